"""Counters in shared memory, and :meth:`Store.stats`.

Design
------
Every counter has one writer, so none needs a lock or an atomic:

- The coordinator's live in the data segment's header (``_layout`` ``H_*``): ops by
  kind, groups, a log2 histogram of group sizes, the queue depth each group found,
  errors, and the journal's fsync/WAL/checkpoint counters. It writes them; anyone
  reads them.
- Each client's live in its client block of the write channel (``_channel``
  ``C_READS`` .. ``C_WRITE_ERRORS``, words 8-15, and ``C_CACHE_HITS``, word 6). The
  handle keeps its running totals in process memory (the ``get`` fast path counts in
  closure cells, nothing more) and *publishes* them - stores the totals into its
  block - at these moments:

  * after every write request (a few word stores next to a request that costs tens of
    microseconds);
  * every 4096th ``get`` (``_segment.PUBLISH_MASK``), and at every ``stats()`` call;
  * when the handle closes.

  A process that only reads has no client block: on one of those publish moments, if
  it has read anything, a coordinator runs and more than half of the store's client
  blocks are free, it claims one (so its reads become visible to ``shmstore stats``);
  otherwise its counts stay in the process (its own ``stats()`` shows them) and it
  tries again no sooner than ``CLAIM_RETRY`` seconds later. Readers never take the
  last blocks writers need.

  Because totals, not increments, are published, a handle that re-registers with a
  restarted coordinator (whose channel is new) carries its totals over. When a client
  closes or dies, the coordinator, which reclaims its block, adds the block's counters
  to the header's ``H_RETIRED_*`` words first, so store-wide totals never drop.

Rates in :class:`StoreStats` are per second over the interval since the previous
``stats()`` call of the same handle (None on its first call).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable

import msgspec

from . import _channel as C
from . import _layout as L
from ._errors import ShmStoreError
from ._segment import coordinator_alive, pid_alive

if TYPE_CHECKING:
    from ._store import Store

#: seconds between a reader process's attempts to claim a client block for its counters
CLAIM_RETRY = 10.0
#: how long a claim may wait for the coordinator's handshake
CLAIM_TIMEOUT = 0.25


class ClientStats(msgspec.Struct, frozen=True):
    """One live client (a process's handle with a client block)."""

    block: int  #: its client block number
    pid: int
    age: float  #: seconds since the process started
    reads: int
    read_retries: int
    writes: int
    timeouts: int
    write_errors: int
    write_latency_avg: float | None  #: seconds, over waited writes (None: none yet)
    write_latency_max: float | None
    read_cache_hits: int = 0  #: of its reads, those its read cache answered


class StoreStats(msgspec.Struct, frozen=True):
    """What :meth:`Store.stats` returns. Durations are in seconds, sizes in bytes.

    ``reads`` .. ``write_latency_max`` describe the calling handle; ``total_*`` every
    client of the store (live ones plus those that closed or died); ``*_per_s`` are
    rates since this handle's previous ``stats()`` call (None on the first).
    """

    name: str
    records: int
    capacity: int
    key_size: int
    value_size: int
    epoch: int
    coordinator_pid: int | None
    ops: int
    groups: int
    frames: int
    max_group: int
    errors: int
    clients_reclaimed: int
    fallback_reads: int
    reads: int
    read_retries: int
    writes: int
    # -- this handle, continued
    timeouts: int = 0
    write_errors: int = 0
    write_latency_avg: float | None = None
    write_latency_max: float | None = None
    read_cache_hits: int = 0  #: of this handle's reads, those its read cache answered
    read_cache_records: int = 0  #: records in this handle's read cache now
    # -- the coordinator's counters
    puts: int = 0
    deletes: int = 0
    compare_and_sets: int = 0
    incrs: int = 0
    batches: int = 0
    #: bucket b counts groups of 2**b to 2**(b+1)-1 requests (the last: all larger)
    group_hist: list[int] = []
    queue_bytes: int = 0  #: bytes the last group drained: the queue depth it found
    queue_bytes_max: int = 0
    coordinator_runs: int = 0  #: coordinators that served this segment (1 + restarts)
    expired: int = 0  #: records the coordinator reclaimed after their TTL ran out
    watch_posts: int = 0  #: wake-ups posted to clients in ``watch()``
    #: ``changes(since=E)`` needs ``E >= feed_horizon`` (older changes were overwritten)
    feed_horizon: int = 0
    # -- durability (zero / None for memory-only stores)
    fsyncs: int = 0
    fsync_seconds: float = 0.0  #: summed fsync latency
    #: bucket b counts fsyncs of [2**b, 2**(b+1)) microseconds (see ``_layout``)
    fsync_hist: list[int] = []
    fsync_avg: float | None = None
    fsync_min: float | None = None
    fsync_max: float | None = None
    fsync_p99: float | None = None  #: upper edge of the histogram bucket holding the p99
    wal_bytes: int = 0
    checkpoints: int = 0
    checkpoint_last: float | None = None  #: how long the last checkpoint took
    last_checkpoint_epoch: int = 0
    # -- the coordinator process (None while none runs)
    coordinator_rss: int | None = None
    coordinator_cpu_seconds: float | None = None  #: user + system since it started
    coordinator_cpu_percent: float | None = None  #: of one core, since the previous stats()
    coordinator_uptime: float | None = None
    # -- clients
    clients: list[ClientStats] = []
    total_reads: int = 0
    total_read_retries: int = 0
    total_writes: int = 0
    total_timeouts: int = 0
    total_write_errors: int = 0
    total_read_cache_hits: int = 0
    total_write_latency_avg: float | None = None
    total_write_latency_max: float | None = None
    # -- rates
    interval: float | None = None  #: seconds since this handle's previous stats()
    ops_per_s: float | None = None
    groups_per_s: float | None = None
    requests_per_s: float | None = None
    reads_per_s: float | None = None
    writes_per_s: float | None = None
    read_retries_per_s: float | None = None


# -- the handle's own counters ---------------------------------------------------------


def init_counters(store: Store) -> None:
    """Give a new handle (or a forked child's copy) zeroed counters."""
    store._reads = 0
    store._read_retries = 0
    store._writes = 0
    store._timeouts = 0
    store._write_ns = 0
    store._write_ns_max = 0
    store._writes_timed = 0
    store._write_errors = 0
    store._cache_hits = 0
    store._get_base = 0  # get.reads() at the last reset (the closure cell is not reset)
    store._hits_base = 0  # the same for get.cache_hits()
    store._retries_base = 0  # the same for the segment's retry count
    store._next_claim = 0.0
    store._prev_stats = None
    get = store.__dict__.get("get")
    if get is not None:
        store._get_base = get.reads()
        store._hits_base = get.cache_hits()
    seg = store.__dict__.get("_seg")
    if seg is not None:
        store._retries_base = seg.retries


def totals(store: Store) -> tuple[int, ...]:
    """The handle's counters in ``C.C_COUNTERS`` order."""
    seg = store._seg
    get = store.__dict__.get("get")
    reads = store._reads + (get.reads() - store._get_base if get is not None else 0)
    hits = store._cache_hits + (get.cache_hits() - store._hits_base if get is not None else 0)
    retries = store._read_retries + (seg.retries - store._retries_base if seg is not None else 0)
    return (reads, retries, store._writes, store._timeouts, store._write_ns,
            store._write_ns_max, store._writes_timed, store._write_errors, hits)


def note_write(store: Store, ns: int | None, error: bool) -> None:
    """Count one finished write request (``ns``: its latency if it was waited for)."""
    if ns is not None:
        store._write_ns += ns
        store._writes_timed += 1
        if ns > store._write_ns_max:
            store._write_ns_max = ns
    if error:
        store._write_errors += 1


def publish(store: Store, pid_checked: bool = False) -> None:
    """Store the handle's totals into its client block, if it has one.

    ``pid_checked``: the caller saw ``store._pid == os.getpid()`` under the handle's
    write lock (a write request does), so the block is this process's; a getpid()
    is a system call here (glibc does not cache it), and a write would make two.
    """
    ch = store._chan
    if ch is None or (not pid_checked and store._pid != os.getpid()):
        return
    q = ch.chan.__dict__.get("q")
    if q is None:
        return
    w = ch.w
    try:
        for word, value in zip(C.C_COUNTERS, totals(store)):
            q[w + word] = value
    except ValueError:
        pass  # another thread of this process just closed that channel: its next one counts


def publish_or_claim(store: Store) -> None:
    """A publish moment of a handle that may have no block (see the module docstring)."""
    ch = store._chan
    if ch is not None and ch.alive():
        publish(store)
        return
    # No block, or one of a coordinator that is gone (a reader has no write that would
    # register it with the new one): claim one, at most every CLAIM_RETRY seconds.
    seg = store._seg
    now = time.monotonic()
    if seg is None or now < store._next_claim or store._pid != os.getpid():
        return
    store._next_claim = now + CLAIM_RETRY
    if totals(store)[0] == 0 or not seg.q[L.H_COORD_INCARNATION] or not coordinator_alive(seg):
        return
    try:
        ch = C.open_channel(store.name)
    except ShmStoreError:
        return
    try:
        free = int((ch.words(C.C_SESSION) == 0).sum())
        half = ch.layout.max_clients // 2
    finally:
        ch.close()
    if free <= half or not store._wlock.acquire(blocking=False):
        return
    try:
        if store._chan is None or not store._chan.alive():
            store._channel(seg, time.monotonic() + CLAIM_TIMEOUT)
    except ShmStoreError:
        return
    finally:
        store._wlock.release()
    store._next_claim = 0.0  # claimed: the retry pause is for failures only
    publish(store)


# -- reading everything ----------------------------------------------------------------


def _secs(ns: int) -> float:
    return ns / 1e9


def _avg(total_ns: int, n: int) -> float | None:
    return total_ns / n / 1e9 if n else None


def hist_quantile(hist: list[int], q: float, unit: float = 1.0,
                  upper: Callable[[int], float] = lambda b: 2.0 ** (b + 1)) -> float | None:
    """The upper edge of the bucket holding quantile ``q``, or None for an empty
    histogram. By default bucket b spans ``[2**b, 2**(b+1))`` units; ``upper(b)``
    gives another histogram's bucket edges (in units)."""
    n = sum(hist)
    if not n:
        return None
    want = q * n
    cum = 0
    for b, c in enumerate(hist):
        cum += c
        if cum >= want:
            return upper(b) * unit
    return upper(len(hist) - 1) * unit


def _read_blocks(name: str) -> list[tuple[int, int, int, list[int]]]:
    """(block, pid, start ms, counters) of each client registered on the running
    coordinator's channel whose process lives."""
    try:
        ch = C.open_channel(name)
    except ShmStoreError:
        return []
    out = []
    try:
        q = ch.q
        for i in range(ch.layout.max_clients):
            w = ch.layout.block(i) // 8
            if q[w + C.C_ACK] == 0 or q[w + C.C_ACK] != q[w + C.C_SESSION]:
                continue
            pid, start = q[w + C.C_PID], q[w + C.C_START]
            if pid_alive(pid, start):  # else dead, not reclaimed yet (within a tick)
                out.append((i, pid, start, [q[w + word] for word in C.C_COUNTERS]))
    finally:
        ch.close()
    return out


def _client(block: int, pid: int, start: int, c: list[int], now_ms: float) -> ClientStats:
    return ClientStats(
        block=block, pid=pid, age=max(0.0, (now_ms - start) / 1000), reads=c[0],
        read_retries=c[1], writes=c[2], timeouts=c[3], write_errors=c[7],
        write_latency_avg=_avg(c[4], c[6]), write_latency_max=_secs(c[5]) if c[6] else None,
        read_cache_hits=c[8])


def live_clients(name: str) -> list[ClientStats]:
    """The live clients of store ``name`` (those with a client block), by block."""
    now_ms = time.time() * 1000
    return [_client(*b, now_ms) for b in _read_blocks(name)]


def _add(tot: list[int], c: list[int] | tuple[int, ...]) -> None:
    """Add one client's counters (``C.C_COUNTERS`` order) to ``tot``; max for the max."""
    for k in range(len(tot)):
        if C.C_COUNTERS[k] == C.C_WRITE_NS_MAX:
            tot[k] = max(tot[k], c[k])
        else:
            tot[k] += c[k]


def _coordinator_process(pid: int | None) -> tuple[int | None, float | None, float | None]:
    """(rss bytes, cpu seconds, uptime seconds) of the coordinator, by psutil."""
    if not pid:
        return None, None, None
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            rss = p.memory_info().rss
            t = p.cpu_times()
            up = time.time() - p.create_time()
        return rss, t.user + t.system, up
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None, None, None


def collect(store: Store) -> StoreStats:
    """Build :class:`StoreStats` for ``store`` (see :meth:`Store.stats`)."""
    seg = store._live_segment()
    publish_or_claim(store)
    q = seg.q
    now = time.monotonic()
    alive = coordinator_alive(seg)
    pid = q[L.H_COORD_PID] if alive else None
    rss, cpu, uptime = _coordinator_process(pid)
    mine = totals(store)
    blocks = _read_blocks(store.name) if alive else []
    now_ms = time.time() * 1000
    clients = [_client(*b, now_ms) for b in blocks]
    # Invariant: C.C_COUNTERS order, like the handle's totals() and a block's words.
    tot = [q[L.H_RETIRED_READS], q[L.H_RETIRED_READ_RETRIES], q[L.H_RETIRED_WRITES],
           q[L.H_RETIRED_TIMEOUTS], q[L.H_RETIRED_WRITE_NS], q[L.H_RETIRED_WRITE_NS_MAX],
           q[L.H_RETIRED_WRITES_TIMED], q[L.H_RETIRED_WRITE_ERRORS], q[L.H_RETIRED_CACHE_HITS]]
    for b in blocks:
        _add(tot, b[3])
    ch = store._chan
    if ch is None or not ch.alive() or ch.client not in {b[0] for b in blocks}:
        _add(tot, mine)  # this handle's counts are in no live block
    fs = q[L.H_FSYNCS]
    fhist = [q[L.H_FSYNC_HIST + b] for b in range(L.FSYNC_HIST_BUCKETS)]
    fields = dict(
        name=store.name, records=q[L.H_COUNT], capacity=seg.layout.capacity,
        key_size=seg.key_size, value_size=seg.value_size, epoch=q[L.H_EPOCH],
        coordinator_pid=pid, ops=q[L.H_OPS], groups=q[L.H_GROUPS], frames=q[L.H_FRAMES],
        max_group=q[L.H_MAX_GROUP], errors=q[L.H_ERRORS],
        clients_reclaimed=q[L.H_CLIENTS_RECLAIMED], fallback_reads=q[L.H_FALLBACK_READS],
        reads=mine[0], read_retries=mine[1], writes=mine[2], timeouts=mine[3],
        write_errors=mine[7], write_latency_avg=_avg(mine[4], mine[6]),
        write_latency_max=_secs(mine[5]) if mine[6] else None,
        read_cache_hits=mine[8], read_cache_records=store.get.cached(),
        puts=q[L.H_PUTS], deletes=q[L.H_DELETES], compare_and_sets=q[L.H_CAS],
        incrs=q[L.H_INCRS], batches=q[L.H_BATCHES],
        group_hist=[q[L.H_GROUP_HIST + b] for b in range(L.GROUP_HIST_BUCKETS)],
        queue_bytes=q[L.H_QUEUE_BYTES], queue_bytes_max=q[L.H_QUEUE_BYTES_MAX],
        coordinator_runs=q[L.H_COORD_RUNS],
        expired=q[L.H_EXPIRED], watch_posts=q[L.H_WATCH_POSTS], feed_horizon=q[L.H_FEED_HORIZON],
        fsyncs=fs, fsync_seconds=_secs(q[L.H_FSYNC_NS_TOTAL]), fsync_hist=fhist,
        fsync_avg=_avg(q[L.H_FSYNC_NS_TOTAL], fs),
        fsync_min=_secs(q[L.H_FSYNC_NS_MIN]) if fs else None,
        fsync_max=_secs(q[L.H_FSYNC_NS_MAX]) if fs else None,
        fsync_p99=_cap(hist_quantile(fhist, 0.99, 1e-6), _secs(q[L.H_FSYNC_NS_MAX]) if fs else None),
        wal_bytes=q[L.H_WAL_BYTES], checkpoints=q[L.H_CHECKPOINTS],
        checkpoint_last=_secs(q[L.H_CHECKPOINT_NS_LAST]) if q[L.H_CHECKPOINTS] else None,
        last_checkpoint_epoch=q[L.H_LAST_CHECKPOINT_EPOCH],
        coordinator_rss=rss, coordinator_cpu_seconds=cpu, coordinator_uptime=uptime,
        clients=clients, total_reads=tot[0], total_read_retries=tot[1], total_writes=tot[2],
        total_timeouts=tot[3], total_write_errors=tot[7], total_read_cache_hits=tot[8],
        total_write_latency_avg=_avg(tot[4], tot[6]),
        total_write_latency_max=_secs(tot[5]) if tot[6] else None,
    )
    prev = store._prev_stats
    store._prev_stats = (now, fields)
    if prev is not None:
        dt = now - prev[0]
        fields["interval"] = dt
        if dt > 0:
            p = prev[1]
            for out, key in (("ops_per_s", "ops"), ("groups_per_s", "groups"),
                             ("requests_per_s", "frames"), ("reads_per_s", "total_reads"),
                             ("writes_per_s", "total_writes"),
                             ("read_retries_per_s", "total_read_retries")):
                fields[out] = max(0, fields[key] - p[key]) / dt
            if cpu is not None and p["coordinator_cpu_seconds"] is not None and p["coordinator_pid"] == pid:
                fields["coordinator_cpu_percent"] = 100.0 * max(0.0, cpu - p["coordinator_cpu_seconds"]) / dt
    return StoreStats(**fields)


def _cap(x: float | None, top: float | None) -> float | None:
    if x is None or top is None:
        return x
    return min(x, top)
