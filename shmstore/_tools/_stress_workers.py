"""The processes of ``shmstore stress``: readers and writers (see ``_stress``), and the
harness every stress scenario shares: start a worker, its progress file, run its body
and leave, reap the workers (the torn scenario, ``_stress_torn``, runs its own readers
and writers on it).

Workers are forked; each gets names and ints only, connects to the store by name and
leaves through ``os._exit``. What they tell the parent lives in files of the run
directory, written so that a SIGKILL at any moment loses at most the last half second
of counts and never an acknowledgement:

- ``acks-w<id>-g<gen>.log``: a writer appends ``key counter version`` per acknowledged
  write, with one ``write()`` on an ``O_APPEND`` file *after* the store acknowledged
  it (the kernel keeps it when the process dies);
- ``<role><id>-g<gen>.json``: counts and latency histograms, replaced atomically every
  ``PROGRESS_EVERY`` seconds and at exit.

The stop signal is the file ``stop`` in the run directory (checked every few hundred
ops), or the parent's death.
"""

from __future__ import annotations

import math
import multiprocessing.process
import os
import random
import signal
import sys
import time
from typing import Callable

import msgspec

import shmstore

from shmstore import _channel as C
from shmstore import _stats
from shmstore._errors import CoordinatorUnavailableError, ShmStoreError, StoreTimeoutError

from ._selfcheck import ReadStats, TornRead, check_record, key_of, make_record, verify

PROGRESS_EVERY = 0.5
CHECK_EVERY = 256  # ops between looks at the stop file
HIST_BUCKETS = 8 * 40  # 8 buckets per power of two, up to 2**40 ns
#: errors a reader or writer meets, by design, while the coordinator is dead or restarting
EXPECTED_ERRORS = (CoordinatorUnavailableError, StoreTimeoutError)


def hist_index(ns: int) -> int:
    """The latency histogram bucket of ``ns``: 8 per power of two (~9% wide)."""
    if ns <= 1:
        return 0
    return min(HIST_BUCKETS - 1, int(math.log2(ns) * 8))


def hist_upper(i: int) -> float:
    """The upper edge of bucket ``i``, in ns."""
    return 2 ** ((i + 1) / 8)


def hist_quantile(hist: list[int], q: float) -> float | None:
    """The upper edge (ns) of the bucket holding quantile ``q`` of a latency histogram."""
    return _stats.hist_quantile(hist, q, upper=hist_upper)


class Progress(msgspec.Struct):
    """What one worker generation reports (the file it replaces every half second)."""

    role: str
    id: int
    gen: int
    pid: int
    reads: int = 0
    read_retries: int = 0
    torn: int = 0
    violations: int = 0
    missing: int = 0
    errors: int = 0  # unexpected exceptions: each is a finding
    expected_errors: int = 0  # CoordinatorUnavailableError / StoreTimeoutError
    writes: int = 0
    acks: int = 0
    uncertain: int = 0  # writes whose fate is unknown (the coordinator died with them)
    hist: list[int] = []
    max_ns: int = 0
    examples: list[str] = []
    finals: dict[str, int] = {}  # torn scenario: the last counter this writer wrote per key
    done: bool = False


def _paths(run_dir: str, role: str, wid: int, gen: int) -> tuple[str, str]:
    return (os.path.join(run_dir, f"{role}{wid}-g{gen}.json"),
            os.path.join(run_dir, f"acks-w{wid}-g{gen}.log"))


def save_progress(path: str, prog: Progress) -> None:
    """Replace the worker's progress file atomically (a reader never sees half of one)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(prog))
    os.replace(tmp, path)


def start_worker() -> None:
    """A forked or spawned worker's first step: the parent owns Ctrl-C, SIGTERM kills."""
    # The parent handles Ctrl-C and tells us to stop; the signals were blocked across
    # the fork, so none arrived before these dispositions took effect.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _should_stop(stop_path: str, parent: int) -> bool:
    return os.path.exists(stop_path) or os.getppid() != parent


def run_worker(body: Callable[[Progress], None], prog: Progress, path: str) -> None:
    """Run a worker's ``body``, count what it raises as an error, save its progress
    (``done``) and leave the process through ``os._exit`` (0: the body returned)."""
    code = 1
    try:
        body(prog)
        code = 0
    except BaseException as e:  # noqa: BLE001 - reported in the progress file, then exit
        prog.errors += 1
        if len(prog.examples) < 5:
            prog.examples.append(f"{type(e).__name__}: {e}")
    finally:
        try:
            prog.done = True
            save_progress(path, prog)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def reader_main(name: str, rid: int, gen: int, nkeys: int, size: int, run_dir: str,
                seed: int, parent: int) -> None:
    """Read random keys (``get``; every 16th round a ``get_many`` of 16) and verify
    each value and each key's counter monotonicity, until told to stop."""
    start_worker()
    path, _ = _paths(run_dir, "reader", rid, gen)
    prog = Progress(role="reader", id=rid, gen=gen, pid=os.getpid(), hist=[0] * HIST_BUCKETS)

    def body(prog: Progress) -> None:
        rng = random.Random(seed)
        keys = [key_of(i) for i in range(nkeys)]
        stop_path = os.path.join(run_dir, "stop")
        st = ReadStats()
        last: dict[str, int] = {}
        hist = prog.hist
        clock = time.perf_counter_ns
        log2 = math.log2
        top = HIST_BUCKETS - 1
        store = shmstore.connect(name, timeout=5.0)
        get = store.get
        next_save = time.monotonic() + PROGRESS_EVERY
        rounds = 0
        try:
            while not _should_stop(stop_path, parent):
                rounds += 1
                for _ in range(CHECK_EVERY // 16 if rounds % 16 == 0 else CHECK_EVERY):
                    if rounds % 16 == 0:
                        batch = rng.sample(keys, 16)
                        try:
                            values = store.get_many(batch)
                        except EXPECTED_ERRORS:
                            prog.expected_errors += 1
                            continue
                        for k, v in zip(batch, values):
                            verify(st, last, k, v, size)
                        continue
                    k = keys[int(rng.random() * nkeys)]
                    t0 = clock()
                    try:
                        v = get(k)
                    except EXPECTED_ERRORS:
                        prog.expected_errors += 1
                        continue
                    except (msgspec.DecodeError, msgspec.ValidationError) as e:
                        st.reads += 1
                        st.torn += 1  # the store handed the decoder bytes no writer wrote
                        st.note(f"{k}: undecodable value accepted: {e}")
                        continue
                    dt = clock() - t0
                    hist[min(top, int(log2(dt) * 8)) if dt > 1 else 0] += 1
                    if dt > prog.max_ns:
                        prog.max_ns = dt
                    verify(st, last, k, v, size)
                if time.monotonic() >= next_save:
                    _fill(prog, st, store)
                    save_progress(path, prog)
                    next_save = time.monotonic() + PROGRESS_EVERY
        finally:
            _fill(prog, st, store)
            store.close()

    run_worker(body, prog, path)


def _fill(prog: Progress, st: ReadStats, store: shmstore.Store) -> None:
    prog.reads, prog.torn, prog.violations, prog.missing = st.reads, st.torn, st.violations, st.missing
    prog.examples = (prog.examples + st.examples)[:5] if st.examples else prog.examples
    prog.read_retries = store._counters.totals()[1]


def writer_main(name: str, wid: int, gen: int, nwriters: int, nkeys: int, size: int, run_dir: str,
                seed: int, parent: int) -> None:
    """Rewrite this writer's keys (``i % nwriters == wid``) with rising counters, logging
    every acknowledged write; every 10th request is a batch of two keys."""
    start_worker()
    path, ack_path = _paths(run_dir, "writer", wid, gen)
    prog = Progress(role="writer", id=wid, gen=gen, pid=os.getpid(), hist=[0] * HIST_BUCKETS)

    def body(prog: Progress) -> None:
        rng = random.Random(seed)
        mine = [i for i in range(nkeys) if i % nwriters == wid]
        stop_path = os.path.join(run_dir, "stop")
        clock = time.perf_counter_ns
        store = shmstore.connect(name, timeout=5.0)
        counter = {}
        # Continue each key from what the store holds (a replaced writer's keys hold
        # its predecessor's last applied write: the parent waited for its block to be
        # reclaimed, so nothing of it can still be applied).
        for i in mine:
            v = store.get(key_of(i))
            try:
                counter[i] = check_record(key_of(i), v, size)
            except TornRead as e:
                raise TornRead(f"at writer start: {e}") from None
        fd = os.open(ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        next_save = time.monotonic() + PROGRESS_EVERY
        n = 0
        try:
            while mine and not _should_stop(stop_path, parent):
                for _ in range(CHECK_EVERY // 4):
                    n += 1
                    if n % 10 == 0 and len(mine) > 1:
                        ks = rng.sample(mine, 2)
                    else:
                        ks = [mine[int(rng.random() * len(mine))]]
                    for i in ks:
                        counter[i] += 1
                    t0 = clock()
                    prog.writes += 1
                    try:
                        if len(ks) == 1:
                            versions = [store.put(key_of(ks[0]), make_record(key_of(ks[0]), counter[ks[0]], size))]
                        else:
                            with store.batch() as b:
                                for i in ks:
                                    b.put(key_of(i), make_record(key_of(i), counter[i], size))
                            versions = b.results
                    except EXPECTED_ERRORS:
                        # Sent or not, applied or not: the next write of the key takes
                        # the next counter, so readers still see counters only rise.
                        prog.uncertain += 1
                        if _should_stop(stop_path, parent):
                            break
                        time.sleep(0.005)
                        continue
                    dt = clock() - t0
                    prog.hist[hist_index(dt)] += 1
                    if dt > prog.max_ns:
                        prog.max_ns = dt
                    # Invariant: logged only after the store acknowledged it.
                    os.write(fd, "".join(f"{i} {counter[i]} {v}\n" for i, v in zip(ks, versions)).encode())
                    prog.acks += len(ks)
                if time.monotonic() >= next_save:
                    save_progress(path, prog)
                    next_save = time.monotonic() + PROGRESS_EVERY
        finally:
            os.close(fd)
            store.close()

    run_worker(body, prog, path)


def reap(workers: list[tuple[str, multiprocessing.process.BaseProcess]], deadline: float,
         hung: str) -> list[str]:
    """Join every worker by ``deadline`` (``time.monotonic()``); kill those still running.

    Args:
        workers: ``(label, process)`` pairs; the label names the worker in problems.
        hung: what to say of a worker that was still running, after its label.

    Returns:
        One problem per worker that hung (and was killed) or exited non-zero.
    """
    problems = []
    for _, p in workers:
        p.join(max(0.0, deadline - time.monotonic()))
    for label, p in workers:
        if p.is_alive():
            problems.append(f"{label} {hung}")
            p.kill()
            p.join()
        elif p.exitcode != 0:
            problems.append(f"{label} exited with {p.exitcode}")
    return problems


def read_acks(run_dir: str) -> dict[int, list[tuple[int, int]]]:
    """Every acknowledged write: ``{key index: [(counter, version), ...]}``."""
    out: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir(run_dir):
        if not entry.startswith("acks-"):
            continue
        with open(os.path.join(run_dir, entry), "rb") as f:
            for line in f.read().split(b"\n"):
                parts = line.split()
                if len(parts) == 3:
                    i, c, v = map(int, parts)
                    out.setdefault(i, []).append((c, v))
    return out


def read_progress(run_dir: str) -> list[Progress]:
    out = []
    for entry in os.listdir(run_dir):
        if entry.endswith(".json"):
            try:
                with open(os.path.join(run_dir, entry), "rb") as f:
                    out.append(msgspec.json.decode(f.read(), type=Progress))
            except (OSError, msgspec.DecodeError):
                continue  # replaced under us: the next look reads it
    return out


def check_final(store: shmstore.Store, nkeys: int, size: int,
                acks: dict[int, list[tuple[int, int]]]) -> tuple[int, int, list[str]]:
    """Compare the store with the acknowledged writes.

    Returns:
        ``(acked writes lost, torn or missing records, examples)``: an acknowledged
        write is lost if the key's record has a lower counter or version than it.
    """
    lost = bad = 0
    examples: list[str] = []
    for i in range(nkeys):
        k = key_of(i)
        value, version = store.get(k), store.version(k)
        try:
            c = check_record(k, value, size)
        except TornRead as e:
            bad += 1
            examples.append(f"final {e}")
            continue
        mine = acks.get(i, [])
        gone = [(ac, av) for ac, av in mine if ac > c or av > (version or 0)]
        if gone:
            lost += len(gone)
            if len(examples) < 10:
                top = max(gone)
                examples.append(f"{k}: holds counter {c} version {version}; acknowledged counter "
                                f"{top[0]} version {top[1]}")
    return lost, bad, examples[:10]


def attached(name: str, pid: int) -> bool:
    """True while a client block of the running coordinator is registered to ``pid``."""
    try:
        ch = C.open_channel(name)
    except ShmStoreError:
        return False
    try:
        acked = ch.words(C.C_ACK) != 0
        pids = ch.words(C.C_PID)[acked].tolist()
        del acked
        return pid in pids
    finally:
        ch.close()
