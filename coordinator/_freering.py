"""The engine's free slots, reused oldest-freed first, and the change-feed horizon.

Design
------
A freed slot keeps its key and its stamp ``2E+2`` (the epoch E that freed it): that is
how a deletion shows up in ``store.changes(since)``. Reusing the slot for another
record erases that record of the change. Two rules keep a change feed from ever
missing one silently:

1. Free slots are reused in FIFO order (:class:`FreeRing`): the slot freed longest ago
   goes first, so the erased change records are always the oldest ones, and the store
   remembers as many recent changes as it has free slots.
2. Before a reused slot is first written, the header word ``H_FEED_HORIZON`` is raised
   to the epoch whose change record is about to be erased (``Engine._store``). A
   reader asking for the changes after ``since < H_FEED_HORIZON`` gets
   :class:`FeedTruncatedError` instead of a silently incomplete list; one whose scan
   overlapped a reuse sees the raised horizon when it re-checks after its scan.

The horizon is conservative: the slot an update frees is also erased when reused,
though the key's newer record still carries the change. A store that is nearly full
and keeps being written therefore has a horizon close to its epoch; feed consumers
must keep up within (free slots) epochs there.

Invariant: ``H_FEED_HORIZON`` is stored before the first store into a reused slot.
"""

from __future__ import annotations

from collections import deque


class FreeRing(deque):
    """A FIFO of slot numbers: ``pop()`` returns the slot appended longest ago.

    A deque (C-speed append and pop on the coordinator's hot path). Indexing counts
    like a stack whose top is the next slot ``pop()`` returns: ``ring[-1]`` is that
    slot.
    """

    __slots__ = ()
    pop = deque.popleft

    def __getitem__(self, i: int) -> int:
        return deque.__getitem__(self, -1 - i)
