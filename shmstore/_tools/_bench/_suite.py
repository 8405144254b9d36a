"""The benchmark run: its data sets, its peers, and the order the measures run in."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from typing import Any, Callable

from . import _peers as peers
from .._format import figure
from ._core import Children, Config, Result, Spec, calibrate, log, run_once
from ._procs import Procs
from ._reads import MANY, Reads
from ._specs import DATASETS, GROUPS, PROC_GROUPS, SPEC_BY_ID, SPECS, TARGETS, DataSet, MEMORY_PAIRS

LMDB_MISSING = "the lmdb python package is missing (pip install 'shmstore[bench]')"
DISKCACHE_MISSING = "the diskcache python package is missing (pip install 'shmstore[bench]')"


class Loaded:
    """One data set, loaded into shmstore and every peer (each on first use)."""

    def __init__(self, spec: DataSet, n: int, rng: random.Random) -> None:
        import msgspec  # noqa: PLC0415

        self.tag = spec.tag
        self.n = n
        self.nocache = None  # a second shmstore handle, read_cache=0 (Bench.nocache_store)
        self.value_bytes = spec.value_bytes
        self.keys = [peers.key_for(spec.tag, i) for i in range(n)]
        self.kbs = [k.encode() for k in self.keys]
        self._encode = msgspec.msgpack.encode
        self.sample_value = self.value(0)
        assert len(self.encoded(0)) == spec.value_bytes
        order = list(range(n))
        rng.shuffle(order)
        self.rand_idx = order[:min(n, 100_000)]  # the random key order of a get loop
        self.many_idx = rng.sample(range(n), min(n, MANY))
        self.hot = n // 2
        self.store_name = ""
        self.coord = None
        self.store = None
        self.env = None
        self.env_sync = None
        self.env_dir = ""
        self.redis_bytes = 0
        self.diskcache_bytes = 0
        self.memcached_bytes = 0

    def value(self, i: int) -> str:
        return peers.value_for(i, self.value_bytes)

    def encoded(self, i: int) -> bytes:
        return self._encode(self.value(i))


def _memory_store(ds: Loaded) -> dict:
    """serve()'s sizes for a data set, as a user who knows its records would set them:
    a memory budget of the data's slots (each record's size class, from the longest
    key) rounded up to whole pages plus one page, records bounded at n + n/16 + 1024."""
    from shmstore import _layout as L  # noqa: PLC0415

    klen = max(len(k) for k in ds.kbs)
    lay = L.Layout(capacity=1, key_size=16, value_size=ds.value_bytes + 16, memory=1 << 30)
    slot = lay.classes[lay.class_for(L.slot_need(klen, ds.value_bytes))]
    memory = (ds.n * slot // lay.page_size + 2) * lay.page_size
    return dict(memory=memory, capacity=ds.n + ds.n // 16 + 1024, key_size=16,
                value_size=ds.value_bytes + 16)


class Bench(Reads, Procs):
    def __init__(self, cfg: Config) -> None:
        import msgspec  # noqa: PLC0415

        self.cfg = cfg
        self.results: dict[str, Result] = {}
        self.children = Children()
        self.tmpdir = ""
        self.name = f"bench-{uuid.uuid4().hex[:16]}"
        self.datasets: dict[str, Loaded] = {}
        self.coords: list = []  # every coordinator started, to stop at the end
        self.stores: list = []  # every handle opened
        self.served: list[str] = []  # every store name served, to destroy at the end
        self.envs: dict[str, Any] = {}
        self.writer_pools: dict[tuple[str, str], list[subprocess.Popen]] = {}
        self.redis_server: peers.RedisServer | None = None
        self.redis = None
        self.redis_skip: str | None = None
        self.lmdb_skip: str | None = None
        self.diskcache_skip: str | None = None
        self.dcache = None  # the diskcache Cache holding every data set
        self.dcache_dir = ""
        self.memcached_server: peers.MemcachedServer | None = None
        self.memcached = None  # the pymemcache client
        self.memcached_skip: str | None = None
        self.memcached_version = ""
        self.manager = None
        self.mdict = None
        self.echo_sock: socket.socket | None = None
        self.echo_proc: subprocess.Popen | None = None
        self.redis_version = ""
        self.decode = msgspec.msgpack.Decoder().decode
        self.rng = random.Random(1234)
        self.t0 = time.monotonic()

    # -- setup / teardown ------------------------------------------------------------

    def setup(self) -> None:
        base = tempfile.gettempdir()
        if len(base) > 60:  # a unix socket path must fit in 108 bytes
            base = "/tmp"
        self.tmpdir = tempfile.mkdtemp(prefix="shmstore-bench-", dir=base)
        try:
            import lmdb  # noqa: PLC0415, F401
        except ImportError:
            self.lmdb_skip = LMDB_MISSING
            log(f"NOTE: skipping py-lmdb: {self.lmdb_skip}")
        if not self.cfg.use_redis:
            self.redis_skip = "disabled with --no-redis"
        else:
            self.redis_server = peers.RedisServer(self.tmpdir, self.cfg.redis_binary)
            self.redis_skip = self.redis_server.start()
            if self.redis_skip is None:
                import redis  # noqa: PLC0415

                self.redis_version = self.redis_server.version
                self.redis = redis.Redis(unix_socket_path=self.redis_server.socket_path)
            else:
                log(f"NOTE: skipping Redis: {self.redis_skip}")
        try:
            import diskcache  # noqa: PLC0415, F401
        except ImportError:
            self.diskcache_skip = DISKCACHE_MISSING
            log(f"NOTE: skipping diskcache: {self.diskcache_skip}")
        else:
            self.dcache_dir = os.path.join(self.tmpdir, "diskcache")
            self.dcache = peers.open_diskcache(self.dcache_dir)
        if not self.cfg.use_memcached:
            self.memcached_skip = "disabled with --no-memcached"
        else:
            self.memcached_server = peers.MemcachedServer(self.tmpdir, self.cfg.memcached_binary)
            self.memcached_skip = self.memcached_server.start()
            if self.memcached_skip is None:
                self.memcached_version = self.memcached_server.version
                self.memcached = peers.memcached_client(self.memcached_server.socket_path)
            else:
                log(f"NOTE: skipping memcached: {self.memcached_skip}")
        if any(s.peer == "manager" and s.group in self.cfg.groups for s in SPECS):
            log("multiprocessing.Manager: starting")
            self.manager = multiprocessing.get_context("spawn").Manager()
            self.mdict = self.manager.dict()
            ds = self.data("get_random")
            self.mdict.update({k: ds.value(i) for i, k in enumerate(ds.keys)})

    def _serve(self, suffix: str, **kw: Any) -> tuple[str, Any, Any]:
        import shmstore  # noqa: PLC0415

        name = f"{self.name}-{suffix}"
        self.served.append(name)
        coord = shmstore.serve(name, **kw)
        self.coords.append(coord)
        store = shmstore.connect(name)
        self.stores.append(store)
        return name, coord, store

    def data(self, group: str) -> Loaded:
        """The data set a measure reads, loaded into every system on first use."""
        tag = GROUPS[group][1]
        if tag in self.datasets:
            return self.datasets[tag]
        spec = DATASETS[tag]
        n = self.cfg.big_keys if spec.big else self.cfg.small_keys
        ds = Loaded(spec, n, self.rng)
        log(f"data set {tag}: {n} keys, {spec.value_bytes} B values: loading")
        ds.store_name, ds.coord, ds.store = self._serve(tag, **_memory_store(ds))
        put = ds.store.put
        for i, k in enumerate(ds.keys):
            put(k, ds.value(i), wait=False)
        ds.store.flush()
        if self.lmdb_skip is None:
            ds.env_dir = os.path.join(self.tmpdir, f"lmdb-{tag}")
            ds.env = self._env(ds.env_dir, sync=False)
            envs = [ds.env]
            if tag == "a":  # the put rows compare with sync on and off
                ds.env_sync = self._env(ds.env_dir + "-sync", sync=True)
                envs.append(ds.env_sync)
            for env in envs:
                for start in range(0, n, 100_000):
                    with env.begin(write=True) as txn:
                        for i in range(start, min(n, start + 100_000)):
                            txn.put(ds.kbs[i], ds.encoded(i))
        if self.redis is not None:
            before = self.redis.info("memory")["used_memory"]
            for start in range(0, n, 10_000):
                self.redis.mset({ds.kbs[i]: ds.encoded(i) for i in range(start, min(n, start + 10_000))})
            ds.redis_bytes = self.redis.info("memory")["used_memory"] - before
        if self.dcache is not None:
            before = self.dcache.volume()
            for start in range(0, n, 10_000):
                with self.dcache.transact():
                    for i in range(start, min(n, start + 10_000)):
                        self.dcache.set(ds.kbs[i], ds.encoded(i))
            ds.diskcache_bytes = self.dcache.volume() - before
        if self.memcached is not None:
            before = int(self.memcached.stats()[b"bytes"])
            for start in range(0, n, 1_000):
                failed = self.memcached.set_many({ds.kbs[i]: ds.encoded(i)
                                                  for i in range(start, min(n, start + 1_000))})
                if failed:
                    raise RuntimeError(f"memcached did not store {len(failed)} keys of data set {tag}")
            ds.memcached_bytes = int(self.memcached.stats()[b"bytes"]) - before
        self.datasets[tag] = ds
        return ds

    def nocache_store(self, group: str):
        """A second handle on the measure's store, with the read cache off."""
        import shmstore  # noqa: PLC0415

        ds = self.data(group)
        if ds.nocache is None:
            ds.nocache = shmstore.connect(ds.store_name, read_cache=0)
            self.stores.append(ds.nocache)
        return ds.nocache

    def _env(self, path: str, *, sync: bool):
        env = peers.open_lmdb(path, sync=sync)
        self.envs[path] = env
        return env

    def lmdb_dir(self, what: str, *, sync: bool) -> str:
        """An (empty) lmdb environment directory for writer processes."""
        path = os.path.join(self.tmpdir, f"lmdb-{what}")
        if path not in self.envs:
            self._env(path, sync=sync)
        return path

    def diskcache_dir(self, what: str) -> str:
        """A diskcache directory of its own, for writer processes."""
        path = os.path.join(self.tmpdir, f"diskcache-{what}")
        if path not in self.envs:
            self.envs[path] = peers.open_diskcache(path)  # made here; closed at the end
        return path

    def writer_store(self) -> str:
        if not hasattr(self, "_writer_store"):
            self._writer_store = self._serve("w", capacity=16_384, key_size=16, value_size=80)[0]
        return self._writer_store

    def durable_store(self) -> str:
        if not hasattr(self, "_durable_store"):
            self._durable_store = self._serve(
                "dur", capacity=16_384, key_size=16, value_size=80, sync="always",
                path=os.path.join(self.tmpdir, "shmstore-durable"))[0]
        return self._durable_store

    def teardown(self) -> None:
        """Undo everything setup() and the measures did; every step runs, whatever fails."""
        steps: list[tuple[str, Callable[[], object]]] = [
            ("echo child", self._stop_echo),
            ("writer processes", self.close_writer_pools),
            ("child processes", self.children.reap_all),
            ("shmstore handles", lambda: [s.close() for s in self.stores]),
            ("coordinators", lambda: [c.stop() for c in self.coords]),
            ("shmstore stores", self._destroy_stores),
            ("redis client", lambda: self.redis is not None and self.redis.close()),
            ("redis-server", lambda: self.redis_server is not None and self.redis_server.stop()),
            ("memcached client", lambda: self.memcached is not None and self.memcached.close()),
            ("memcached", lambda: self.memcached_server is not None and self.memcached_server.stop()),
            ("diskcache", lambda: self.dcache is not None and self.dcache.close()),
            ("manager", lambda: self.manager is not None and self.manager.shutdown()),
            ("lmdb environments, diskcache caches", lambda: [env.close() for env in self.envs.values()]),
            ("temp dir", lambda: self.tmpdir and shutil.rmtree(self.tmpdir, ignore_errors=True)),
        ]
        for what, step in steps:
            try:
                step()
            except BaseException as e:  # noqa: BLE001 - clean up the rest regardless
                log(f"cleanup of {what} failed: {type(e).__name__}: {e}")

    def _destroy_stores(self) -> None:
        import shmstore  # noqa: PLC0415

        for name in self.served:
            shmstore.destroy(name)

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
            log(f"{group}: (at {time.monotonic() - self.t0:.1f} s)")
            if group == "memory":
                self.run_memory(specs)
            elif group == "reads_under_write":
                self.run_reads_under_write(specs)
            elif group in PROC_GROUPS:
                self.run_writers(specs)
            else:
                self.run_timed(specs)
        self.close_writer_pools()

    def skip_reason(self, spec: Spec) -> str | None:
        if spec.group == "table_read":
            return self.table_skip()
        if spec.peer == "redis":
            return self.redis_skip
        if spec.peer == "lmdb":
            return self.lmdb_skip
        if spec.peer == "diskcache":
            return self.diskcache_skip
        if spec.peer == "memcached":
            return self.memcached_skip
        return None

    def finish(self, res: Result) -> None:
        self.results[res.spec.id] = res
        shown = f"skipped: {res.skipped}" if res.skipped else figure(res.median, res.spec.unit)
        log(f"  {res.spec.id:<36} {shown}")

    def _timed_fn(self, spec: Spec) -> Callable[[int], int]:
        if spec.group.startswith("get_") and spec.group != "get_many":
            return self.get_row(spec.group, spec.system)
        return getattr(self, f"b_{spec.group}_{spec.system}")()

    def run_timed(self, specs: list[Spec]) -> None:
        live: list[tuple[Spec, Callable[[int], int], int, list[float]]] = []
        skipped = []
        for spec in specs:
            reason = self.skip_reason(spec)
            if reason is not None:
                skipped.append(Result(spec, skipped=reason))
                continue
            fn = self._timed_fn(spec)
            n = calibrate(fn, self.cfg)
            run_once(fn, n)  # warm-up, excluded
            live.append((spec, fn, n, []))
        for _ in range(self.cfg.repeats):
            for _spec, fn, n, runs in live:
                runs.append(run_once(fn, n) / n)
        for spec, _fn, n, runs in live:
            res = Result(spec, n=n)
            res.runs = [1e9 / r for r in runs] if spec.unit == "ops/s" else runs
            res.median = statistics.median(res.runs)
            self.finish(res)
        for res in skipped:
            self.finish(res)

    # -- comparisons ---------------------------------------------------------------------

    def speedup(self, spec: Spec, mine_id: str | None = None) -> float | None:
        """How many times better shmstore (its row ``mine_id``, by default the
        measure's ``shmstore`` row) is than this row (None: not comparable)."""
        if spec.peer == "shmstore":
            return None
        if mine_id is None:
            mine_id = MEMORY_PAIRS.get(spec.id) if spec.unit == "bytes" else f"{spec.group}.shmstore"
        mine = self.results.get(mine_id) if mine_id else None
        other = self.results.get(spec.id)
        if mine is None or other is None or mine.median is None or other.median is None:
            return None
        if spec.lower_is_better:
            return other.median / mine.median if mine.median else None
        return mine.median / other.median

    def target_rows(self) -> list[dict[str, Any]]:
        out = []
        for t in TARGETS:
            if t.subject not in self.results or t.baseline not in self.results:
                continue
            ratio = self.speedup(SPEC_BY_ID[t.baseline])
            subj, base = self.results[t.subject], self.results[t.baseline]
            skipped = base.skipped or subj.skipped
            out.append({
                "target": t.text, "subject": t.subject, "baseline": t.baseline,
                "min_speedup": t.min_speedup, "speedup": ratio, "stretch": t.stretch,
                "shmstore": subj.median, "peer": base.median, "unit": subj.spec.unit,
                "status": "skipped" if ratio is None else ("pass" if ratio >= t.min_speedup else "miss"),
                **({"skip_reason": skipped} if skipped and ratio is None else {}),
            })
        return out
