"""Counters in shared memory, and :meth:`Store.stats`.

Design
------
Every counter has one writer, so none needs a lock or an atomic:

- The coordinator's live in the data segment's header (``_layout`` ``H_*``): ops by
  kind, groups, a log2 histogram of group sizes, the queue depth each group found,
  errors, and the journal's fsync/WAL/checkpoint counters. It writes them; anyone
  reads them.
- Each client's live in its client block of the write channel (``_channel``
  ``C_READS`` .. ``C_WRITE_ERRORS``, words 8-15, and ``C_CACHE_HITS``, word 6). A client
  is a process: its handles on the store share one block (``_attach``), so the block
  shows the process's totals. Each handle keeps its own running totals in process
  memory (the ``get`` fast path counts in closure cells, nothing more), and
  ``stats()`` reports them as "this handle"; the process's totals are kept by the
  attachment's :class:`_Counters`: a write request counts into both, and a handle
  *pushes* its read counts (reads, cache hits, the retries of its get_many and
  snapshots) into the process's at each publish moment and when it closes or is
  collected. Read retries inside the mapping's lookups are counted per mapping, that
  is per process (a handle's ``read_retries`` includes those of the other handles of
  its process since it opened). The process's totals are *published* - stored into its
  block - at these moments:

  * after every write request (a few word stores next to a request that costs tens of
    microseconds);
  * every 4096th ``get`` of any handle (``_readers.PUBLISH_MASK``), and at every
    ``stats()`` call;
  * when the last handle closes.

  A process that only reads has no client block: on one of those publish moments, if
  it has read anything, a coordinator runs and more than half of the store's client
  blocks are free, it claims one (so its reads become visible to ``shmstore stats``);
  otherwise its counts stay in the process (its own ``stats()`` shows them) and it
  tries again no sooner than ``CLAIM_RETRY`` seconds later. Readers never take the
  last blocks writers need.

  Because totals, not increments, are published, a process that re-registers with a
  restarted coordinator (whose channel is new) carries its totals over. When a client
  closes or dies, the coordinator, which reclaims its block, adds the block's counters
  to the header's ``H_RETIRED_*`` words first, so store-wide totals never drop.

Rates in :class:`StoreStats` are per second over the interval since the previous
``stats()`` call of the same handle (None on its first call).

The handle's and the process's counters and their publishing (:class:`_Counters`) are
in ``shmstore._counters``, which every reader imports; this module, which reads every
client block (numpy, the write channel), comes in with the first ``stats()``.
"""

from __future__ import annotations

import time
from typing import Callable

import msgspec
import numpy as np

from . import _channel as C
from . import _layout as L
from ._errors import ShmStoreError
from ._counters import WriteSession, _Counters
from ._liveness import pid_alive
from ._segment import Segment, coordinator_alive


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


class ClassStats(msgspec.Struct, frozen=True):
    """One size class: slots of ``slot_size`` bytes in ``pages`` pages."""

    slot_size: int
    pages: int
    slots: int  #: slots in its pages
    records: int  #: live records in them
    bytes_asked: int  #: what those records need (header + key padded to 8 + value)
    bytes_spent: int  #: records x slot_size
    fragmentation: float  #: 1 - asked / spent (0.0 when empty)


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
    # -- memory (size classes and eviction)
    memory: int = 0  #: the page budget (0: a single-class store of capacity x value_size)
    page_size: int = 0
    pages: int = 0  #: pages of records (the budget / page_size)
    free_pages: int = 0  #: pages no class holds yet
    memory_used: int = 0  #: bytes of the pages classes hold
    segment_bytes: int = 0  #: the whole data segment: header, page table, pages, index
    fragmentation: float = 0.0  #: over all classes: 1 - bytes asked / slot bytes spent
    classes: list[ClassStats] = []
    eviction: str | None = None  #: the running coordinator's policy
    evictions: int = 0  #: records evicted to make room
    page_moves: int = 0  #: pages moved from one class to another
    # -- a replica's upstream (serve(..., upstream=); None / 0 for a store of its own)
    upstream_state: str | None = None  #: "syncing", "ok", "unreachable" or "stalled"
    #: versions the replica is behind the newest it has heard of
    upstream_lag_entries: int = 0
    #: seconds from the last applied entry's append in Redis to its apply here (both hosts' clocks)
    upstream_lag: float = 0.0
    upstream_lag_max: float = 0.0
    upstream_resyncs: int = 0  #: reloads of the whole dataset from the upstream's records
    upstream_applied: int = 0  #: change stream entries applied
    upstream_roundtrips: int = 0  #: write round trips to the upstream
    upstream_failures: int = 0  #: round trips and reads that failed
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
        # The claim table, not every block: reading an untouched block allocates it.
        for i in np.flatnonzero(ch.claims()).tolist():
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


def collect(seg: Segment, counters: _Counters, session: WriteSession) -> StoreStats:
    """Build :class:`StoreStats` for the handle whose live mapping, counters and write
    session (its process's) these are (see :meth:`Store.stats`)."""
    proc = session.counters
    counters.push(proc)
    proc.publish_or_claim(session)
    q = seg.q
    now = time.monotonic()
    alive = coordinator_alive(seg)
    # The word is read again: a coordinator exiting in between has zeroed it (a handover
    # under Gunicorn's USR2, a stop). No coordinator, then, rather than "pid 0".
    pid = (q[L.H_COORD_PID] or None) if alive else None
    alive = pid is not None
    rss, cpu, uptime = _coordinator_process(pid)
    mine = counters.totals()
    blocks = _read_blocks(seg.name) if alive else []
    now_ms = time.time() * 1000
    clients = [_client(*b, now_ms) for b in blocks]
    # Invariant: C.C_COUNTERS order, like the handle's totals() and a block's words.
    tot = [q[L.H_RETIRED_READS], q[L.H_RETIRED_READ_RETRIES], q[L.H_RETIRED_WRITES],
           q[L.H_RETIRED_TIMEOUTS], q[L.H_RETIRED_WRITE_NS], q[L.H_RETIRED_WRITE_NS_MAX],
           q[L.H_RETIRED_WRITES_TIMED], q[L.H_RETIRED_WRITE_ERRORS], q[L.H_RETIRED_CACHE_HITS]]
    for b in blocks:
        _add(tot, b[3])
    ch = session.chan
    if ch is None or not ch.alive() or ch.client not in {b[0] for b in blocks}:
        _add(tot, proc.totals())  # this process's counts are in no live block
    fs = q[L.H_FSYNCS]
    fhist = [q[L.H_FSYNC_HIST + b] for b in range(L.FSYNC_HIST_BUCKETS)]
    fields = dict(
        name=seg.name, records=q[L.H_COUNT], capacity=seg.layout.capacity,
        key_size=seg.key_size, value_size=seg.value_size, epoch=q[L.H_EPOCH],
        coordinator_pid=pid, ops=q[L.H_OPS], groups=q[L.H_GROUPS], frames=q[L.H_FRAMES],
        max_group=q[L.H_MAX_GROUP], errors=q[L.H_ERRORS],
        clients_reclaimed=q[L.H_CLIENTS_RECLAIMED], fallback_reads=q[L.H_FALLBACK_READS],
        reads=mine[0], read_retries=mine[1], writes=mine[2], timeouts=mine[3],
        write_errors=mine[7], write_latency_avg=_avg(mine[4], mine[6]),
        write_latency_max=_secs(mine[5]) if mine[6] else None,
        read_cache_hits=mine[8], read_cache_records=counters.readers.cached(),
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
    fields.update(_memory(seg))
    fields.update(_upstream(q))
    prev = counters.prev_stats
    counters.prev_stats = (now, fields)
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


_POLICY = {v: k for k, v in L.EVICTION_NAMES.items()}


def _memory(seg: Segment) -> dict:
    """The memory fields of StoreStats: per class from the header's class words."""
    q = seg.q
    lay = seg.layout
    classes = []
    asked = spent = 0
    for c, size in enumerate(seg.classes):
        pages = q[L.class_word(c, L.C_PAGES)]
        records = q[L.class_word(c, L.C_RECORDS)]
        a = q[L.class_word(c, L.C_ASKED)]
        sp = records * size
        asked += a
        spent += sp
        classes.append(ClassStats(slot_size=size, pages=pages, slots=pages * (lay.page_size // size),
                                  records=records, bytes_asked=a, bytes_spent=sp,
                                  fragmentation=1.0 - a / sp if sp else 0.0))
    used_pages = sum(c.pages for c in classes)
    return dict(memory=lay.memory, page_size=lay.page_size, pages=lay.npages,
                free_pages=q[L.H_FREE_PAGES], memory_used=used_pages * lay.page_size,
                segment_bytes=lay.size, fragmentation=1.0 - asked / spent if spent else 0.0,
                classes=classes, eviction=_POLICY.get(q[L.H_EVICTION]),
                evictions=q[L.H_EVICTIONS], page_moves=q[L.H_PAGE_MOVES])


def _upstream(q: object) -> dict:
    """The upstream fields of StoreStats (a replica's; none for a store of its own)."""
    state = L.UP_STATE_NAMES.get(q[L.H_UP_STATE])
    if state is None:
        return {}
    return dict(upstream_state=state, upstream_lag_entries=max(0, q[L.H_UP_HEAD] - q[L.H_EPOCH]),
                upstream_lag=q[L.H_UP_LAG_MS] / 1e3, upstream_lag_max=q[L.H_UP_LAG_MS_MAX] / 1e3,
                upstream_resyncs=q[L.H_UP_RESYNCS], upstream_applied=q[L.H_UP_APPLIED],
                upstream_roundtrips=q[L.H_UP_ROUNDTRIPS], upstream_failures=q[L.H_UP_FAILURES])


def _cap(x: float | None, top: float | None) -> float | None:
    if x is None or top is None:
        return x
    return min(x, top)
