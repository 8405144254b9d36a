"""The benchmark's building blocks: rows, targets, timing, child processes."""

from __future__ import annotations

import gc
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

clock = time.perf_counter_ns

#: The command that runs one of the benchmark's child processes (see ``_peers``). The
#: file, not ``-m``: the redis and lmdb children then never import shmstore.
PEERS = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_peers.py")]


@dataclass(frozen=True)
class Spec:
    """One row of the table."""

    group: str
    system: str  # short id, unique within the group
    label: str  # what the row runs
    decoded: str  # whether the value comes back decoded (reads) / gets encoded (writes)
    unit: str  # "ns/op" (a time per call), "ops/s" (a throughput) or "bytes"
    peer: str = "shmstore"  # family, for skipping: shmstore, lmdb, redis, diskcache, memcached, manager, floor

    @property
    def id(self) -> str:
        return f"{self.group}.{self.system}"

    @property
    def lower_is_better(self) -> bool:
        return self.unit != "ops/s"


@dataclass(frozen=True)
class Target:
    subject: str  # shmstore measure id
    baseline: str  # peer measure id
    min_speedup: float  # shmstore speedup over the peer needed to pass
    text: str
    stretch: bool = False  # the "rung after that"


@dataclass
class Config:
    quick: bool
    repeats: int
    target_s: float  # seconds per timed run
    max_n: int  # cap on a loop's iterations (its key list is built up front)
    writer_s: float  # seconds per round of the multi-process measures
    writer_warmup_s: float
    groups: list[str]
    redis_binary: str
    use_redis: bool
    memcached_binary: str
    use_memcached: bool
    small_keys: int  # keys of the "10k" data sets
    big_keys: int  # keys of the "1M" data sets


@dataclass
class Result:
    spec: Spec
    median: float | None = None  # in spec.unit
    runs: list[float] = field(default_factory=list)
    n: int = 0  # ops per timed run (0 for the multi-process rows: they run for a duration)
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        s = self.spec
        d: dict[str, Any] = {"group": s.group, "system": s.system, "label": s.label,
                             "decoded": s.decoded, "unit": s.unit}
        if self.skipped is not None:
            d["skipped"] = self.skipped
            d["median"] = None
            return d
        d["median"] = self.median
        d["runs"] = self.runs
        d["n"] = self.n
        if s.unit == "ns/op":
            d["ops_per_s"] = 1e9 / self.median
        elif s.unit == "ops/s":
            d["ns_per_op"] = 1e9 / self.median
        d.update(self.extra)
        return d


# -- timing ------------------------------------------------------------------------------


def run_once(fn: Callable[[int], int], n: int) -> int:
    """``fn(n)`` (elapsed ns of n ops) with the garbage collector off, as timeit does."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return fn(n)
    finally:
        if enabled:
            gc.enable()


def calibrate(fn: Callable[[int], int], cfg: Config) -> int:
    """The n for which one run of ``fn(n)`` takes ~cfg.target_s."""
    target_ns = cfg.target_s * 1e9
    n = 1
    while True:
        t = max(run_once(fn, n), 1)
        if t >= target_ns / 5 or n >= cfg.max_n:
            break
        n = min(cfg.max_n, n * max(2, min(100, int(target_ns / 5 / t) + 1)))
    return max(1, min(cfg.max_n, int(n * target_ns / t)))


def cycle_list(seq: list, n: int) -> list:
    reps = -(-n // len(seq))
    return (seq * reps)[:n]


# -- process bookkeeping -----------------------------------------------------------------


class Children:
    """Every child process the benchmark starts, so the end reaps them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def popen(self, args: list[str], **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    def peer(self, *args: object, **kw: Any) -> subprocess.Popen:
        """A ``_peers`` child talking over pipes (stdin commands, stdout lines)."""
        return self.popen([*PEERS, *map(str, args)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, bufsize=0, **kw)

    def reap(self, p: subprocess.Popen, timeout: float = 5.0) -> None:
        if p.stdin is not None:
            try:
                p.stdin.close()
            except OSError:
                pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p.stdout is not None:
            p.stdout.close()
        if p in self.procs:
            self.procs.remove(p)

    def reap_all(self) -> None:
        for p in list(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in list(self.procs):
            self.reap(p, timeout=3.0)


def read_line(p: subprocess.Popen, timeout: float) -> str:
    """One line of a child's (unbuffered, binary) stdout, or raise after ``timeout``."""
    fd = p.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"child {p.args!r} sent no line within {timeout} s (got {buf!r})")
        b = os.read(fd, 1)
        if not b:
            raise RuntimeError(f"child {p.args!r} exited (code {p.wait()}) before a line (got {buf!r})")
        buf += b
    return buf.decode().strip()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
