"""The coordinator's side of ``Store.snapshot()``: a consistent copy, handed over.

Called between two ops (the coordinator applies one op at a time), so every slot the
index points to is stable: copying the index and those slots is the store exactly at
the current epoch. The copy goes into a handover segment (``shmstore._handover``)
laid out as ``shmstore._snapshot.from_handover`` reads it::

    64   u64 x 5   epoch, records n, buckets, slot size, wall-clock ns of the copy
    128  u64 x nbuckets   the index, each bucket pointing to ``row + 1``
    ...  n x slot size    the slots, in row order
"""

from __future__ import annotations

import numpy as np

from shmstore import _layout as L
from shmstore._handover import HANDOVER_HEADER, Handovers
from shmstore._segment import Segment
from shmstore._snapshot import HIGH, SNAP_HEADER, U32
from shmstore._ttl import now_ns


def write_snapshot(seg: Segment, epoch: int, handovers: Handovers) -> str:
    """Copy the store into a new handover segment; returns its name."""
    idx = seg.index_view()
    pos = np.flatnonzero(idx)
    b = idx[pos]
    n = len(pos)
    nb = seg.nbuckets
    size = SNAP_HEADER + 8 * nb + n * seg.slot_size
    name, mm = handovers.create(size)
    try:
        o = HANDOVER_HEADER
        np.frombuffer(mm, dtype=np.uint64, count=5, offset=o)[:] = (epoch, n, nb, seg.slot_size, now_ns())
        o += SNAP_HEADER
        out_idx = np.frombuffer(mm, dtype=np.uint64, count=nb, offset=o)
        out_idx[:] = idx
        out_idx[pos] = (b & HIGH) | np.arange(1, n + 1, dtype=np.uint64)
        if n:
            slot_bytes = np.ndarray((seg.nslots, seg.slot_size), dtype=np.uint8, buffer=seg.mm,
                                    offset=L.SLOTS_OFFSET)
            out_rows = np.frombuffer(mm, dtype=np.uint8, count=n * seg.slot_size,
                                     offset=o + 8 * nb).reshape(n, seg.slot_size)
            np.take(slot_bytes, (b & U32).astype(np.intp) - 1, axis=0, out=out_rows)
            del slot_bytes, out_rows
        del out_idx, idx
    except BaseException:
        mm.close()
        raise
    Handovers.seal(mm, size)
    return name
