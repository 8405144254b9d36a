"""The counters of a handle and of a process, and their publishing to the client block.

Every reader has them (a handle's ``get`` counts into them), so this module is light:
what ``Store.stats()`` reads and computes is in ``shmstore._stats``, whose docstring
describes the counters, who writes each and when they are published. A process that
only reads has no client block; at a publish moment it may claim one, which opens the
write channel (and imports numpy: see ``shmstore._lazy``).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Protocol

from . import _layout as L
from ._errors import ShmStoreError
from ._lazy import LazyModule
from ._readers import Readers
from ._segment import Segment, coordinator_alive

if TYPE_CHECKING:
    from . import _channel as C
else:
    C = LazyModule("shmstore._channel")

#: seconds between a reader process's attempts to claim a client block for its counters
CLAIM_RETRY = 10.0
#: how long a claim may wait for the coordinator's handshake
CLAIM_TIMEOUT = 0.25


# -- the handle's own counters ---------------------------------------------------------


class WriteSession(Protocol):
    """What :class:`_Counters` needs of the handle's write session (``_writes._Writer``):
    the channel its totals are published to, and a way to claim one."""

    pid: int  #: the process the session belongs to
    chan: C.ClientChannel | None
    counters: _Counters  #: the process's counters

    def claim(self, seg: Segment, timeout: float) -> bool:
        """Open a write channel if none is alive, without waiting for the write lock."""
        ...


class _Counters:
    """One handle's counters, or (the attachment's) one process's, and the publishing of
    the process's to its client block.

    The running totals live here; the ``get`` fast path counts in its closure cells and
    the segment counts its retries, so :meth:`totals` adds what those counted since
    they were attached (their ``*_base``). One writer: the handle's process (a write
    updates them under the write session's lock, a read without any lock, as before).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.seg: Segment | None = None
        self.readers: Readers | None = None  # the handle's reads (make_readers)
        self.reset()

    def reset(self) -> None:
        """Zeroed counters: a new handle, or a forked child's copy (a new client)."""
        self.reads = 0
        self.read_retries = 0
        self.writes = 0
        self.timeouts = 0
        self.write_ns = 0
        self.write_ns_max = 0
        self.writes_timed = 0
        self.write_errors = 0
        self.cache_hits = 0
        #: read counts already pushed to the process's counters (see :meth:`push`)
        self.pushed = (0, 0, 0)
        #: the channel and ticket of this handle's last request (what flush() waits for)
        self.last_chan = None
        self.last_ticket = 0
        self.next_claim = 0.0
        self.prev_stats: tuple[float, dict] | None = None
        readers, seg = self.readers, self.seg
        # the closure cells and the segment's count are not reset: count from here
        self.readers_base = readers.reads() if readers is not None else 0
        self.hits_base = readers.cache_hits() if readers is not None else 0
        self.retries_base = seg.retries if seg is not None else 0

    def attach(self, seg: Segment | None, readers: Readers | None) -> None:
        """Count through a new mapping and its ``Readers`` (at open, after a reattach,
        None at close), keeping what the old ones counted in the totals."""
        old_seg, old_readers = self.seg, self.readers
        if old_seg is not None:
            self.read_retries += old_seg.retries - self.retries_base
        if old_readers is not None:
            self.reads += old_readers.reads() - self.readers_base
            self.cache_hits += old_readers.cache_hits() - self.hits_base
        self.seg, self.readers = seg, readers
        self.readers_base = readers.reads() if readers is not None else 0
        self.hits_base = readers.cache_hits() if readers is not None else 0
        self.retries_base = seg.retries if seg is not None else 0

    def totals(self) -> tuple[int, ...]:
        """The handle's counters in ``C.C_COUNTERS`` order."""
        seg, readers = self.seg, self.readers
        reads = self.reads + (readers.reads() - self.readers_base if readers is not None else 0)
        hits = self.cache_hits + (readers.cache_hits() - self.hits_base if readers is not None else 0)
        retries = self.read_retries + (seg.retries - self.retries_base if seg is not None else 0)
        return (reads, retries, self.writes, self.timeouts, self.write_ns,
                self.write_ns_max, self.writes_timed, self.write_errors, hits)

    def push(self, proc: _Counters) -> None:
        """Add the reads this handle counted since its last push to the process's."""
        readers = self.readers
        reads = self.reads + (readers.reads() - self.readers_base if readers is not None else 0)
        hits = self.cache_hits + (readers.cache_hits() - self.hits_base if readers is not None else 0)
        now = (reads, hits, self.read_retries)
        before, self.pushed = self.pushed, now
        proc.reads += now[0] - before[0]
        proc.cache_hits += now[1] - before[1]
        proc.read_retries += now[2] - before[2]

    def note_write(self, ns: int | None, error: bool) -> None:
        """Count one finished write request (``ns``: its latency if it was waited for)."""
        if ns is not None:
            self.write_ns += ns
            self.writes_timed += 1
            if ns > self.write_ns_max:
                self.write_ns_max = ns
        if error:
            self.write_errors += 1

    def publish(self, ch: C.ClientChannel | None) -> None:
        """Store the totals into the client block of ``ch``, if there is one.

        The caller saw that ``ch`` is this process's (a write request holds the write
        lock and has checked the pid; :meth:`publish_or_claim` checks it itself): a
        getpid() is a system call here (glibc does not cache it).
        """
        if ch is None:
            return
        q = ch.chan.__dict__.get("q")
        if q is None:
            return
        w = ch.w
        try:
            for word, value in zip(C.C_COUNTERS, self.totals()):
                q[w + word] = value
        except ValueError:
            pass  # another thread of this process just closed that channel: its next one counts

    def publish_or_claim(self, session: WriteSession) -> None:
        """A publish moment of a handle that may have no block (see the module docstring)."""
        ch = session.chan
        if ch is not None and ch.alive():
            if session.pid == os.getpid():
                self.publish(ch)
            return
        # No block, or one of a coordinator that is gone (a reader has no write that would
        # register it with the new one): claim one, at most every CLAIM_RETRY seconds.
        seg = self.seg
        now = time.monotonic()
        if seg is None or now < self.next_claim or session.pid != os.getpid():
            return
        self.next_claim = now + CLAIM_RETRY
        if self.totals()[0] == 0 or not seg.q[L.H_COORD_INCARNATION] or not coordinator_alive(seg):
            return
        try:
            ch = C.open_channel(self.name)
        except ShmStoreError:
            return
        try:
            free = int((ch.claims() == 0).sum())
            half = ch.layout.max_clients // 2
        finally:
            ch.close()
        if free <= half or not session.claim(seg, CLAIM_TIMEOUT):
            return
        self.next_claim = 0.0  # claimed: the retry pause is for failures only
        self.publish(session.chan)
