"""Repairing a segment adopted from a coordinator that died, and the batch redo area.

Design
------
Single ops are copy-on-write, so a death at any store leaves every *published* record
intact; what it can leave behind, and what :func:`repair` does about it:

==================================  =================================================
left behind                         repair
==================================  =================================================
a slot with an odd seq              unreferenced by the index: stamp it free
a free page that is not blank       a page move was cut short after its entry went
                                    to 0 (the compiled core's order): zero the page
slots of a page assigned after      a page move was cut short between the page table
the last published epoch (or        entry and the new slots' headers: what no bucket
stamped before its assignment)      names there is the old class's bytes, garbage
                                    stamps included; stamp it free, key length 0
                                    (and keep its stamps out of the epoch's reckoning)
an odd index generation             a backward shift was cut short: rebuild the index
                                    from the slots it references (duplicates, and
                                    references that are no slot of an assigned page,
                                    dropped)
an unreferenced, non-free slot      the old slot of an update, or a new slot never
                                    linked: free it
``H_EPOCH`` behind the stamps       set it to the newest stamp's epoch
``H_COUNT`` off by one, class        recount from the index and the page table
counters off                        (``Engine.rebuild_free_list``)
an odd ``H_BATCH_SEQ``              a batch was half applied: re-apply it whole from
                                    the redo area (its ops are idempotent as a whole)
==================================  =================================================

Slots are enumerated from the page table (``Segment.slot_refs``): only the slots of
assigned pages exist, each page cut into its class's slots.

The redo area (``/shmstore.NAME@redo``) holds the request payload of the batch being
applied, written before ``H_BATCH_SEQ`` goes odd. A batch's puts and deletes, applied
again in order, leave the state the whole batch would have left.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib

import numpy as np
import posix_ipc

from shmstore import _layout as L
from shmstore._errors import CorruptionError
from shmstore._segment import Segment

_REDO_HDR = struct.Struct("<QQ")  # length, crc32


class RedoArea:
    """A shared-memory scratch copy of the batch in flight (coordinator only)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = L.redo_name(name)
        try:
            shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREAT, mode=0o600)
        except posix_ipc.ExistentialError:  # pragma: no cover - racing destroy
            raise
        need = L.align(size + _REDO_HDR.size, L.PAGE)
        if os.fstat(shm.fd).st_size < need:
            os.ftruncate(shm.fd, need)
        self.mm = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size)
        shm.close_fd()

    def read(self) -> bytes | None:
        n, crc = _REDO_HDR.unpack_from(self.mm, 0)
        if n == 0 or n > len(self.mm) - _REDO_HDR.size:
            return None
        blob = bytes(self.mm[_REDO_HDR.size : _REDO_HDR.size + n])
        return blob if zlib.crc32(blob) == crc else None

    def write(self, blob: bytes) -> None:
        if len(blob) > len(self.mm) - _REDO_HDR.size:
            self.mm.resize(L.align(len(blob) + _REDO_HDR.size, L.PAGE))
        self.mm[_REDO_HDR.size : _REDO_HDR.size + len(blob)] = blob
        # Invariant: the header is stored after the payload it describes.
        _REDO_HDR.pack_into(self.mm, 0, len(blob), zlib.crc32(blob))

    def clear(self) -> None:
        _REDO_HDR.pack_into(self.mm, 0, 0, 0)

    def close(self) -> None:
        self.mm.close()


def valid_refs(seg: Segment, refs: np.ndarray, pt: np.ndarray | None = None) -> np.ndarray:
    """Which of ``refs`` (bucket slot fields minus one) name a slot of an assigned page:
    in range, on a slot boundary of the page's class (a bool array)."""
    if pt is None:
        pt = seg.page_table().copy()
    refs = np.asarray(refs, dtype=np.int64)
    inside = (refs >= 0) & (refs < seg.nslots)
    safe = np.where(inside, refs, 0)
    c = (pt[safe >> seg.ref_shift] & np.uint64(0xFF)).astype(np.int64) - 1
    classes = np.array(seg.classes, dtype=np.int64)
    ok = inside & (c >= 0) & (c < len(classes))
    size = classes[np.where(ok, c, 0)]
    within = (safe - ((safe >> seg.ref_shift) << seg.ref_shift)) * L.SLOT_UNIT
    return ok & (within % size == 0) & (within + size <= seg.page_size)


def _rebuild_index(seg: Segment) -> None:
    q = seg.q
    idx = seg.index_view()
    live = np.unique(idx[idx != 0])
    refs = (live & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1
    ok = valid_refs(seg, refs)
    live, refs = live[ok], refs[ok]
    hashes = (live >> np.uint64(32)).astype(np.int64)
    head = seg.headers(refs) if len(refs) else np.zeros((0, 4), np.uint64)
    ok = (head[:, L.S_SEQ] & np.uint64(1)) == 0
    ok &= head[:, L.S_SEQ] != 0
    ok &= ((head[:, L.S_META] >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) == 0
    keep: dict[int, int] = {}
    for ref, h, meta in zip(refs[ok].tolist(), hashes[ok].tolist(), head[ok, L.S_META].tolist()):
        klen = meta & 0xFFFF
        o = 8 * seg.slot0 + L.SLOT_UNIT * ref + L.SLOT_HEADER
        if ref in keep or not 1 <= klen <= seg.key_size or o + klen > seg.page_end(ref):
            continue
        if L.key_hash(bytes(seg.mv[o : o + klen])) == h:
            keep[ref] = h
    idx[:] = 0
    mask = seg.mask
    for ref, h in keep.items():
        pos = h & mask
        while idx[pos]:
            pos = (pos + 1) & mask
        idx[pos] = (h << 32) | (ref + 1)


def _stamp_free(seg: Segment, ref: int, epoch: int, klen: int) -> None:
    """Stamp slot ``ref`` free at ``epoch`` with key length ``klen`` (no reader uses it:
    no bucket points to it)."""
    q = seg.q
    w = seg.slot0 + ref * seg.slot_words
    q[w] = 2 * epoch + 1
    q[w + L.S_META] = klen | (L.FLAG_FREE << 16)
    q[w + L.S_EXPIRY] = 0
    q[w] = 2 * epoch + 2


def _clear_free_pages(seg: Segment, pt: np.ndarray) -> int:
    """Zero every free page that is not all zero; returns how many.

    A page is handed to a class as never-written (``Engine.assign_page``), so a free
    page must be blank. One that is not was left by a page move cut short after its
    entry went to 0 (the compiled core's order: entry 0, new slots stamped, entry last).
    No bucket may name a free page, and readers re-check the entry, so nobody reads it.
    """
    from ._durable._checkpoint import written_pages  # noqa: PLC0415

    per = seg.page_size // 8
    words = np.ndarray((seg.npages * per,), dtype=np.uint64, buffer=seg.mm, offset=8 * seg.slot0)
    cleared = 0
    top = written_pages(seg, pt)  # pages after it were never handed out: not read here
    for page in np.flatnonzero(pt[:top] == 0).tolist():
        region = words[page * per : (page + 1) * per]
        if region.any():
            region[:] = 0
            cleared += 1
    del words
    return cleared


def repair(seg: Segment, engine: object, redo: RedoArea | None = None) -> dict[str, int]:
    """Make an adopted segment consistent (a fresh one passes through untouched).

    Returns:
        Counts of what was repaired, for the log.
    """
    q = seg.q
    pt = seg.page_table().copy()
    refs, _ = seg.slot_refs(pt)
    report = {"odd_slots": 0, "stale_slots": 0, "pages_cleared": 0, "index_rebuilt": 0, "batch_redone": 0}
    report["pages_cleared"] = _clear_free_pages(seg, pt)
    if q[L.H_INDEX_GEN] & 1:
        _rebuild_index(seg)
        q[L.H_INDEX_GEN] += 1
        report["index_rebuilt"] = 1
    head = seg.headers(refs) if len(refs) else np.zeros((0, 4), np.uint64)
    seqs = head[:, L.S_SEQ]
    idx = seg.index_view()
    named = np.isin(refs, (idx[idx != 0] & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1)
    del idx
    # A page handed to its class after the last published epoch: a move (or a batch
    # that moved it) was cut short, and its slots no bucket names may still hold the old
    # class's bytes, which read as headers of the new geometry are garbage, stamps
    # included. A completed move publishes its epoch, so no other page can.
    page_epoch = (pt[refs >> seg.ref_shift] >> np.uint64(L.PTE_CLASS_BITS)).astype(np.int64)
    published = q[L.H_EPOCH]
    blank = ~head.any(axis=1) if len(refs) else np.zeros(0, bool)
    floor = (2 * page_epoch + 1).astype(np.uint64)
    stale = ~named & ~blank & ((page_epoch > published) | ((page_epoch > 0) & (seqs < floor)))
    odd = ~stale & ((seqs & np.uint64(1)) != 0)
    trusted = seqs[~stale]
    top = int(trusted.max()) if len(trusted) else 0
    top_page = int((pt >> np.uint64(L.PTE_CLASS_BITS)).max()) if len(pt) else 0
    engine.epoch = max(published, (top - 1) // 2 if top else 0, top_page)
    # An odd slot keeps its key (change feeds name the key whose write was cut short);
    # a stale one gets none.
    klen = (head[:, L.S_META] & np.uint64(0xFFFF)).astype(np.int64)
    klen = np.where(odd & (klen <= seg.key_size), klen, 0)
    for i in np.flatnonzero(odd | stale).tolist():
        ref = int(refs[i])
        kl = int(klen[i])
        if 8 * seg.slot0 + L.SLOT_UNIT * ref + L.SLOT_HEADER + kl > seg.page_end(ref):
            kl = 0
        _stamp_free(seg, ref, engine.next_epoch(), kl)
    report["odd_slots"] = int(np.count_nonzero(odd))
    report["stale_slots"] = int(np.count_nonzero(stale))
    engine.rebuild_free_list()
    if q[L.H_BATCH_SEQ] & 1:
        blob = redo.read() if redo is not None else None
        if blob is None:
            raise CorruptionError(
                f"store {seg.name!r}: a batch was cut short by the previous coordinator's "
                f"death and its redo copy is missing or damaged; the segment cannot be "
                f"trusted. Destroy it and recover from the data directory."
            )
        import msgspec

        from ._ops import Batch, decode_logged

        try:
            op = decode_logged(blob)
        except msgspec.DecodeError:
            op = None
        if type(op) is not Batch:
            raise CorruptionError(
                f"store {seg.name!r}: a batch was cut short by the previous coordinator's "
                f"death and its redo copy is not a batch; the segment cannot be trusted. "
                f"Destroy it and recover from the data directory."
            )
        ops = op.ops
        q[L.H_BATCH_SEQ] += 1  # even again; batch() makes it odd while re-applying
        engine.batch(ops)
        report["batch_redone"] = 1
    if redo is not None:
        redo.clear()
    engine.publish()
    q[L.H_LAST_DELETE_EPOCH] = engine.epoch
    return report
