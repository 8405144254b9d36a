"""``shmstore demo``: a coordinator and a pool of workers sharing a cache and counters.

What runs:

- the coordinator, started with :func:`shmstore.serve` for a store ``demo-<pid>``;
- the parent (this process) seeds the store, prints live stats once a second, then
  stops the workers, prints a summary and checks it;
- N worker processes (``multiprocessing``, default start method). Each gets only the
  store name and ints, connects by name, and runs a web-cache-like mix:

  ====  ======================================================================
  70%   ``get`` one product record (skewed to popular ids); a miss loads the
        record "from the database" and ``put``s it (cache-aside)
  13%   ``get_many`` of 8 products (a cart page)
  5%    ``get_many`` of another worker's 8 wallets: a consistent snapshot must
        always sum to ``WALLET_TOTAL`` (a "torn" read would not)
  8%    ``put`` a product update (price, stock; 1 in 10 discontinues it)
  4%    ``batch``: a new session, an expired one deleted, and a transfer between
        two of the worker's own wallets, applied atomically
  ====  ======================================================================

  Workers count hits, misses and writes locally and add them to shared counters
  (``counter:hits``, all workers on one key) and their own (``counter:hits:w3``) with
  :meth:`Store.incr` about 5 times a second; they publish progress for the live view
  in ``demo:progress:wN`` and stop when ``demo:stop`` appears. At the end each sends
  its totals back as a tuple of ints on a :class:`multiprocessing.Queue`.

The check: every shared counter equals the sum the workers report, every worker's
own counter equals its report, and no wallet snapshot was torn. Ctrl-C or SIGTERM
stop everything (workers, coordinator) and destroy the store: nothing is left in
``/dev/shm``.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import sys
import time
import traceback
from typing import TextIO

import msgspec

import shmstore
from shmstore import _layout as L
from shmstore._errors import CoordinatorRunningError, CoordinatorUnavailableError, ShmStoreError
from shmstore._liveness import pid_alive, process_start_ms
from shmstore._shm import open_segment

from ._format import human, micros
from ._stress_workers import HIST_BUCKETS as _HIST_BUCKETS
from ._stress_workers import hist_index, hist_quantile

#: What each worker sends back, in this order, as plain ints.
REPORT_FIELDS = ("worker", "reads", "hits", "misses", "get_many", "writes", "batches",
                 "retries", "snapshots", "torn", "failed", "read_ns", "read_n", "read_max",
                 "write_ns", "write_n", "write_max")
#: after REPORT_FIELDS each report carries two latency histograms (gets, then waited
#: writes), HIST_BUCKETS ints each; see ``_stress_workers.hist_index``.
HIST_BUCKETS = _HIST_BUCKETS
COUNTERS = ("hits", "misses", "writes")
WALLETS = 8
WALLET_START = 1000
WALLET_TOTAL = WALLETS * WALLET_START
SESSIONS_KEPT = 32  # sessions per worker before the oldest expires
FLUSH_EVERY = 0.2  # seconds between counter flushes / progress updates in a worker
CHECK_EVERY = 32  # ops between looks at the stop flag
STOP_KEY = "demo:stop"
#: [pid, start ms] of the demo process that owns the store: a later demo removes the
#: store only once that very process is gone (a reused pid has another start time)
OWNER_KEY = "demo:owner"
SHOW_WORKERS = 16  # rows of the summary table; the totals count every worker
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

_CATEGORIES = ("books", "garden", "kitchen", "games", "tools", "music", "outdoor", "toys")
_WORDS = ("red", "steel", "quiet", "smart", "mini", "classic", "eco", "pro", "ultra", "soft")


class _Stop(Exception):
    """SIGTERM in the parent: clean up as for Ctrl-C."""


# -- records -------------------------------------------------------------------------


def product(i: int, rng: random.Random, by: int = -1) -> dict:
    """A product record as a cache would hold it (about 200 bytes of msgpack)."""
    return {
        "id": i,
        "name": f"{rng.choice(_WORDS)} {rng.choice(_WORDS)} {_CATEGORIES[i % len(_CATEGORIES)][:-1]} {i}",
        "category": _CATEGORIES[i % len(_CATEGORIES)],
        "price_cents": rng.randrange(199, 99_999),
        "stock": rng.randrange(0, 500),
        "rating": round(rng.uniform(1, 5), 1),
        "tags": rng.sample(_WORDS, 3),
        "updated_by": by,
        "updated_at": time.time(),
    }


def session(w: int, n: int, keys: int, rng: random.Random) -> dict:
    return {
        "user": f"user-{rng.randrange(100_000)}",
        "worker": w,
        "seq": n,
        "cart": [rng.randrange(keys) for _ in range(rng.randrange(1, 6))],
        "started_at": time.time(),
    }


def _pkey(i: int) -> str:
    return f"product:{i}"


def _wkey(w: int, j: int) -> str:
    return f"wallet:w{w}:{j}"


# -- the worker ----------------------------------------------------------------------


def worker_main(name: str, w: int, workers: int, keys: int, seed: int, parent: int, parent_start: int,
                reports) -> None:
    """One worker process: run the mix until ``demo:stop`` (or until the demo process
    ``parent``, started at ``parent_start`` ms, is gone), then send its counts on ``reports``.

    ``parent`` is a pid, not ``os.getppid()``: under the forkserver start method the
    worker's parent is the fork server.
    """
    # The parent stops us (Ctrl-C is its to handle); SIGTERM kills us outright. Both
    # were blocked across the fork, so nothing arrived before these took effect.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    t = dict.fromkeys(REPORT_FIELDS, 0)
    t["worker"] = w
    t["rh"], t["wh"] = [0] * HIST_BUCKETS, [0] * HIST_BUCKETS
    try:
        with shmstore.connect(name, timeout=2.0) as store:
            _work(store, w, workers, keys, random.Random(seed), t, parent, parent_start)
    except ShmStoreError as e:
        t["failed"] = 1
        if not pid_alive(parent, parent_start):
            return  # the demo was killed, and its coordinator stopped with it: no news
        first = str(e).split(". ")[0]  # the rest is advice for interactive use
        print(f"demo worker w{w} stopped: {type(e).__name__}: {first}", file=sys.stderr)
    except Exception:  # noqa: BLE001 - report any bug, and still send the report
        traceback.print_exc()
        t["failed"] = 1
    reports.put(tuple(int(t[f]) for f in REPORT_FIELDS) + tuple(t["rh"]) + tuple(t["wh"]))


def _work(store: shmstore.Store, w: int, workers: int, keys: int, rng: random.Random, t: dict,
          parent: int, parent_start: int) -> None:
    get, get_many = store.get, store.get_many
    clock = time.perf_counter_ns

    def put(key: str, value: object) -> None:
        t0 = clock()
        store.put(key, value)
        _note(t, "write", clock() - t0)
    flushed = dict.fromkeys(COUNTERS, 0)  # Invariant: what counter:C:wN holds
    wallets = [WALLET_START] * WALLETS  # Invariant: only this worker writes its wallets
    n_sessions = 0
    id_space = keys + keys // 4 + 1  # ids past `keys` start missing: real misses
    next_flush = time.monotonic() + FLUSH_EVERY
    while not get(STOP_KEY):
        for _ in range(CHECK_EVERY):
            r = rng.random()
            if r < 0.70:
                i = int(id_space * rng.random() ** 2)
                t["reads"] += 1
                t0 = clock()
                v = get(_pkey(i))
                _note(t, "read", clock() - t0)
                if v is not None:
                    t["hits"] += 1
                else:
                    t["misses"] += 1
                    put(_pkey(i), product(i, rng, w))  # cache-aside fill
                    t["writes"] += 1
            elif r < 0.83:
                ids = [int(id_space * rng.random() ** 2) for _ in range(8)]
                found = sum(v is not None for v in get_many([_pkey(i) for i in ids]))
                t["reads"] += 8
                t["get_many"] += 1
                t["hits"] += found
                t["misses"] += 8 - found
            elif r < 0.88:
                v = rng.randrange(workers)
                balances = get_many([_wkey(v, j) for j in range(WALLETS)])
                t["reads"] += WALLETS
                t["get_many"] += 1
                t["snapshots"] += 1
                if sum(b or 0 for b in balances) != WALLET_TOTAL:
                    t["torn"] += 1
            elif r < 0.96:
                i = int(id_space * rng.random() ** 2)
                if rng.random() < 0.1:
                    t0 = clock()
                    store.delete(_pkey(i))  # discontinued
                    _note(t, "write", clock() - t0)
                else:
                    put(_pkey(i), product(i, rng, w))
                t["writes"] += 1
            else:
                a, b = rng.sample(range(WALLETS), 2)
                amount = rng.randrange(0, wallets[a] + 1)
                t0 = clock()
                with store.batch() as batch:
                    batch.put(f"session:w{w}:{n_sessions}", session(w, n_sessions, keys, rng))
                    if n_sessions >= SESSIONS_KEPT:
                        batch.delete(f"session:w{w}:{n_sessions - SESSIONS_KEPT}")
                    batch.put(_wkey(w, a), wallets[a] - amount)
                    batch.put(_wkey(w, b), wallets[b] + amount)
                _note(t, "write", clock() - t0)
                wallets[a] -= amount  # applied: the batch raised nothing
                wallets[b] += amount
                n_sessions += 1
                t["batches"] += 1
                t["writes"] += 1
        if time.monotonic() >= next_flush:
            if not pid_alive(parent, parent_start):
                return  # the demo was killed: nobody will read a report
            _flush(store, w, t, flushed)
            next_flush = time.monotonic() + FLUSH_EVERY
    _flush(store, w, t, flushed)


def _note(t: dict, kind: str, ns: int) -> None:
    """Count one timed get or waited write in the worker's totals and histogram."""
    t[kind + "_ns"] += ns
    t[kind + "_n"] += 1
    if ns > t[kind + "_max"]:
        t[kind + "_max"] = ns
    t["rh" if kind == "read" else "wh"][hist_index(ns)] += 1


def _flush(store: shmstore.Store, w: int, t: dict, flushed: dict) -> None:
    """Add what was counted since the last flush to the shared and own counters;
    publish progress for the live view."""
    for c in COUNTERS:
        d = t[c] - flushed[c]
        if d:
            store.incr(f"counter:{c}", d)  # every worker adds to this one key
            store.incr(f"counter:{c}:w{w}", d)
            flushed[c] += d
    t["retries"] = store._counters.totals()[1]  # this handle's read retries
    store.put(f"demo:progress:w{w}", [t["reads"], t["writes"], t["retries"], t["read_ns"], t["read_n"],
                                      t["write_ns"], t["write_n"]], wait=False)


# -- the parent ----------------------------------------------------------------------


def run_demo(*, workers: int = 4, seconds: float = 5.0, keys: int = 1000, out: TextIO | None = None) -> int:
    """Run the demo; returns the exit code (0: the consistency check passed).

    Whatever happens (an error, Ctrl-C, SIGTERM), the workers and the coordinator are
    stopped and the store is destroyed before this returns.
    """
    out = out or sys.stdout
    name = f"demo-{os.getpid()}"
    for stale in remove_stale_demos():
        _say(out, f"removed {stale!r}, left by a demo that was killed")
    run = _Run(name, workers, seconds, keys, out)
    old_term = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        return run.main()
    except (KeyboardInterrupt, _Stop):
        _say(out, "\ninterrupted: stopping the workers and the coordinator")
        run.aborted = True
        return EXIT_INTERRUPTED
    finally:
        # Let the cleanup finish (it is bounded: joins and stops have timeouts).
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            left = run.cleanup()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        if left:
            print(f"shmstore: error: the demo left {', '.join(left)} in /dev/shm", file=sys.stderr)


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


class _Run:
    """One demo run: the store, the coordinator, the workers, and their reports."""

    def __init__(self, name: str, workers: int, seconds: float, keys: int, out: TextIO) -> None:
        self.name = name
        self.workers = workers
        self.seconds = seconds
        self.keys = keys
        self.out = out
        self.coord: shmstore.Coordinator | None = None
        self.store: shmstore.Store | None = None
        self.procs: list = []
        self.reports_q = None
        self.reports: dict[int, dict[str, int]] = {}
        self.aborted = False  # Ctrl-C / SIGTERM: terminate the workers, ask nothing
        self.start_ms = process_start_ms(os.getpid()) or 0
        per_worker = WALLETS + SESSIONS_KEPT + 2 + 1 + len(COUNTERS)
        self.capacity = 2 * (keys + keys // 4 + 1 + workers * per_worker + len(COUNTERS) + 8)

    def main(self) -> int:
        destroy_quietly(self.name)  # a dead process with our pid may have left it
        # Small queues (the demo's largest request is a 100-record seed batch) keep the
        # write channel at ~130 KiB per client, for a small /dev/shm (Docker: 64 MiB).
        self.coord = shmstore.serve(self.name, capacity=self.capacity, key_size=64, value_size=1024,
                                    max_clients=self.workers + 4, ring_size=64 * 1024,
                                    reply_size=64 * 1024)
        self.store = store = shmstore.connect(self.name)
        store.put(OWNER_KEY, [os.getpid(), self.start_ms])
        self._seed()
        _say(self.out, f"shmstore demo: store {self.name!r}, coordinator pid {self.coord.pid}, "
                       f"{self.workers} workers, {self.seconds:g} s")
        _say(self.out, f"  seeded {self.keys:,} products and {self.workers * WALLETS} wallets; "
                       f"workers do ~88% get/get_many,\n  ~12% put/delete/batch, and add to shared "
                       f"counters with incr (Ctrl-C aborts)")
        self._start_workers()
        t0 = time.monotonic()
        self._live(t0)
        store.put(STOP_KEY, True)
        elapsed = time.monotonic() - t0
        self._collect(deadline=time.monotonic() + 30.0)
        return self._summary(elapsed)

    def _seed(self) -> None:
        store = self.store
        rng = random.Random(0)
        for lo in range(0, self.keys, 100):
            with store.batch() as batch:
                for i in range(lo, min(lo + 100, self.keys)):
                    batch.put(_pkey(i), product(i, rng))
        for w in range(self.workers):
            with store.batch() as batch:
                for j in range(WALLETS):
                    batch.put(_wkey(w, j), WALLET_START)

    def _start_workers(self) -> None:
        ctx = multiprocessing.get_context()
        self.reports_q = ctx.Queue()
        seed = random.randrange(1 << 30)
        # Children start with SIGINT and SIGTERM blocked, so neither can hit one before
        # it sets its own dispositions (not this process's handlers, which fork copies).
        # Here they stay pending until the unblock.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for w in range(self.workers):
                p = ctx.Process(target=worker_main, name=f"shmstore-demo-w{w}", daemon=True,
                                args=(self.name, w, self.workers, self.keys, seed + w, os.getpid(),
                                      self.start_ms, self.reports_q))
                p.start()
                self.procs.append(p)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _progress(self) -> list[int]:
        """[reads, writes, retries, read ns, timed reads, write ns, timed writes], summed."""
        total = [0] * 7
        for w in range(self.workers):
            p = self.store.get(f"demo:progress:w{w}")
            if p:
                total = [a + b for a, b in zip(total, p)]
        return total

    def _live(self, t0: float) -> None:
        store = self.store
        _say(self.out, "")
        _say(self.out, "   time   reads/s  writes/s     ops/s  groups/s  avg group  retries  get avg  "
                       "write avg   records")
        end = t0 + self.seconds
        prev = (t0, store.stats(), self._progress())
        tick = t0
        while True:
            tick = min(tick + 1.0, end)
            time.sleep(max(0.0, tick - time.monotonic()))
            now = time.monotonic()
            st, pr = store.stats(), self._progress()
            dt = max(now - prev[0], 1e-9)
            dgroups = st.groups - prev[1].groups
            avg = (st.frames - prev[1].frames) / dgroups if dgroups else 0.0
            d = [a - b for a, b in zip(pr, prev[2])]
            read_avg = micros(d[3] / d[4]) if d[4] else "-"
            write_avg = micros(d[5] / d[6]) if d[6] else "-"
            _say(self.out, f"{now - t0:>6.1f}s {human(d[0] / dt):>9} "
                           f"{human(d[1] / dt):>9} {human((st.ops - prev[1].ops) / dt):>9} "
                           f"{human(dgroups / dt):>9} {avg:>10.2f} {pr[2]:>8,} {read_avg:>8} "
                           f"{write_avg:>10} {st.records:>9,}")
            prev = (now, st, pr)
            if not self.coord.alive():
                raise CoordinatorUnavailableError(
                    f"the demo's coordinator (pid {self.coord.pid}) stopped unexpectedly "
                    f"(exit code {self.coord.returncode})")
            if now >= end or not any(p.is_alive() for p in self.procs):
                return

    def _collect(self, deadline: float) -> None:
        """Take every worker's report off the queue, then reap the workers."""
        while len(self.reports) < self.workers and time.monotonic() < deadline:
            try:
                row = self.reports_q.get(timeout=0.2)
            except queue.Empty:
                if not any(p.is_alive() for p in self.procs):
                    try:
                        row = self.reports_q.get(timeout=0.5)  # a last one in the pipe
                    except queue.Empty:
                        break
                else:
                    continue
            nf = len(REPORT_FIELDS)
            rep = dict(zip(REPORT_FIELDS, row[:nf]))
            rep["rh"], rep["wh"] = list(row[nf:nf + HIST_BUCKETS]), list(row[nf + HIST_BUCKETS:])
            self.reports[rep["worker"]] = rep
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))

    def _summary(self, elapsed: float) -> int:
        store, out = self.store, self.out
        st = store.stats()
        reps = [self.reports[w] for w in sorted(self.reports)]
        total = {f: sum(r[f] for r in reps) for f in REPORT_FIELDS}
        rh = [sum(col) for col in zip(*(r["rh"] for r in reps))] if reps else []
        wh = [sum(col) for col in zip(*(r["wh"] for r in reps))] if reps else []
        cols = ("reads", "hits", "misses", "get_many", "writes", "batches", "retries", "torn")
        widths = (11, 10, 8, 10, 8, 9, 9, 6)
        line = "-" * (8 + sum(widths))
        _say(out, f"\nsummary: {elapsed:.1f} s, {self.workers} workers, store {self.name!r}")
        _say(out, "  worker" + "".join(f"{c:>{wd}}" for c, wd in zip(cols, widths)))
        _say(out, "  " + line[2:])
        for r in reps[:SHOW_WORKERS]:
            _say(out, f"  w{r['worker']:<5}" + "".join(f"{r[c]:>{wd},}" for c, wd in zip(cols, widths)))
        if len(reps) > SHOW_WORKERS:
            _say(out, f"  ... and {len(reps) - SHOW_WORKERS} more workers")
        _say(out, "  " + line[2:])
        _say(out, "  all   " + "".join(f"{total[c]:>{wd},}" for c, wd in zip(cols, widths)))
        avg = st.frames / st.groups if st.groups else 0.0
        hit_rate = 100 * total["hits"] / max(1, total["hits"] + total["misses"])
        _say(out, f"\n  workers      {human(total['reads'] / elapsed)} reads/s, "
                  f"{human(total['writes'] / elapsed)} writes/s, hit rate {hit_rate:.1f}%")
        _say(out, f"  coordinator  {st.ops:,} ops applied, {st.groups:,} groups, "
                  f"avg group {avg:.2f} (max {st.max_group})")
        _say(out, f"  store        {st.records:,} of {st.capacity:,} records, {st.errors:,} errors, "
                  f"{st.fallback_reads:,} get_many fallbacks")
        _say(out, f"  get latency  {_lat(rh, max((r['read_max'] for r in reps), default=0))}")
        _say(out, f"  write        {_lat(wh, max((r['write_max'] for r in reps), default=0))} "
                  f"(put, delete, batch; waited)")
        _say(out, f"  retries      {total['retries']:,} reads met a write in progress and read again")

        ok = True
        _say(out, "\nconsistency check")

        def check(label: str, good: bool, detail: str, why: str = "") -> None:
            nonlocal ok
            ok &= good
            _say(out, f"  {label:<16}{detail:<50}{'OK' if good else 'MISMATCH'}")
            if why:
                _say(out, f"  {'':<16}{why}")

        for c in COUNTERS:
            have = store.get(f"counter:{c}", 0)
            check(f"counter:{c}", have == total[c], f"{have:>12,} = workers' sum {total[c]:,}")
        bad = [f"w{r['worker']}:{c}" for r in reps for c in COUNTERS
               if store.get(f"counter:{c}:w{r['worker']}", 0) != r[c]]
        n = len(reps) * len(COUNTERS)
        check("own counters", not bad, f"{n - len(bad)} of {n} equal each worker's report",
              f"differ: {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}" if bad else "")
        check("wallets", total["torn"] == 0,
              f"{total['snapshots']:>12,} get_many snapshots, {total['torn']} torn")
        missing = [f"w{w}" for w in range(self.workers) if w not in self.reports]
        failed = [f"w{r['worker']}" for r in reps if r["failed"]]
        check("workers", not missing and not failed,
              f"{len(reps) - len(failed)} of {self.workers} finished cleanly",
              (f"failed: {', '.join(failed)} " if failed else "")
              + (f"no report: {', '.join(missing)}" if missing else ""))
        _say(out, f"\nresult: {'OK' if ok else 'MISMATCH'}")
        return EXIT_OK if ok else EXIT_FAILED

    def cleanup(self) -> list[str]:
        """Stop the workers, then the coordinator; destroy the store. Returns leftovers."""
        alive = [p for p in self.procs if p.is_alive()]
        if (alive and not self.aborted and self.store is not None and self.coord is not None
                and self.coord.alive()):
            try:
                self.store.put(STOP_KEY, True, timeout=1.0)
            except ShmStoreError:
                pass  # the coordinator is going away: terminate them below
            for p in alive:
                p.join(3.0)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
        if self.reports_q is not None:
            self.reports_q.close()
            self.reports_q.cancel_join_thread()
        if self.store is not None:
            self.store.close()
        if self.coord is not None:
            self.coord.stop()
        destroy_quietly(self.name)
        return L.store_entries(self.name)


def _lat(hist: list[int], mx: int) -> str:
    if not hist or not sum(hist):
        return "-"
    return (f"p50 {micros(hist_quantile(hist, 0.5))}, p99 {micros(hist_quantile(hist, 0.99))}, "
            f"max {micros(mx)}")


def destroy_quietly(name: str) -> None:
    try:
        shmstore.destroy(name)
    except CoordinatorRunningError:
        raise
    except ShmStoreError:
        pass  # half-made leftovers: destroy() unlinks what it can


def remove_stale_demos() -> list[str]:
    """Destroy demo stores whose demo process is gone (a ``kill -9`` leaves them)."""
    removed = []
    for name in L.shm_entries():
        if not (name.startswith("demo-") and name[5:].isdigit()) or _owner_alive(name):
            continue
        try:
            shmstore.destroy(name)
        except ShmStoreError:
            continue  # its coordinator still runs (it stops within a tick of its parent)
        removed.append(name)
    return removed


def _owner_alive(name: str) -> bool:
    """True while the demo process that made store ``demo-<pid>`` may still run it."""
    pid = int(name[5:])
    try:
        seg = open_segment(name, timeout=0.1)
    except ShmStoreError:
        seg = None  # no readable segment: the demo died before (or while) making it
    owner = None
    if seg is not None:
        try:
            found = seg.lookup(OWNER_KEY.encode())
            if found is not None:
                owner = msgspec.msgpack.decode(found[3])
        except (ShmStoreError, msgspec.DecodeError):
            pass
        finally:
            seg.close()
    if owner is None:
        # Not recorded yet: no start time to check against, so any process with the pid
        # keeps the store (never a live demo's store removed).
        return process_start_ms(pid) is not None
    return pid_alive(owner[0], owner[1])
