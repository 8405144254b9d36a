#!/usr/bin/env python3
"""Benchmark shmstore against py-lmdb, Redis, multiprocessing.Manager and floors.

Every system runs in this process tree, on the same data (10,000 keys, each with a
62-character str whose msgpack encoding is 64 bytes; lmdb and Redis hold exactly the
bytes shmstore holds). Each figure is the median of ``--repeats`` timed runs of a loop
sized to take ``--target-time`` seconds; a warm-up run (and the calibration before it)
is excluded. The garbage collector is off while a loop runs, as in ``timeit``.

Measures (the "measure" column of the table):

  get_hot       get of a 64 B value, the same key every time
  get_random    get of a 64 B value, keys in random order out of 10,000
  get_many      one call fetching 1,000 random keys (shmstore get_many, a py-lmdb
                loop inside one read txn, Redis MGET)
  put           a synchronous write round trip (shmstore put, redis-py SET, py-lmdb
                put in its own write txn with sync on and off)
  put_pipelined pipelined write throughput (shmstore put(wait=False) ... flush())
  writes_2proc  writes/s of 2 client processes doing sync puts of their own keys

Floors: a plain dict, a 1-byte socketpair ping-pong between two processes (the price
of one wake-up round trip) and a numpy copy of the same number of bytes.

Decoding: shmstore.get returns the decoded Python object; py-lmdb and Redis return
raw bytes. The "lmdb + decode" rows add msgspec decoding to compare like with like.

The "shmstore speedup" column is how many times faster shmstore is than the row's
system: peer time / shmstore time, or shmstore ops/s / peer ops/s (> 1: shmstore is
faster). Targets are checked against it and marked pass or miss.

Usage::

    python scripts/bench.py                       # full run (a few minutes)
    python scripts/bench.py --quick               # smoke run, < 60 s (what CI runs)
    python scripts/bench.py --json out.json --markdown out.md
    python scripts/bench.py --only get_hot,put    # some measures only

Redis rows need ``redis-server`` on PATH (the script starts a private one on a unix
socket in a temp dir, persistence off, and stops it at the end); without it they are
reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import os
import platform
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _bench_peers as peers  # noqa: E402

clock = time.perf_counter_ns

NKEYS = 10_000
MANY = 1_000
VALUE_BYTES = 64

GROUPS: dict[str, str] = {
    "get_hot": "get, 64 B value, one hot key",
    "get_random": "get, 64 B value, random key of 10k",
    "get_many": "get_many of 1,000 random keys (one call)",
    "put": "put round trip (sync), 64 B value",
    "put_pipelined": "pipelined put throughput",
    "writes_2proc": "writes/s, 2 client processes, sync puts",
}


@dataclass(frozen=True)
class Spec:
    """One row of the table."""

    group: str
    system: str  # short id, unique within the group
    label: str  # what the row runs
    decoded: str  # whether the value comes back decoded (reads) / gets encoded (writes)
    unit: str  # "ns/op" (a time per call) or "ops/s" (a throughput)
    peer: str = "shmstore"  # family, for skipping: shmstore, lmdb, redis, manager, floor

    @property
    def id(self) -> str:
        return f"{self.group}.{self.system}"


SPECS: list[Spec] = [
    Spec("get_hot", "shmstore", "shmstore store.get", "yes (str)", "ns/op"),
    Spec("get_hot", "lmdb_txn", "py-lmdb txn.get, one long read txn", "no (bytes)", "ns/op", "lmdb"),
    Spec("get_hot", "lmdb_txn_decode", "py-lmdb long txn + msgspec decode", "yes (str)", "ns/op", "lmdb"),
    Spec("get_hot", "lmdb_txn_per_get", "py-lmdb, a read txn per get", "no (bytes)", "ns/op", "lmdb"),
    Spec("get_hot", "redis", "redis-py GET (unix socket)", "no (bytes)", "ns/op", "redis"),
    Spec("get_hot", "manager", "multiprocessing.Manager().dict() get", "yes (pickle)", "ns/op", "manager"),
    Spec("get_hot", "dict", "plain dict.get (floor)", "n/a (object)", "ns/op", "floor"),
    Spec("get_hot", "numpy_copy", "numpy copy of 64 B (floor)", "n/a (bytes)", "ns/op", "floor"),
    Spec("get_random", "shmstore", "shmstore store.get", "yes (str)", "ns/op"),
    Spec("get_random", "lmdb_txn", "py-lmdb txn.get, one long read txn", "no (bytes)", "ns/op", "lmdb"),
    Spec("get_random", "lmdb_txn_decode", "py-lmdb long txn + msgspec decode", "yes (str)", "ns/op", "lmdb"),
    Spec("get_random", "lmdb_txn_per_get", "py-lmdb, a read txn per get", "no (bytes)", "ns/op", "lmdb"),
    Spec("get_random", "redis", "redis-py GET (unix socket)", "no (bytes)", "ns/op", "redis"),
    Spec("get_random", "manager", "multiprocessing.Manager().dict() get", "yes (pickle)", "ns/op", "manager"),
    Spec("get_random", "dict", "plain dict.get (floor)", "n/a (object)", "ns/op", "floor"),
    Spec("get_many", "shmstore", "shmstore store.get_many(1000 keys)", "yes (str)", "ns/op"),
    Spec("get_many", "lmdb_loop", "py-lmdb loop of 1000 txn.get, one long txn", "no (bytes)", "ns/op", "lmdb"),
    Spec("get_many", "lmdb_loop_decode", "py-lmdb loop + msgspec decode", "yes (str)", "ns/op", "lmdb"),
    Spec("get_many", "redis_mget", "redis-py MGET of 1000 keys", "no (bytes)", "ns/op", "redis"),
    Spec("get_many", "dict", "plain dict, list of 1000 .get (floor)", "n/a (object)", "ns/op", "floor"),
    Spec("get_many", "numpy_copy", "numpy copy of 64,000 B (floor)", "n/a (bytes)", "ns/op", "floor"),
    Spec("put", "shmstore", "shmstore store.put (sync round trip)", "encodes (str)", "ns/op"),
    Spec("put", "redis", "redis-py SET (unix socket)", "no (bytes)", "ns/op", "redis"),
    Spec("put", "lmdb_sync", "py-lmdb put, own write txn, sync=True", "no (bytes)", "ns/op", "lmdb"),
    Spec("put", "lmdb_nosync", "py-lmdb put, own write txn, sync=False", "no (bytes)", "ns/op", "lmdb"),
    Spec("put", "manager", "multiprocessing.Manager().dict() set", "yes (pickle)", "ns/op", "manager"),
    Spec("put", "dict", "plain dict set (floor)", "n/a (object)", "ns/op", "floor"),
    Spec("put", "socketpair", "1-byte socketpair ping-pong, 2 processes (floor)", "n/a", "ns/op", "floor"),
    Spec("put_pipelined", "shmstore", "shmstore put(wait=False) x n, then flush()", "encodes (str)", "ops/s"),
    Spec("put_pipelined", "redis_pipeline", "redis-py pipeline, SET x 1000 per execute", "no (bytes)", "ops/s", "redis"),
    Spec("put_pipelined", "lmdb_one_txn", "py-lmdb put x n in one write txn, sync=False", "no (bytes)", "ops/s", "lmdb"),
    Spec("writes_2proc", "shmstore", "shmstore, 2 processes, sync put", "encodes (str)", "ops/s"),
    Spec("writes_2proc", "redis", "Redis, 2 processes, SET", "no (bytes)", "ops/s", "redis"),
    Spec("writes_2proc", "lmdb_nosync", "py-lmdb, 2 processes, txn per put, sync=False", "no (bytes)", "ops/s", "lmdb"),
    Spec("writes_2proc", "lmdb_sync", "py-lmdb, 2 processes, txn per put, sync=True", "no (bytes)", "ops/s", "lmdb"),
]

SPEC_BY_ID = {s.id: s for s in SPECS}


@dataclass(frozen=True)
class Target:
    subject: str  # shmstore measure id
    baseline: str  # peer measure id
    min_speedup: float  # shmstore speedup over the peer needed to pass
    text: str


TARGETS: list[Target] = [
    Target("get_hot.shmstore", "get_hot.lmdb_txn", 1.0, "get time <= 1.0x py-lmdb long-txn get"),
    Target("get_random.shmstore", "get_random.lmdb_txn", 1.0, "get time <= 1.0x py-lmdb long-txn get"),
    Target("get_many.shmstore", "get_many.lmdb_loop", 5.0, "get_many(1000) >= 5x faster than py-lmdb loop"),
    Target("get_many.shmstore", "get_many.redis_mget", 10.0, "get_many(1000) >= 10x faster than Redis MGET"),
    Target("put.shmstore", "put.redis", 2.0, "put round trip <= 0.5x redis-py SET"),
    Target("writes_2proc.shmstore", "writes_2proc.redis", 3.0, "writes/s from 2 clients >= 3x Redis"),
]


@dataclass
class Config:
    quick: bool
    repeats: int
    target_s: float  # seconds per timed run
    max_n: int  # cap on a loop's iterations (its key list is built up front)
    writer_s: float  # seconds per round of the 2-process writers
    writer_warmup_s: float
    groups: list[str]
    redis_binary: str
    use_redis: bool


@dataclass
class Result:
    spec: Spec
    median: float | None = None  # in spec.unit
    runs: list[float] = field(default_factory=list)
    n: int = 0  # ops per timed run (0 for the 2-process rows: they run for a duration)
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
        else:
            d["ns_per_op"] = 1e9 / self.median
        d.update(self.extra)
        return d


# -- timing ------------------------------------------------------------------------------


def _run(fn: Callable[[int], int], n: int) -> int:
    enabled = gc.isenabled()
    gc.disable()
    try:
        return fn(n)
    finally:
        if enabled:
            gc.enable()


def calibrate(fn: Callable[[int], int], cfg: Config) -> int:
    """The n for which one run of ``fn(n)`` (elapsed ns of n ops) takes ~cfg.target_s."""
    target_ns = cfg.target_s * 1e9
    n = 1
    while True:
        t = max(_run(fn, n), 1)
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

    def reap(self, p: subprocess.Popen, timeout: float = 5.0) -> None:
        for stream in (p.stdin,):
            if stream is not None:
                try:
                    stream.close()
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


# -- the benchmark -----------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.results: dict[str, Result] = {}
        self.children = Children()
        self.tmpdir = ""
        self.name = f"bench-{uuid.uuid4().hex[:16]}"
        self.coord = None
        self.store = None
        self.served = False
        self.redis_server: peers.RedisServer | None = None
        self.redis = None
        self.redis_skip: str | None = None
        self.lmdb_skip: str | None = None
        self.env_sync = None
        self.env_nosync = None
        self.manager = None
        self.mdict = None
        self.echo_sock: socket.socket | None = None
        self.echo_proc: subprocess.Popen | None = None
        self.redis_version = ""
        # data
        rng = random.Random(1234)
        self.keys = [f"key:{i:06d}" for i in range(NKEYS)]
        self.kbs = [k.encode() for k in self.keys]
        self.values = [peers.value_for(i) for i in range(NKEYS)]
        import msgspec  # noqa: PLC0415

        self.encode = msgspec.msgpack.encode
        self.decode = msgspec.msgpack.Decoder().decode
        self.vbs = [self.encode(v) for v in self.values]
        assert all(len(v) == VALUE_BYTES for v in self.vbs)
        order = list(range(NKEYS))
        rng.shuffle(order)
        self.rand_idx = order
        self.many_idx = rng.sample(range(NKEYS), MANY)
        self.hot = NKEYS // 2

    # -- setup / teardown ------------------------------------------------------------

    def setup(self) -> None:
        base = tempfile.gettempdir()
        if len(base) > 60:  # a unix socket path must fit in 108 bytes
            base = "/tmp"
        self.tmpdir = tempfile.mkdtemp(prefix="shmstore-bench-", dir=base)

        import shmstore  # noqa: PLC0415

        log(f"shmstore store {self.name!r}: serving")
        self.coord = shmstore.serve(self.name, capacity=4 * NKEYS, key_size=32, value_size=128)
        self.served = True
        self.store = shmstore.connect(self.name)
        for k, v in zip(self.keys, self.values):
            self.store.put(k, v, wait=False)
        self.store.flush()

        try:
            import lmdb  # noqa: PLC0415, F401

            self.env_sync = peers.open_lmdb(os.path.join(self.tmpdir, "lmdb-sync"), sync=True)
            self.env_nosync = peers.open_lmdb(os.path.join(self.tmpdir, "lmdb-nosync"), sync=False)
            for env in (self.env_sync, self.env_nosync):
                with env.begin(write=True) as txn:
                    for k, v in zip(self.kbs, self.vbs):
                        txn.put(k, v)
        except ImportError:
            self.lmdb_skip = "the lmdb python package is missing (pip install -e '.[bench]')"

        if not self.cfg.use_redis:
            self.redis_skip = "disabled with --no-redis"
        else:
            self.redis_server = peers.RedisServer(self.tmpdir, self.cfg.redis_binary)
            self.redis_skip = self.redis_server.start()
            if self.redis_skip is None:
                import redis  # noqa: PLC0415

                self.redis_version = self.redis_server.version
                self.redis = redis.Redis(unix_socket_path=self.redis_server.socket_path)
                self.redis.mset(dict(zip(self.kbs, self.vbs)))
            else:
                log(f"NOTE: skipping Redis: {self.redis_skip}")

        if any(s.peer == "manager" and s.group in self.cfg.groups for s in SPECS):
            log("multiprocessing.Manager: starting")
            self.manager = multiprocessing.get_context("spawn").Manager()
            self.mdict = self.manager.dict()
            self.mdict.update(dict(zip(self.keys, self.values)))

    def teardown(self) -> None:
        """Undo everything setup() and the measures did; every step runs, whatever fails."""
        steps: list[tuple[str, Callable[[], object]]] = [
            ("echo child", self._stop_echo),
            ("child processes", self.children.reap_all),
            ("shmstore handle", lambda: self.store is not None and self.store.close()),
            ("coordinator", lambda: self.coord is not None and self.coord.stop()),
            ("shmstore store", self._destroy_store),
            ("redis client", lambda: self.redis is not None and self.redis.close()),
            ("redis-server", lambda: self.redis_server is not None and self.redis_server.stop()),
            ("manager", lambda: self.manager is not None and self.manager.shutdown()),
            ("lmdb", self._close_lmdb),
            ("temp dir", lambda: self.tmpdir and shutil.rmtree(self.tmpdir, ignore_errors=True)),
        ]
        for what, step in steps:
            try:
                step()
            except BaseException as e:  # noqa: BLE001 - clean up the rest regardless
                log(f"cleanup of {what} failed: {type(e).__name__}: {e}")

    def _destroy_store(self) -> None:
        if not self.served:
            return
        import shmstore  # noqa: PLC0415

        shmstore.destroy(self.name)

    def _close_lmdb(self) -> None:
        for env in (self.env_sync, self.env_nosync):
            if env is not None:
                env.close()

    def _stop_echo(self) -> None:
        if self.echo_sock is not None:
            self.echo_sock.close()
            self.echo_sock = None
        if self.echo_proc is not None:
            self.children.reap(self.echo_proc)
            self.echo_proc = None

    # -- running -----------------------------------------------------------------------

    def run(self) -> None:
        """Each measure's rows interleaved: repeat r of every row runs before repeat r+1
        of any, so a change of background load hits every system alike."""
        for group in GROUPS:
            if group not in self.cfg.groups:
                continue
            specs = [s for s in SPECS if s.group == group]
            if group == "writes_2proc":
                self.run_writers(specs)
            else:
                self.run_timed(specs)

    def skip_reason(self, spec: Spec) -> str | None:
        if spec.peer == "redis":
            return self.redis_skip
        if spec.peer == "lmdb":
            return self.lmdb_skip
        return None

    def finish(self, res: Result) -> None:
        self.results[res.spec.id] = res
        shown = f"skipped: {res.skipped}" if res.skipped else fmt_value(res.median, res.spec.unit)
        log(f"  {res.spec.id:<32} {shown}")

    def run_timed(self, specs: list[Spec]) -> None:
        live: list[tuple[Spec, Callable[[int], int], int, list[float]]] = []
        skipped = []
        for spec in specs:
            reason = self.skip_reason(spec)
            if reason is not None:
                skipped.append(Result(spec, skipped=reason))
                continue
            fn = getattr(self, f"b_{spec.group}_{spec.system}")()
            n = calibrate(fn, self.cfg)
            _run(fn, n)  # warm-up, excluded
            live.append((spec, fn, n, []))
        for _ in range(self.cfg.repeats):
            for _spec, fn, n, runs in live:
                runs.append(_run(fn, n) / n)
        for spec, _fn, n, runs in live:
            res = Result(spec, n=n)
            if spec.unit == "ops/s":
                res.runs = [1e9 / r for r in runs]
            else:
                res.runs = runs
            res.median = statistics.median(res.runs)
            self.finish(res)
        for res in skipped:
            self.finish(res)

    # -- get of one key ---------------------------------------------------------------------

    def _get_keys(self, group: str, kind: str) -> Callable[[int], list]:
        """A function building the key list of n gets: str or bytes keys."""
        src = self.keys if kind == "str" else self.kbs
        if group == "get_hot":
            hot = src[self.hot]
            return lambda n: [hot] * n
        seq = [src[i] for i in self.rand_idx]
        return lambda n: cycle_list(seq, n)

    def _loop(self, get: Callable, keys_of: Callable[[int], list]) -> Callable[[int], int]:
        def fn(n: int) -> int:
            ks = keys_of(n)
            t0 = clock()
            for k in ks:
                get(k)
            return clock() - t0

        return fn

    def _lmdb_txn_loop(self, keys_of: Callable[[int], list], decode: bool) -> Callable[[int], int]:
        env = self.env_nosync
        dec = self.decode

        def fn(n: int) -> int:
            ks = keys_of(n)
            with env.begin(buffers=False) as txn:
                get = txn.get
                if decode:
                    t0 = clock()
                    for k in ks:
                        dec(get(k))
                    return clock() - t0
                t0 = clock()
                for k in ks:
                    get(k)
                return clock() - t0

        return fn

    def _lmdb_txn_per_get(self, keys_of: Callable[[int], list]) -> Callable[[int], int]:
        begin = self.env_nosync.begin

        def fn(n: int) -> int:
            ks = keys_of(n)
            t0 = clock()
            for k in ks:
                with begin() as txn:
                    txn.get(k)
            return clock() - t0

        return fn

    def _numpy_copy(self, nbytes: int) -> Callable[[int], int]:
        import numpy as np  # noqa: PLC0415

        src = np.frombuffer(b"".join(self.vbs)[:nbytes], dtype=np.uint8).copy()
        dst = np.empty_like(src)
        copyto = np.copyto

        def fn(n: int) -> int:
            t0 = clock()
            for _ in range(n):
                copyto(dst, src)
            return clock() - t0

        return fn

    def b_get_hot_shmstore(self):
        return self._loop(self.store.get, self._get_keys("get_hot", "str"))

    def b_get_hot_lmdb_txn(self):
        return self._lmdb_txn_loop(self._get_keys("get_hot", "bytes"), decode=False)

    def b_get_hot_lmdb_txn_decode(self):
        return self._lmdb_txn_loop(self._get_keys("get_hot", "bytes"), decode=True)

    def b_get_hot_lmdb_txn_per_get(self):
        return self._lmdb_txn_per_get(self._get_keys("get_hot", "bytes"))

    def b_get_hot_redis(self):
        return self._loop(self.redis.get, self._get_keys("get_hot", "bytes"))

    def b_get_hot_manager(self):
        return self._loop(self.mdict.get, self._get_keys("get_hot", "str"))

    def b_get_hot_dict(self):
        return self._loop(dict(zip(self.keys, self.values)).get, self._get_keys("get_hot", "str"))

    def b_get_hot_numpy_copy(self):
        return self._numpy_copy(VALUE_BYTES)

    def b_get_random_shmstore(self):
        return self._loop(self.store.get, self._get_keys("get_random", "str"))

    def b_get_random_lmdb_txn(self):
        return self._lmdb_txn_loop(self._get_keys("get_random", "bytes"), decode=False)

    def b_get_random_lmdb_txn_decode(self):
        return self._lmdb_txn_loop(self._get_keys("get_random", "bytes"), decode=True)

    def b_get_random_lmdb_txn_per_get(self):
        return self._lmdb_txn_per_get(self._get_keys("get_random", "bytes"))

    def b_get_random_redis(self):
        return self._loop(self.redis.get, self._get_keys("get_random", "bytes"))

    def b_get_random_manager(self):
        return self._loop(self.mdict.get, self._get_keys("get_random", "str"))

    def b_get_random_dict(self):
        return self._loop(dict(zip(self.keys, self.values)).get, self._get_keys("get_random", "str"))

    # -- get_many ---------------------------------------------------------------------------

    def _many(self, call: Callable[[list], object], kind: str) -> Callable[[int], int]:
        src = self.keys if kind == "str" else self.kbs
        ks = [src[i] for i in self.many_idx]

        def fn(n: int) -> int:
            t0 = clock()
            for _ in range(n):
                call(ks)
            return clock() - t0

        return fn

    def b_get_many_shmstore(self):
        out = self.store.get_many([self.keys[i] for i in self.many_idx])
        assert out == [self.values[i] for i in self.many_idx], "shmstore get_many returned wrong values"
        return self._many(self.store.get_many, "str")

    def _lmdb_many(self, decode: bool) -> Callable[[int], int]:
        env = self.env_nosync
        dec = self.decode
        ks = [self.kbs[i] for i in self.many_idx]

        def fn(n: int) -> int:
            with env.begin(buffers=False) as txn:
                get = txn.get
                if decode:
                    t0 = clock()
                    for _ in range(n):
                        [dec(get(k)) for k in ks]
                    return clock() - t0
                t0 = clock()
                for _ in range(n):
                    [get(k) for k in ks]
                return clock() - t0

        return fn

    def b_get_many_lmdb_loop(self):
        return self._lmdb_many(decode=False)

    def b_get_many_lmdb_loop_decode(self):
        return self._lmdb_many(decode=True)

    def b_get_many_redis_mget(self):
        return self._many(self.redis.mget, "bytes")

    def b_get_many_dict(self):
        get = dict(zip(self.keys, self.values)).get
        return self._many(lambda ks: [get(k) for k in ks], "str")

    def b_get_many_numpy_copy(self):
        return self._numpy_copy(VALUE_BYTES * MANY)

    # -- put round trip ---------------------------------------------------------------------

    def _put_loop(self, put: Callable, kind: str) -> Callable[[int], int]:
        keys = [(self.keys if kind == "str" else self.kbs)[i] for i in self.rand_idx]
        vals = [(self.values if kind == "str" else self.vbs)[i] for i in self.rand_idx]
        pairs = list(zip(keys, vals))

        def fn(n: int) -> int:
            ps = cycle_list(pairs, n)
            t0 = clock()
            for k, v in ps:
                put(k, v)
            return clock() - t0

        return fn

    def b_put_shmstore(self):
        return self._put_loop(self.store.put, "str")

    def b_put_redis(self):
        return self._put_loop(self.redis.set, "bytes")

    def _lmdb_put(self, env) -> Callable[[int], int]:
        def put(k: bytes, v: bytes) -> None:
            with env.begin(write=True) as txn:
                txn.put(k, v)

        return self._put_loop(put, "bytes")

    def b_put_lmdb_sync(self):
        return self._lmdb_put(self.env_sync)

    def b_put_lmdb_nosync(self):
        return self._lmdb_put(self.env_nosync)

    def b_put_manager(self):
        return self._put_loop(self.mdict.__setitem__, "str")

    def b_put_dict(self):
        return self._put_loop(dict(zip(self.keys, self.values)).__setitem__, "str")

    def b_put_socketpair(self):
        a, b = socket.socketpair()
        try:
            self.echo_proc = self.children.popen(
                [sys.executable, os.path.join(HERE, "_bench_peers.py"), "echo", str(b.fileno())],
                pass_fds=(b.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            b.close()
        self.echo_sock = a
        send, recv = a.send, a.recv
        send(b"x")
        assert recv(1) == b"x"

        def fn(n: int) -> int:
            t0 = clock()
            for _ in range(n):
                send(b"x")
                recv(1)
            return clock() - t0

        return fn

    # -- pipelined puts ---------------------------------------------------------------------

    def b_put_pipelined_shmstore(self):
        put, flush = self.store.put, self.store.flush
        pairs = [(self.keys[i], self.values[i]) for i in self.rand_idx]

        def fn(n: int) -> int:
            ps = cycle_list(pairs, n)
            t0 = clock()
            for k, v in ps:
                put(k, v, wait=False)
            flush()
            return clock() - t0

        return fn

    def b_put_pipelined_redis_pipeline(self):
        r = self.redis
        pairs = [(self.kbs[i], self.vbs[i]) for i in self.rand_idx]

        def fn(n: int) -> int:
            ps = cycle_list(pairs, n)
            t0 = clock()
            for start in range(0, n, 1000):
                p = r.pipeline(transaction=False)
                for k, v in ps[start:start + 1000]:
                    p.set(k, v)
                p.execute()
            return clock() - t0

        return fn

    def b_put_pipelined_lmdb_one_txn(self):
        env = self.env_nosync
        pairs = [(self.kbs[i], self.vbs[i]) for i in self.rand_idx]

        def fn(n: int) -> int:
            ps = cycle_list(pairs, n)
            t0 = clock()
            with env.begin(write=True) as txn:
                put = txn.put
                for k, v in ps:
                    put(k, v)
            return clock() - t0

        return fn

    # -- 2 writer processes -------------------------------------------------------------------

    def _writer_target(self, spec: Spec) -> tuple[str, str]:
        return {
            "shmstore": ("shmstore", self.name),
            "redis": ("redis", self.redis_server.socket_path if self.redis_server else ""),
            "lmdb_nosync": ("lmdb-nosync", os.path.join(self.tmpdir, "lmdb-nosync")),
            "lmdb_sync": ("lmdb-sync", os.path.join(self.tmpdir, "lmdb-sync")),
        }[spec.system]

    @staticmethod
    def _writer_round(procs: list[subprocess.Popen], seconds: float) -> list[float]:
        """Let every writer of one system put for ``seconds``; their ops/s each."""
        cmd = f"go {int(seconds * 1e9)}\n".encode()
        for p in procs:
            p.stdin.write(cmd)
        got = [read_line(p, seconds + 60).split() for p in procs]
        return [int(c) / int(e) * 1e9 for c, e in got]

    def run_writers(self, specs: list[Spec]) -> None:
        """2 writer processes per system, all started up front and idle (blocked on a
        pipe) except during their own rounds; rounds interleave across systems."""
        live: list[tuple[Spec, list[subprocess.Popen], list[float], list[list[float]]]] = []
        skipped = []
        try:
            for spec in specs:
                reason = self.skip_reason(spec)
                if reason is not None:
                    skipped.append(Result(spec, skipped=reason))
                    continue
                system, target = self._writer_target(spec)
                procs = [self.children.popen(
                    [sys.executable, os.path.join(HERE, "_bench_peers.py"), "writer", system, target, str(i)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0) for i in range(2)]
                live.append((spec, procs, [], []))
            for _spec, procs, _, _ in live:
                for p in procs:
                    line = read_line(p, 60)
                    if line != "ready":
                        raise RuntimeError(f"writer {p.args!r} said {line!r}, not 'ready'")
            for _spec, procs, _, _ in live:
                self._writer_round(procs, self.cfg.writer_warmup_s)  # warm-up, excluded
            for _ in range(self.cfg.repeats):
                for _spec, procs, rates, per_proc in live:
                    each = self._writer_round(procs, self.cfg.writer_s)
                    rates.append(sum(each))
                    per_proc.append(each)
            for _spec, procs, _, _ in live:
                for p in procs:
                    p.stdin.write(b"quit\n")
        finally:
            for _spec, procs, _, _ in live:
                for p in procs:
                    self.children.reap(p, timeout=10)
        for spec, _procs, rates, per_proc in live:
            self.finish(Result(spec, median=statistics.median(rates), runs=rates, extra={
                "per_process_ops_per_s": per_proc, "duration_s": self.cfg.writer_s, "processes": 2}))
        for res in skipped:
            self.finish(res)

    # -- report -------------------------------------------------------------------------------

    def speedup(self, spec: Spec) -> float | None:
        """How many times faster shmstore is than this row (None: not comparable)."""
        if spec.system == "shmstore" and spec.peer == "shmstore":
            return None
        mine = self.results.get(f"{spec.group}.shmstore")
        other = self.results.get(spec.id)
        if mine is None or other is None or mine.median is None or other.median is None:
            return None
        if spec.unit == "ns/op":
            return other.median / mine.median
        return mine.median / other.median

    def target_rows(self) -> list[dict[str, Any]]:
        out = []
        for t in TARGETS:
            if t.subject not in self.results or t.baseline not in self.results:
                continue
            ratio = self.speedup(SPEC_BY_ID[t.baseline])
            skipped = self.results[t.baseline].skipped or self.results[t.subject].skipped
            out.append({
                "target": t.text, "subject": t.subject, "baseline": t.baseline,
                "min_speedup": t.min_speedup, "speedup": ratio,
                "status": "skipped" if ratio is None else ("pass" if ratio >= t.min_speedup else "miss"),
                **({"skip_reason": skipped} if skipped and ratio is None else {}),
            })
        return out


# -- formatting ---------------------------------------------------------------------------


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ns/op":
        if v < 1e3:
            return f"{v:.0f} ns"
        if v < 1e6:
            return f"{v / 1e3:.2f} us"
        return f"{v / 1e6:.2f} ms"
    return fmt_rate(v)


def fmt_rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f} M/s"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k/s"
    return f"{v:.0f} /s"


def md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown(bench: Bench, meta: dict[str, Any]) -> str:
    targets_by_baseline: dict[str, list[dict[str, Any]]] = {}
    for t in bench.target_rows():
        targets_by_baseline.setdefault(t["baseline"], []).append(t)
    header = ["measure", "what", "system", "decoded", "median", "ops/s", "shmstore speedup", "target", "status"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + [":---:"] + ["---:"] * 3 + ["---", ":---:"]) + "|",
    ]
    for spec in SPECS:
        res = bench.results.get(spec.id)
        if res is None:
            continue
        if res.skipped:
            median, rate, ratio = f"skipped: {res.skipped.split(';')[0]}", "-", "-"
        else:
            median = fmt_value(res.median, spec.unit)
            rate = fmt_rate(1e9 / res.median if spec.unit == "ns/op" else res.median)
            r = bench.speedup(spec)
            ratio = "-" if r is None else f"{r:.2f}x"
        ts = targets_by_baseline.get(spec.id, [])
        target = "; ".join(f">= {t['min_speedup']:g}x ({t['target']})" for t in ts) or "-"
        status = "; ".join(t["status"] for t in ts) or "-"
        cells = [f"`{spec.id}`", GROUPS[spec.group], spec.label, spec.decoded, median, rate, ratio,
                 target, status]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")

    out = [
        f"# shmstore benchmark{' (--quick)' if bench.cfg.quick else ''}",
        "",
        f"{meta['cpu_model']}, {meta['nproc']} CPUs, Python {meta['python']}, "
        f"shmstore {meta['packages'].get('shmstore')}, {meta['date_utc']}. "
        f"Medians of {bench.cfg.repeats} runs of ~{bench.cfg.target_s:g} s each "
        f"(2-process writers: {bench.cfg.writer_s:g} s rounds), warm-up excluded. "
        f"Values: a 62-char str, 64 B as msgpack. 'shmstore speedup' = how many times "
        f"faster shmstore is than that row (peer time / shmstore time, or shmstore ops/s "
        f"/ peer ops/s).",
        "",
        *lines,
        "",
    ]
    if bench.redis_skip:
        out += [f"Redis rows skipped: {bench.redis_skip}", ""]
    trows = bench.target_rows()
    if trows:
        out.append("Targets:")
        out.append("")
        for t in trows:
            r = "-" if t["speedup"] is None else f"{t['speedup']:.2f}x"
            out.append(f"- {t['status'].upper()}: {t['target']} (shmstore speedup {r}, "
                       f"needs >= {t['min_speedup']:g}x)")
        out.append("")
    return "\n".join(out)


# -- machine info ---------------------------------------------------------------------------


def machine_info(bench: Bench) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    pkgs = {}
    for p in ("shmstore", "msgspec", "numpy", "posix_ipc", "lmdb", "redis", "psutil"):
        try:
            pkgs[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pkgs[p] = None
    try:
        import lmdb  # noqa: PLC0415

        lmdb_lib = ".".join(map(str, lmdb.version()))
    except ImportError:
        lmdb_lib = None
    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "packages": pkgs,
        "lmdb_library": lmdb_lib,
        "redis_server": bench.redis_version or None,
        "git_commit": commit,
        "loadavg_at_start": list(os.getloadavg()),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark shmstore against py-lmdb, Redis (redis-py over a unix socket), "
                    "multiprocessing.Manager().dict() and floors (dict, socketpair ping-pong, "
                    "numpy copy), all in this process tree on the same data. Prints a "
                    "Markdown table of medians and shmstore's speedup over each peer, with "
                    "the targets marked pass/miss.",
        epilog=f"measures: {', '.join(GROUPS)}. Redis rows are skipped (with the reason) "
               f"when redis-server is not on PATH.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: short loops, 3 repeats, well under 60 s (what CI runs)")
    ap.add_argument("--json", metavar="PATH", help="write every raw number and machine info as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the results table as Markdown")
    ap.add_argument("--repeats", type=int, help="timed runs per measure (default 5; --quick 3)")
    ap.add_argument("--target-time", type=float, metavar="S",
                    help="seconds per timed run (default 0.3; --quick 0.03)")
    ap.add_argument("--writer-time", type=float, metavar="S",
                    help="seconds per round of the 2-process writers (default 1.0; --quick 0.25)")
    ap.add_argument("--only", metavar="MEASURES",
                    help=f"comma-separated subset of: {', '.join(GROUPS)}")
    ap.add_argument("--redis-server", default="redis-server", metavar="BINARY",
                    help="the redis-server to start (default: redis-server on PATH)")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis rows")
    args = ap.parse_args(argv)
    if args.only:
        bad = [g for g in args.only.split(",") if g not in GROUPS]
        if bad:
            ap.error(f"--only: unknown measure(s) {', '.join(bad)}; choose from {', '.join(GROUPS)}")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def config(args: argparse.Namespace) -> Config:
    q = args.quick
    return Config(
        quick=q,
        repeats=args.repeats or (3 if q else 5),
        target_s=args.target_time or (0.03 if q else 0.3),
        max_n=200_000 if q else 3_000_000,
        writer_s=args.writer_time or (0.25 if q else 1.0),
        writer_warmup_s=0.1 if q else 0.3,
        groups=args.only.split(",") if args.only else list(GROUPS),
        redis_binary=args.redis_server,
        use_redis=not args.no_redis,
    )


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    bench = Bench(cfg)
    t0 = time.monotonic()
    try:
        bench.setup()
        meta = machine_info(bench)
        log(f"{meta['cpu_model']}, {meta['nproc']} CPUs, Python {meta['python']}; "
            f"{'quick' if cfg.quick else 'full'} run, {cfg.repeats} repeats")
        load = meta["loadavg_at_start"][0]
        if load > 0.5 * (os.cpu_count() or 1):
            log(f"WARNING: load average {load:.2f} on {os.cpu_count()} CPUs: other work competes "
                f"with the benchmark, figures will be noisy")
        bench.run()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        bench.teardown()
    elapsed = time.monotonic() - t0
    md = markdown(bench, meta)
    doc = {
        "machine": meta,
        "config": {"quick": cfg.quick, "repeats": cfg.repeats, "target_time_s": cfg.target_s,
                   "max_n": cfg.max_n, "writer_time_s": cfg.writer_s,
                   "writer_warmup_s": cfg.writer_warmup_s, "groups": cfg.groups,
                   "keys": NKEYS, "get_many_keys": MANY, "value_bytes": VALUE_BYTES,
                   "value": "a 62-character str (msgpack: 64 bytes); lmdb and Redis hold the msgpack bytes",
                   "store_name": bench.name, "tmpdir": bench.tmpdir, "elapsed_s": elapsed,
                   "loadavg_at_end": list(os.getloadavg())},
        "measures": {s.id: bench.results[s.id].as_json() for s in SPECS if s.id in bench.results},
        "targets": bench.target_rows(),
        "redis_skipped": bench.redis_skip,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    print(md)
    log(f"done in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
