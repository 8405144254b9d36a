"""Consistent snapshots: every key read through one snapshot is as of one epoch.

Design (and why it copies)
--------------------------
Writes are copy-on-write and keep no old versions: once a record changes after epoch
E, its value as of E is gone. So a *lazy* snapshot, one that pins E and reads keys as
they are asked for, can only answer a key that has not changed since E; when a key it
needs has changed and an earlier answer can no longer be reconciled with a newer epoch,
it has nothing left to answer from and would have to fail (or lie). shmstore promises
both that a snapshot never returns an inconsistent view and that it always ends, so
:meth:`Store.snapshot` takes an **eager copy** when it is created:

1. Optimistic, lock-free (up to ``SNAPSHOT_TRIES`` times): note the index generation
   G and the commit epoch E; copy the index (one numpy copy); gather the slots its
   buckets point to (one fancy-index copy), with their seq words gathered just before
   and just after; then check that G is unchanged and even, that no key was deleted
   after E (``H_LAST_DELETE_EPOCH``), and that every copied slot's seq is even,
   unchanged across the copy and at most ``2E+2`` (written at or before E). If so the
   copy is exactly the store at E: every record present at E has its bucket and an
   untorn slot in the copy, and nothing written after E does.
2. Otherwise (writers kept changing records during the copy) the coordinator writes
   the copy between two of its ops, which is consistent by construction, into a
   temporary shared-memory segment it hands over (``_handover``); the client maps it
   and unlinks it at once. So the call always ends, after a bounded number of tries.

Reads from a snapshot then probe the private copy: no seqlock, no retries, no
coordinator. Expiry is judged against the wall clock at the moment of the copy, so a
record does not expire half-way through a snapshot.

Cost: one copy of the index (8 bytes per bucket, 16 per record slot) plus the live
records' slots (``slot_size`` bytes each), O(store size) in time and private memory,
per snapshot: about the cost of a ``memcpy`` of that much memory (tens of ms for
100 MB). Take a snapshot for a multi-key read that must be consistent across several
calls; for one consistent multi-key read ``Store.get_many`` is cheaper.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from . import _channel as C
from . import _layout as L
from ._compiled import acquire as fence
from ._check_args import key_bytes, key_list
from ._errors import StoreClosedError
from ._handover import open_handover
from ._ttl import now_ns

if TYPE_CHECKING:
    from ._segment import Segment
    from ._counters import _Counters
    from ._writes import _Writer

U32 = np.uint64(0xFFFFFFFF)
HIGH = np.uint64(0xFFFFFFFF00000000)
#: lock-free copy attempts before the coordinator is asked for the copy
SNAPSHOT_TRIES = 4
#: the handover payload's header: epoch, records, buckets, slot size, taken-at ns
SNAP_HEADER = 64


def copy_optimistic(seg: object) -> tuple[int, np.ndarray, np.ndarray] | None:
    """One lock-free attempt at a consistent copy; None if writers got in the way.

    Returns:
        ``(epoch, buckets, rows)``: a private copy of the index whose buckets point to
        rows (``row + 1`` in the low 32 bits) of ``rows``, the copied slots.
    """
    q = seg.q
    g1 = q[L.H_INDEX_GEN]
    if g1 & 1:
        return None
    e = q[L.H_EPOCH]
    fence()  # g1 and e before the copy (acquire)
    idx = seg.index_view().copy()
    pos = np.flatnonzero(idx)
    b = idx[pos]
    slots = (b & U32).astype(np.intp) - 1
    words = seg.slot_words_view()
    slot_bytes = np.ndarray((seg.nslots, seg.slot_size), dtype=np.uint8, buffer=seg.mm,
                            offset=L.SLOTS_OFFSET)
    s1 = words[slots, L.S_SEQ]
    fence()  # the stamps before the records
    rows = np.take(slot_bytes, slots, axis=0)
    fence()  # the records before the stamps again, the delete epoch, the generation
    s2 = words[slots, L.S_SEQ]
    lde = q[L.H_LAST_DELETE_EPOCH]
    g2 = q[L.H_INDEX_GEN]
    del words, slot_bytes
    # Invariant: nothing copied above is trusted until every check below passes.
    if g2 != g1 or lde > e:
        return None
    if len(slots) and (np.any(s1 != s2) or np.any(s1 & np.uint64(1)) or int(s1.max()) > 2 * e + 2):
        return None
    idx[pos] = (b & HIGH) | (np.arange(1, len(pos) + 1, dtype=np.uint64))
    return e, idx, rows


def from_handover(mm: mmap.mmap, n: int) -> tuple[int, np.ndarray, np.ndarray, int]:
    """The coordinator's copy, as written by ``coordinator._table.write_snapshot``."""
    hdr = np.frombuffer(mm, dtype=np.uint64, count=5, offset=64)
    epoch, count, nbuckets, slot_size, taken = (int(x) for x in hdr)
    o = 64 + SNAP_HEADER
    idx = np.frombuffer(mm, dtype=np.uint64, count=nbuckets, offset=o)
    rows = np.frombuffer(mm, dtype=np.uint8, count=count * slot_size,
                         offset=o + 8 * nbuckets).reshape(count, slot_size)
    return epoch, idx, rows, taken


class Snapshot:
    """A consistent, read-only view of a store as of one epoch (:attr:`epoch`).

    Made by :meth:`Store.snapshot`; every read through it sees the store exactly as it
    was at that epoch, however the store changes meanwhile. It holds a private copy
    of the records, so it never blocks or waits on anything; close it (or leave its
    ``with`` block) to free that memory. Thread-safe (read-only); not shared across
    processes.
    """

    def __init__(self, epoch: int, buckets: np.ndarray, rows: np.ndarray, key_size: int,
                 value_size: int, taken_ns: int, decode: Callable[[bytes], Any],
                 via_coordinator: bool, mm: mmap.mmap | None = None) -> None:
        self.epoch = epoch
        #: True if the coordinator made the copy (writers kept the lock-free copy failing)
        self.via_coordinator = via_coordinator
        self._mm = mm
        self._buckets = buckets
        self._rows = rows
        self._b = memoryview(buckets).cast("B").cast("Q") if len(buckets) else memoryview(b"").cast("Q")
        self._raw = memoryview(rows.reshape(-1)).cast("B") if rows.size else memoryview(b"")
        self._w = self._raw.cast("Q") if rows.size else memoryview(b"").cast("Q")
        self._mask = len(buckets) - 1
        self._slot_size = rows.shape[1] if rows.ndim == 2 else 0
        self._ksz = key_size
        self._vsz = value_size
        self._taken = taken_ns
        self._decode = decode

    # -- lookups ---------------------------------------------------------------------

    def _find(self, kb: bytes) -> bytes | None:
        """The value bytes of ``kb`` in the copy, or None."""
        if self._b is None:
            raise StoreClosedError("this snapshot is closed; take a new one with store.snapshot()")
        if self._mask < 0:
            return None
        h = L.key_hash(kb)
        b = self._b
        raw = self._raw
        w = self._w
        mask = self._mask
        sw = self._slot_size >> 3
        pos = h & mask
        while True:
            x = b[pos]
            if x == 0:
                return None
            if x >> 32 == h:
                i = ((x & 0xFFFFFFFF) - 1) * sw  # the row's first word
                meta = w[i + L.S_META]
                klen = meta & 0xFFFF
                o = 8 * i + L.SLOT_HEADER
                if klen == len(kb) and raw[o : o + klen].tobytes() == kb:
                    expiry = w[i + L.S_EXPIRY]
                    if expiry and expiry <= self._taken:
                        return None
                    vo = o + self._ksz
                    return raw[vo : vo + min(meta >> 32, self._vsz)].tobytes()
            pos = (pos + 1) & mask

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value of ``key`` as of :attr:`epoch`, or ``default``."""
        vb = self._find(_kb(key))
        return default if vb is None else self._decode(vb)

    def get_many(self, keys: Iterable[str | bytes], default: Any = None) -> list:
        """Values of several keys as of :attr:`epoch` (``default`` for missing ones)."""
        find = self._find
        decode = self._decode
        out = []
        for k in keys if keys.__class__ is list else key_list(keys):
            vb = find(_kb(k))
            out.append(default if vb is None else decode(vb))
        return out

    def __getitem__(self, key: str | bytes) -> Any:
        vb = self._find(_kb(key))
        if vb is None:
            raise KeyError(key)
        return self._decode(vb)

    def __contains__(self, key: object) -> bool:
        return self._find(_kb(key)) is not None

    def items(self) -> Iterator[tuple[bytes, Any]]:
        """Every ``(key bytes, value)`` of the snapshot, in no particular order."""
        for kb in self.keys():
            vb = self._find(kb)
            if vb is not None:
                yield kb, self._decode(vb)

    def keys(self) -> Iterator[bytes]:
        """Every key of the snapshot (bytes), in no particular order."""
        if self._b is None:
            raise StoreClosedError("this snapshot is closed; take a new one with store.snapshot()")
        raw = self._raw
        w = self._w
        sw = self._slot_size >> 3
        for r in range(self._rows.shape[0]):
            i = r * sw
            expiry = w[i + L.S_EXPIRY]
            if expiry and expiry <= self._taken:
                continue
            o = 8 * i + L.SLOT_HEADER
            yield raw[o : o + (w[i + L.S_META] & 0xFFFF)].tobytes()

    __iter__ = keys

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Free the copy. Idempotent."""
        for attr in ("_w", "_b", "_raw"):
            v = self.__dict__.get(attr)
            if v is not None:
                v.release()
                self.__dict__[attr] = None
        self._buckets = self._rows = None
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the GC unmaps later
                pass

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmstore.Snapshot epoch={self.epoch}{' closed' if self._b is None else ''}>"


def _kb(key: object) -> bytes:
    if key.__class__ is str:
        try:
            return key.encode()  # type: ignore[union-attr]
        except UnicodeEncodeError:
            pass  # key_bytes raises the typed error
    elif key.__class__ is bytes:
        return key  # type: ignore[return-value]
    return key_bytes(key)  # InvalidKeyError: not str/bytes, or a str with no UTF-8 bytes


def take(seg: Segment, decode: Callable[[bytes], Any], counters: _Counters, writer: _Writer,
         timeout: float) -> Snapshot:
    """Store.snapshot(): the optimistic copy, or the coordinator's after the tries."""
    for _ in range(SNAPSHOT_TRIES):
        t = now_ns()  # the clock every expiry check reads (shmstore/_ttl.py)
        r = copy_optimistic(seg)
        if r is not None:
            e, idx, rows = r
            return Snapshot(e, idx, rows, seg.key_size, seg.value_size, t, decode, False)
        counters.read_retries += 1
    seg_name, _ = writer.request(seg, [C.OP_SNAPSHOT, 1], "snapshot", True, timeout)
    mm, n = open_handover(seg_name)
    e, idx, rows, taken = from_handover(mm, n)
    return Snapshot(e, idx, rows, seg.key_size, seg.value_size, taken, decode, True, mm)
