"""``shmstore stress`` (and ``scripts/stress.py``): prove a store under load and crashes.

What runs: a coordinator for a fresh store (memory-only, or durable in a temporary
directory with ``--sync``), N reader and M writer processes (forked; see
``_stress_workers``), and this process, which draws a progress bar, injects crashes
and checks the result. Records check themselves (``_selfcheck``: key, counter,
payload, checksum); each key has one writer, whose counter for it only rises.

Crash injection: ``--kill-coordinator S`` SIGKILLs the coordinator about every S
seconds and starts a new one, which adopts the segment; ``--kill-clients S`` SIGKILLs
a random reader or writer about every S seconds and starts a replacement (a writer's
replacement only after the coordinator reclaimed the dead writer's block, so none of
its writes can still be applied, and it continues each key from the store's counter).

The verdict, each line of which must read 0:

- torn reads accepted: a value that fails its checksum, or undecodable bytes;
- version monotonicity violations: a reader saw a key's counter go back;
- missing records: a read of a key (all keys exist from the start) missed;
- acknowledged writes lost: after the run, a key whose record is older (counter or
  version) than a write its writer logged as acknowledged. With ``--sync`` the store
  is also killed, its segment destroyed and rebuilt from the data directory, and
  checked again;
- unexpected errors: any exception other than the CoordinatorUnavailableError /
  StoreTimeoutError that clients meet by design while the coordinator is down.

Scenarios (``--scenario``): ``mixed``, the run above (the default); ``torn``
(``_stress_torn``), readers that stall mid-read against writers that move records out
of their slots and back, checked against each writer's last counters; ``crash``
(``_stress_crash``), a durable store's coordinator SIGKILLed again and again, the store
checked after every restart against an exact model of what was acknowledged.

Exit status: 0 all zero; 1 a violation (or a worker that hung or crashed on its
own); 2 bad arguments; 130 interrupted (Ctrl-C or SIGTERM) without a violation in
the partial report. Whatever happens, workers and coordinator are stopped and the
store and its data directory removed before exit.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from typing import TextIO

import msgspec

import shmstore
from shmstore import _layout as L

from ._format import duration_ns, human
from ._selfcheck import VALUE_OVERHEAD, key_of, make_record
from ._stress_workers import (
    HIST_BUCKETS,
    attached,
    check_final,
    hist_quantile,
    read_acks,
    read_progress,
    reader_main,
    reap,
    writer_main,
)

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
KEY_SIZE = 32
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _Interrupted(Exception):
    """SIGTERM: stop as for Ctrl-C."""


class StressOptions(msgspec.Struct, kw_only=True):
    readers: int = 4
    writers: int = 2
    seconds: float = 10.0
    keys: int = 256
    value_size: int = 128
    sync: str = "never"
    kill_coordinator: float = 0.0
    kill_clients: float = 0.0
    seed: int | None = None
    name: str | None = None
    progress: bool = True


class StressReport(msgspec.Struct):
    """The outcome of a run; :meth:`text` is what the tool prints."""

    options: StressOptions
    seed: int
    seconds: float = 0.0
    interrupted: bool = False
    reads: int = 0
    read_retries: int = 0
    writes: int = 0
    acks: int = 0
    uncertain: int = 0
    torn: int = 0
    violations: int = 0
    missing: int = 0
    lost: int = 0
    final_bad: int = 0
    errors: int = 0
    expected_errors: int = 0
    coordinator_kills: int = 0
    reader_kills: int = 0
    writer_kills: int = 0
    rebuilt_from_disk: bool = False
    read_hist: list[int] = []
    write_hist: list[int] = []
    read_max_ns: int = 0
    write_max_ns: int = 0
    problems: list[str] = []
    examples: list[str] = []

    @property
    def ok(self) -> bool:
        return not (self.torn or self.violations or self.missing or self.lost or self.final_bad
                    or self.errors or self.problems)

    def exit_code(self) -> int:
        if not self.ok:
            return EXIT_VIOLATION
        return EXIT_INTERRUPTED if self.interrupted else EXIT_OK

    def text(self) -> str:
        o = self.options
        t = max(self.seconds, 1e-9)
        head = "PARTIAL report (interrupted)" if self.interrupted else "report"
        lines = [
            f"shmstore stress {head}: {o.readers} readers, {o.writers} writers, {o.keys} keys, "
            f"{o.value_size}-byte values, sync {o.sync}, {self.seconds:.1f} s, seed {self.seed}",
            f"  crash injection     coordinator killed {self.coordinator_kills}x, readers killed "
            f"{self.reader_kills}x, writers killed {self.writer_kills}x",
            f"  reads               {self.reads:,} ({human(self.reads / t)}/s), {self.read_retries:,} retried",
            f"  writes              {self.writes:,} ({human(self.writes / t)}/s), {self.acks:,} acknowledged "
            f"records, {self.uncertain:,} uncertain (the coordinator died with them in flight)",
            f"  read latency        {_lat(self.read_hist, self.read_max_ns)}",
            f"  write latency       {_lat(self.write_hist, self.write_max_ns)}",
            f"  expected errors     {self.expected_errors:,} (coordinator unavailable / timeout while it was down)",
            "",
            f"  torn reads accepted              {self.torn}",
            f"  acknowledged writes lost         {self.lost}"
            + ("   (checked again after a rebuild from disk)" if self.rebuilt_from_disk else ""),
            f"  version monotonicity violations  {self.violations}",
            f"  missing records                  {self.missing + self.final_bad}",
            f"  unexpected errors                {self.errors}",
        ]
        lines += [f"  problem: {p}" for p in self.problems[:10]]
        lines += [f"  example: {e}" for e in self.examples[:10]]
        lines.append(f"result: {'OK' if self.ok else 'FAILED'}"
                     + (" (so far)" if self.interrupted and self.ok else ""))
        return "\n".join(lines)


def _lat(hist: list[int], mx: int) -> str:
    if not hist or not sum(hist):
        return "-"
    return (f"p50 {duration_ns(hist_quantile(hist, 0.5))}  p99 {duration_ns(hist_quantile(hist, 0.99))}  "
            f"max {duration_ns(mx)}  (p50/p99: bucket upper edges, within 9%)")


# -- the run -------------------------------------------------------------------------


class _Worker:
    def __init__(self, role: str, wid: int, gen: int, proc: multiprocessing.Process) -> None:
        self.role, self.id, self.gen, self.proc = role, wid, gen, proc


class StressRun:
    """One run of the tool. :meth:`run` returns the report; it never leaves anything."""

    def __init__(self, opts: StressOptions, err: TextIO) -> None:
        self.o = opts
        self.err = err
        self.seed = opts.seed if opts.seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.name = opts.name or f"stress-{os.getpid()}"
        self.tmp = tempfile.mkdtemp(prefix="shmstore-stress-")
        self.run_dir = os.path.join(self.tmp, "run")
        os.mkdir(self.run_dir)
        self.path = os.path.join(self.tmp, "data") if opts.sync != "never" else None
        self.ctx = multiprocessing.get_context("fork")
        self.workers: list[_Worker] = []
        self.coord: shmstore.Coordinator | None = None
        self.report = StressReport(options=opts, seed=self.seed)
        self.gens: dict[tuple[str, int], int] = {}

    # -- pieces

    def serve(self) -> None:
        # Ctrl-C waits until the coordinator is up (or failed): interrupting serve()
        # would orphan a coordinator we could not stop. (Handlers that only record the
        # signal, not a blocked mask: the coordinator would inherit the mask.)
        got: list[int] = []
        old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in _STOP_SIGNALS}
        try:
            self._serve()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if got:
            signal.raise_signal(got[0])

    def _serve(self) -> None:
        self.coord = shmstore.serve(
            self.name, path=self.path, sync=self.o.sync if self.path else None, capacity=self.o.keys,
            key_size=KEY_SIZE, value_size=self.o.value_size + VALUE_OVERHEAD,
            max_clients=self.o.readers + self.o.writers * 2 + 8, timeout=60)

    def start(self, role: str, wid: int) -> None:
        gen = self.gens.get((role, wid), -1) + 1
        self.gens[(role, wid)] = gen
        seed = self.rng.randrange(1 << 30)
        if role == "reader":
            args = (self.name, wid, gen, self.o.keys, self.o.value_size, self.run_dir, seed, os.getpid())
            target = reader_main
        else:
            args = (self.name, wid, gen, self.o.writers, self.o.keys, self.o.value_size, self.run_dir,
                    seed, os.getpid())
            target = writer_main
        # Children start with SIGINT/SIGTERM blocked and set their own dispositions.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            p = self.ctx.Process(target=target, args=args, name=f"stress-{role}{wid}-g{gen}", daemon=True)
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        self.workers.append(_Worker(role, wid, gen, p))

    def kill_coordinator(self) -> None:
        self.coord.kill()
        self.report.coordinator_kills += 1
        time.sleep(self.rng.uniform(0.0, 0.2))  # clients meet a store with no coordinator
        self.serve()

    def kill_client(self) -> None:
        live = [w for w in self.workers if w.proc.is_alive()]
        if not live:
            return
        w = self.rng.choice(live)
        pid = w.proc.pid
        os.kill(pid, signal.SIGKILL)
        w.proc.join()
        self.workers.remove(w)
        if w.role == "writer":
            self.report.writer_kills += 1
            # Its queued requests may still be applied until its block is reclaimed.
            deadline = time.monotonic() + 10
            while self.coord.alive() and attached(self.name, pid):
                if time.monotonic() > deadline:
                    self.report.problems.append(f"writer pid {pid}'s client block was not reclaimed in 10 s")
                    break
                time.sleep(0.01)
        else:
            self.report.reader_kills += 1
        self.start(w.role, w.id)

    def totals(self) -> StressReport:
        """The workers' counts so far (every generation's last progress file)."""
        r = self.report
        progs = read_progress(self.run_dir)
        fields = ("reads", "read_retries", "torn", "violations", "missing", "errors", "expected_errors",
                  "writes", "acks", "uncertain")
        sums = dict.fromkeys(fields, 0)
        rh, wh = [0] * HIST_BUCKETS, [0] * HIST_BUCKETS
        rmax = wmax = 0
        examples: list[str] = []
        for s in progs:
            for f in fields:
                sums[f] += getattr(s, f)
            h = rh if s.role == "reader" else wh
            for i, c in enumerate(s.hist):
                h[i] += c
            if s.role == "reader":
                rmax = max(rmax, s.max_ns)
            else:
                wmax = max(wmax, s.max_ns)
            examples += [f"{s.role} {s.id} (gen {s.gen}): {e}" for e in s.examples]
        for f in fields:
            setattr(r, f, sums[f])
        r.read_hist, r.write_hist, r.read_max_ns, r.write_max_ns = rh, wh, rmax, wmax
        r.examples = examples[:10]
        return r

    def progress(self, t0: float, final: bool = False) -> None:
        if not self.o.progress:
            return
        r = self.totals()
        el = time.monotonic() - t0
        frac = min(1.0, el / self.o.seconds)
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        bad = r.torn + r.violations + r.missing + r.errors
        line = (f"[{bar}] {el:5.1f}/{self.o.seconds:g} s  reads {human(r.reads)} ({human(r.reads / max(el, 1e-9))}/s)"
                f"  writes {human(r.writes)}  kills c{r.coordinator_kills} r{r.reader_kills} "
                f"w{r.writer_kills}  violations {bad}")
        if self.err.isatty():
            self.err.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.err.write(line + "\n")
        self.err.flush()

    # -- the whole run

    def run(self) -> StressReport:
        old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
        # Ctrl-C stops the run even where SIGINT came in ignored (a background job).
        old_int0 = signal.signal(signal.SIGINT, signal.default_int_handler)
        r = self.report
        t0 = time.monotonic()
        try:
            self.serve()
            with shmstore.connect(self.name) as s:
                for i in range(self.o.keys):
                    s.put(key_of(i), make_record(key_of(i), 0, self.o.value_size), wait=False)
                s.flush()
            for i in range(self.o.writers):
                self.start("writer", i)
            for i in range(self.o.readers):
                self.start("reader", i)
            t0 = time.monotonic()
            self._loop(t0)
        except (KeyboardInterrupt, _Interrupted):
            r.interrupted = True
        finally:
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                r.seconds = time.monotonic() - t0
                self._finish()
            finally:
                signal.signal(signal.SIGINT, old_int0 if old_int is not None else old_int)
                signal.signal(signal.SIGTERM, old_term)
        return r

    def _loop(self, t0: float) -> None:
        o = self.o
        end = t0 + o.seconds
        next_ck = t0 + o.kill_coordinator * self.rng.uniform(0.5, 1.5) if o.kill_coordinator else float("inf")
        next_cl = t0 + o.kill_clients * self.rng.uniform(0.5, 1.5) if o.kill_clients else float("inf")
        next_bar = t0
        tty = self.err.isatty()
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_ck:
                self.kill_coordinator()
                next_ck = time.monotonic() + o.kill_coordinator * self.rng.uniform(0.5, 1.5)
            if now >= next_cl:
                self.kill_client()
                next_cl = time.monotonic() + o.kill_clients * self.rng.uniform(0.5, 1.5)
            if now >= next_bar:
                self.progress(t0)
                next_bar = now + (0.25 if tty else max(1.0, o.seconds / 10))
            for w in self.workers:
                if not w.proc.is_alive() and w.proc.exitcode != 0:
                    self.report.problems.append(f"{w.role} {w.id} (gen {w.gen}) exited with {w.proc.exitcode}")
                    self.workers.remove(w)
                    break
            time.sleep(min(0.05, max(0.0, min(end, next_ck, next_cl, next_bar) - time.monotonic())))
        self.progress(t0, final=True)

    def _finish(self) -> None:
        """Stop the workers, check the store, then remove everything."""
        r = self.report
        try:
            with open(os.path.join(self.run_dir, "stop"), "w"):
                pass
            r.problems += reap([(f"{w.role} {w.id} (gen {w.gen})", w.proc) for w in self.workers],
                               time.monotonic() + 15, "did not stop within 15 s; killed")
            self.totals()
            self._check_store()
        except shmstore.ShmStoreError as e:
            r.problems.append(f"final check failed: {type(e).__name__}: {e}")
        finally:
            self._cleanup()

    def _check_store(self) -> None:
        r = self.report
        try:
            store = shmstore.connect(self.name)
        except shmstore.StoreNotFoundError:
            return  # interrupted before the store existed
        with store:
            acks = read_acks(self.run_dir)
            lost, bad, ex = check_final(store, self.o.keys, self.o.value_size, acks)
        r.lost, r.final_bad = lost, bad
        r.examples = (r.examples + ex)[:10]
        if self.path and self.coord is not None and not r.interrupted:
            # The reboot case: SIGKILL, no segment, rebuild from checkpoint + WAL.
            self.coord.kill()
            shmstore.destroy(self.name)
            self.serve()
            with shmstore.connect(self.name) as store:
                lost, bad, ex = check_final(store, self.o.keys, self.o.value_size, acks)
            r.lost += lost
            r.final_bad += bad
            r.examples = (r.examples + [f"after the rebuild from disk: {e}" for e in ex])[:10]
            r.rebuilt_from_disk = True

    def _cleanup(self) -> None:
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
        if self.coord is not None:
            self.coord.stop()
        try:
            shmstore.destroy(self.name)
        except shmstore.ShmStoreError as e:
            self.report.problems.append(f"cleanup: {e}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        left = L.store_entries(self.name)
        if left:
            self.report.problems.append(f"left in /dev/shm: {', '.join(left)}")


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted()


# -- command line ----------------------------------------------------------------------


def _nonneg(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return x


def _count(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} must be from {lo} to {hi}")
        return n
    return parse


SCENARIOS = ("mixed", "torn", "crash")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The stress options (shared by ``shmstore stress`` and ``scripts/stress.py``)."""
    p.add_argument("--scenario", choices=SCENARIOS, default="mixed",
                   help="mixed: readers and writers, optional kills (this module; the default); "
                        "torn: readers that stall mid-read against writers rewriting slots "
                        "(_stress_torn; uses --readers --writers --seconds --ops --keys --value-size "
                        "--start-method --name --memory); crash: SIGKILL a durable store's coordinator again and "
                        "again, checking an exact model of what was acknowledged (_stress_crash; uses "
                        "--writers --seconds --kills --destroy --sync --seed)")
    p.add_argument("--memory", type=_count(1 << 20, 1 << 36), default=None, metavar="BYTES",
                   help="torn: serve a memory store of this budget whose records hop between size "
                        "classes, so pages move while readers read (default: a single-class store)")
    p.add_argument("--readers", type=_count(0, 256), default=4, metavar="N", help="reader processes (default 4)")
    p.add_argument("--writers", type=_count(1, 256), default=2, metavar="M", help="writer processes (default 2)")
    p.add_argument("--seconds", type=_nonneg, default=10.0, metavar="S", help="how long to run (default 10)")
    p.add_argument("--keys", type=_count(1, 1_000_000), default=256, metavar="K", help="records (default 256)")
    p.add_argument("--value-size", type=_count(1, 1 << 20), default=128, metavar="B",
                   help="payload bytes per record (default 128)")
    p.add_argument("--sync", choices=("never", "periodic", "always"), default="never",
                   help="never: a memory-only store; periodic/always: durable, in a temporary "
                        "directory, checked again after a rebuild from disk (default never)")
    p.add_argument("--kill-coordinator", type=_nonneg, default=0.0, metavar="S",
                   help="SIGKILL and restart the coordinator about every S seconds (default 0: never)")
    p.add_argument("--kill-clients", type=_nonneg, default=0.0, metavar="S",
                   help="SIGKILL a random reader or writer about every S seconds and replace it (0: never)")
    p.add_argument("--seed", type=int, default=None, help="seed of the schedule (default: random, printed)")
    p.add_argument("--name", default=None, help="store name (default stress-<pid>; it must not exist)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    p.add_argument("--ops", type=_count(0, 1 << 40), default=0, metavar="N",
                   help="torn: writes per writer, 0 = until --seconds (default 0)")
    p.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                   help="torn: the workers' multiprocessing start method (default fork)")
    p.add_argument("--kills", type=_count(1, 1 << 30), default=200, metavar="N",
                   help="crash: stop after this many coordinator kills, or --seconds (default 200)")
    p.add_argument("--destroy", type=_fraction, default=0.5, metavar="P",
                   help="crash: probability of destroying the segment after a kill, the reboot case "
                        "(default 0.5)")


def _fraction(text: str) -> float:
    x = _nonneg(text)
    if x > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a probability, from 0 to 1")
    return x


def run_from_args(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    scenario = getattr(args, "scenario", "mixed")
    if args.seconds <= 0:
        print("shmstore: error: --seconds must be more than 0", file=sys.stderr)
        return EXIT_USAGE
    if scenario == "crash":
        if args.sync == "never":
            args.sync = "always"  # the scenario is about a durable store
        from ._stress_crash import run_and_report  # noqa: PLC0415  (a scenario loads when run)

        return run_and_report(kills=args.kills, seconds=args.seconds, writers=args.writers,
                              destroy=args.destroy, sync=args.sync, seed=args.seed, out=out)
    if args.writers > args.keys:
        print(f"shmstore: error: --keys ({args.keys}) must be at least --writers ({args.writers}): "
              f"each key has one writer", file=sys.stderr)
        return EXIT_USAGE
    if args.name is not None:
        L.check_name(args.name)
    if scenario == "torn":
        if args.readers < 1:
            print("shmstore: error: --scenario torn needs --readers of at least 1", file=sys.stderr)
            return EXIT_USAGE
        from ._stress_torn import run_and_report  # noqa: PLC0415  (a scenario loads when run)

        return run_and_report(readers=args.readers, writers=args.writers, keys=args.keys,
                              value_size=args.value_size, ops=args.ops, seconds=args.seconds,
                              method=args.start_method, name=args.name, out=out, memory=args.memory or 0)
    opts = StressOptions(readers=args.readers, writers=args.writers, seconds=args.seconds, keys=args.keys,
                         value_size=args.value_size, sync=args.sync, kill_coordinator=args.kill_coordinator,
                         kill_clients=args.kill_clients, seed=args.seed, name=args.name, progress=args.progress)
    report = StressRun(opts, err or sys.stderr).run()
    out.write(report.text() + "\n")
    out.flush()
    return report.exit_code()


def main(argv: list[str] | None = None) -> int:
    """``scripts/stress.py``: the same tool as ``shmstore stress``."""
    p = argparse.ArgumentParser(prog="python scripts/stress.py",
                                description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except shmstore.ShmStoreError as e:
        print(f"shmstore: error: {e}", file=sys.stderr)
        return 1
