"""The crash scenario of ``shmstore stress`` (and ``scripts/crash_test.py``): SIGKILL a
durable store's coordinator again and again, and check that every acknowledged write
survives.

    shmstore stress --scenario crash --kills 50 --writers 3
    python scripts/crash_test.py --kills 300            # hundreds of kills
    python scripts/crash_test.py --seconds 120 --destroy 1.0 --sync periodic

Writer processes (``--writers``) write their own keys with every kind of op (put,
delete, compare_and_set, incr, batch, now and then a checkpoint) and report each
acknowledged result (key, version, value) and each write whose fate they cannot know
(it failed with CoordinatorUnavailableError or a timeout after it was sent) on stdout.
The coordinator is SIGKILLed at random moments; with probability ``--destroy`` the
segment is destroyed too (the reboot case: the next coordinator rebuilds the store
from the data directory), otherwise the next coordinator adopts the segment. After
every restart the writers pause and the store must hold, for every key, exactly the
last acknowledged state (version and value) or the outcome of a write still
uncertain after it, and no key nobody wrote. The writers keep their store handles
across restarts.

The seed is printed; ``--seed`` replays the same schedule of kills.
tests/test_crash.py runs the same loop with a few kills.

Its writers are not the stress harness's forked workers (``_stress_workers``): each is
a ``python -m shmstore._tools._stress_crash _writer`` child that streams every
acknowledgement to the parent over a pipe and pauses on request, because the check
after each restart needs the exact, complete model of what was acknowledged up to
that moment, which half-second progress files cannot give.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

#: keys per writer ("w<id>-<n>"), plus a counter "w<id>-ctr"
KEYS = 40
MISSING = object()


# -- the writer process ----------------------------------------------------------------


def writer_main(name: str, wid: int, seed: int, timeout: float) -> int:
    import shmstore
    from shmstore import (
        CoordinatorUnavailableError,
        StoreNotFoundError,
        StoreTimeoutError,
        VersionConflictError,
    )

    uncertain_errors = (CoordinatorUnavailableError, StoreTimeoutError, StoreNotFoundError)
    rng = random.Random(seed)
    store = shmstore.connect(name, timeout=timeout)
    ctr = f"w{wid}-ctr"

    def emit(*item: object) -> None:
        sys.stdout.write(json.dumps(item) + "\n")
        sys.stdout.flush()

    emit("R")
    seq = 0
    stdin = sys.stdin
    while True:
        if select.select([stdin], [], [], 0)[0]:
            line = stdin.readline().strip()
            if line == "pause":
                emit("P")
                line = stdin.readline().strip()
            if line != "go":
                break
        seq += 1
        value = [wid, seq]
        key = f"w{wid}-{rng.randrange(KEYS)}"
        r = rng.random()
        try:
            if r < 0.40:
                op = ("put", key, value)
                emit("A", "put", key, store.put(key, value), value)
            elif r < 0.50:
                op = ("del", key)
                store.delete(key)
                emit("A", "del", key)
            elif r < 0.65:
                op = ("incr", ctr)
                emit("A", "incr", ctr, store.incr(ctr))
            elif r < 0.80:
                keys = rng.sample(range(KEYS), 4)
                ops = [[f"w{wid}-{k}", value] for k in keys[:3]] + [[f"w{wid}-{keys[3]}", None]]
                op = ("batch", ops)
                with store.batch() as b:
                    for k, v in ops:
                        if v is None:
                            b.delete(k)
                        else:
                            b.put(k, v)
                res = b.results
                emit("A", "batch", [[k, res[i] if v is not None else None, v] for i, (k, v) in enumerate(ops)])
            elif r < 0.995:
                op = ("put", key, value)
                try:
                    version = store.version(key) or 0
                except uncertain_errors:
                    version = 0
                try:
                    emit("A", "put", key, store.compare_and_set(key, value, version=version), value)
                except VersionConflictError:
                    pass  # nothing written
            else:
                op = ("ckpt",)
                store.checkpoint(timeout=timeout * 4)
        except uncertain_errors as e:
            emit("U", *op)
            if isinstance(e, StoreNotFoundError):
                time.sleep(0.01)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails
            import traceback

            emit("E", f"{type(e).__name__}: {e} | " + " < ".join(
                f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(traceback.extract_tb(e.__traceback__))))
    store.close()
    return 0


# -- the model of what must be in the store ------------------------------------------


@dataclass
class Model:
    """What the writers were told; the store must agree."""

    acked: dict = field(default_factory=dict)  # key -> (version, value) | None (deleted)
    uncertain: dict = field(default_factory=dict)  # key -> [value | None, ...]
    ctr: dict = field(default_factory=dict)  # counter key -> acknowledged value
    ctr_unc: dict = field(default_factory=dict)  # counter key -> uncertain incrs since
    acks: int = 0
    unknown: int = 0
    errors: list = field(default_factory=list)

    def event(self, ev: list) -> None:
        kind = ev[0]
        if kind == "A":
            self.acks += 1
            op = ev[1]
            if op == "put":
                self._ack(ev[2], (ev[3], ev[4]))
            elif op == "del":
                self._ack(ev[2], None)
            elif op == "incr":
                self.ctr[ev[2]] = ev[3]
                self.ctr_unc[ev[2]] = 0
            elif op == "batch":
                for k, version, v in ev[2]:
                    self._ack(k, None if v is None else (version, v))
        elif kind == "U":
            self.unknown += 1
            op = ev[1]
            if op == "put":
                self.uncertain.setdefault(ev[2], []).append(ev[3])
            elif op == "del":
                self.uncertain.setdefault(ev[2], []).append(None)
            elif op == "incr":
                self.ctr_unc[ev[2]] = self.ctr_unc.get(ev[2], 0) + 1
            elif op == "batch":
                for k, v in ev[2]:
                    self.uncertain.setdefault(k, []).append(v)
        elif kind == "E":
            self.errors.append(ev[1])

    def _ack(self, key: str, state: tuple | None) -> None:
        self.acked[key] = state
        self.uncertain[key] = []

    def check(self, store: object) -> list[str]:
        """Differences between the store and what may be in it (empty: all good)."""
        bad = []
        for key in set(self.acked) | set(self.uncertain):
            value = store.get(key, MISSING)
            version = store.version(key)
            acked = self.acked.get(key)
            unc = self.uncertain.get(key, [])
            if value is MISSING:
                if acked is not None and None not in unc:
                    bad.append(f"{key}: acknowledged {acked} is missing")
            elif acked is not None and (version, value) == tuple(acked):
                pass
            elif value in unc:
                pass
            else:
                bad.append(f"{key}: holds version {version} value {value}; acknowledged {acked}, uncertain {unc}")
        for key, n in self.ctr.items():
            value = store.get(key, 0)
            if not n <= value <= n + self.ctr_unc.get(key, 0):
                bad.append(f"{key}: counter is {value}; acknowledged {n} (+{self.ctr_unc.get(key, 0)} uncertain)")
        known = set(self.acked) | set(self.uncertain) | set(self.ctr) | set(self.ctr_unc)
        for kb in store.keys():
            if kb.decode() not in known:
                bad.append(f"{kb!r}: a record nobody wrote")
        return bad


# -- the loop --------------------------------------------------------------------------


@dataclass
class Summary:
    seed: int
    kills: int = 0
    rebuilds: int = 0
    adopts: int = 0
    acks: int = 0
    unknown: int = 0
    checks: int = 0
    problems: list = field(default_factory=list)

    def __str__(self) -> str:
        return (f"seed {self.seed}: {self.kills} kills ({self.rebuilds} with the segment destroyed, "
                f"{self.adopts} adopted), {self.acks} acknowledged writes checked {self.checks} times, "
                f"{self.unknown} uncertain, {len(self.problems)} problems")


class _Writer:
    def __init__(self, name: str, wid: int, seed: int, timeout: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __spec__.name if __spec__ else "shmstore._tools._stress_crash", "_writer",
             name, str(wid), str(seed), str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1)
        self.buf = ""

    def lines_until(self, marker: str, model: Model, deadline: float) -> None:
        """Feed the writer's events to the model until it prints ``marker``."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"writer {self.proc.pid} exited (code {self.proc.poll()})")
            ev = json.loads(line)
            if ev[0] == marker:
                return
            model.event(ev)
            if time.monotonic() > deadline:
                raise RuntimeError(f"writer {self.proc.pid} did not pause in time")

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for s in (self.proc.stdin, self.proc.stdout):
            try:
                s.close()
            except (BrokenPipeError, OSError):
                pass


def crash_loop(name: str, path: str, *, kills: int, seconds: float = 1e9, writers: int = 3,
               seed: int | None = None, destroy: float = 0.5, sync: str = "always",
               capacity: int = 1000, on_serve: Callable[[object], None] = lambda c: None,
               log: Callable[[str], None] = lambda s: None) -> Summary:
    """Run the crash loop on store ``name`` with data directory ``path``.

    Stops after ``kills`` kills or ``seconds``, whichever comes first; the store and
    its coordinator are left stopped (the caller destroys the store).
    """
    import shmstore

    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    summary = Summary(seed)
    model = Model()

    def serve() -> object:
        coord = shmstore.serve(name, path=path, sync=sync, capacity=capacity, key_size=32, value_size=64,
                               checkpoint_ops=rng.choice([50, 300, 5000]), timeout=60)
        on_serve(coord)
        return coord

    coord = serve()
    procs = [_Writer(name, i, rng.randrange(1 << 30), timeout=0.5) for i in range(writers)]
    checker = shmstore.connect(name, timeout=10)
    t_end = time.monotonic() + seconds
    try:
        for w in procs:
            w.lines_until("R", model, time.monotonic() + 30)
        while summary.kills < kills and time.monotonic() < t_end:
            time.sleep(rng.uniform(0.02, 0.4))
            coord.kill()
            summary.kills += 1
            if rng.random() < destroy:
                shmstore.destroy(name)
                summary.rebuilds += 1
            else:
                summary.adopts += 1
            time.sleep(rng.uniform(0.0, 0.3))  # writers meet a store with no coordinator
            coord = serve()
            _check(procs, model, checker, summary, log)
            # Nothing was damaged here, so recovery must never have needed a fallback.
            summary.problems.extend(f"after kill {summary.kills}: recovery set {f} aside"
                                    for f in os.listdir(path) if f.endswith(".corrupt"))
            if summary.problems:
                break
        coord.stop()
        if not summary.problems:
            _check(procs, model, checker, summary, log)
    finally:
        for w in procs:
            w.close()
        checker.close()
        coord.stop()
    summary.acks = model.acks
    summary.unknown = model.unknown
    summary.problems.extend(model.errors)
    return summary


def _check(procs: list[_Writer], model: Model, checker: object, summary: Summary,
           log: Callable[[str], None]) -> None:
    deadline = time.monotonic() + 60
    for w in procs:
        w.send("pause")
    for w in procs:
        w.lines_until("P", model, deadline)
    problems = model.check(checker)
    summary.checks += 1
    if problems:
        summary.problems.extend(f"after kill {summary.kills}: {p}" for p in problems[:20])
    log(f"kill {summary.kills}: {model.acks} acknowledged, {model.unknown} uncertain, "
        f"{len(problems)} problems (checked in {time.monotonic() - deadline + 60:.2f} s)")
    for w in procs:
        w.send("go")


def run_and_report(*, kills: int, seconds: float = 1e9, writers: int = 3, destroy: float = 0.5,
                   sync: str = "always", seed: int | None = None, data_dir: str | None = None,
                   out: TextIO | None = None) -> int:
    """Run the crash loop on a fresh store (destroyed after) and print what it found;
    returns the exit code (0: every acknowledged write survived every kill)."""
    import shmstore

    out = out or sys.stdout
    name = f"crash-{os.getpid()}"
    tmp = None
    path = data_dir
    if path is None:
        tmp = tempfile.mkdtemp(prefix="shmstore-crash-")
        path = os.path.join(tmp, "data")
    seed = random.randrange(1 << 30) if seed is None else seed
    print(f"seed {seed}; store {name!r}; data directory {path}", file=out, flush=True)
    t0 = time.monotonic()
    try:
        summary = crash_loop(name, path, kills=kills, seconds=seconds, writers=writers,
                             seed=seed, destroy=destroy, sync=sync,
                             log=lambda s: print(s, file=out, flush=True))
    finally:
        try:
            shmstore.destroy(name)
        except shmstore.ShmStoreError as e:
            print(f"cleanup: {e}", file=sys.stderr)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{summary} in {time.monotonic() - t0:.1f} s", file=out)
    for p_ in summary.problems[:50]:
        print("PROBLEM:", p_, file=out)
    out.flush()
    return 1 if summary.problems else 0


def main(argv: list[str] | None = None) -> int:
    """``scripts/crash_test.py``: the same scenario as ``shmstore stress --scenario crash``
    (and, with ``_writer``, one writer process of it)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_writer"]:
        return writer_main(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
    p = argparse.ArgumentParser(
        prog="python scripts/crash_test.py",
        description="SIGKILL a durable store's coordinator at random moments and check that "
                    "every acknowledged write survives (see shmstore/_tools/_stress_crash.py).")
    p.add_argument("--kills", type=int, default=200, help="stop after this many kills (default: 200)")
    p.add_argument("--seconds", type=float, default=1e9, help="or after this many seconds")
    p.add_argument("--writers", type=int, default=3, help="writer processes (default: 3)")
    p.add_argument("--destroy", type=float, default=0.5,
                   help="probability of destroying the segment after a kill: the reboot case (default: 0.5)")
    p.add_argument("--sync", choices=("always", "periodic"), default="always",
                   help="sync mode of the store (default: always)")
    p.add_argument("--seed", type=int, default=None, help="replay a schedule (default: random, printed)")
    p.add_argument("--dir", default=None, help="data directory (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    return run_and_report(kills=args.kills, seconds=args.seconds, writers=args.writers, destroy=args.destroy,
                          sync=args.sync, seed=args.seed, data_dir=args.dir)


if __name__ == "__main__":
    raise SystemExit(main())
