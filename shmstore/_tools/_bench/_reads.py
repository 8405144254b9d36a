"""The timed loops that run in the benchmark's own process: gets, get_many, puts.

Each ``b_<measure>_<system>`` returns ``fn(n) -> elapsed ns of n ops``; the runner
calibrates n, runs a warm-up, then the timed repeats (see ``_suite.Bench.run_timed``).
"""

from __future__ import annotations

import socket
import subprocess
from typing import Callable

from ._core import PEERS, clock, cycle_list

MANY = 1_000


class Reads:
    """Mixin of :class:`~shmstore._tools._bench._suite.Bench`: the in-process measures."""

    # -- helpers -------------------------------------------------------------------------

    def _get_keys(self, group: str, kind: str) -> Callable[[int], list]:
        """A function building the key list of n gets: str or bytes keys."""
        ds = self.data(group)
        src = ds.keys if kind == "str" else ds.kbs
        if group == "get_hot":
            hot = src[ds.hot]
            return lambda n: [hot] * n
        seq = [src[i] for i in ds.rand_idx]
        return lambda n: cycle_list(seq, n)

    @staticmethod
    def _loop(get: Callable, keys_of: Callable[[int], list]) -> Callable[[int], int]:
        def fn(n: int) -> int:
            ks = keys_of(n)
            t0 = clock()
            for k in ks:
                get(k)
            return clock() - t0

        return fn

    def _lmdb_txn_loop(self, group: str, decode: bool) -> Callable[[int], int]:
        env = self.data(group).env
        keys_of = self._get_keys(group, "bytes")
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

    def _lmdb_txn_per_get(self, group: str) -> Callable[[int], int]:
        begin = self.data(group).env.begin
        keys_of = self._get_keys(group, "bytes")

        def fn(n: int) -> int:
            ks = keys_of(n)
            t0 = clock()
            for k in ks:
                with begin() as txn:
                    txn.get(k)
            return clock() - t0

        return fn

    @staticmethod
    def _numpy_copy(nbytes: int) -> Callable[[int], int]:
        import numpy as np  # noqa: PLC0415

        src = np.arange(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        copyto = np.copyto

        def fn(n: int) -> int:
            t0 = clock()
            for _ in range(n):
                copyto(dst, src)
            return clock() - t0

        return fn

    def _dict_get(self, group: str) -> Callable[[int], int]:
        ds = self.data(group)
        d = dict.fromkeys(ds.keys, ds.sample_value)
        return self._loop(d.get, self._get_keys(group, "str"))

    # -- get of one key: every get_* measure has the same rows -----------------------------

    def get_row(self, group: str, system: str) -> Callable[[int], int]:
        if system == "shmstore":
            return self._loop(self.data(group).store.get, self._get_keys(group, "str"))
        if system == "shmstore_nocache":
            return self._loop(self.nocache_store(group).get, self._get_keys(group, "str"))
        if system == "lmdb_txn":
            return self._lmdb_txn_loop(group, decode=False)
        if system == "lmdb_txn_decode":
            return self._lmdb_txn_loop(group, decode=True)
        if system == "lmdb_txn_per_get":
            return self._lmdb_txn_per_get(group)
        if system == "redis":
            return self._loop(self.redis.get, self._get_keys(group, "bytes"))
        if system == "diskcache":
            return self._loop(self.dcache.get, self._get_keys(group, "bytes"))
        if system == "memcached":
            return self._loop(self.memcached.get, self._get_keys(group, "bytes"))
        if system == "manager":
            return self._loop(self.mdict.get, self._get_keys(group, "str"))
        if system == "dict":
            return self._dict_get(group)
        if system == "numpy_copy":
            return self._numpy_copy(self.data(group).value_bytes)
        raise KeyError(f"{group}.{system}")

    # -- get_many ---------------------------------------------------------------------------

    def _many_keys(self, kind: str) -> list:
        ds = self.data("get_many")
        src = ds.keys if kind == "str" else ds.kbs
        return [src[i] for i in ds.many_idx]

    def _many(self, call: Callable[[list], object], kind: str) -> Callable[[int], int]:
        ks = self._many_keys(kind)

        def fn(n: int) -> int:
            t0 = clock()
            for _ in range(n):
                call(ks)
            return clock() - t0

        return fn

    def b_get_many_shmstore(self):
        ds = self.data("get_many")
        out = ds.store.get_many(self._many_keys("str"))
        assert out == [ds.value(i) for i in ds.many_idx], "shmstore get_many returned wrong values"
        return self._many(ds.store.get_many, "str")

    def _lmdb_many(self, decode: bool) -> Callable[[int], int]:
        env = self.data("get_many").env
        dec = self.decode
        ks = self._many_keys("bytes")

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

    def b_get_many_diskcache_loop(self):
        get = self.dcache.get
        return self._many(lambda ks: [get(k) for k in ks], "bytes")

    def b_get_many_memcached_get_many(self):
        got = self.memcached.get_many(self._many_keys("bytes"))
        assert len(got) == MANY, f"memcached get_many found {len(got)} of {MANY} keys"
        return self._many(self.memcached.get_many, "bytes")

    def b_get_many_dict(self):
        ds = self.data("get_many")
        get = dict.fromkeys(ds.keys, ds.sample_value).get
        return self._many(lambda ks: [get(k) for k in ks], "str")

    def b_get_many_numpy_copy(self):
        return self._numpy_copy(64 * MANY)

    # -- put round trip ---------------------------------------------------------------------

    def _put_loop(self, put: Callable, kind: str) -> Callable[[int], int]:
        ds = self.data("put")
        idx = ds.rand_idx
        if kind == "str":
            pairs = [(ds.keys[i], ds.value(i)) for i in idx]
        else:
            pairs = [(ds.kbs[i], ds.encoded(i)) for i in idx]

        def fn(n: int) -> int:
            ps = cycle_list(pairs, n)
            t0 = clock()
            for k, v in ps:
                put(k, v)
            return clock() - t0

        return fn

    def b_put_shmstore(self):
        return self._put_loop(self.data("put").store.put, "str")

    def b_put_redis(self):
        return self._put_loop(self.redis.set, "bytes")

    def b_put_diskcache(self):
        return self._put_loop(self.dcache.set, "bytes")

    def b_put_memcached(self):
        return self._put_loop(self.memcached.set, "bytes")  # waits for the reply (peers.memcached_client)

    def _lmdb_put(self, env) -> Callable[[int], int]:
        def put(k: bytes, v: bytes) -> None:
            with env.begin(write=True) as txn:
                txn.put(k, v)

        return self._put_loop(put, "bytes")

    def b_put_lmdb_sync(self):
        return self._lmdb_put(self.data("put").env_sync)

    def b_put_lmdb_nosync(self):
        return self._lmdb_put(self.data("put").env)

    def b_put_manager(self):
        return self._put_loop(self.mdict.__setitem__, "str")

    def b_put_dict(self):
        return self._put_loop({}.__setitem__, "str")

    def b_put_socketpair(self):
        a, b = socket.socketpair()
        try:
            self.echo_proc = self.children.popen([*PEERS, "echo", str(b.fileno())],
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
        ds = self.data("put_pipelined")
        put, flush = ds.store.put, ds.store.flush
        pairs = [(ds.keys[i], ds.value(i)) for i in ds.rand_idx]

        def fn(n: int) -> int:
            ps = cycle_list(pairs, n)
            t0 = clock()
            for k, v in ps:
                put(k, v, wait=False)
            flush()
            return clock() - t0

        return fn

    def b_put_pipelined_redis_pipeline(self):
        ds = self.data("put_pipelined")
        r = self.redis
        pairs = [(ds.kbs[i], ds.encoded(i)) for i in ds.rand_idx]

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
        ds = self.data("put_pipelined")
        env = ds.env
        pairs = [(ds.kbs[i], ds.encoded(i)) for i in ds.rand_idx]

        def fn(n: int) -> int:
            ps = cycle_list(pairs, n)
            t0 = clock()
            with env.begin(write=True) as txn:
                put = txn.put
                for k, v in ps:
                    put(k, v)
            return clock() - t0

        return fn

    def b_put_pipelined_diskcache_transact(self):
        ds = self.data("put_pipelined")
        cache = self.dcache
        pairs = [(ds.kbs[i], ds.encoded(i)) for i in ds.rand_idx]

        def fn(n: int) -> int:
            ps = cycle_list(pairs, n)
            t0 = clock()
            with cache.transact():
                put = cache.set
                for k, v in ps:
                    put(k, v)
            return clock() - t0

        return fn

    def b_put_pipelined_memcached_set_many(self):
        ds = self.data("put_pipelined")
        set_many = self.memcached.set_many
        pairs = [(ds.kbs[i], ds.encoded(i)) for i in ds.rand_idx]

        def fn(n: int) -> int:
            ps = cycle_list(pairs, n)
            t0 = clock()
            for start in range(0, n, 1000):
                set_many(dict(ps[start:start + 1000]))  # waits for the 1000 replies
            return clock() - t0

        return fn

    # -- table reads: "table read(100k rows) vs numpy copy" ------------------------------------
    #
    # A memory-only store with one table of TABLE_ROWS rows of a 64-byte structured dtype
    # (an int64 id, a float64 price, twelve int32 fields); each op reads TABLE_READ
    # distinct random rows with ``table.read(rows)``: seqlock-validated, vectorized. The
    # floor copies the same number of bytes with numpy (a memcpy).
    # ``scripts/table_bench.py`` breaks this down further (ranges, read_all, gathers).

    TABLE_ROWS = 200_000
    TABLE_READ = 100_000
    TABLE_ITEM = 64

    def table_skip(self) -> str | None:
        import shmstore  # noqa: PLC0415

        if not hasattr(shmstore, "Table"):
            return "shmstore has no Table (numpy-typed records)"
        return None

    def b_table_read_shmstore(self):
        import numpy as np  # noqa: PLC0415

        dt = np.dtype([("id", "<i8"), ("price", "<f8")] + [(f"f{i}", "<i4") for i in range(12)])
        assert dt.itemsize == self.TABLE_ITEM
        _, _, store = self._serve("table", capacity=16, key_size=16, value_size=64,
                                  ring_size=8 << 20)
        table = store.table("bench", dt, self.TABLE_ROWS)
        vals = np.zeros(self.TABLE_ROWS, dtype=dt)
        vals["id"] = np.arange(self.TABLE_ROWS)
        vals["price"] = vals["id"] * 0.5
        step = 50_000  # one write must fit the client's queue (ring_size)
        for lo in range(0, self.TABLE_ROWS, step):
            table.write(range(lo, min(lo + step, self.TABLE_ROWS)), vals[lo : lo + step])
        rows = np.random.default_rng(7).permutation(self.TABLE_ROWS)[: self.TABLE_READ]
        got = table.read(rows)
        if not (got["id"] == rows).all():  # the measure reads real, whole rows
            raise RuntimeError("table read returned rows other than the ones asked for")
        read = table.read

        def fn(n: int) -> int:
            t0 = clock()
            for _ in range(n):
                read(rows)
            return clock() - t0

        return fn

    def b_table_read_numpy_copy(self):
        return self._numpy_copy(self.TABLE_READ * self.TABLE_ITEM)
