"""The durability seam: what the coordinator does with each applied op.

The server calls, per group: :meth:`Journal.append` for every op it applied (the epoch
before the op and the request payload, which replays deterministically), then
:meth:`Journal.commit` once before any reply of the group is published. A durable
journal (the write-ahead log) makes ``commit`` write and, per its sync mode, fsync the
group; :class:`NullJournal` is the memory-only store's: nothing survives the segment.
"""

from __future__ import annotations

from typing import Protocol


class Journal(Protocol):
    def open(self, seg: object, engine: object) -> None:
        """Called once the segment is adopted or created, before serving."""

    def append(self, epoch_before: int, payload: bytes) -> None:
        """Record one applied op."""

    def commit(self) -> None:
        """Make everything appended so far as durable as the sync mode promises."""

    def tick(self) -> None:
        """Called every coordinator tick (periodic fsync, checkpoints)."""

    def close(self) -> None:
        """Called once at shutdown."""


class NullJournal:
    """Memory only: the segment is the only copy (``path=None``)."""

    def open(self, seg: object, engine: object) -> None:
        pass

    def append(self, epoch_before: int, payload: bytes) -> None:
        pass

    def commit(self) -> None:
        pass

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass
