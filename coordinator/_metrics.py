"""Durability counters in the segment header (words ``H_FSYNCS`` .. ``H_FSYNC_HIST``).

One writer: the coordinator thread. A checkpoint written by the helper thread collects
its fsync latencies in a list, and the coordinator thread adds them when it finishes
the checkpoint (:meth:`DurabilityMetrics.checkpoint_done`), so no word ever has two
writers. Readers (``stats()``, Prometheus) read the words without a lock: each is one
aligned u64, and the histogram is a set of independent counts.

Invariant: ``sum(H_FSYNC_HIST .. +FSYNC_HIST_BUCKETS) == H_FSYNCS`` between two
updates of the coordinator thread, and ``H_FSYNC_NS_MIN <= total / count <=
H_FSYNC_NS_MAX`` once ``H_FSYNCS > 0``.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from shmstore import _layout as L


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
