"""Checkpoints: a consistent image of the store's records at one epoch, on disk.

Design
------
The coordinator is single-threaded and applies whole ops, so between two ops every
slot the index points to is stable, and so is the page table: copying the page table,
the index's non-empty buckets and the records they point to at that moment is a
consistent image at epoch ``C`` (:func:`take_snapshot`). Writing it can then happen in
another thread while the coordinator goes on serving (:func:`write_checkpoint`): the
snapshot is a private copy.

Only live records are kept, and of each only the bytes it uses: its slot's first
``align8(slot_need(klen, vlen))`` bytes (header, key padded to 8, value), however large
its class's slots are. So the file grows with the records' sizes, not with the
capacity or the classes. A file ``ckpt-<C, 20 digits>-<id, 16 hex>.ckpt`` (format 2;
format 1 held fixed-size slots of segment format 3 and is refused, see ``_formats``)::

    header (88 bytes)
     0  8s   magic b"SHMSCKP1"
     8  u32  format version (2)
    12  u32  chunk size (1 MiB): the unit of the body's checksums
    16  u64  id: random, nonzero
    24  u64  wal_id: the WAL file whose records follow this checkpoint (0: none)
    32  u64  epoch C
    40  u64  records n
    48  u64  layout fingerprint
    56  u64  schema fingerprint
    64  u64  pages: the page table's entries (the layout's npages)
    72  u64  record bytes: the sum of the lengths below
    80  u32  flags: 0 plain; else the rest of the file is sealed frames (``_atrest``)
    84  u32  crc32 of bytes 0..84
    body
     page table  pages x u64   the segment's entries: (epoch << 8) | (class + 1), 0 free
     positions   n x u64       index bucket numbers, ascending
     buckets     n x u64       those buckets' words: (key hash << 32) | (ref + 1)
     lengths     n x u64       bytes kept of each record's slot (a multiple of 8)
     records     record bytes  each record's slot bytes as in the segment, in
                               bucket order, back to back
    trailer
     crc32 of each chunk of each body section, u32 each; then crc32 of those, u32

Restoring (:func:`load_checkpoint` then :func:`restore_into`) puts the page table back,
each record at its slot reference and each bucket at its position, so placement is
identical and the index needs no rehash; free slots come back as never-written (their
tombstone keys are not kept), and the class counters are recounted from what was
restored. Loading checks every record against the layout (references on a slot
boundary of an assigned page of the right class, one bucket per slot, lengths that
fit the slot), so a forged file is refused before anything is laid into the segment.

It is written to ``<name>.tmp``, fsynced, renamed, and the directory fsynced: a crash
leaves either the whole new checkpoint or none (a stray ``.tmp`` is removed at the
next start). A damaged checkpoint is reported as :class:`CorruptionError` with the
file and the offset of the bad chunk or record; it is never loaded in part.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from shmstore import _layout as L
from shmstore._errors import CorruptionError
from shmstore._segment import Segment

from .._metrics import timed, timed_fsync_dir
from ._formats import old_format_error

CKPT_MAGIC = b"SHMSCKP1"
#: 1: fixed-size slots (segment format 3); 2: page table + records of their own length
CKPT_VERSION = 2
CHUNK = 1 << 20
HEADER = struct.Struct("<8sIIQQQQQQQQI")
HEADER_SIZE = 88
_CRC_AT = HEADER_SIZE - 4
_V1_HEADER = 80  # format 1's header, checksummed in its last 4 bytes
U32 = np.uint64(0xFFFFFFFF)
crc32 = zlib.crc32


def ckpt_name(epoch: int, ckpt_id: int) -> str:
    """``ckpt-<epoch, 20 digits>-<id, 16 hex>.ckpt``."""
    return f"ckpt-{epoch:020d}-{ckpt_id:016x}.ckpt"


# -- records of variable length, as u64 words ---------------------------------------


def pages_words(seg: Segment) -> np.ndarray:
    """The pages as one u64 view: slot ``ref`` starts at word ``2 * ref``."""
    lay = seg.layout
    return np.ndarray((lay.npages * lay.page_size // 8,), dtype=np.uint64, buffer=seg.mm,
                      offset=lay.pages_offset)


def used_pages(pt: np.ndarray) -> int:
    """Pages up to the last one assigned to a class (from page table ``pt``). Free pages
    are handed out lowest first and never handed back, so every page from here on was
    never written: scans stop here and leave those pages unmapped (a memory store's
    budget is mostly pages nobody touched)."""
    assigned = np.flatnonzero(pt)
    return int(assigned[-1]) + 1 if len(assigned) else 0


def written_pages(seg: Segment, pt: np.ndarray) -> int:
    """Pages that may have been written: up to the last assigned one (``pt``), and the
    pages the header does not count as never handed out (``H_FREE_PAGES``: a move cut
    short can leave the last page handed out free again). Pages after are untouched."""
    never = min(seg.q[L.H_FREE_PAGES], seg.npages)
    return max(used_pages(pt), seg.npages - never)


def spans(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lens)])``, in numpy calls."""
    lens = lens.astype(np.int64)
    total = int(lens.sum())
    if not total:
        return np.zeros(0, np.int64)
    before = np.cumsum(lens) - lens
    return np.repeat(starts.astype(np.int64) - before, lens) + np.arange(total, dtype=np.int64)


def record_lengths(seg: Segment, refs: np.ndarray) -> np.ndarray:
    """Bytes each live record at ``refs`` uses of its slot: ``align8(slot_need)``, never
    past its page's end (int64). Coordinator: the slots are stable."""
    words = pages_words(seg)
    meta = words[2 * refs + L.S_META]
    klen = (meta & np.uint64(0xFFFF)).astype(np.int64)
    vlen = (meta >> np.uint64(32)).astype(np.int64)
    need = L.SLOT_HEADER + ((klen + 7) & ~7) + vlen
    need = (need + 7) & ~7
    page_end = ((refs >> seg.ref_shift) + 1) << seg.ref_shift  # in SLOT_UNITs
    return np.minimum(need, (page_end - refs) * L.SLOT_UNIT)


def gather_records(seg: Segment, refs: np.ndarray, lengths: np.ndarray,
                   source: np.ndarray | None = None) -> np.ndarray:
    """The first ``lengths[i]`` bytes of each slot ``refs[i]``, back to back (uint8),
    from the segment or from ``source`` (a copy of :func:`pages_words`)."""
    words = pages_words(seg) if source is None else source
    return words[spans(2 * refs, lengths // 8)].view(np.uint8)


@dataclass
class Snapshot:
    """A private copy of the store's live records at ``epoch``."""

    epoch: int
    pt: np.ndarray  # uint64, the page table
    positions: np.ndarray  # int64, ascending
    buckets: np.ndarray  # uint64
    lengths: np.ndarray  # int64, bytes of each record
    data: np.ndarray | None  # uint8, the records back to back; None until materialize()
    layout_fp: int
    schema_fp: int
    #: a copy of the pages (u64 words), from which materialize() picks the records
    source: np.ndarray | None = None

    @property
    def count(self) -> int:
        return len(self.positions)

    @property
    def nbytes(self) -> int:
        return HEADER_SIZE + 8 * len(self.pt) + 24 * self.count + int(self.lengths.sum())

    def materialize(self) -> None:
        """Pick the live records out of the copied pages (any thread)."""
        if self.data is None:
            refs = (self.buckets & U32).astype(np.int64) - 1
            self.data = self.source[spans(2 * refs, self.lengths // 8)].view(np.uint8)
            self.source = None


def take_snapshot(seg: Segment, epoch: int) -> Snapshot:
    """Copy the live records out of the segment. Call it between ops (coordinator).

    This is all the coordinator waits for. When the records use at least 1/8 of the
    pages, the whole page region is copied (one sequential copy, several times faster
    than gathering scattered slots) and the records are picked out later, by
    :meth:`Snapshot.materialize`, in the thread that writes the file; a sparse store
    gathers its records at once.
    """
    pt = seg.page_table().copy()
    idx = seg.index_view()
    positions = np.flatnonzero(idx).astype(np.int64)
    buckets = idx[positions].copy()
    del idx
    refs = (buckets & U32).astype(np.int64) - 1
    lengths = record_lengths(seg, refs)
    data = source = None
    words = pages_words(seg)[: used_pages(pt) * seg.page_size // 8]
    if int(lengths.sum()) >= len(words):  # the records fill >= 1/8 of the used pages (8 bytes a word)
        source = words.copy()
    else:
        data = gather_records(seg, refs, lengths)
    del words
    return Snapshot(epoch=epoch, pt=pt, positions=positions, buckets=buckets, lengths=lengths, data=data,
                    source=source, layout_fp=seg.q[L.H_LAYOUT_FP], schema_fp=seg.q[L.H_SCHEMA_FP])


def _sections(npages: int, n: int, total: int) -> list[int]:
    return [8 * npages, 8 * n, 8 * n, 8 * n, total]


def write_checkpoint(dirpath: str, snap: Snapshot, *, ckpt_id: int, wal_id: int,
                     fsync_ns: list[int] | None = None, codec: object = None, name: str | None = None) -> str:
    """Write ``snap`` durably as ``ckpt-<epoch>.ckpt``; returns the path.

    Safe to run in a thread other than the coordinator's: it touches only ``snap``
    and the files. A crash at any point leaves at most a ``.tmp`` file behind.
    The latency of each fsync it issues is appended to ``fsync_ns``. With a ``codec``
    (``_atrest.Codec``) the body is stored sealed; ``name`` overrides the file name.
    """

    snap.materialize()
    n = snap.count
    flags = codec.flags if codec is not None else 0
    head = HEADER.pack(CKPT_MAGIC, CKPT_VERSION, CHUNK, ckpt_id, wal_id, snap.epoch, n,
                       snap.layout_fp, snap.schema_fp, len(snap.pt), len(snap.data), flags)
    head += struct.pack("<I", crc32(head))
    path = os.path.join(dirpath, name or ckpt_name(snap.epoch, ckpt_id))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0, closefd=False) as f:
            f.write(head)
            if flags:
                codec.seal_frames(_body(snap), ckpt_id, f.write)
            else:
                for piece in _body(snap):
                    f.write(piece)
        timed(os.fdatasync, fd, fsync_ns)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, path)
    timed_fsync_dir(dirpath, fsync_ns)
    return path


def _body(snap: Snapshot):
    """The plain body's pieces: the five sections, then the checksum table."""
    crcs = []
    for arr in (snap.pt, snap.positions, snap.buckets, snap.lengths, snap.data):
        mv = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        for o in range(0, len(mv), CHUNK):
            piece = mv[o : o + CHUNK]
            crcs.append(crc32(piece))
            yield piece
    table = struct.pack(f"<{len(crcs)}I", *crcs)
    yield table + struct.pack("<I", crc32(table))


@dataclass
class LoadedCheckpoint:
    path: str
    id: int
    wal_id: int
    epoch: int
    pt: np.ndarray  # uint64, the page table
    positions: np.ndarray  # int64
    buckets: np.ndarray  # uint64
    lengths: np.ndarray  # int64, bytes of each record
    data: np.ndarray  # uint8, the records back to back

    @property
    def refs(self) -> np.ndarray:
        return (self.buckets & U32).astype(np.int64) - 1


@dataclass
class CheckpointHeader:
    id: int
    wal_id: int
    epoch: int
    count: int
    layout_fp: int
    schema_fp: int
    npages: int
    total: int
    chunk: int
    flags: int = 0


def read_header(path: str, data: bytes | memoryview) -> CheckpointHeader:
    """The header of a checkpoint file, checked.

    Raises:
        CorruptionError: it is cut short, damaged or impossible.
        IncompatibleStoreError: it is a checkpoint of another format (format 1: segment
            format 3), with what to do about it.
    """
    if len(data) >= _V1_HEADER and bytes(data[:8]) == CKPT_MAGIC:
        (version,) = struct.unpack_from("<I", data, 8)
        (crc,) = struct.unpack_from("<I", data, _V1_HEADER - 4)
        if version == 1 and crc == crc32(data[: _V1_HEADER - 4]):  # format 1's header, intact
            raise old_format_error(f"checkpoint {path}", version, CKPT_VERSION)
    if len(data) < HEADER_SIZE:
        raise CorruptionError(f"checkpoint {path}: cut short at offset {len(data)} (header is {HEADER_SIZE} bytes)")
    magic, version, chunk, id_, wal_id, epoch, n, lfp, sfp, npages, total, flags = HEADER.unpack_from(data, 0)
    (crc,) = struct.unpack_from("<I", data, _CRC_AT)
    if magic != CKPT_MAGIC or crc != crc32(data[:_CRC_AT]):
        raise CorruptionError(f"checkpoint {path}: bad header (magic or checksum) at offset 0")
    if version != CKPT_VERSION:
        raise CorruptionError(f"checkpoint {path}: format version {version}, this shmstore reads {CKPT_VERSION}")
    if chunk <= 0 or n > (1 << 40) or npages > (1 << 40) or total > (1 << 48) or total & 7:
        raise CorruptionError(f"checkpoint {path}: impossible header values at offset 8")
    return CheckpointHeader(id_, wal_id, epoch, n, lfp, sfp, npages, total, chunk, flags)


def peek_header(path: str) -> CheckpointHeader:
    with open(path, "rb") as f:
        return read_header(path, f.read(HEADER_SIZE))


def load_checkpoint(path: str, layout: L.Layout, schema_fp: int, *, key: bytes | None = None) -> LoadedCheckpoint:
    """Read and fully check a checkpoint (``key``: for an encrypted one).

    Raises:
        EncryptionKeyError: it is encrypted and no key was given.
        CorruptionError: the file is cut short, fails a checksum (naming the offset),
            belongs to another layout or schema, or holds impossible records (naming
            the offset of the first).
        IncompatibleStoreError: a checkpoint of another format (see ``_formats``).
    """
    with open(path, "rb") as f:
        data = f.read()
    h = read_header(path, data)
    if h.flags:
        from ._atrest import Codec  # noqa: PLC0415

        plain = Codec(h.flags, key).open_frames(memoryview(data)[HEADER_SIZE:], HEADER_SIZE, h.id, path)
        data = data[:HEADER_SIZE] + plain
    if h.layout_fp != layout.fingerprint or h.schema_fp != schema_fp or h.npages != layout.npages:
        raise CorruptionError(f"checkpoint {path}: written for another store layout or schema (offset 48)")
    if h.count > layout.capacity:
        raise CorruptionError(f"checkpoint {path}: {h.count} records, more than the store's capacity "
                              f"{layout.capacity} (offset 40)")
    sizes = _sections(h.npages, h.count, h.total)
    nch = sum((s + h.chunk - 1) // h.chunk for s in sizes)
    want = HEADER_SIZE + sum(sizes) + 4 * nch + 4
    if len(data) != want:
        raise CorruptionError(
            f"checkpoint {path}: {len(data)} bytes, its header says {want}; cut short or extended "
            f"at offset {min(len(data), want)}"
        )
    mv = memoryview(data)
    toff = HEADER_SIZE + sum(sizes)
    table = mv[toff : toff + 4 * nch]
    (tcrc,) = struct.unpack_from("<I", data, toff + 4 * nch)
    if crc32(table) != tcrc:
        raise CorruptionError(f"checkpoint {path}: checksum table damaged at offset {toff}")
    crcs = struct.unpack(f"<{nch}I", table)
    off = HEADER_SIZE
    i = 0
    for s in sizes:
        for o in range(0, s, h.chunk):
            piece = mv[off + o : off + min(s, o + h.chunk)]
            if crc32(piece) != crcs[i]:
                raise CorruptionError(f"checkpoint {path}: checksum mismatch in bytes {off + o}..{off + o + len(piece)}")
            i += 1
        off += s
    n = h.count
    o = HEADER_SIZE
    pt = np.frombuffer(data, dtype="<u8", count=h.npages, offset=o)
    o += 8 * h.npages
    positions = np.frombuffer(data, dtype="<i8", count=n, offset=o)
    buckets = np.frombuffer(data, dtype="<u8", count=n, offset=o + 8 * n)
    lengths = np.frombuffer(data, dtype="<i8", count=n, offset=o + 16 * n)
    recs = np.frombuffer(data, dtype=np.uint8, count=h.total, offset=o + 24 * n)
    ck = LoadedCheckpoint(path, h.id, h.wal_id, h.epoch, pt, positions, buckets, lengths, recs)
    _check_records(path, layout, ck, h.total, HEADER_SIZE)
    return ck


def _bad(path: str, what: str, offset: int) -> CorruptionError:
    return CorruptionError(f"checkpoint {path}: {what} at offset {offset} (checksums passed: written by "
                           f"a faulty build, or forged)")


def _check_records(path: str, layout: L.Layout, ck: LoadedCheckpoint, total: int, base: int) -> None:
    """Checks beyond the checksums: nothing loaded can point outside the segment, into
    a free page, between two slots, or into a slot another bucket uses; every record
    fits its slot. Offsets are the file's (of the plain body, for a sealed one)."""
    npages = len(ck.pt)
    n = len(ck.positions)
    classes = np.array(layout.classes, dtype=np.int64)
    nclasses = len(classes)
    o_pt = base
    o_pos = o_pt + 8 * npages
    o_buck = o_pos + 8 * n
    o_len = o_buck + 8 * n
    o_rec = o_len + 8 * n
    pcls = (ck.pt & np.uint64(0xFF)).astype(np.int64) - 1
    pep = ck.pt >> np.uint64(L.PTE_CLASS_BITS)
    wrong = np.flatnonzero((pcls >= nclasses) | (pep > np.uint64(ck.epoch))
                           | ((pcls < 0) & (ck.pt != 0)) | ((pcls != 0) if not layout.memory else False))
    if len(wrong):
        raise _bad(path, f"page table entry {int(wrong[0])} ({int(ck.pt[wrong[0]]):#x}) is impossible for "
                         f"this layout", o_pt + 8 * int(wrong[0]))
    if not n:
        if total:
            raise _bad(path, "record bytes without records", o_rec)
        return
    pos = ck.positions
    dec = np.flatnonzero(np.diff(pos) <= 0)
    if pos[0] < 0 or pos[0] >= layout.nbuckets:
        raise _bad(path, "an index position is out of range", o_pos)
    if len(dec) or pos[-1] >= layout.nbuckets:
        i = int(dec[0]) + 1 if len(dec) else n - 1
        raise _bad(path, "index positions out of range or not ascending", o_pos + 8 * i)
    refs = ck.refs
    ref_shift = (layout.page_size // L.SLOT_UNIT).bit_length() - 1
    out = np.flatnonzero((refs < 0) | (refs >= layout.nrefs))
    if len(out):
        raise _bad(path, f"bucket {int(pos[out[0]])} names slot reference {int(refs[out[0]])}, outside "
                         f"the pages", o_buck + 8 * int(out[0]))
    page = refs >> ref_shift
    c = pcls[page]
    free = np.flatnonzero(c < 0)
    if len(free):
        i = int(free[0])
        raise _bad(path, f"bucket {int(pos[i])} names slot reference {int(refs[i])} in page {int(page[i])}, "
                         f"which is free", o_buck + 8 * i)
    size = classes[c]
    within = (refs - (page << ref_shift)) * L.SLOT_UNIT
    off = np.flatnonzero((within % size != 0) | (within + size > layout.page_size))
    if len(off):
        i = int(off[0])
        raise _bad(path, f"bucket {int(pos[i])} names slot reference {int(refs[i])}, not on a slot boundary "
                         f"of its page's class ({int(size[i])}-byte slots)", o_buck + 8 * i)
    order = np.argsort(refs, kind="stable")
    rep = np.flatnonzero(np.diff(refs[order]) == 0)
    if len(rep):
        i = int(order[rep[0] + 1])
        raise _bad(path, f"two buckets name slot reference {int(refs[i])}", o_buck + 8 * i)
    lengths = ck.lengths
    badlen = np.flatnonzero((lengths < L.SLOT_HEADER) | (lengths & 7 != 0) | (lengths > size))
    if len(badlen):
        i = int(badlen[0])
        raise _bad(path, f"record {i} has a length of {int(lengths[i])} bytes, impossible in its "
                         f"{int(size[i])}-byte slot", o_len + 8 * i)
    if int(lengths.sum()) != total:
        raise _bad(path, "the record lengths do not add up to the header's record bytes", o_len)
    at = np.cumsum(lengths) - lengths  # each record's first byte in the records section
    words = ck.data.view("<u8") if total else np.zeros(0, np.uint64)
    w0 = at // 8
    seq = words[w0 + L.S_SEQ]
    meta = words[w0 + L.S_META]
    klen = (meta & np.uint64(0xFFFF)).astype(np.int64)
    vlen = (meta >> np.uint64(32)).astype(np.int64)
    need = L.SLOT_HEADER + ((klen + 7) & ~7) + vlen
    for what, bad in (
        ("a slot stamp is odd or zero", ((seq & np.uint64(1)) != 0) | (seq == 0)),
        ("a key length is out of range", (klen == 0) | (klen > layout.key_size)),
        ("a value length is out of range", vlen > layout.value_size),
        ("a free slot is indexed", ((meta >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) != 0),
        ("a record's length is not what its key and value need", ((need + 7) & ~7) != lengths),
        ("a record is stamped after the checkpoint's epoch", seq > np.uint64(2 * ck.epoch + 2)),
    ):
        hit = np.flatnonzero(bad)
        if len(hit):
            i = int(hit[0])
            raise _bad(path, f"{what} (record {i}, slot reference "
                             f"{int(refs[i])})", o_rec + int(at[i]))


def restore_into(seg: Segment, ck: LoadedCheckpoint) -> None:
    """Lay a loaded checkpoint into a fresh, zeroed segment nobody reads yet: the page
    table, every record at its slot, every bucket at its position; then the header's
    counts, the class counters included, from what was laid."""
    pt = seg.page_table()
    pt[:] = ck.pt
    del pt
    refs = ck.refs
    words = pages_words(seg)
    if len(refs):
        words[spans(2 * refs, ck.lengths // 8)] = np.ascontiguousarray(ck.data).view(np.uint64)
    del words
    idx = seg.index_view()
    idx[ck.positions] = ck.buckets
    del idx
    recount_classes(seg, refs)
    q = seg.q
    q[L.H_COUNT] = len(refs)
    q[L.H_EPOCH] = ck.epoch
    q[L.H_LAST_DELETE_EPOCH] = ck.epoch
    q[L.H_LAST_CHECKPOINT_EPOCH] = ck.epoch


def class_counts(seg: Segment, refs: np.ndarray, pt: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per class, from page table ``pt`` (the segment's by default) and the live records
    at ``refs``: ``pages``, ``records``, ``asked`` (their summed slot_need); and
    ``free_pages``. What the header's class counters must hold."""
    if pt is None:
        pt = seg.page_table().copy()
    k = len(seg.classes)
    pcls = (pt & np.uint64(0xFF)).astype(np.int64) - 1
    pages = np.bincount(pcls[pcls >= 0], minlength=k)[:k]
    words = pages_words(seg)
    meta = words[2 * refs + L.S_META] if len(refs) else np.zeros(0, np.uint64)
    del words
    klen = (meta & np.uint64(0xFFFF)).astype(np.int64)
    vlen = (meta >> np.uint64(32)).astype(np.int64)
    c = pcls[refs >> seg.ref_shift] if len(refs) else np.zeros(0, np.int64)
    ok = (c >= 0) & (c < k)
    records = np.bincount(c[ok], minlength=k)[:k]
    asked = np.bincount(c[ok], weights=(L.SLOT_HEADER + ((klen + 7) & ~7) + vlen)[ok], minlength=k)[:k]
    return {"pages": pages, "records": records, "asked": asked.astype(np.int64),
            "free_pages": int(np.count_nonzero(pcls < 0))}


def recount_classes(seg: Segment, refs: np.ndarray) -> None:
    """Set the header's class counters and free pages from the segment (coordinator,
    a segment nobody else writes)."""
    counts = class_counts(seg, refs)
    q = seg.q
    for c in range(len(seg.classes)):
        q[L.class_word(c, L.C_PAGES)] = int(counts["pages"][c])
        q[L.class_word(c, L.C_RECORDS)] = int(counts["records"][c])
        q[L.class_word(c, L.C_ASKED)] = int(counts["asked"][c])
    q[L.H_FREE_PAGES] = counts["free_pages"]
