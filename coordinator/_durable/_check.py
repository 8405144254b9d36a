"""``shmstore.check``: verify a data directory and a live segment, read-only.

Nothing here writes: files are opened read-only, the segment is mapped read-only, and
no lock is taken (a running coordinator is not disturbed; the segment is checked on a
copy taken while no write landed).
"""

from __future__ import annotations

import os
import re
import time

import msgspec
import numpy as np

from shmstore import _layout as L
from shmstore._checkreport import CheckReport
from shmstore._errors import CorruptionError, IncompatibleStoreError
from shmstore._segment import coordinator_alive
from shmstore._shm import open_segment

from .._ops import decode_logged, logged_problem
from ._atrest import FLAG_AESGCM, Codec, load_key, verify_key
from ._checkpoint import HEADER_SIZE as CKPT_HEADER
from ._checkpoint import load_checkpoint, peek_header, read_header
from ._datadir import MANIFEST, DataDir, is_own_file, missing_link, wal_chain
from ._tablefile import read_tables_file, tables_path
from ._wal import scan_wal

_OFFSET = re.compile(r"(?:offset|bytes) (\d+)")
MAX_LISTED = 20  # problems of one kind listed one by one in a segment; the rest counted


def _offset(message: str) -> int | None:
    m = _OFFSET.search(message)
    return int(m.group(1)) if m else None


def _add(report: CheckReport, source: str, e: Exception) -> None:
    msg = getattr(e, "message", str(e))
    # The file is named in ``source``; keep the message's words after the name.
    short = msg.split(f"{source}: ", 1)[-1]
    report.problem(source, short, _offset(msg))


def check_path(path: str, *, key_file: str | None = None, report: CheckReport | None = None) -> CheckReport:
    """Check a data directory (see :func:`shmstore.check`)."""
    report = report or CheckReport()
    report.path = path
    if not os.path.isdir(path):
        report.problem(path, "is not a directory")
        return report
    d = DataDir(path)
    mpath = d.file(MANIFEST)
    try:
        m = d.read_manifest()
    except (CorruptionError, IncompatibleStoreError) as e:
        _add(report, mpath, e)
        m = None
    ckpts = d.checkpoints()
    wals = d.wal_files()
    if m is None:
        if not any(p.source == mpath for p in report.problems):
            report.problem(mpath, "missing: this is not a data directory" if not (ckpts or wals)
                           else "missing, but checkpoints and WAL files are here; nothing can be trusted")
        return report
    if report.name is None:
        report.name = m.name
    key = None
    if m.encryption != "none":
        key = load_key(key_file)
        if key is None:
            report.notes.append("the directory is encrypted and no key was given: only the stored bytes' "
                                "checksums were verified, not their contents")
        else:
            verify_key(key, m.key_check, f"data directory {path!r}")
    for n in sorted(os.listdir(path)):
        if (n.endswith(".tmp") or n.endswith(".corrupt")) and is_own_file(n):
            report.notes.append(f"{d.file(n)}: left over ({'an unfinished write' if n.endswith('.tmp') else 'set aside by recovery'}); not used")
    good = []
    for epoch, p in ckpts:
        report.checkpoints += 1
        try:
            h = peek_header(p)
            if h.flags & FLAG_AESGCM and key is None:
                with open(p, "rb") as f:
                    data = f.read()
                read_header(p, data)
                Codec(0).open_frames(memoryview(data)[CKPT_HEADER:], CKPT_HEADER, h.id, p, verify_only=True)
                if (h.layout_fp, h.schema_fp) != (m.layout_fp, m.schema_fp):
                    raise CorruptionError(f"checkpoint {p}: written for another store layout or schema (offset 48)")
            else:
                load_checkpoint(p, m.layout, m.schema_fp, key=key)
        except CorruptionError as e:
            _add(report, p, e)
            continue
        # The checkpoint's numpy tables (a companion file, sealed like it): recovery
        # refuses a checkpoint whose tables file is damaged.
        tp = tables_path(p)
        try:
            read_tables_file(tp, key, verify_only=key is None)
            good.append(h)
        except CorruptionError as e:
            _add(report, tp, e)
    if good:
        report.newest_checkpoint = good[0].epoch
    elif ckpts or wals:
        report.problem(path, "no checkpoint passes its check: the store cannot be recovered from here")
    has_successor = {w.header.prev for w in wals if w.header is not None}
    for w in wals:
        report.wal_files += 1
        if w.error is not None:
            _add(report, w.path, w.error)
            continue
        try:
            raw = bool(w.header.flags & FLAG_AESGCM) and key is None
            s = scan_wal(w.path, layout_fp=m.layout_fp, schema_fp=m.schema_fp, key=key, raw=raw)
        except CorruptionError as e:
            _add(report, w.path, e)
            continue
        report.wal_records += len(s.records)
        if not raw:
            _check_records(report, w.path, s.records, m)
        if s.torn:
            if w.header.id in has_successor:
                report.problem(w.path, f"damaged from here to the end ({s.size - s.end} bytes), and a newer "
                               f"WAL file continues it, so these bytes had been synced", s.end)
            else:
                report.notes.append(f"{w.path}: a torn tail at offset {s.end} ({s.size - s.end} bytes never "
                                    f"made durable); recovery cuts it off")
    # The chain recovery would follow: newest checkpoint first; one whose header names
    # a WAL file that is missing is a problem whatever is older (recovery refuses it).
    good_ids = {h.id for h in good}
    for epoch, p in ckpts:
        try:
            h = peek_header(p)
        except (CorruptionError, OSError):
            continue  # reported above
        err = missing_link(p, h.wal_id, h.epoch, wals)
        if err is None and h.id in good_ids:
            try:
                wal_chain(h.id, h.epoch, h.wal_id, wals, p)
            except CorruptionError as e:
                err = e
        if err is not None:
            msg = err.message
            src = msg.split(": ", 1)[0].split(" ", 1)[-1] if ": " in msg else path
            _add(report, src if os.path.isabs(src) else path, err)
            break
        if h.id in good_ids:
            break
    return report


def _stable_copy(seg: object) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Index, slot bytes and record count copied while no write landed (if possible)."""
    q = seg.q
    lay = seg.layout
    live = coordinator_alive(seg)
    for _ in range(50):
        e1, g1, b1 = q[L.H_EPOCH], q[L.H_INDEX_GEN], q[L.H_BATCH_SEQ]
        idx = seg.index_view().copy()
        slots = np.ndarray((lay.nslots, lay.slot_size), dtype=np.uint8, buffer=seg.mm, offset=L.SLOTS_OFFSET).copy()
        count = q[L.H_COUNT]
        if not live:
            return idx, slots, count, True
        time.sleep(0.005)  # an op in flight during the copy lands (and moves the epoch) by now
        if (e1, g1, b1) == (q[L.H_EPOCH], q[L.H_INDEX_GEN], q[L.H_BATCH_SEQ]) and not (g1 | b1) & 1:
            return idx, slots, count, True
    return idx, slots, count, False


def _check_records(report: CheckReport, path: str, records: list, m: object) -> None:
    """Decode every record of a WAL file as replay would (``_ops``): a record whose
    checksum passed but which is not a logged op, or cannot fit the store, is reported
    (the first one of the file) with its offset."""
    for off, _eb, payload in records:
        try:
            problem = logged_problem(decode_logged(payload), m.key_size, m.value_size)
        except msgspec.DecodeError as e:
            problem = f"not a logged op ({str(e)[:200]})"
        if problem is not None:
            report.problem(path, f"record at offset {off}: {problem}; its checksum passed, so it "
                                 f"was written so (a faulty build or a forged record) and recovery "
                                 f"refuses it", off)
            return


def check_segment(name: str, report: CheckReport) -> CheckReport:
    """Check the live segment of store ``name`` (see :func:`shmstore.check`)."""
    seg = open_segment(name)
    try:
        report.name = name
        src = f"segment {name}"
        lay = seg.layout
        idx, slots, count, stable = _stable_copy(seg)
        if not stable:
            report.notes.append("the store was being written throughout the check: problems below may be "
                                "writes in flight; check again")
    finally:
        seg.close()
    words = slots[:, :32].copy().view("<u8")
    seq, meta = words[:, L.S_SEQ], words[:, L.S_META]
    nb = len(idx)
    mask = nb - 1
    pos = np.flatnonzero(idx)
    b = idx[pos]
    slot = (b & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1
    h = (b >> np.uint64(32)).astype(np.int64)
    report.records = int(len(pos))

    def listed(kind: str, items: list, text) -> None:
        for it in items[:MAX_LISTED]:
            report.problem(src, text(it))
        if len(items) > MAX_LISTED:
            report.problem(src, f"... and {len(items) - MAX_LISTED} more {kind}")

    bad_range = pos[(slot < 0) | (slot >= lay.nslots)]
    listed("buckets pointing outside the slots", bad_range.tolist(),
           lambda p: f"index bucket {p} points to slot {int(idx[p] & 0xFFFFFFFF) - 1}, outside the "
                     f"{lay.nslots} slots")
    ok = (slot >= 0) & (slot < lay.nslots)
    pos, slot, h = pos[ok], slot[ok], h[ok]
    uniq, counts = np.unique(slot, return_counts=True)
    listed("slots shared by buckets", uniq[counts > 1].tolist(),
           lambda s: f"slot {s} is pointed to by {int(np.count_nonzero(slot == s))} index buckets")
    if count != len(pos) + len(bad_range):
        report.problem(src, f"the header counts {count} records (H_COUNT) but the index holds "
                            f"{len(pos) + len(bad_range)} buckets")
    odd = np.flatnonzero(seq & np.uint64(1))
    listed("slots left odd", odd.tolist(),
           lambda s: f"slot {s} is left mid-write (odd stamp {int(seq[s])}); a coordinator died while "
                     f"writing it and none repaired it yet")
    s_seq, s_meta = seq[slot], meta[slot]
    klen = (s_meta & np.uint64(0xFFFF)).astype(np.int64)
    vlen = (s_meta >> np.uint64(32)).astype(np.int64)
    free = ((s_meta >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) != 0
    listed("indexed slots marked free", pos[free].tolist(),
           lambda p: f"index bucket {p} points to slot {int(idx[p] & 0xFFFFFFFF) - 1}, which is marked free")
    unwritten = pos[s_seq == 0]
    listed("indexed slots never written", unwritten.tolist(),
           lambda p: f"index bucket {p} points to slot {int(idx[p] & 0xFFFFFFFF) - 1}, which was never written")
    badlen = pos[(klen < 1) | (klen > lay.key_size) | (vlen > lay.value_size)]
    listed("indexed slots with impossible lengths", badlen.tolist(),
           lambda p: f"index bucket {p}: its slot's key or value length is out of range")
    # The key must hash to the bucket's hash, and the bucket must be reachable from the
    # key's home bucket without crossing an empty one (linear probing).
    wrong_hash = []
    for p, s, hv, kl in zip(pos.tolist(), slot.tolist(), h.tolist(), klen.tolist()):
        if 1 <= kl <= lay.key_size and L.key_hash(slots[s, 32 : 32 + kl].tobytes()) != hv:
            wrong_hash.append((p, s))
    listed("buckets whose key does not hash to them", wrong_hash,
           lambda ps: f"index bucket {ps[0]} points to slot {ps[1]}, whose key does not hash to the bucket's hash")
    zeros = np.concatenate(([0], np.cumsum(np.tile(idx == 0, 2))))
    home = h & mask
    end = home + ((pos - home) & mask)
    unreachable = pos[(zeros[end + 1] - zeros[home]) > 0]
    listed("unreachable buckets", unreachable.tolist(),
           lambda p: f"index bucket {p} cannot be reached from its key's home bucket "
                     f"{int(idx[p] >> 32) & mask}: an empty bucket lies between, so lookups miss it")
    used = np.zeros(lay.nslots, dtype=bool)
    used[slot] = True
    all_free = ((meta >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) != 0
    orphans = np.flatnonzero(~used & ~all_free & (seq != 0) & ((seq & np.uint64(1)) == 0))
    listed("orphan slots", orphans.tolist(),
           lambda s: f"slot {s} holds a record no index bucket points to and is not marked free")
    return report
