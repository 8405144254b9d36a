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
from ._checkpoint import load_checkpoint, peek_header, read_header, written_pages
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
        except (CorruptionError, IncompatibleStoreError) as e:
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
        except (CorruptionError, IncompatibleStoreError) as e:
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
        except (CorruptionError, IncompatibleStoreError, OSError):
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


def _stable_copy(seg: object) -> tuple[dict, bool]:
    """Header words, page table, index and pages copied while no write landed (if
    possible): ``({"header", "pt", "idx", "words"}, stable)``."""
    q = seg.q
    live = coordinator_alive(seg)
    lay = seg.layout
    for _ in range(50):
        e1, g1, b1 = q[L.H_EPOCH], q[L.H_INDEX_GEN], q[L.H_BATCH_SEQ]
        pt = seg.page_table().copy()
        # Pages after the last assigned one were never handed out: never written, and
        # not read (a memory store's budget stays unmapped); nothing below reads them.
        top = written_pages(seg, pt) * lay.page_size // 8
        words = np.ndarray((top,), dtype=np.uint64, buffer=seg.mm, offset=lay.pages_offset).copy()
        copy = {
            "header": np.frombuffer(seg.mm, dtype=np.uint64, count=L.H_WORDS).copy(),
            "pt": pt,
            "idx": seg.index_view().copy(),
            "words": words,
        }
        if not live:
            return copy, True
        time.sleep(0.005)  # an op in flight during the copy lands (and moves the epoch) by now
        if (e1, g1, b1) == (q[L.H_EPOCH], q[L.H_INDEX_GEN], q[L.H_BATCH_SEQ]) and not (g1 | b1) & 1:
            return copy, True
    return copy, False


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
    """Check the live segment of store ``name`` (see :func:`shmstore.check`).

    On a copy: the page table (each entry free or a class of the layout, assigned no
    later than the segment's epoch; a single-class store's pages all its class's), the
    class counters (pages, records, bytes asked, free pages) against a recount, the
    free pages (blank), the index (each bucket's slot reference on a slot boundary of
    an assigned page, one
    bucket per slot, the key hashing to the bucket, reachable from its home bucket, the
    count), and the slots (none left odd, none indexed that is free, never written or of
    impossible lengths, none holding a record no bucket points to, none stamped before
    its page was handed to its class).
    """
    seg = open_segment(name)
    try:
        report.name = name
        src = f"segment {name}"
        lay = seg.layout
        ref_shift = seg.ref_shift
        copy, stable = _stable_copy(seg)
        if not stable:
            report.notes.append("the store was being written throughout the check: problems below may be "
                                "writes in flight; check again")
    finally:
        seg.close()
    hdr, pt, idx, words = copy["header"], copy["pt"], copy["idx"], copy["words"]
    raw = words.view(np.uint8)
    classes = np.array(lay.classes, dtype=np.int64)
    k = len(classes)
    nrefs = lay.nrefs

    def listed(kind: str, items: list, text) -> None:
        for it in items[:MAX_LISTED]:
            report.problem(src, text(it))
        if len(items) > MAX_LISTED:
            report.problem(src, f"... and {len(items) - MAX_LISTED} more {kind}")

    # -- the page table -------------------------------------------------------------
    pcls = (pt & np.uint64(0xFF)).astype(np.int64) - 1
    pep = (pt >> np.uint64(L.PTE_CLASS_BITS)).astype(np.int64)
    epoch = int(hdr[L.H_EPOCH])
    badpte = (pcls >= k) | ((pcls < 0) & (pt != 0))
    if not lay.memory:
        badpte |= pcls != 0
    listed("bad page table entries", np.flatnonzero(badpte).tolist(),
           lambda p: f"page table entry {p} ({int(pt[p]):#x}) is neither a free page nor a class of "
                     f"this store")
    pcls[badpte] = -1  # the checks below take such a page as unassigned
    late = ~badpte & (pcls >= 0) & (pep > epoch)
    listed("pages assigned after the segment's epoch", np.flatnonzero(late).tolist(),
           lambda p: f"page table entry {p}: the page went to class {int(pcls[p])} at epoch {int(pep[p])}, "
                     f"after the segment's epoch {epoch}: a page move was cut short (the next "
                     f"coordinator's start repairs it)")
    per_page = lay.page_size // 8
    dirty = [p for p in np.flatnonzero(pcls[: len(words) // per_page] < 0).tolist()
             if words[p * per_page : (p + 1) * per_page].any()]
    listed("free pages that are not blank", dirty,
           lambda p: f"page {p} is free but not blank: a page move was cut short (the next "
                     f"coordinator's start clears it)")
    # -- every slot of the assigned pages ------------------------------------------------
    per = lay.page_size // classes
    parts = []
    for c in range(k):
        pages = np.flatnonzero(pcls == c)
        if len(pages):
            parts.append(((pages[:, None] << ref_shift)
                          + np.arange(per[c], dtype=np.int64)[None, :] * (classes[c] // L.SLOT_UNIT)).ravel())
    all_refs = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    seq = words[2 * all_refs + L.S_SEQ]
    meta = words[2 * all_refs + L.S_META]
    odd = all_refs[(seq & np.uint64(1)) != 0]
    listed("slots left odd", odd.tolist(),
           lambda r: f"slot {r} is left mid-write (odd stamp {int(words[2 * r])}); a coordinator died while "
                     f"writing it and none repaired it yet")
    page_epoch = pep[all_refs >> ref_shift]
    stale = all_refs[(seq != 0) & ((seq & np.uint64(1)) == 0) & (page_epoch > 0)
                     & (seq < (2 * page_epoch + 2).astype(np.uint64))]
    listed("slots older than their page", stale.tolist(),
           lambda r: f"slot {r} is stamped before its page {r >> ref_shift} was handed to its class "
                     f"(epoch {int(pep[r >> ref_shift])}): a page move cut short left it")
    # -- the index -------------------------------------------------------------------------
    nb = len(idx)
    mask = nb - 1
    pos = np.flatnonzero(idx)
    b = idx[pos]
    ref = (b & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1
    h = (b >> np.uint64(32)).astype(np.int64)
    report.records = int(len(pos))
    inside = (ref >= 0) & (ref < nrefs)
    bc = np.full(len(ref), -1, np.int64)
    bc[inside] = pcls[ref[inside] >> ref_shift]
    size = np.where(bc >= 0, classes[np.maximum(bc, 0)], 1)
    within = (ref - ((ref >> ref_shift) << ref_shift)) * L.SLOT_UNIT
    on_slot = (bc >= 0) & (within % size == 0) & (within + size <= lay.page_size)
    bad_range = pos[~inside]
    listed("buckets pointing outside the pages", bad_range.tolist(),
           lambda p: f"index bucket {p} points to slot {int(idx[p] & 0xFFFFFFFF) - 1}, outside the "
                     f"{nrefs} slot references of the pages")
    listed("buckets pointing into free pages", pos[inside & (bc < 0)].tolist(),
           lambda p: f"index bucket {p} points to slot {int(idx[p] & 0xFFFFFFFF) - 1}, in page "
                     f"{(int(idx[p] & 0xFFFFFFFF) - 1) >> ref_shift}, which is not assigned to a class")
    listed("buckets pointing between slots", pos[inside & (bc >= 0) & ~on_slot].tolist(),
           lambda p: f"index bucket {p} points to slot {int(idx[p] & 0xFFFFFFFF) - 1}, which is not on a "
                     f"slot boundary of its page's class")
    if int(hdr[L.H_COUNT]) != len(pos):
        report.problem(src, f"the header counts {int(hdr[L.H_COUNT])} records (H_COUNT) but the index "
                            f"holds {len(pos)} buckets")
    ok = on_slot
    pos, ref, h, bc, size = pos[ok], ref[ok], h[ok], bc[ok], size[ok]
    uniq, counts = np.unique(ref, return_counts=True)
    listed("slots shared by buckets", uniq[counts > 1].tolist(),
           lambda s: f"slot {s} is pointed to by {int(np.count_nonzero(ref == s))} index buckets")
    s_seq = words[2 * ref + L.S_SEQ]
    s_meta = words[2 * ref + L.S_META]
    klen = (s_meta & np.uint64(0xFFFF)).astype(np.int64)
    vlen = (s_meta >> np.uint64(32)).astype(np.int64)
    need = L.SLOT_HEADER + ((klen + 7) & ~7) + vlen
    free = ((s_meta >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) != 0
    listed("indexed slots marked free", pos[free].tolist(),
           lambda p: f"index bucket {p} points to slot {int(idx[p] & 0xFFFFFFFF) - 1}, which is marked free")
    listed("indexed slots never written", pos[s_seq == 0].tolist(),
           lambda p: f"index bucket {p} points to slot {int(idx[p] & 0xFFFFFFFF) - 1}, which was never written")
    badlen = (klen < 1) | (klen > lay.key_size) | (vlen > lay.value_size) | (need > size)
    listed("indexed slots with impossible lengths", pos[badlen].tolist(),
           lambda p: f"index bucket {p}: its slot's key or value length is out of range (or does not fit "
                     f"its class's slots)")
    # The key must hash to the bucket's hash, and the bucket must be reachable from the
    # key's home bucket without crossing an empty one (linear probing).
    wrong_hash = []
    for p, r, hv, kl in zip(pos[~badlen].tolist(), ref[~badlen].tolist(), h[~badlen].tolist(),
                            klen[~badlen].tolist()):
        o = 16 * r + L.SLOT_HEADER
        if L.key_hash(raw[o : o + kl].tobytes()) != hv:
            wrong_hash.append((p, r))
    listed("buckets whose key does not hash to them", wrong_hash,
           lambda ps: f"index bucket {ps[0]} points to slot {ps[1]}, whose key does not hash to the bucket's hash")
    zeros = np.concatenate(([0], np.cumsum(np.tile(idx == 0, 2))))
    home = h & mask
    end = home + ((pos - home) & mask)
    unreachable = pos[(zeros[end + 1] - zeros[home]) > 0]
    listed("unreachable buckets", unreachable.tolist(),
           lambda p: f"index bucket {p} cannot be reached from its key's home bucket "
                     f"{int(idx[p] >> 32) & mask}: an empty bucket lies between, so lookups miss it")
    used = np.isin(all_refs, ref)
    all_free = ((meta >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) != 0
    orphans = all_refs[~used & ~all_free & (seq != 0) & ((seq & np.uint64(1)) == 0)]
    listed("orphan slots", orphans.tolist(),
           lambda s: f"slot {s} holds a record no index bucket points to and is not marked free")
    # -- the class counters ----------------------------------------------------------------
    live = ~badlen & ~free
    for c in range(k):
        sel = (bc == c) & live
        want = {"C_SLOT_SIZE": int(classes[c]), "C_PAGES": int(np.count_nonzero(pcls == c)),
                "C_RECORDS": int(np.count_nonzero(sel)), "C_ASKED": int(need[sel].sum())}
        for field, value in want.items():
            have = int(hdr[L.class_word(c, getattr(L, field))])
            if have != value:
                report.problem(src, f"class {c} ({int(classes[c])}-byte slots): the header's {field} is "
                                    f"{have}, a recount finds {value}")
    nfree = int(np.count_nonzero(pcls < 0))
    if int(hdr[L.H_FREE_PAGES]) != nfree:
        report.problem(src, f"the header counts {int(hdr[L.H_FREE_PAGES])} free pages (H_FREE_PAGES), the "
                            f"page table {nfree}")
    return report
