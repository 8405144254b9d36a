"""The coordinator's metrics: counters it keeps in the segment header.

Two writers of disjoint header words, both on the coordinator thread:

- :class:`ServerMetrics`: the operations counters (words 96-127, see ``_layout``). The
  server calls :meth:`ServerMetrics.group` per group served, :meth:`ServerMetrics.retire`
  per client block reclaimed (by a tick, or at the handshake of a client that claimed
  the block before a tick could), and the constructor at start. Everything else (ops by
  kind, groups, requests, errors) the server and ``_apply`` count inline.
- :class:`DurabilityMetrics`: fsyncs, WAL bytes and checkpoints (words ``H_FSYNCS`` ..
  ``H_FSYNC_HIST``), counted by the durable journal (``_durable``). A checkpoint
  written by the helper thread collects its fsync latencies in a list, and the
  coordinator thread adds them when it finishes the checkpoint
  (:meth:`DurabilityMetrics.checkpoint_done`), so no word ever has two writers.

Readers (``stats()``, Prometheus) read the words without a lock: each is one aligned
u64, and a histogram is a set of independent counts.

Invariant: only the coordinator writes these words, one word per store, so readers
need no lock (they may see one counter a group ahead of another).
Invariant: ``sum(H_FSYNC_HIST .. +FSYNC_HIST_BUCKETS) == H_FSYNCS`` between two
updates of the coordinator thread, and ``H_FSYNC_NS_MIN <= total / count <=
H_FSYNC_NS_MAX`` once ``H_FSYNCS > 0``.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from shmstore import _channel as C
from shmstore import _layout as L

_TOP = L.GROUP_HIST_BUCKETS - 1


class ServerMetrics:
    """The loop's counters of one coordinator run over its segment header and channel."""

    def __init__(self, seg_q: memoryview, chan: C.ChannelMap) -> None:
        self.q = seg_q
        self.chan = chan
        self.stride_words = chan.layout.stride // 8
        self.ring_size = chan.layout.ring_size
        self.block0 = chan.layout.block(0) // 8
        n = chan.layout.max_clients
        # Per block: the session and TAIL this run last saw when serving it, so the
        # bytes a group drained are exact even across a handshake or a reclaim.
        self.seen_session = [0] * n
        self.seen_tail = [0] * n
        seg_q[L.H_COORD_RUNS] += 1

    def group(self, nframes: int, served: list) -> None:
        """Count one group of ``nframes`` requests drained from the ``served`` clients
        (the server's list of ``(client, reply, error)``)."""
        q = self.q
        b = nframes.bit_length() - 1
        q[L.H_GROUP_HIST + (b if b < _TOP else _TOP)] += 1
        cq = self.chan.q
        drained = 0
        sessions = self.seen_session
        tails = self.seen_tail
        for entry in served:
            i = entry[0]
            w = self.block0 + i * self.stride_words
            session = cq[w + C.C_SESSION]
            tail = cq[w + C.C_TAIL]
            if sessions[i] != session:  # a new client: its ring started at 0
                sessions[i] = session
                tails[i] = 0
            d = tail - tails[i]
            if 0 < d <= self.ring_size:  # not a client refused for impossible ring words
                drained += d
            tails[i] = tail
        q[L.H_QUEUE_BYTES] = drained
        if drained > q[L.H_QUEUE_BYTES_MAX]:
            q[L.H_QUEUE_BYTES_MAX] = drained

    def retire(self, i: int) -> None:
        """Add the counters of client block ``i`` (being reclaimed) to the header's."""
        cq = self.chan.q
        q = self.q
        w = self.block0 + i * self.stride_words
        if cq[w + C.C_ACK] == 0:
            return  # never registered, or already retired
        for word, h in ((C.C_READS, L.H_RETIRED_READS), (C.C_READ_RETRIES, L.H_RETIRED_READ_RETRIES),
                        (C.C_WRITES, L.H_RETIRED_WRITES), (C.C_TIMEOUTS, L.H_RETIRED_TIMEOUTS),
                        (C.C_WRITE_NS, L.H_RETIRED_WRITE_NS),
                        (C.C_WRITES_TIMED, L.H_RETIRED_WRITES_TIMED),
                        (C.C_WRITE_ERRORS, L.H_RETIRED_WRITE_ERRORS),
                        (C.C_CACHE_HITS, L.H_RETIRED_CACHE_HITS)):
            q[h] += cq[w + word]
        if cq[w + C.C_WRITE_NS_MAX] > q[L.H_RETIRED_WRITE_NS_MAX]:
            q[L.H_RETIRED_WRITE_NS_MAX] = cq[w + C.C_WRITE_NS_MAX]
        self.seen_session[i] = 0


# -- durability ---------------------------------------------------------------------


def hist_bucket(ns: int) -> int:
    """The histogram bucket of one fsync: ``[2**b, 2**(b+1))`` microseconds."""
    us = ns // 1000
    return min(L.FSYNC_HIST_BUCKETS - 1, max(0, us.bit_length() - 1))


def timed(fn: Callable[[int], None], fd: int, out: list[int] | None) -> None:
    """Run ``fn(fd)`` (an fsync), appending its latency in ns to ``out``."""
    t0 = time.perf_counter_ns()
    fn(fd)
    if out is not None:
        out.append(time.perf_counter_ns() - t0)


def timed_fsync_dir(path: str, out: list[int] | None) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        timed(os.fsync, fd, out)
    finally:
        os.close(fd)


class DurabilityMetrics:
    """Adds fsyncs, WAL bytes and checkpoints to the header counters of one segment."""

    def __init__(self) -> None:
        self.q = None
        #: fsync latencies (ns) observed before a segment was bound
        self.pending: list[int] = []

    def bind(self, q: object) -> None:
        self.q = q
        pending, self.pending = self.pending, []
        self.fsyncs(pending)

    def fsyncs(self, latencies: list[int]) -> None:
        """Count fsyncs that took ``latencies`` ns each (coordinator thread)."""
        q = self.q
        if q is None:
            self.pending.extend(latencies)
            return
        for ns in latencies:
            ns = max(1, int(ns))
            if q[L.H_FSYNC_NS_MIN] == 0 or ns < q[L.H_FSYNC_NS_MIN]:
                q[L.H_FSYNC_NS_MIN] = ns
            if ns > q[L.H_FSYNC_NS_MAX]:
                q[L.H_FSYNC_NS_MAX] = ns
            q[L.H_FSYNC_NS_TOTAL] += ns
            q[L.H_FSYNC_HIST + hist_bucket(ns)] += 1
            # Invariant: the count goes up last, so the histogram never sums below it.
            q[L.H_FSYNCS] += 1

    def fsync(self, ns: int) -> None:
        self.fsyncs((ns,))

    def wal_bytes(self, n: int) -> None:
        if self.q is not None:
            self.q[L.H_WAL_BYTES] += n

    def checkpoint_done(self, ns: int, latencies: list[int]) -> None:
        """A checkpoint became durable after ``ns`` ns of writing."""
        self.fsyncs(latencies)
        q = self.q
        if q is not None:
            q[L.H_CHECKPOINT_NS_LAST] = max(1, int(ns))
            q[L.H_CHECKPOINTS] += 1
