#!/usr/bin/env python3
"""Replica stores against Redis (issue 18): lag, writes/s through Redis, local reads/s.

A replica (``shmstore.serve(name, upstream="redis://...", upstream_name=DATASET)``)
sends its writes to Redis (one Lua step each, one round trip per coordinator group)
and applies Redis's change stream; its reads are local shared-memory reads. Several
replicas of one dataset under different store names stand for several hosts. This
script starts a private ``redis-server`` (127.0.0.1, a free TCP port, ``--save ''
--appendonly no``, a temporary directory), serves the replicas it needs, and measures,
in one run, on one machine (every peer in this process tree):

1. **Replica lag under load.** Replicas A and B. On A one process does sync puts of
   key ``lag`` whose value is ``time.time_ns()`` (its own ack latency is timed), while
   another does pipelined puts (``wait=False``) of other keys at full speed. On B one
   process polls ``get("lag")`` every 0.1 ms (sleeping between polls: a reader that
   spun would take one of the machine's cores from the replicas); each new value (each is unique, so a new value is a
   new version) gives a lag sample ``time.time_ns() - value``: from the writer's call
   to the write being readable on the other host. The same again without the
   background writer is the baseline (a fresh pair of replicas each time).
2. **Writes/s through Redis from 1, 2 and 4 hosts** (``--hosts``). N replicas of a fresh
   dataset, one writer process per replica, all released together: sync puts
   (``store.put(k, v)``) for ``--seconds``, then pipelined puts (``wait=False``, then
   ``store.flush()``, included in the time). Values are 100 bytes; each writer cycles
   over ``--keys`` keys of its own. The peer row: redis-py ``SET`` from N processes
   (protocol 2) on the same Redis, sync and in pipelines of 100 (``transaction=False``).
   Reported: acknowledged writes/s of all writers together (total writes / the slowest
   writer's time).
3. **Reads/s on a replica vs redis-py.** ``--keys`` keys with 100-byte values written
   through a replica, and the same keys as plain Redis strings. One reader process at
   a time (the rows run one after another): the replica's ``store.get(key)``, redis-py
   ``r.get(key)`` (protocol 2), and redis-py's client-side cache (protocol 3,
   ``cache_config=CacheConfig(max_size=2 x keys)``, warmed until every key is cached),
   each over the same pseudo-random key sequence, and over one hot key. redis-py's
   client-side cache needs Redis 7.4 or later (redis-py refuses older servers): on an
   older ``redis-server`` its row says so instead of a number.

The machine's cores are shared by everything: Redis, every replica's coordinator and
every writer or reader process (on a 2-core machine, N=4 is 4 coordinators, 4 writers
and Redis on 2 cores). Numbers are only comparable within one run. Times are taken
with ``time.perf_counter`` (latencies: ``perf_counter_ns``; the lag: ``time_ns``, the
one clock both processes share). Nothing here asserts a speed.

    python scripts/replica_bench.py                     # Markdown table, ~1-2 minutes
    python scripts/replica_bench.py --json              # JSON instead
    python scripts/replica_bench.py --seconds 1 --keys 2000 --hosts 1,2

Needs ``pip install -e '.[dev]'`` (redis, hiredis) and ``redis-server`` on PATH. Every
store it serves (named ``rbench-<pid>-...``) is stopped and destroyed at the end, and
redis-server stopped and its directory removed, also after Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from typing import Any

import shmstore
from shmstore._tools._bench._peers import stop_process

CTX = multiprocessing.get_context("fork")
#: Every value written is this many bytes.
VALUE_BYTES = 100
VALUE = b"v" * VALUE_BYTES
#: Store names start with this and the script's pid.
STORE_PREFIX = "rbench-"
#: redis-py pipelines this many SETs per round trip.
REDIS_BATCH = 100
#: The readers cycle over this many pseudo-random key indexes (seeded: the same for all).
READ_SEQUENCE = 1 << 16
#: the lag reader's pause between polls (seconds)
POLL_S = 0.0001
#: set (to a version) by --csc-version-floor for the client-side cache's reader process
CSC_FLOOR_ENV = "SHMSTORE_BENCH_CSC_FLOOR"
READ_SEED = 18
#: The readers look at the clock after this many reads.
READ_CHUNK = 256
#: Seconds to wait for a worker's result past its measuring time.
RESULT_GRACE = 60.0
START_TIMEOUT = 10.0


# -- cleanup ---------------------------------------------------------------------------


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (a cleanup is not cut short; the
    signal then interrupts what follows)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- redis-server ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A private redis-server on 127.0.0.1 (a free port), no persistence, its own
    temporary directory. Its own session, so a Ctrl-C reaches only this script, which
    stops it in :meth:`stop` (SIGTERM, then SIGKILL; idempotent; removes the directory).
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rbench-redis-")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.version = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        """Start and wait until it answers PING (a new port if the chosen one was taken).

        Raises:
            RuntimeError: redis-server is not on PATH, or did not come up.
        """
        import redis  # noqa: PLC0415

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH (Debian/Ubuntu: apt-get install -y redis-server)")
        self.version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                      check=False).stdout.strip()
        log = os.path.join(self.dir, "redis.log")
        for _ in range(5):
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--logfile", log],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as c:
                        if c.ping():
                            return self
                except redis.RedisError:
                    time.sleep(0.02)
            if self.proc.poll() is None:
                break  # it runs but does not answer: give up
            self.proc = None  # exited: most likely the port was taken meanwhile; retry
        self.stop()
        raise RuntimeError(f"redis-server did not come up on 127.0.0.1; see its log: {log}")

    def stop(self) -> None:
        with _uninterrupted():
            p, self.proc = self.proc, None
            stop_process(p)
            shutil.rmtree(self.dir, ignore_errors=True)


# -- the replicas -------------------------------------------------------------------------


class Replicas:
    """The replicas this run serves: each :meth:`serve` is stopped and destroyed by
    :meth:`close` (idempotent; ``close`` of a dataset's replicas once it is measured)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.served: list[tuple[str, shmstore.Coordinator | None]] = []
        self._n = 0

    def serve(self, dataset: str, *, capacity: int) -> str:
        self._n += 1
        name = f"{STORE_PREFIX}{os.getpid()}-{self._n}"
        # (Not under _uninterrupted(): the coordinator would inherit the blocked signals.)
        self.served.append((name, None))  # destroyed even if serve() fails halfway
        coord = shmstore.serve(name, upstream=self.url, upstream_name=dataset, capacity=capacity,
                               value_size=2 * VALUE_BYTES + 56, key_size=32, upstream_timeout=5.0)
        self.served[-1] = (name, coord)
        return name

    def close(self) -> None:
        with _uninterrupted():
            served, self.served = self.served, []
            for _, coord in served:
                if coord is not None:
                    coord.stop(timeout=10)
            for name, _ in served:
                shmstore.destroy(name)


def _dataset(tag: str) -> str:
    return f"rbench{os.getpid()}{tag}"


# -- worker processes (forked; each puts one dict into ``out``) ---------------------------


def _child(out: Any, i: int, fn: Any, barrier: Any, *args: Any) -> None:
    """A worker process: puts ``(i, fn(barrier, *args))``, or ``(i, {"error": traceback})``
    after breaking the barrier (so the other workers do not wait for this one)."""
    try:
        res = fn(barrier, *args)
    except BaseException:  # noqa: BLE001 -- reported to the parent, which raises it
        barrier.abort()
        res = {"error": traceback.format_exc()}
    out.put((i, res))


def _run(jobs: list[tuple[Any, tuple]], timeout: float) -> list[dict]:
    """One process per ``(fn, args)``, called as ``fn(barrier, *args)``: each calls
    ``barrier.wait()`` once it is ready to measure, so all start together. Returns the
    results in job order. Every process is reaped here, killed if it outlives
    ``timeout``.

    Raises:
        RuntimeError: a worker failed (with its traceback).
    """
    out = CTX.Queue()
    barrier = CTX.Barrier(len(jobs), timeout=START_TIMEOUT * 3)
    procs = []
    got: dict[int, dict] = {}
    try:
        for i, (fn, args) in enumerate(jobs):
            p = CTX.Process(target=_child, args=(out, i, fn, barrier, *args), daemon=True)
            p.start()
            procs.append(p)
        for _ in jobs:
            i, res = out.get(timeout=timeout)
            got[i] = res
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r["error"] for r in got.values() if "error" in r]
    if errors:
        raise RuntimeError("a worker failed:\n" + "\n".join(errors))
    return [got[i] for i in range(len(jobs))]


def _lag_writer(barrier: Any, name: str, seconds: float) -> dict:
    s = shmstore.connect(name)
    try:
        put, clock, now_ns = s.put, time.perf_counter_ns, time.time_ns
        put("lag", now_ns())
        acks = []
        barrier.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = clock()
            put("lag", now_ns())
            acks.append(clock() - t)
        put("lag", -1)  # tells the reader to stop
        return {"acks_ns": acks}
    finally:
        s.close()


def _load_writer(barrier: Any, name: str, seconds: float, keys: int) -> dict:
    s = shmstore.connect(name)
    try:
        put = s.put
        barrier.wait()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        n = 0
        while time.perf_counter() < deadline:
            for _ in range(64):
                put(f"bg{n % keys}", VALUE, wait=False)
                n += 1
        s.flush()
        return {"ops": n, "elapsed": time.perf_counter() - t0}
    finally:
        s.close()


def _lag_reader(barrier: Any, name: str, seconds: float) -> dict:
    s = shmstore.connect(name)
    try:
        get, now_ns, sleep = s.get, time.time_ns, time.sleep
        deadline = time.monotonic() + START_TIMEOUT
        while get("lag") is None:  # the writer's first put, before the barrier
            if time.monotonic() > deadline:
                raise TimeoutError("the writer's first put did not reach this replica")
            time.sleep(0.001)
        barrier.wait()
        last = get("lag")
        lags = []
        deadline = time.perf_counter() + seconds + RESULT_GRACE / 2  # if the writer never says stop
        while time.perf_counter() < deadline:
            v = get("lag")
            if v != last:
                t = now_ns()
                if v == -1:
                    return {"lags_ns": lags}
                lags.append(t - v)
                last = v
            sleep(POLL_S)  # a reader that polls, not one that takes a core from the others
        raise TimeoutError("the writer's last put (-1) did not reach this replica")
    finally:
        s.close()


def _shm_writer(barrier: Any, name: str, idx: int, keys: int, seconds: float, pipelined: bool) -> dict:
    s = shmstore.connect(name)
    try:
        put = s.put
        ks = [f"w{idx}-{j}" for j in range(keys)]
        barrier.wait()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        n = 0
        if pipelined:
            while time.perf_counter() < deadline:
                for _ in range(64):
                    put(ks[n % keys], VALUE, wait=False)
                    n += 1
            s.flush()
        else:
            while time.perf_counter() < deadline:
                put(ks[n % keys], VALUE)
                n += 1
        return {"ops": n, "elapsed": time.perf_counter() - t0}
    finally:
        s.close()


def _redis_writer(barrier: Any, port: int, idx: int, keys: int, seconds: float, pipelined: bool) -> dict:
    import redis  # noqa: PLC0415

    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        ks = [f"rw{idx}-{j}" for j in range(keys)]
        r.ping()
        barrier.wait()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        n = 0
        if pipelined:
            p = r.pipeline(transaction=False)
            while time.perf_counter() < deadline:
                for _ in range(REDIS_BATCH):
                    p.set(ks[n % keys], VALUE)
                    n += 1
                p.execute()
        else:
            set_ = r.set
            while time.perf_counter() < deadline:
                set_(ks[n % keys], VALUE)
                n += 1
        return {"ops": n, "elapsed": time.perf_counter() - t0}
    finally:
        r.close()


def _reader(barrier: Any, kind: str, target: Any, keys: int, seconds: float, hot: bool) -> dict:
    """Reads/s of one client: ``kind`` is shmstore (target: store name), redis or
    redis-csc (target: port)."""
    rng = random.Random(READ_SEED)
    names = [f"k{i}" for i in range(keys)]
    seq = [names[0]] * READ_SEQUENCE if hot else [names[rng.randrange(keys)] for _ in range(READ_SEQUENCE)]
    close = None
    if kind == "shmstore":
        s = shmstore.connect(target)
        get, close = s.get, s.close
    else:
        import redis  # noqa: PLC0415

        if kind == "redis":
            r = redis.Redis(host="127.0.0.1", port=target)
        else:
            from redis.cache import CacheConfig  # noqa: PLC0415
            from redis.connection import CacheProxyConnection  # noqa: PLC0415

            if CSC_FLOOR_ENV in os.environ:
                # redis-py refuses servers older than 7.4 "to maximize compatibility with
                # all Redis products"; the tracking it relies on (CLIENT TRACKING, RESP3
                # invalidation pushes) is in Redis since 6.0. The report says when this is used.
                CacheProxyConnection.MIN_ALLOWED_VERSION = os.environ[CSC_FLOOR_ENV]
            r = redis.Redis(host="127.0.0.1", port=target, protocol=3,
                            cache_config=CacheConfig(max_size=2 * keys))
            try:
                r.ping()
            except redis.ConnectionError as e:
                r.close()
                barrier.wait()
                return {"skipped": str(e)}
        get, close = r.get, r.close
    try:
        for _ in range(2 if kind == "redis-csc" else 1):  # checks every key; the 2nd pass: all cache hits
            for k in names:
                if get(k) != VALUE:
                    raise AssertionError(f"{kind}: {k} does not hold the loaded value")
        if kind == "redis-csc":
            cached = r.get_cache().size
            if cached < keys:
                raise AssertionError(f"redis-py's cache holds {cached} of {keys} keys after warming")
        barrier.wait()
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        chunks = [seq[i:i + READ_CHUNK] for i in range(0, len(seq), READ_CHUNK)]
        while True:
            for chunk in chunks:
                for k in chunk:
                    get(k)
                n += len(chunk)
                if time.perf_counter() >= deadline:
                    return {"ops": n, "elapsed": time.perf_counter() - t0}
    finally:
        close()


# -- the measurements -----------------------------------------------------------------------


def _pct(ns: list[int], q: float) -> float:
    """The ``q`` quantile of ``ns`` (nearest rank), in milliseconds."""
    if not ns:
        return float("nan")
    s = sorted(ns)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e6


def _rate(results: list[dict]) -> float:
    return sum(r["ops"] for r in results) / max(r["elapsed"] for r in results)


def measure_lag(redis_p: RedisProcess, seconds: float, keys: int) -> dict:
    """The lag, and the sync writer's ack latency, with the background load on A and,
    as the baseline, without it (each on a fresh pair of replicas)."""
    out = {}
    for variant in ("unloaded", "loaded"):
        reps = Replicas(redis_p.url)
        try:
            ds = _dataset(f"lag{variant}")
            a = reps.serve(ds, capacity=keys + 100)
            b = reps.serve(ds, capacity=keys + 100)
            jobs = [(_lag_writer, (a, seconds)), (_lag_reader, (b, seconds))]
            if variant == "loaded":
                jobs.append((_load_writer, (a, seconds, keys)))
            res = _run(jobs, seconds + RESULT_GRACE)
        finally:
            reps.close()
        lags, acks = res[1]["lags_ns"], res[0]["acks_ns"]
        row = {"lag_ms": {"p50": _pct(lags, 0.5), "p99": _pct(lags, 0.99), "count": len(lags)},
               "ack_ms": {"p50": _pct(acks, 0.5), "p99": _pct(acks, 0.99), "count": len(acks)}}
        if variant == "loaded":
            row["background_puts_per_s"] = res[2]["ops"] / res[2]["elapsed"]
        out[variant] = row
    return out


def measure_writes(redis_p: RedisProcess, seconds: float, keys: int, hosts: list[int]) -> list[dict]:
    rows = []
    for n in hosts:
        row: dict[str, Any] = {"hosts": n}
        reps = Replicas(redis_p.url)
        try:
            ds = _dataset(f"w{n}")
            stores = [reps.serve(ds, capacity=n * keys + 100) for _ in range(n)]
            for mode, pipelined in (("sync", False), ("pipelined", True)):
                res = _run([(_shm_writer, (s, i, keys, seconds, pipelined)) for i, s in enumerate(stores)],
                           seconds + RESULT_GRACE)
                row[f"shmstore_{mode}"] = _rate(res)
        finally:
            reps.close()
        for mode, pipelined in (("sync", False), ("pipelined", True)):
            res = _run([(_redis_writer, (redis_p.port, i, keys, seconds, pipelined)) for i in range(n)],
                       seconds + RESULT_GRACE)
            row[f"redis_{mode}"] = _rate(res)
        rows.append(row)
    return rows


def measure_reads(redis_p: RedisProcess, seconds: float, keys: int) -> dict:
    import redis  # noqa: PLC0415

    reps = Replicas(redis_p.url)
    try:
        name = reps.serve(_dataset("r"), capacity=keys + 100)
        s = shmstore.connect(name)
        try:
            for i in range(keys):
                s.put(f"k{i}", VALUE, wait=False)
            s.flush()
        finally:
            s.close()
        with redis.Redis(host="127.0.0.1", port=redis_p.port) as r:
            p = r.pipeline(transaction=False)
            for i in range(keys):
                p.set(f"k{i}", VALUE)
            p.execute()
        out: dict[str, dict] = {}
        for kind, target in (("shmstore", name), ("redis", redis_p.port), ("redis-csc", redis_p.port)):
            row: dict[str, Any] = {}
            for pattern, hot in (("random", False), ("hot", True)):
                (res,) = _run([(_reader, (kind, target, keys, seconds, hot))], seconds + RESULT_GRACE)
                if "skipped" in res:
                    row = {"skipped": res["skipped"]}
                    break
                row[pattern] = res["ops"] / res["elapsed"]
            out[kind] = row
    finally:
        reps.close()
    base = out["shmstore"]
    for kind, row in out.items():
        if kind != "shmstore" and "skipped" not in row:
            row["shmstore_ratio"] = {p: base[p] / row[p] for p in ("random", "hot")}
    return out


def environment(redis_p: RedisProcess) -> dict:
    import redis  # noqa: PLC0415

    try:
        import hiredis  # noqa: PLC0415

        parser = f"hiredis {hiredis.__version__}"
    except ImportError:
        parser = "python"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "redis_server": redis_p.version, "redis_py": redis.__version__, "redis_py_parser": parser,
            "shmstore": shmstore.__version__}


# -- the report ------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:,.0f}"


def markdown(res: dict) -> str:
    env, st = res["environment"], res["settings"]
    lines = [
        (f"Replica benchmark: {env['cpus']} CPUs, Python {env['python']}, {env['redis_server'].split(' sha')[0]}, "
         f"redis-py {env['redis_py']} ({env['redis_py_parser']} parser); {st['seconds']} s per measurement, "
         f"{st['keys']} keys, {VALUE_BYTES}-byte values. All processes share the machine's cores."),
        "",
        "### 1. Replica lag under load (A writes, B reads)",
        "",
        "| measure | p50 ms | p99 ms | samples |",
        "|---|---:|---:|---:|",
    ]
    for variant in ("loaded", "unloaded"):
        m = res["lag"][variant]
        what = "with" if variant == "loaded" else "without"
        for label, key in ((f"lag: A's put until B reads it, {what} the load", "lag_ms"),
                           (f"A's sync put ack latency, {what} the load", "ack_ms")):
            lines.append(f"| {label} | {m[key]['p50']:.3f} | {m[key]['p99']:.3f} | {m[key]['count']:,} |")
    lines += ["", (f"The load: another process on A doing pipelined puts at full speed "
               f"({_num(res['lag']['loaded']['background_puts_per_s'])} puts/s) while B's reader spins. "
               "Samples: lag = new values B saw (B may apply several of A's puts at once), "
               "ack = A's sync puts."),
              "", "### 2. Writes/s through Redis (all writers together, acknowledged)", "",
              ("| hosts | shmstore sync put | shmstore pipelined put | redis-py SET | "
               f"redis-py SET, pipelines of {REDIS_BATCH} |"),
              "|---:|---:|---:|---:|---:|"]
    for row in res["writes"]:
        lines.append(f"| {row['hosts']} | {_num(row['shmstore_sync'])} | {_num(row['shmstore_pipelined'])} | "
                     f"{_num(row['redis_sync'])} | {_num(row['redis_pipelined'])} |")
    lines += ["", ("One writer process per host (replica), each on its own keys; redis-py from the same "
               "number of processes on the same Redis."), "",
              "### 3. Reads/s, one reader process", "",
              "| reader | random keys | one hot key | shmstore / this (random) | shmstore / this (hot) |",
              "|---|---:|---:|---:|---:|"]
    floor = res["settings"].get("csc_version_floor")
    labels = {"shmstore": "shmstore replica `get`", "redis": "redis-py `get` (RESP2)",
              "redis-csc": "redis-py client-side cache (RESP3)" + (
                  f" (its 7.4 server floor lowered to {floor})" if floor else "")}
    for kind, row in res["reads"].items():
        if "skipped" in row:
            lines.append(f"| {labels[kind]} | skipped: {row['skipped']} | | | |")
            continue
        ratio = row.get("shmstore_ratio", {"random": 1.0, "hot": 1.0})
        lines.append(f"| {labels[kind]} | {_num(row['random'])} | {_num(row['hot'])} | "
                     f"{ratio['random']:.1f}x | {ratio['hot']:.1f}x |")
    lines += ["", ("One reader process per row, rows one after another (the machine has "
               f"{env['cpus']} cores); every key read once first (twice for the client-side cache: all hits).")]
    return "\n".join(lines)


def _hosts(text: str) -> list[int]:
    try:
        hosts = [int(h) for h in text.split(",") if h.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hosts {text!r}: comma-separated numbers, e.g. 1,2,4") from None
    if not hosts or min(hosts) < 1:
        raise argparse.ArgumentTypeError(f"--hosts {text!r}: each at least 1")
    return hosts


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        v = kind(text)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
        return v

    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=_positive(float), default=3.0, help="seconds per measurement (default 3)")
    ap.add_argument("--keys", type=_positive(int), default=10_000,
                    help="keys loaded for the reads, and cycled over by each writer (default 10000)")
    ap.add_argument("--hosts", type=_hosts, default=[1, 2, 4], help="replica counts for the writes (default 1,2,4)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    ap.add_argument("--csc-version-floor", metavar="VERSION", default=None,
                    help="let redis-py's client-side cache run on a server older than the 7.4 it "
                         "insists on (e.g. 7.0: Redis has had CLIENT TRACKING since 6.0); the report "
                         "says so")
    args = ap.parse_args(argv)
    if args.csc_version_floor:
        os.environ[CSC_FLOOR_ENV] = args.csc_version_floor

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so every finally below runs

    signal.signal(signal.SIGTERM, on_term)
    redis_p = RedisProcess()
    try:
        redis_p.start()
        t0 = time.perf_counter()
        res = {
            "environment": environment(redis_p),
            "settings": {"seconds": args.seconds, "keys": args.keys, "hosts": args.hosts,
                         "csc_version_floor": args.csc_version_floor,
                         "value_bytes": VALUE_BYTES, "redis_batch": REDIS_BATCH},
            "lag": measure_lag(redis_p, args.seconds, args.keys),
            "writes": measure_writes(redis_p, args.seconds, args.keys, args.hosts),
            "reads": measure_reads(redis_p, args.seconds, args.keys),
        }
        res["wall_seconds"] = time.perf_counter() - t0
    finally:
        redis_p.stop()
    print(json.dumps(res, indent=2) if args.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
