"""The upstream of a replica store: the seam between the coordinator and whatever orders
every write of a dataset (today a Redis primary, :mod:`._redis`).

Design
------
A replica store's coordinator applies no write on its own. It turns each write into an
op tuple, hands the list to :meth:`Upstream.submit`, and the upstream applies them in one
atomic step to the dataset's records, numbers them with the dataset's global versions
and appends them to the dataset's change stream. Every replica (including the one that
submitted) then applies the stream in order with :meth:`Upstream.read`: its local epoch
and every record's version are the global ones.

The stream is a chain of :class:`Entry`: each names its predecessor (``prev``), and its
id is ``"<V>-<nonce>"`` where ``V`` is the global version after the entry and the nonce
is random per submitting call, so two histories that reached the same version never
share an id. A replica that finds an entry whose ``prev`` is not the id it applied last
knows entries were lost (a failover, a restart that lost the tail, a trimmed stream)
and must resynchronize from :meth:`Upstream.scan`.

Op tuples for :meth:`Upstream.submit` (validated by the caller; keys and values are
bytes, expiries absolute wall-clock ns, 0 = none)::

    ("put", key, value, expiry)              -> new version (int)
    ("cas", key, value, expiry, expected)    -> new version, or VersionConflictError
    ("delete", key)                          -> it existed (bool; an expired one: False)
    ("incr", key, delta)                     -> the new integer, or ValueEncodingError
    ("batch", [BatchPut | BatchDelete, ...]) -> per op: version (put) / existed (delete)
    ("expire", key, now_ns)                  -> it was due and is gone (bool)

Each op's result comes back as ``(entry_id or None, result)``, ``result`` being what the
local engine returns for that op, or a :class:`shmstore.ShmStoreError` *instance* that
failed that op alone (the other ops of the list still apply). A failure of the whole
call is raised: ``UpstreamUnavailableError`` (nothing applied), ``UpstreamTimeoutError``
(may or may not have been applied), ``CorruptionError`` (the upstream's data does not
parse).
"""

from __future__ import annotations

from typing import Iterator, Protocol

import msgspec

__all__ = ["Entry", "Upstream"]


class Entry(msgspec.Struct, frozen=True):
    """One entry of a dataset's change stream, parsed and checked.

    Attributes:
        id: ``"V-nonce"``.
        prev: the id of the entry before it (``"0-0"`` for the first).
        version: ``V``, the global version after the entry.
        epoch_before: ``V`` of ``prev`` (0 for ``"0-0"``); ``version - epoch_before`` is
            the number of versions the entry takes (``_ops.epochs_of(op)``).
        op: the logged op to apply (``_ops.Put`` / ``Delete`` / ``Batch`` / ``Expire``;
            an incr's result comes as a ``Put``), or None for a jump (a fence: only the
            global version moves).
        time_ms: the upstream's clock when the entry was appended (ms since the epoch).
    """

    id: str
    prev: str
    version: int
    epoch_before: int
    op: object | None
    time_ms: int


class Upstream(Protocol):
    """What a replica's coordinator needs from its upstream.

    One instance is one connection: use it from one thread; :meth:`clone` gives another
    (the follower thread's). ``close()`` is idempotent.
    """

    def submit(self, ops: list[tuple], now_ns: int) -> list[tuple[str | None, object]]:
        """Apply ``ops`` in order as one atomic step; ``now_ns`` judges expiries."""
        ...

    def read(self, after: str, count: int, block_ms: int | None = None) -> list[Entry]:
        """Up to ``count`` entries after the id ``after``; waits up to ``block_ms`` for one."""
        ...

    def entry(self, entry_id: str) -> Entry | None:
        """The entry of that id, or None when the stream does not hold it."""
        ...

    def head(self) -> tuple[int, str]:
        """``(version, id of the last entry)``; ``(0, "0-0")`` for a dataset never written."""
        ...

    def scan(self, count: int = 1000) -> Iterator[tuple[bytes, int, int, bytes]]:
        """Every record as ``(key, version, expiry, value)`` (a key may come twice)."""
        ...

    def fence(self, min_version: int) -> tuple[int, str]:
        """Move the global version to at least ``min_version`` (and by at least one)."""
        ...

    def clone(self) -> Upstream:
        """Another connection to the same dataset."""
        ...

    def close(self) -> None:
        """Drop the connection(s); idempotent."""
        ...
