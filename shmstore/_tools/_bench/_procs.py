"""The measures that need several processes: writers, readers under a writer, durable
writers, and memory.

Every child runs ``python shmstore/_tools/_bench/_peers.py`` and is driven over pipes: all
children of a measure start up front and sit idle (blocked on a pipe) except during
their own rounds, and the rounds of the systems interleave, so a change of background
load hits every system alike. A warm-up round per system is excluded.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from typing import Iterator

from . import _peers as peers
from ._core import Result, Spec, log, read_line
from ._specs import READER_TARGET_BYTES


def _go(procs: list[subprocess.Popen], seconds: float) -> None:
    cmd = f"go {int(seconds * 1e9)}\n".encode()
    for p in procs:
        p.stdin.write(cmd)


def _collect(procs: list[subprocess.Popen], seconds: float) -> list[float]:
    """Each child's ops/s of the round just started."""
    got = [read_line(p, seconds + 60).split() for p in procs]
    return [int(c) / int(e) * 1e9 for c, e in got]


def _ready(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        line = read_line(p, 120)
        if line != "ready":
            raise RuntimeError(f"child {p.args!r} said {line!r}, not 'ready'")


def _bytecode_cached() -> bool:
    """Whether shmstore's modules load from ``__pycache__``: without it (a fresh tree
    run with PYTHONDONTWRITEBYTECODE set) every reader compiles them at import, which
    costs it about 1 MiB more."""
    import importlib.util  # noqa: PLC0415

    import shmstore._store  # noqa: PLC0415

    return os.path.exists(importlib.util.cache_from_source(shmstore._store.__file__))


class Procs:
    """Mixin of :class:`~shmstore._tools._bench._suite.Bench`: the multi-process measures."""

    def _writer_target(self, system: str, durable: bool) -> tuple[str, str]:
        if system == "shmstore":
            return "shmstore", self.durable_store() if durable else self.writer_store()
        if system == "redis":
            return "redis", self.redis_server.socket_path
        if system == "lmdb_nosync":
            return "lmdb-nosync", self.lmdb_dir("writers-nosync", sync=False)
        if system == "lmdb_sync":
            return "lmdb-sync", self.lmdb_dir("durable" if durable else "writers-sync", sync=True)
        if system == "diskcache":
            return "diskcache", self.diskcache_dir("writers")
        if system == "memcached":
            return "memcached", self.memcached_server.socket_path
        raise KeyError(system)

    def _writers(self, spec: Spec, durable: bool, nproc: int) -> list[subprocess.Popen]:
        """``nproc`` idle writer processes of a system. They are kept for the next
        measure of the family (writes_1/2/4proc, durable_1/2/8proc), which only starts
        the extra ones it needs: starting Python processes is most of a quick run."""
        system, target = self._writer_target(spec.system, durable)
        pool = self.writer_pools.setdefault((system, target), [])
        fresh = [self.children.peer("writer", system, target, i) for i in range(len(pool), nproc)]
        pool.extend(fresh)
        return fresh

    def close_writer_pools(self) -> None:
        for pool in self.writer_pools.values():
            for p in pool:
                try:
                    p.stdin.write(b"quit\n")
                except OSError:
                    pass
            for p in pool:
                self.children.reap(p, timeout=10)
        self.writer_pools.clear()

    def runnable(self, specs: list[Spec]) -> Iterator[Spec]:
        """The specs that can run here; each of the others is finished as skipped."""
        for spec in specs:
            reason = self.skip_reason(spec)
            if reason is None:
                yield spec
            else:
                self.finish(Result(spec, skipped=reason))

    def run_writers(self, specs: list[Spec]) -> None:
        """writes_Nproc / durable_Nproc: N writer processes per system."""
        group = specs[0].group
        nproc = int(group.split("_")[1].removesuffix("proc"))
        durable = group.startswith("durable")
        live: list[tuple[Spec, list[subprocess.Popen], list[float], list[list[float]]]] = []
        fresh = []
        try:
            for spec in self.runnable(specs):
                fresh += self._writers(spec, durable, nproc)
                system, target = self._writer_target(spec.system, durable)
                live.append((spec, self.writer_pools[(system, target)][:nproc], [], []))
            _ready(fresh)
            for _spec, procs, _, _ in live:  # warm-up, excluded
                _go(procs, self.cfg.writer_warmup_s)
                _collect(procs, self.cfg.writer_warmup_s)
            for _ in range(self.cfg.repeats):
                for _spec, procs, rates, per_proc in live:
                    _go(procs, self.cfg.writer_s)
                    each = _collect(procs, self.cfg.writer_s)
                    rates.append(sum(each))
                    per_proc.append(each)
        except BaseException:
            self.close_writer_pools()
            raise
        for spec, _procs, rates, per_proc in live:
            self.finish(Result(spec, median=statistics.median(rates), runs=rates, extra={
                "per_process_ops_per_s": per_proc, "duration_s": self.cfg.writer_s,
                "processes": nproc}))

    def run_reads_under_write(self, specs: list[Spec]) -> None:
        """2 reader processes of the 10k/64 B data set while 1 writer puts its keys."""
        ds = self.data("reads_under_write")
        live = []
        try:
            for spec in self.runnable(specs):
                system, target = {
                    "shmstore": ("shmstore", ds.store_name),
                    "lmdb": ("lmdb", ds.env_dir),
                    "redis": ("redis", self.redis_server.socket_path if self.redis_server else ""),
                    "diskcache": ("diskcache", self.dcache_dir),
                    "memcached": ("memcached", self.memcached_server.socket_path if self.memcached_server else ""),
                }[spec.system]
                wsys = "lmdb-nosync" if system == "lmdb" else system
                writer = self.children.peer("writer", wsys, target, 0, ds.tag, ds.n)
                readers = [self.children.peer("reader", system, target, ds.tag, ds.n) for _ in range(2)]
                live.append((spec, writer, readers, [], []))
            for _spec, writer, readers, _, _ in live:
                _ready([writer, *readers])
            secs = [self.cfg.writer_warmup_s] + [self.cfg.writer_s] * self.cfg.repeats
            for r, s in enumerate(secs):
                for _spec, writer, readers, rates, wrates in live:
                    _go([writer], s + 0.05)  # the writer starts first and ends last
                    _go(readers, s)
                    each = _collect(readers, s)
                    w = _collect([writer], s)
                    if r:  # round 0 is the warm-up
                        rates.append(sum(each))
                        wrates.append(w[0])
            for _spec, writer, readers, _, _ in live:
                for p in (writer, *readers):
                    p.stdin.write(b"quit\n")
        finally:
            for _spec, writer, readers, _, _ in live:
                for p in (writer, *readers):
                    self.children.reap(p, timeout=10)
        for spec, _w, _r, rates, wrates in live:
            self.finish(Result(spec, median=statistics.median(rates), runs=rates, extra={
                "writer_ops_per_s": wrates, "duration_s": self.cfg.writer_s, "readers": 2}))

    def _reader_target(self, system: str) -> str:
        ds = self.data("memory")
        return {
            "bare": "", "shmstore": ds.store_name, "lmdb": ds.env_dir, "diskcache": self.dcache_dir,
            "redis": self.redis_server.socket_path if self.redis_server else "",
            "memcached": self.memcached_server.socket_path if self.memcached_server else "",
        }[system]

    def _reader_uss(self, system: str) -> int:
        """USS of a ``python -c`` reader of ``system`` (``peers.mem_reader_code``), taken
        from outside while it waits, so nothing of the measuring counts."""
        import psutil  # noqa: PLC0415

        ds = self.data("memory")
        p = self.children.popen([sys.executable, "-c", peers.mem_reader_code(system),
                                 self._reader_target(system), ds.tag, str(ds.n)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        try:
            line = read_line(p, 120)
            if line != "ready":
                raise RuntimeError(f"memory reader {system} said {line!r}, not 'ready'")
            return psutil.Process(p.pid).memory_full_info().uss
        finally:
            self.children.reap(p, timeout=10)

    def run_memory(self, specs: list[Spec]) -> None:
        """Sizes and per-client overheads with the big 64 B data set loaded (one
        measurement each, not a median: memory does not jitter like time).

        The ``*_reader`` rows: the private memory (USS) of a process that imports a
        system's client, connects and reads 1,000 keys, beyond that of a bare
        interpreter (``bare_reader``, measured first)."""
        import psutil  # noqa: PLC0415

        ds = self.data("memory")
        bare = None
        for spec in self.runnable(specs):
            extra: dict = {"records": ds.n}
            if spec.system == "shmstore_segment":
                st = os.stat(f"/dev/shm/shmstore.{ds.store_name}")
                value = st.st_size
                extra["allocated"] = st.st_blocks * 512  # tmpfs pages actually in use
                extra["note"] = "the segment's size (header, page table, pages of the memory= budget, index)"
            elif spec.system == "shmstore_coordinator":
                mi = psutil.Process(ds.coord.pid).memory_full_info()
                value, extra["rss"] = mi.uss, mi.rss
            elif spec.system == "lmdb_file":
                value = os.path.getsize(os.path.join(ds.env_dir, "data.mdb"))
                extra["note"] = "the file's apparent size; lmdb maps it (page cache)"
            elif spec.system == "redis_server":
                value = ds.redis_bytes
                extra["note"] = "INFO used_memory after loading these records minus before"
            elif spec.system == "diskcache_file":
                value = ds.diskcache_bytes
                extra["note"] = "Cache.volume() after loading these records minus before"
            elif spec.system == "memcached_server":
                value = ds.memcached_bytes
                extra["note"] = "stats 'bytes' after loading these records minus before"
            elif spec.system == "bare_reader":
                value = bare = self._reader_uss("bare")
            elif spec.system.endswith("_reader"):
                if bare is None:
                    bare = self._reader_uss("bare")
                uss = self._reader_uss(spec.system.removesuffix("_reader"))
                value = uss - bare
                extra.update(uss=uss, bare_uss=bare, mib_beyond_bare=value / 2**20)
                if spec.system == "shmstore_reader":
                    extra.update(target_bytes=READER_TARGET_BYTES, meets_target=value <= READER_TARGET_BYTES,
                                 bytecode_cached=_bytecode_cached())
            else:
                system, target = {
                    "shmstore_client": ("shmstore", ds.store_name),
                    "lmdb_client": ("lmdb", ds.env_dir),
                    "redis_client": ("redis", self.redis_server.socket_path if self.redis_server else ""),
                }[spec.system]
                p = self.children.peer("memclient", system, target, ds.tag, ds.n)
                try:
                    rss0, uss0, rss1, uss1 = map(int, read_line(p, 120).split())
                finally:
                    self.children.reap(p, timeout=10)
                value = uss1 - uss0
                extra.update(rss_delta=rss1 - rss0, uss_before=uss0, rss_before=rss0)
            self.finish(Result(spec, median=float(value), runs=[float(value)], n=1, extra=extra))
        log(f"  (memory measured with {ds.n} records)")
