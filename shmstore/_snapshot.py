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
   buckets point to, each whole at its size class's size (one fancy-index copy per
   class, :func:`gather_rows`), with their pages' entries and seq words gathered just
   before and just after; then check that G is unchanged and even, that no key was
   deleted after E (``H_LAST_DELETE_EPOCH``), that every page entry is assigned and
   unchanged (no page was handed to another class during the copy), and that every
   copied slot's seq is even, unchanged across the copy and at most ``2E+2``
   (written at or before E). If so the
   copy is exactly the store at E: every record present at E has its bucket and an
   untorn slot in the copy, and nothing written after E does.
2. Otherwise (writers kept changing records during the copy) the coordinator writes
   the copy between two of its ops, which is consistent by construction, into a
   temporary shared-memory segment it hands over (``_handover``); the client maps it
   and unlinks it at once. So the call always ends, after a bounded number of tries.

Reads from a snapshot then probe the private copy: no seqlock, no retries, no
coordinator. Expiry is judged against the wall clock at the moment of the copy, so a
record does not expire half-way through a snapshot.

Cost: one copy of the index (8 bytes per bucket) plus the live records' slots (each
its class's slot size), O(store size) in time and private memory,
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


def gather_rows(seg: Segment, slots: np.ndarray, pte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copy slots (refs) out of the segment into one private buffer, each slot whole
    (its class's size), by one gather per size class.

    Args:
        seg: the mapping.
        slots: the refs (int64), grouped by class (see :func:`by_class`), each the start
            of a slot of its page's class in ``pte``.
        pte: each slot's page-table entry (as read by the caller; class = low byte - 1).

    Returns:
        ``(data, offsets)``: uint8 bytes, and int64 ``(n + 1,)`` row bounds: row r is
        ``data[offsets[r]:offsets[r + 1]]``, rows in the order of ``slots``.
    """
    n = len(slots)
    cls = (pte & np.uint64(0xFF)).astype(np.int64) - 1
    sizes = np.asarray(seg.classes, dtype=np.int64)[cls] if n else np.zeros(0, np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    base = 8 * seg.slot0
    # the runs of one class: [starts[i], starts[i + 1])
    starts = np.flatnonzero(np.diff(cls, prepend=-2))
    for a, z in zip(starts.tolist(), [*starts[1:].tolist(), n]):
        size = seg.classes[int(cls[a])]
        count = min(seg.nslots, (len(seg.mm) - base - size) // L.SLOT_UNIT + 1)
        view = np.ndarray((count,), dtype=np.dtype(f"V{size}"), buffer=seg.mm, offset=base,
                          strides=(L.SLOT_UNIT,))
        data[offsets[a] : offsets[z]] = view[slots[a:z]].view(np.uint8).reshape(-1)
        del view
    return data, offsets


def by_class(pte: np.ndarray) -> np.ndarray:
    """The order that groups slots by class (what :func:`gather_rows` takes)."""
    return np.argsort(pte & np.uint64(0xFF), kind="stable")


def copy_optimistic(seg: Segment) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
    """One lock-free attempt at a consistent copy; None if writers got in the way.

    Returns:
        ``(epoch, buckets, data, offsets)``: a private copy of the index whose buckets
        point to rows (``row + 1`` in the low 32 bits) of the copied slots
        (:func:`gather_rows`).
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
    slots = (b & U32).astype(np.int64) - 1
    if len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= seg.nslots):
        return None  # a damaged bucket: the coordinator's copy reports it
    pt = seg.page_table()
    pages = slots >> seg.ref_shift
    pte1 = pt[pages]
    words = np.ndarray((len(seg.mm) // 8,), dtype=np.uint64, buffer=seg.mm)
    seqw = seg.slot0 + seg.slot_words * slots
    s1 = words[seqw]
    fence()  # the page entries and stamps before the records
    if len(slots) and not pte1.all():
        return None  # a bucket into a page being moved
    cls = (pte1 & np.uint64(0xFF)).astype(np.int64) - 1
    if len(slots) and (int(cls.max()) >= len(seg.classes)
                       or np.any((slots & ((1 << seg.ref_shift) - 1)) * L.SLOT_UNIT
                                 % np.asarray(seg.classes, np.int64)[cls])):
        return None  # not a slot's start in its page's class: stale
    order = by_class(pte1)
    pos, b, slots, pages, seqw, s1, pte1 = (x[order] for x in (pos, b, slots, pages, seqw, s1, pte1))
    data, offsets = gather_rows(seg, slots, pte1)
    fence()  # the records before the stamps again, the entries, the delete epoch, the generation
    s2 = words[seqw]
    pte2 = pt[pages]
    lde = q[L.H_LAST_DELETE_EPOCH]
    g2 = q[L.H_INDEX_GEN]
    del words, pt
    # Invariant: nothing copied above is trusted until every check below passes.
    if g2 != g1 or lde > e:
        return None
    if len(slots) and (np.any(s1 != s2) or np.any(pte1 != pte2) or np.any(s1 & np.uint64(1))
                       or int(s1.max()) > 2 * e + 2):
        return None
    idx[pos] = (b & HIGH) | (np.arange(1, len(pos) + 1, dtype=np.uint64))
    return e, idx, data, offsets


def from_handover(mm: mmap.mmap, n: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, int]:
    """The coordinator's copy, as written by ``coordinator._table.write_snapshot``.

    Layout (after the handover header)::

        64   u64 x 5   epoch, records n, buckets, row size (0: rows of their own sizes),
                       wall-clock ns of the copy
        128  u64 x nbuckets   the index, each bucket pointing to ``row + 1``
        row size > 0:  n x row size bytes, each a slot zero-padded to the row size
        row size 0:    u64 x (n + 1) row bounds (from 0), then the rows' bytes
    """
    hdr = np.frombuffer(mm, dtype=np.uint64, count=5, offset=64)
    epoch, count, nbuckets, slot_size, taken = (int(x) for x in hdr)
    o = 64 + SNAP_HEADER
    idx = np.frombuffer(mm, dtype=np.uint64, count=nbuckets, offset=o)
    o += 8 * nbuckets
    if slot_size:
        offsets = np.arange(count + 1, dtype=np.int64) * slot_size
    else:
        offsets = np.frombuffer(mm, dtype=np.uint64, count=count + 1, offset=o).astype(np.int64)
        o += 8 * (count + 1)
    data = np.frombuffer(mm, dtype=np.uint8, count=int(offsets[-1]), offset=o)
    return epoch, idx, data, offsets, taken


class Snapshot:
    """A consistent, read-only view of a store as of one epoch (:attr:`epoch`).

    Made by :meth:`Store.snapshot`; every read through it sees the store exactly as it
    was at that epoch, however the store changes meanwhile. It holds a private copy
    of the records, so it never blocks or waits on anything; close it (or leave its
    ``with`` block) to free that memory. Thread-safe (read-only); not shared across
    processes.
    """

    def __init__(self, epoch: int, buckets: np.ndarray, data: np.ndarray, offsets: np.ndarray,
                 key_size: int, value_size: int, taken_ns: int, decode: Callable[[bytes], Any],
                 via_coordinator: bool, mm: mmap.mmap | None = None) -> None:
        self.epoch = epoch
        #: True if the coordinator made the copy (writers kept the lock-free copy failing)
        self.via_coordinator = via_coordinator
        self._mm = mm
        self._buckets = buckets
        self._data = data
        self._offsets = offsets
        self._b = memoryview(buckets).cast("B").cast("Q") if len(buckets) else memoryview(b"").cast("Q")
        self._raw = memoryview(data).cast("B") if data.size else memoryview(b"")
        #: row r's bounds in _raw: _off[r], _off[r + 1] (a row is one whole slot)
        self._off = memoryview(np.ascontiguousarray(offsets, dtype=np.int64)).cast("B").cast("q")
        self._nrows = len(offsets) - 1
        self._mask = len(buckets) - 1
        self._ksz = key_size
        self._vsz = value_size
        self._taken = taken_ns
        self._decode = decode

    # -- lookups ---------------------------------------------------------------------

    def _row(self, r: int) -> tuple[int, int, int, int]:
        """Row r's ``(expiry, meta, key offset, row end)`` in the copy."""
        off = self._off
        o = off[r]
        end = off[r + 1]
        raw = self._raw
        if end - o < L.SLOT_HEADER:  # not a slot (a damaged handover): nothing in it
            return 0, 0, o + L.SLOT_HEADER, o + L.SLOT_HEADER
        expiry = int.from_bytes(raw[o + 8 * L.S_EXPIRY : o + 8 * L.S_EXPIRY + 8], "little")
        meta = int.from_bytes(raw[o + 8 * L.S_META : o + 8 * L.S_META + 8], "little")
        return expiry, meta, o + L.SLOT_HEADER, end

    def _key_of(self, meta: int, ko: int, end: int) -> tuple[int, int]:
        """The key's length and the value's offset, clamped to the row."""
        klen = min(meta & 0xFFFF, self._ksz, max(0, end - ko))
        return klen, ko + ((klen + 7) & ~7)

    def _find(self, kb: bytes) -> bytes | None:
        """The value bytes of ``kb`` in the copy, or None."""
        if self._b is None:
            raise StoreClosedError("this snapshot is closed; take a new one with store.snapshot()")
        if self._mask < 0:
            return None
        h = L.key_hash(kb)
        b = self._b
        raw = self._raw
        mask = self._mask
        nrows = self._nrows
        pos = h & mask
        while True:
            x = b[pos]
            if x == 0:
                return None
            r = (x & 0xFFFFFFFF) - 1
            if x >> 32 == h and 0 <= r < nrows:
                expiry, meta, ko, end = self._row(r)
                klen, vo = self._key_of(meta, ko, end)
                if klen == len(kb) and raw[ko : ko + klen] == kb:
                    if expiry and expiry <= self._taken:
                        return None
                    return raw[vo : vo + min(meta >> 32, self._vsz, max(0, end - vo))].tobytes()
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
        for r in range(self._nrows):
            expiry, meta, ko, end = self._row(r)
            if expiry and expiry <= self._taken:
                continue
            klen, _ = self._key_of(meta, ko, end)
            yield raw[ko : ko + klen].tobytes()

    __iter__ = keys

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Free the copy. Idempotent."""
        for attr in ("_off", "_b", "_raw"):
            v = self.__dict__.get(attr)
            if v is not None:
                v.release()
                self.__dict__[attr] = None
        self._buckets = self._data = self._offsets = None
        self._nrows = 0
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
            e, idx, data, offsets = r
            return Snapshot(e, idx, data, offsets, seg.key_size, seg.value_size, t, decode, False)
        counters.read_retries += 1
    seg_name, _ = writer.request(seg, [C.OP_SNAPSHOT, 1], "snapshot", True, timeout)
    mm, n = open_handover(seg_name)
    e, idx, data, offsets, taken = from_handover(mm, n)
    return Snapshot(e, idx, data, offsets, seg.key_size, seg.value_size, taken, decode, True, mm)
