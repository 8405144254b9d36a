"""What the benchmark measures: its data sets, measures (groups of rows) and targets."""

from __future__ import annotations

from dataclasses import dataclass

from ._core import Spec, Target


@dataclass(frozen=True)
class DataSet:
    """Keys ``TAG:0000000``.. with values of ``value_bytes`` (msgpack) each."""

    tag: str
    big: bool  # cfg.big_keys keys, else cfg.small_keys
    value_bytes: int


DATASETS = {
    "a": DataSet("a", False, 64),
    "b": DataSet("b", False, 1024),
    "c": DataSet("c", True, 64),
    "d": DataSet("d", True, 1024),
}

#: measure -> (what it measures; {small}/{big} are the key counts), data set it reads
GROUPS: dict[str, tuple[str, str | None]] = {
    "get_hot": ("get, 64 B value, one hot key of {small}", "a"),
    "get_random": ("get, 64 B value, random key of {small}", "a"),
    "get_1k": ("get, 1 KiB value, random key of {small}", "b"),
    "get_big": ("get, 64 B value, random key of {big}", "c"),
    "get_big_1k": ("get, 1 KiB value, random key of {big}", "d"),
    "get_many": ("get_many of 1,000 random keys of {small} (one call)", "a"),
    "put": ("put round trip (sync), 64 B value", "a"),
    "put_pipelined": ("pipelined put throughput", "a"),
    "writes_1proc": ("writes/s, 1 client process, sync puts", None),
    "writes_2proc": ("writes/s, 2 client processes, sync puts", None),
    "writes_4proc": ("writes/s, 4 client processes, sync puts", None),
    "reads_under_write": ("reads/s of 2 reader processes while 1 writer puts", "a"),
    "durable_1proc": ("durable writes/s, 1 client, fsync before ack", None),
    "durable_2proc": ("durable writes/s, 2 clients, fsync before ack", None),
    "durable_8proc": ("durable writes/s, 8 clients, fsync before ack", None),
    "memory": ("memory, {big} with 64 B values", "c"),
    # "table read(100k rows) vs numpy copy" (see _reads.Reads.b_table_read_*).
    "table_read": ("Table read of 100k numpy-typed rows", None),
}

_S = "shmstore store.get (read cache on: the default)"
_SN = "shmstore store.get, read_cache=0 (every get reads the segment)"
_L, _LD, _LP, _R, _M, _D = (
    "py-lmdb txn.get, one long read txn", "py-lmdb long txn + msgspec decode",
    "py-lmdb, a read txn per get", "redis-py GET (unix socket)",
    "multiprocessing.Manager().dict() get", "plain dict.get (floor)")
_DC, _MC = "diskcache Cache.get (SQLite)", "pymemcache get (memcached, unix socket)"
#: The memory measure's reader rows: system -> what its reader process does.
_READERS = {
    "shmstore": "shmstore reader: import, connect, 1000 gets (target <= 4 MiB)",
    "lmdb": "py-lmdb reader: import, open, read txn, 1000 gets",
    "redis": "redis-py reader: import, connect, 1000 GETs",
    "diskcache": "diskcache reader: import, open Cache, 1000 gets",
    "memcached": "pymemcache reader: import, connect, 1000 gets",
}

SPECS: list[Spec] = [
    Spec("get_hot", "shmstore", _S, "yes (str)", "ns/op"),
    Spec("get_hot", "shmstore_nocache", _SN, "yes (str)", "ns/op"),
    Spec("get_hot", "lmdb_txn", _L, "no (bytes)", "ns/op", "lmdb"),
    Spec("get_hot", "lmdb_txn_decode", _LD, "yes (str)", "ns/op", "lmdb"),
    Spec("get_hot", "lmdb_txn_per_get", _LP, "no (bytes)", "ns/op", "lmdb"),
    Spec("get_hot", "redis", _R, "no (bytes)", "ns/op", "redis"),
    Spec("get_hot", "diskcache", _DC, "no (bytes)", "ns/op", "diskcache"),
    Spec("get_hot", "memcached", _MC, "no (bytes)", "ns/op", "memcached"),
    Spec("get_hot", "manager", _M, "yes (pickle)", "ns/op", "manager"),
    Spec("get_hot", "dict", _D, "n/a (object)", "ns/op", "floor"),
    Spec("get_hot", "numpy_copy", "numpy copy of 64 B (floor)", "n/a (bytes)", "ns/op", "floor"),
    Spec("get_random", "shmstore", _S, "yes (str)", "ns/op"),
    Spec("get_random", "shmstore_nocache", _SN, "yes (str)", "ns/op"),
    Spec("get_random", "lmdb_txn", _L, "no (bytes)", "ns/op", "lmdb"),
    Spec("get_random", "lmdb_txn_decode", _LD, "yes (str)", "ns/op", "lmdb"),
    Spec("get_random", "lmdb_txn_per_get", _LP, "no (bytes)", "ns/op", "lmdb"),
    Spec("get_random", "redis", _R, "no (bytes)", "ns/op", "redis"),
    Spec("get_random", "diskcache", _DC, "no (bytes)", "ns/op", "diskcache"),
    Spec("get_random", "memcached", _MC, "no (bytes)", "ns/op", "memcached"),
    Spec("get_random", "manager", _M, "yes (pickle)", "ns/op", "manager"),
    Spec("get_random", "dict", _D, "n/a (object)", "ns/op", "floor"),
    *[Spec(g, sys_, label, dec, "ns/op", peer)
      for g in ("get_1k", "get_big", "get_big_1k")
      for sys_, label, dec, peer in (
          ("shmstore", _S, "yes (str)", "shmstore"),
          ("shmstore_nocache", _SN, "yes (str)", "shmstore"),
          ("lmdb_txn", _L, "no (bytes)", "lmdb"),
          ("lmdb_txn_decode", _LD, "yes (str)", "lmdb"),
          ("redis", _R, "no (bytes)", "redis"),
          ("diskcache", _DC, "no (bytes)", "diskcache"),
          ("memcached", _MC, "no (bytes)", "memcached"),
          ("dict", _D, "n/a (object)", "floor"))],
    Spec("get_many", "shmstore", "shmstore store.get_many(1000 keys)", "yes (str)", "ns/op"),
    Spec("get_many", "lmdb_loop", "py-lmdb loop of 1000 txn.get, one long txn", "no (bytes)", "ns/op", "lmdb"),
    Spec("get_many", "lmdb_loop_decode", "py-lmdb loop + msgspec decode", "yes (str)", "ns/op", "lmdb"),
    Spec("get_many", "redis_mget", "redis-py MGET of 1000 keys", "no (bytes)", "ns/op", "redis"),
    Spec("get_many", "diskcache_loop", "diskcache loop of 1000 Cache.get", "no (bytes)", "ns/op", "diskcache"),
    Spec("get_many", "memcached_get_many", "pymemcache get_many of 1000 keys", "no (bytes)", "ns/op", "memcached"),
    Spec("get_many", "dict", "plain dict, list of 1000 .get (floor)", "n/a (object)", "ns/op", "floor"),
    Spec("get_many", "numpy_copy", "numpy copy of 64,000 B (floor)", "n/a (bytes)", "ns/op", "floor"),
    Spec("put", "shmstore", "shmstore store.put (sync round trip)", "encodes (str)", "ns/op"),
    Spec("put", "redis", "redis-py SET (unix socket)", "no (bytes)", "ns/op", "redis"),
    Spec("put", "diskcache", "diskcache Cache.set (SQLite transaction)", "no (bytes)", "ns/op", "diskcache"),
    Spec("put", "memcached", "pymemcache set, waits for the reply", "no (bytes)", "ns/op", "memcached"),
    Spec("put", "lmdb_sync", "py-lmdb put, own write txn, sync=True", "no (bytes)", "ns/op", "lmdb"),
    Spec("put", "lmdb_nosync", "py-lmdb put, own write txn, sync=False", "no (bytes)", "ns/op", "lmdb"),
    Spec("put", "manager", "multiprocessing.Manager().dict() set", "yes (pickle)", "ns/op", "manager"),
    Spec("put", "dict", "plain dict set (floor)", "n/a (object)", "ns/op", "floor"),
    Spec("put", "socketpair", "1-byte socketpair ping-pong, 2 processes (floor)", "n/a", "ns/op", "floor"),
    Spec("put_pipelined", "shmstore", "shmstore put(wait=False) x n, then flush()", "encodes (str)", "ops/s"),
    Spec("put_pipelined", "redis_pipeline", "redis-py pipeline, SET x 1000 per execute", "no (bytes)", "ops/s", "redis"),
    Spec("put_pipelined", "lmdb_one_txn", "py-lmdb put x n in one write txn, sync=False", "no (bytes)", "ops/s", "lmdb"),
    Spec("put_pipelined", "diskcache_transact", "diskcache Cache.set x n in one transact()", "no (bytes)", "ops/s",
         "diskcache"),
    Spec("put_pipelined", "memcached_set_many", "pymemcache set_many, 1000 per call", "no (bytes)", "ops/s",
         "memcached"),
    *[Spec(f"writes_{n}proc", sys_, label.format(n=n), dec, "ops/s", peer)
      for n in (1, 2, 4)
      for sys_, label, dec, peer in (
          ("shmstore", "shmstore, {n} process(es), sync put", "encodes (str)", "shmstore"),
          ("redis", "Redis, {n} process(es), SET", "no (bytes)", "redis"),
          ("lmdb_nosync", "py-lmdb, {n} process(es), txn per put, sync=False", "no (bytes)", "lmdb"),
          *([("lmdb_sync", "py-lmdb, {n} process(es), txn per put, sync=True", "no (bytes)", "lmdb")]
            if n == 2 else []),
          ("diskcache", "diskcache, {n} process(es), Cache.set", "no (bytes)", "diskcache"),
          ("memcached", "memcached, {n} process(es), pymemcache set", "no (bytes)", "memcached"))],
    Spec("reads_under_write", "shmstore", "shmstore get; writer: shmstore put", "yes (str)", "ops/s"),
    Spec("reads_under_write", "lmdb", "py-lmdb txn per get; writer: put, sync=False", "no (bytes)", "ops/s", "lmdb"),
    Spec("reads_under_write", "redis", "redis-py GET; writer: SET", "no (bytes)", "ops/s", "redis"),
    Spec("reads_under_write", "diskcache", "diskcache get; writer: set", "no (bytes)", "ops/s", "diskcache"),
    Spec("reads_under_write", "memcached", "pymemcache get; writer: set", "no (bytes)", "ops/s", "memcached"),
    *[Spec(f"durable_{n}proc", sys_, label.format(n=n), dec, "ops/s", peer)
      for n in (1, 2, 8)
      for sys_, label, dec, peer in (
          ("shmstore", "shmstore sync=\"always\" (group commit), {n} client(s)", "encodes (str)", "shmstore"),
          ("lmdb_sync", "py-lmdb sync=True, txn per put, {n} process(es)", "no (bytes)", "lmdb"))],
    Spec("memory", "shmstore_segment", "shmstore data segment (shared memory)", "-", "bytes"),
    Spec("memory", "shmstore_coordinator", "shmstore coordinator process, USS", "-", "bytes"),
    Spec("memory", "shmstore_client", "shmstore per-client overhead, USS (import + connect + 1000 gets)", "-", "bytes"),
    Spec("memory", "lmdb_file", "py-lmdb data file", "-", "bytes", "lmdb"),
    Spec("memory", "lmdb_client", "py-lmdb per-client overhead, USS (import + open + 1000 gets)", "-", "bytes", "lmdb"),
    Spec("memory", "redis_server", "redis-server used_memory for the same records", "-", "bytes", "redis"),
    Spec("memory", "redis_client", "redis-py per-client overhead, USS (import + connect + 1000 GETs)", "-", "bytes", "redis"),
    Spec("memory", "diskcache_file", "diskcache SQLite volume for the same records", "-", "bytes", "diskcache"),
    Spec("memory", "memcached_server", "memcached 'bytes' stat for the same records", "-", "bytes", "memcached"),
    Spec("memory", "bare_reader", "a bare interpreter (python -c, waiting), USS", "-", "bytes", "floor"),
    *[Spec("memory", f"{sys_}_reader", f"{label}: USS beyond a bare interpreter", "-", "bytes",
           sys_) for sys_, label in _READERS.items()],
    Spec("table_read", "shmstore", "shmstore Table read of 100k rows", "n/a (numpy)", "ns/op"),
    Spec("table_read", "numpy_copy", "numpy copy of the same rows (floor)", "n/a (numpy)", "ns/op", "floor"),
]

SPEC_BY_ID = {s.id: s for s in SPECS}

#: Measures run by the multi-process code (the others are timed loops in this process).
PROC_GROUPS = {"writes_1proc", "writes_2proc", "writes_4proc", "reads_under_write",
               "durable_1proc", "durable_2proc", "durable_8proc", "memory"}

#: For memory rows: the comparable peer rows (no "speedup" across unlike things).
MEMORY_PAIRS = {"memory.lmdb_file": "memory.shmstore_segment",
                "memory.redis_server": "memory.shmstore_segment",
                "memory.diskcache_file": "memory.shmstore_segment",
                "memory.memcached_server": "memory.shmstore_segment",
                "memory.lmdb_client": "memory.shmstore_client",
                "memory.redis_client": "memory.shmstore_client",
                **{f"memory.{s}_reader": "memory.shmstore_reader" for s in _READERS if s != "shmstore"}}

#: The memory measure's target for a reader process (``memory.shmstore_reader``).
READER_TARGET_BYTES = 4 << 20

TARGETS: list[Target] = [
    Target("get_hot.shmstore", "get_hot.lmdb_txn", 1.0, "get time <= 1.0x py-lmdb long-txn get"),
    Target("get_random.shmstore", "get_random.lmdb_txn", 1.0, "get time <= 1.0x py-lmdb long-txn get"),
    Target("get_many.shmstore", "get_many.lmdb_loop", 5.0, "get_many(1000) >= 5x faster than py-lmdb loop"),
    Target("get_many.shmstore", "get_many.redis_mget", 10.0, "get_many(1000) >= 10x faster than Redis MGET"),
    Target("put.shmstore", "put.redis", 2.0, "put round trip <= 0.5x redis-py SET"),
    Target("writes_2proc.shmstore", "writes_2proc.redis", 3.0, "writes/s from 2 clients >= 3x Redis"),
    Target("durable_8proc.shmstore", "durable_8proc.lmdb_sync", 1.0,
           "durable writes/s, 8 clients >= py-lmdb sync=True"),
    Target("table_read.shmstore", "table_read.numpy_copy", 1 / 3,
           "Table read(100k rows) within 3x of a numpy copy of the same bytes"),
    Target("put.shmstore", "put.socketpair", 1 / 1.2, "stretch: put within 1.2x of the socketpair ping-pong",
           stretch=True),
    Target("writes_2proc.shmstore", "writes_2proc.lmdb_nosync", 1.0,
           "stretch: writes/s from 2 clients >= py-lmdb sync=False", stretch=True),
]
