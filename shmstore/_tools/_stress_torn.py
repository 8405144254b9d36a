"""The torn-read scenario of ``shmstore stress`` (and ``scripts/torn_stress.py``): writer processes rewrite self-checking records while reader
processes verify every value they read.

What it proves
--------------
The seqlock protocol of DESIGN.md section 2 promises that a lock-free read returns a
value that some write published, never bytes assembled from two writes. Every record
this script writes checks itself::

    value = [key, counter, payload, checksum]
    payload  = bytes derived from (key, counter), about ``--value-size`` long
               (the length varies with the counter)
    checksum = crc32(key | counter | payload)

so a reader can recompute it from the value alone. A value glued from two writes (of
one key, or of two keys that shared a slot; or the length of one write with the bytes
of another) fails the check, and so does one whose bytes could not even be decoded.
The invariant is checked two independent ways:

1. each reader process checks every value it reads and that each key's counter never
   goes back. Readers rotate through ``get`` (fast path), ``get_many`` (numpy
   passes), ``store[key]`` (full lookup) and a full lookup that stalls ~20 us between
   loading the meta word and copying the bytes, as a preempted reader would; the
   stall is what makes writes land in the middle of reads often enough to matter;
2. at the end the parent reads every key and compares it with the last counter its
   writer reports having written (each writer owns a disjoint set of keys).

Writers rewrite keys so that records move out of a slot and back into it (batches of
four writes of one key, two puts in a row of one key): the ABA case, where only a new
stamp per write lets the reader notice. Run against an engine that gives a batch one
epoch, or an update the previous op's epoch, this reports torn reads within seconds.

With ``memory`` (``--memory``) the store is a memory store (format 4: size classes in
pages) and each key's payload size hops with its counter between ``value_size`` and a
64th of it, so every rewrite of a key moves its record to a slot of another size
class, in another page; with a budget of few pages the coordinator keeps handing pages
from one class to another (page moves, counted in the report), so readers holding a
reference from before a move meet slots whose page changed class under them: only the
page entry, re-checked after the copy, tells (``_segment``'s "Reading a slot").

Shape (like filelock's stress tests): N processes, released together by a barrier,
each doing its share; a deadline that only guards against hangs; one verdict with
every worker's report. Workers get only names and ints as arguments (nothing shared
is pickled); they run on the stress harness (``_stress_workers``: ``start_worker``,
``run_worker``, a ``Progress`` file each, ``reap``) and leave through ``os._exit``.

Usage::

    shmstore stress --scenario torn --seconds 5
    python scripts/torn_stress.py --readers 3 --writers 2 --seconds 30 --start-method spawn

It exits 0 when no torn read was accepted, 1 otherwise, and prints the numbers.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from typing import TextIO

import msgspec
import posix_ipc

import shmstore
from shmstore import _layout as L
from shmstore._shm import open_segment

from ._format import human
from ._selfcheck import VALUE_OVERHEAD, ReadStats, TornRead, check_record, key_of, make_record, verify
from ._stress_workers import Progress, read_progress, reap, run_worker, start_worker

#: key_size of the store (keys are "k" + 6 digits).
KEY_SIZE = 32


class _DawdlingBytes:
    """Stands in for ``Segment.mv``: sleeps a little before every slice it hands out.

    A reader using it is the worst-timed reader there is: it has loaded ``seq`` and the
    meta word and then stalls (as if preempted) before copying the bytes, so the
    writers get to rewrite the slot, often several times, in the middle of the read.
    Only the timing changes; the read protocol is the library's own.
    """

    def __init__(self, mv: memoryview, pause: float) -> None:
        self.mv = mv
        self.pause = pause

    def __getitem__(self, s: slice) -> memoryview:
        time.sleep(self.pause)
        return self.mv[s]

    def __len__(self) -> int:
        return len(self.mv)


#: Seconds a dawdling read stalls between loading the meta word and copying bytes.
DAWDLE = 0.00002


def dawdling_segment(name: str):
    """A read-only mapping of the store whose reads stall mid-read (see above)."""
    seg = open_segment(name)
    seg.mv = _DawdlingBytes(seg.mv, DAWDLE)
    return seg


def close_dawdling(seg) -> None:
    seg.mv = seg.mv.mv
    seg.close()


#: payload sizes of a key in a class-hopping run (``memory``): value_size >> these, by counter
HOPS = (0, 2, 4, 6)


#: counters a key stays in one size class, in a class-hopping run: the keys move from
#: class to class in waves, so whole pages empty in one class while another runs short
HOP_RUN = 4


def size_of(counter: int, size: int, hop: int) -> int:
    """The payload size of a key's record at ``counter``: ``size``, or with ``hop``
    ``size >> HOPS[(counter // HOP_RUN) % 4]`` (at least 16), so the writes of a key
    move it from size class to size class."""
    return max(16, size >> HOPS[(counter // HOP_RUN) % len(HOPS)]) if hop else size


def size_seen(value: object, size: int, hop: int) -> int:
    """The size to verify ``value`` against: from its own (unvalidated) counter when the
    sizes hop; a torn value still fails, since its payload must then be exactly that
    counter's."""
    if not hop:
        return size
    counter = value[1] if isinstance(value, list) and len(value) == 4 else 0
    return size_of(counter if isinstance(counter, int) and counter >= 0 else 0, size, hop)


def read_round(store: shmstore.Store, keys: list[str], mode: int, size: int,
               stats: ReadStats, last: dict[str, int], slow=None, hop: int = 0) -> None:
    """Read every key once through one of the read paths and verify each value.

    Args:
        mode: 0 ``get`` (fast path), 1 ``get_many`` (vectorized), 2 ``store[key]``
            (the full lookup), 3 the full lookup by a reader that stalls mid-read
            (``slow``, from :func:`dawdling_segment`; mode 2 without it).
    """
    try:
        if mode == 1:
            for key, value in zip(keys, store.get_many(keys)):
                verify(stats, last, key, value, size_seen(value, size, hop))
            return
        for key in keys:
            if mode == 0:
                value = store.get(key)
            elif mode == 3 and slow is not None:
                r = slow.lookup(key.encode())
                value = None if r is None else msgspec.msgpack.decode(r[3])
            else:
                try:
                    value = store[key]
                except KeyError:
                    value = None
            verify(stats, last, key, value, size_seen(value, size, hop))
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        # The store handed the decoder bytes that are no encoding: accepted torn bytes.
        stats.reads += 1
        stats.torn += 1
        stats.note(f"undecodable value accepted: {e}")
    except Exception as e:  # noqa: BLE001 - every failure is a finding, reported
        stats.reads += 1
        stats.errors += 1
        stats.note(f"{type(e).__name__}: {e}")


def check_final(store: shmstore.Store, finals: dict[str, int], size: int, hop: int = 0) -> list[str]:
    """Compare the store with the last counter written per key; return the problems."""
    problems = []
    for key, want in finals.items():
        value = store.get(key)
        try:
            got = check_record(key, value, size_seen(value, size, hop))
        except TornRead as e:
            problems.append(f"final {e}")
            continue
        if got != want:
            problems.append(f"final {key}: store holds counter {got}, its writer wrote {want} last")
    return problems


# -- workers (arguments: names and ints only) ----------------------------------------


def _sem_names(name: str) -> tuple[str, str, str]:
    return f"/{name}-torn-ready", f"/{name}-torn-go", f"/{name}-torn-stop"


def _open_barrier(name: str, timeout: float) -> None:
    """Say "ready", then wait for the parent's "go" (both by semaphore name)."""
    ready_name, go_name, _ = _sem_names(name)
    ready = posix_ipc.Semaphore(ready_name)
    go = posix_ipc.Semaphore(go_name)
    try:
        ready.release()
        go.acquire(timeout)
    finally:
        ready.close()
        go.close()


def writer_main(name: str, wid: int, nwriters: int, nkeys: int, size: int, ops: int,
                seconds: float, result_dir: str, limit: float, hop: int = 0) -> None:
    """Rewrite this writer's keys (``i % nwriters == wid``) with rising counters.

    Stops after ``ops`` writes (0: no limit) or ``seconds`` (0: no limit), whichever
    comes first; ``limit`` seconds is the hang guard. Out of every 10 requests: one
    batch of two keys, one batch rewriting one key four times, two puts in a row of
    one key, six puts round-robin. Rewriting a key moves its record out of its slot
    and (copy-on-write, last freed slot first) back into it: the ABA case of
    seqlocks, where the bucket word reads the same before and after and only a new
    stamp per write tells the reader. Reports ``writes`` and the last counter of each
    key it owns (``Progress.finals``).
    """
    start_worker()
    prog = Progress(role="writer", id=wid, gen=0, pid=os.getpid())

    def body(prog: Progress) -> None:
        mine = [key_of(i) for i in range(nkeys) if i % nwriters == wid]
        finals = prog.finals = {k: 0 for k in mine}

        def write_batch(store: shmstore.Store, keys: list[str]) -> None:
            """One batch writing ``keys`` in order (a key may repeat)."""
            counters = dict(finals)
            writes = []
            for k in keys:
                counters[k] += 1
                writes.append((k, make_record(k, counters[k], size_of(counters[k], size, hop))))
            try:
                with store.batch() as batch:
                    for k, v in writes:
                        batch.put(k, v)
            except shmstore.StoreFullError:
                if not hop:
                    raise
                # A batch only takes free slots and free pages; a put also makes room by
                # moving a page between classes. Nothing of the batch was written.
                for k, v in writes:
                    store.put(k, v)
                    finals[k] = v[1]
                    prog.writes += 1
                return
            finals.update(counters)
            prog.writes += len(writes)
        store = shmstore.connect(name, timeout=30)
        try:
            _open_barrier(name, limit)
            t_end = time.monotonic() + (seconds if seconds > 0 else limit)
            i = 0
            while (ops <= 0 or prog.writes < ops) and time.monotonic() < t_end and mine:
                i += 1
                if i % 10 == 0 and len(mine) > 1:
                    a, b = mine[i % len(mine)], mine[(i + 1) % len(mine)]
                    write_batch(store, [a, b])
                elif i % 10 == 5:
                    k = mine[i % len(mine)]
                    write_batch(store, [k] * 4)
                else:
                    # Two requests in a row (7, 8) rewrite one key: out of its slot and back.
                    k = mine[(i // 10 if i % 10 in (7, 8) else i) % len(mine)]
                    finals[k] += 1
                    store.put(k, make_record(k, finals[k], size_of(finals[k], size, hop)))
                    prog.writes += 1
        finally:
            store.close()

    run_worker(body, prog, _progress_path(result_dir, "writer", wid))


def reader_main(name: str, rid: int, nkeys: int, size: int, result_dir: str, limit: float,
                hop: int = 0) -> None:
    """Read and verify every key, rotating the read paths, until the stop flag is up.

    ``limit`` seconds is the hang guard (the parent normally raises the flag).
    """
    start_worker()
    prog = Progress(role="reader", id=rid, gen=0, pid=os.getpid())

    def body(prog: Progress) -> None:
        stats = ReadStats()
        try:
            keys = [key_of(i) for i in range(nkeys)]
            last: dict[str, int] = {}
            store = shmstore.connect(name, timeout=30)
            slow = dawdling_segment(name)
            stop = posix_ipc.Semaphore(_sem_names(name)[2])
            try:
                _open_barrier(name, limit)
                t_end = time.monotonic() + limit
                rounds = 0
                while stop.value == 0 and time.monotonic() < t_end:
                    read_round(store, keys, (rounds + rid) % 4, size, stats, last, slow, hop)
                    rounds += 1
                # One last round after the writers are done: the settled state.
                read_round(store, keys, 0, size, stats, last, hop=hop)
            finally:
                stop.close()
                close_dawdling(slow)
                store.close()
        finally:
            prog.reads, prog.torn, prog.violations = stats.reads, stats.torn, stats.violations
            prog.missing, prog.errors, prog.examples = stats.missing, stats.errors, stats.examples

    run_worker(body, prog, _progress_path(result_dir, "reader", rid))


def _progress_path(result_dir: str, role: str, wid: int) -> str:
    return os.path.join(result_dir, f"{role}-{wid}.json")


# -- the parent ----------------------------------------------------------------------


class Report(msgspec.Struct):
    """The outcome of one run. ``ok`` is the verdict; ``text()`` the evidence."""

    method: str
    readers: int
    writers: int
    keys: int
    value_size: int
    reads: int = 0
    writes: int = 0
    torn: int = 0
    violations: int = 0
    missing: int = 0
    errors: int = 0
    memory: int = 0
    page_moves: int = 0  # pages the coordinator handed from one class to another
    final_problems: list[str] = []
    problems: list[str] = []  # hangs, exit codes, missing reports
    workers: list[Progress] = []  # each worker's last progress file
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.torn == 0 and self.violations == 0 and self.missing == 0
                and self.errors == 0 and not self.final_problems and not self.problems
                and self.reads > 0 and self.writes > 0)

    def text(self) -> str:
        lines = [
            f"torn-read stress ({self.method}): {self.readers} readers, {self.writers} writers, "
            f"{self.keys} keys, {self.value_size}-byte payloads, {self.seconds:.1f} s"
            + (f", memory {self.memory} bytes (sizes hop between classes; {self.page_moves} page moves)"
               if self.memory else ""),
            f"  reads {self.reads}  writes {self.writes}  torn reads accepted {self.torn}  "
            f"monotonicity violations {self.violations}  missing {self.missing}  errors {self.errors}",
        ]
        for w in self.workers:
            if w.role == "reader":
                lines.append(f"  reader {w.id}: reads {w.reads} torn {w.torn} violations {w.violations} "
                             f"missing {w.missing} errors {w.errors} {w.examples or ''}")
            else:
                lines.append(f"  writer {w.id}: writes {w.writes} {w.examples or ''}")
        lines += [f"  {p}" for p in self.problems + self.final_problems[:10]]
        return "\n".join(lines)


def run(name: str, *, readers: int = 2, writers: int = 2, keys: int = 64, value_size: int = 256,
        ops: int = 0, seconds: float = 5.0, method: str = "fork", deadline: float = 120.0,
        memory: int = 0) -> Report:
    """Serve store ``name``, run the workers, stop the coordinator, return the report.

    The store must not exist yet; it is left (stopped) for the caller to destroy.

    Args:
        ops: writes per writer (0: write until ``seconds``).
        seconds: how long writers write (0: until ``ops``). At least one must be set.
        method: the multiprocessing start method, ``fork`` or ``spawn``.
        memory: 0, or a memory store of this many bytes (growth 4) whose records hop
            between size classes (see the module docstring).
        deadline: seconds after which a worker that has not finished counts as hung
            and is killed. Only a guard: it never decides a passing run.
    """
    if ops <= 0 and seconds <= 0:
        raise ValueError("set ops or seconds")
    report = Report(method=method, readers=readers, writers=writers, keys=keys, value_size=value_size,
                    memory=memory)
    hop = 1 if memory else 0
    # (a get_many the coordinator answers, after its lock-free tries, replies with
    # every value: room for all of them)
    sizing = dict(memory=memory, growth=4.0, reply_size=max(1 << 20, 2 * keys * (value_size + 1024))) \
        if memory else {}
    coord = shmstore.serve(name, capacity=keys, key_size=KEY_SIZE,
                           value_size=value_size + VALUE_OVERHEAD, max_clients=writers + 4, **sizing)
    sems = []
    procs: list = []
    t0 = time.monotonic()
    guard = t0 + deadline
    try:
        with shmstore.connect(name) as s:
            for i in range(keys):
                s.put(key_of(i), make_record(key_of(i), 0, size_of(0, value_size, hop)))
        for sem_name in _sem_names(name):
            sems.append(posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=0o600, initial_value=0))
        ready, go, stop = sems
        ctx = mp.get_context(method)
        with tempfile.TemporaryDirectory(prefix="torn-") as result_dir:
            limit = float(deadline)
            wprocs = [ctx.Process(target=writer_main, name=f"torn-writer-{w}",
                                  args=(name, w, writers, keys, value_size, ops, seconds, result_dir, limit,
                                        hop))
                      for w in range(writers)]
            rprocs = [ctx.Process(target=reader_main, name=f"torn-reader-{r}",
                                  args=(name, r, keys, value_size, result_dir, limit, hop))
                      for r in range(readers)]
            procs = wprocs + rprocs
            for p in procs:
                p.start()
            # The barrier: every worker attached and waiting, then all go at once.
            waiting = len(procs)
            while waiting and time.monotonic() < guard:
                try:
                    ready.acquire(0.1)
                    waiting -= 1
                except posix_ipc.BusyError:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        break  # a worker died before the barrier: reported below
            if waiting:
                report.problems.append(f"{waiting} worker(s) never reached the barrier")
            t_go = time.monotonic()
            for _ in procs:
                go.release()
            for p in wprocs:
                p.join(max(0.0, guard - time.monotonic()))
            stop.release()
            report.problems += reap([(p.name, p) for p in procs], guard,
                                    f"still running after {deadline} s (hang guard); killed")
            report.seconds = time.monotonic() - t_go
            finals: dict[str, int] = {key_of(i): 0 for i in range(keys)}
            progs = {(w.role, w.id): w for w in read_progress(result_dir)}
            for role, wid in [("writer", w) for w in range(writers)] + [("reader", r) for r in range(readers)]:
                w = progs.get((role, wid))
                if w is None:
                    report.problems.append(f"{role}-{wid} wrote no report")
                    continue
                report.workers.append(w)
                report.writes += w.writes
                finals.update(w.finals)
                for field in ("reads", "torn", "violations", "missing", "errors"):
                    setattr(report, field, getattr(report, field) + getattr(w, field))
        with shmstore.connect(name) as s:
            report.final_problems = check_final(s, finals, value_size, hop)
            report.page_moves = s._seg.q[L.H_PAGE_MOVES]
        return report
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for sem in sems:
            sem.close()
        for sem_name in _sem_names(name)[: len(sems)]:
            try:
                posix_ipc.unlink_semaphore(sem_name)
            except posix_ipc.ExistentialError:
                pass
        coord.stop()


def run_and_report(*, readers: int, writers: int, keys: int, value_size: int, ops: int, seconds: float,
                   method: str = "fork", name: str | None = None, out: TextIO | None = None,
                   memory: int = 0) -> int:
    """Run on a fresh store (destroyed after), print the report; returns the exit code
    (0: no torn read accepted)."""
    out = out or sys.stdout
    name = name or f"torn-{uuid.uuid4().hex[:12]}"
    try:
        report = run(name, readers=readers, writers=writers, keys=keys, value_size=value_size, ops=ops,
                     seconds=seconds, method=method, deadline=max(120.0, 4 * seconds + 60), memory=memory)
    finally:
        shmstore.destroy(name)
    t = max(report.seconds, 1e-9)
    out.write(report.text() + "\n")
    out.write(f"  {human(report.reads / t)} verified reads/s, {human(report.writes / t)} writes/s\n")
    out.write(("OK: no torn read accepted" if report.ok else "FAILED") + "\n")
    out.flush()
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``scripts/torn_stress.py``: the same scenario as ``shmstore stress --scenario torn``."""
    parser = argparse.ArgumentParser(
        prog="python scripts/torn_stress.py",
        description="Torn-read stress for shmstore: writer processes rewrite self-checking "
                    "records, reader processes verify every read (seqlock, DESIGN.md section 2).")
    parser.add_argument("--readers", type=int, default=3, help="reader processes (default 3)")
    parser.add_argument("--writers", type=int, default=2,
                        help="writer processes, each with its own Store handle (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the writers write (default 10)")
    parser.add_argument("--ops", type=int, default=0, help="writes per writer; 0 = until --seconds (default 0)")
    parser.add_argument("--keys", type=int, default=64, help="records in the store (default 64)")
    parser.add_argument("--value-size", type=int, default=256, help="payload bytes per record (default 256)")
    parser.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                        help="multiprocessing start method (default fork)")
    parser.add_argument("--memory", type=int, default=0,
                        help="serve a memory store of this many bytes whose records hop between "
                             "size classes, so pages move between classes (default 0: one class)")
    parser.add_argument("--name", default=None, help="store name (default: a fresh one, destroyed after)")
    args = parser.parse_args(argv)
    if args.readers < 1 or args.writers < 1 or args.keys < 1 or args.value_size < 1:
        parser.error("--readers, --writers, --keys and --value-size must be at least 1")
    if args.writers > args.keys:
        parser.error("need at least one key per writer (--keys >= --writers)")
    return run_and_report(readers=args.readers, writers=args.writers, keys=args.keys,
                          value_size=args.value_size, ops=args.ops, seconds=args.seconds,
                          method=args.start_method, name=args.name, memory=args.memory)
