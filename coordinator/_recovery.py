"""Repairing a segment adopted from a coordinator that died, and the batch redo area.

Design
------
Single ops are copy-on-write, so a death at any store leaves every *published* record
intact; what it can leave behind, and what :func:`repair` does about it:

==================================  =================================================
left behind                         repair
==================================  =================================================
a slot with an odd seq              unreferenced by the index: stamp it free
an odd index generation             a backward shift was cut short: rebuild the index
                                    from the slots it references (duplicates dropped)
an unreferenced, non-free slot      the old slot of an update, or a new slot never
                                    linked: free it
``H_EPOCH`` behind the stamps       set it to the newest stamp's epoch
``H_COUNT`` off by one              recount from the index
an odd ``H_BATCH_SEQ``              a batch was half applied: re-apply it whole from
                                    the redo area (its ops are idempotent as a whole)
==================================  =================================================

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


def _rebuild_index(seg: Segment) -> None:
    q = seg.q
    idx = seg.index_view()
    words = seg.slot_words_view()
    live = np.unique(idx[idx != 0])
    slots = (live & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1
    hashes = (live >> np.uint64(32)).astype(np.int64)
    ok = (words[slots, L.S_SEQ] & np.uint64(1)) == 0
    ok &= ((words[slots, L.S_META] >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) == 0
    keep: dict[int, int] = {}
    for slot, h in zip(slots[ok].tolist(), hashes[ok].tolist()):
        w = seg.slot0 + slot * seg.slot_words
        o = w * 8 + L.SLOT_HEADER
        kb = bytes(seg.mv[o : o + (q[w + L.S_META] & 0xFFFF)])
        if L.key_hash(kb) == h:
            keep[slot] = h
    idx[:] = 0
    mask = seg.mask
    for slot, h in keep.items():
        pos = h & mask
        while idx[pos]:
            pos = (pos + 1) & mask
        idx[pos] = (h << 32) | (slot + 1)


def repair(seg: Segment, engine: object, redo: RedoArea | None = None) -> dict[str, int]:
    """Make an adopted segment consistent (a fresh one passes through untouched).

    Returns:
        Counts of what was repaired, for the log.
    """
    q = seg.q
    words = seg.slot_words_view()
    seqs = words[:, L.S_SEQ]
    report = {"odd_slots": 0, "index_rebuilt": 0, "batch_redone": 0}
    top = int(seqs.max()) if len(seqs) else 0
    engine.epoch = max(q[L.H_EPOCH], (top - 1) // 2 if top else 0)
    if q[L.H_INDEX_GEN] & 1:
        _rebuild_index(seg)
        q[L.H_INDEX_GEN] += 1
        report["index_rebuilt"] = 1
    odd = np.flatnonzero(seqs & np.uint64(1))
    for slot in odd.tolist():
        w = seg.slot0 + slot * seg.slot_words
        epoch = engine.next_epoch()
        q[w + L.S_META] = (q[w + L.S_META] & 0xFFFF) | (L.FLAG_FREE << 16)
        q[w + L.S_EXPIRY] = 0
        q[w] = 2 * epoch + 2
    report["odd_slots"] = len(odd)
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
