"""Checkpoint format 2 (segment format 4): a round trip keeps placement exactly, files
hold each record's used bytes only, forged files are refused with file and offset, and
the files of the format before (segment format 3) are refused with the way to migrate."""

from __future__ import annotations

import json
import struct
import zlib

import msgspec
import numpy as np
import pytest

import shmstore
from shmstore import _layout as L
from shmstore._shm import create_segment
from shmstore.coordinator import Engine
from shmstore.coordinator._durable import _checkpoint as CK
from shmstore.coordinator._durable._checkpoint import load_checkpoint, restore_into, take_snapshot, write_checkpoint
from shmstore.coordinator._durable._datadir import MANIFEST, DataDir
from shmstore.coordinator._durable._wal import WalHeader

MEM = L.Layout(capacity=2000, key_size=32, value_size=3000, memory=32 << 20)  # 32 pages


@pytest.fixture
def segs(names):
    """Make segments by layout; every one is closed at the end (``names`` unlinks them)."""
    made = []

    def make(layout: L.Layout):
        seg = create_segment(names("ck"), layout, 0)
        made.append(seg)
        return seg

    try:
        yield make
    finally:
        for seg in made:
            seg.close()


def fill(seg) -> Engine:
    """Records of several sizes (several classes, several pages), updates and deletes."""
    eng = Engine(seg, compiled=False)
    eng.rebuild_free_list()
    for i in range(300):
        eng.put(b"k%03d" % i, msgspec.msgpack.encode("v" * (i * 7 % 2900)))
    for i in range(0, 300, 3):
        eng.put(b"k%03d" % i, msgspec.msgpack.encode(i))  # moves to a small class
    for i in range(0, 300, 7):
        eng.delete(b"k%03d" % i)
    eng.publish()
    return eng


def class_words(seg) -> list[int]:
    return [seg.q[L.class_word(c, f)] for c in range(len(seg.classes))
            for f in (L.C_SLOT_SIZE, L.C_PAGES, L.C_RECORDS, L.C_ASKED)] + [seg.q[L.H_FREE_PAGES]]


def test_round_trip_keeps_placement_and_counters(segs, tmp_path):
    a = segs(MEM)
    eng = fill(a)
    assert len(a.classes) > 3 and np.count_nonzero(a.page_table()) > 3
    path = write_checkpoint(str(tmp_path), take_snapshot(a, eng.epoch), ckpt_id=7, wal_id=9)
    ck = load_checkpoint(path, MEM, 0)
    assert (ck.id, ck.wal_id, ck.epoch, len(ck.positions)) == (7, 9, eng.epoch, a.q[L.H_COUNT])
    b = segs(MEM)
    restore_into(b, ck)
    assert np.array_equal(b.page_table(), a.page_table())
    assert np.array_equal(b.index_view(), a.index_view())
    assert class_words(b) == class_words(a)
    assert b.q[L.H_COUNT] == a.q[L.H_COUNT] and b.q[L.H_EPOCH] == eng.epoch
    refs = ck.refs
    lengths = CK.record_lengths(a, refs)
    for r, n in zip(refs.tolist(), lengths.tolist()):
        o = a.layout.pages_offset + 16 * r
        assert bytes(b.mv[o : o + n]) == bytes(a.mv[o : o + n]), r
    # Free slots come back never-written: every slot of b that no bucket names is zero.
    all_refs, _ = b.slot_refs()
    free = np.setdiff1d(all_refs, refs)
    assert not b.headers(free).any()
    # The engine serves the restored segment: every key reads back.
    e2 = Engine(b, compiled=False)
    e2.rebuild_free_list()
    for i in range(300):
        assert e2.get(b"k%03d" % i) == eng.get(b"k%03d" % i)


def test_the_file_holds_what_records_use_not_their_slots(segs, tmp_path):
    a = segs(MEM)
    eng = Engine(a, compiled=False)
    eng.rebuild_free_list()
    for i in range(100):  # 40-byte records whose class is larger than they need
        eng.put(b"k%03d" % i, msgspec.msgpack.encode("x" * (1500 + i)))
    snap = take_snapshot(a, eng.epoch)
    path = write_checkpoint(str(tmp_path), snap, ckpt_id=1, wal_id=0)
    refs = (snap.buckets & CK.U32).astype(np.int64) - 1
    slot_bytes = sum(a.classes[a.class_of(r)] for r in refs.tolist())
    used = sum(L.align(L.slot_need(4, 1503 + i), 8) for i in range(100))
    size = (tmp_path / path.rsplit("/", 1)[1]).stat().st_size
    assert used <= size - CK.HEADER_SIZE - 8 * len(snap.pt) - 24 * 100 < slot_bytes
    assert size - CK.HEADER_SIZE - 8 * len(snap.pt) - 24 * 100 - used < 64  # + checksums only


# -- forged files -------------------------------------------------------------------------


def resign(raw: bytes) -> bytes:
    """Recompute every checksum of a plain checkpoint: a forgery that passes them."""
    raw = bytearray(raw)
    (_, _, chunk, _, _, _, n, _, _, npages, total, _) = CK.HEADER.unpack_from(raw, 0)
    struct.pack_into("<I", raw, CK._CRC_AT, zlib.crc32(raw[: CK._CRC_AT]))
    sizes = CK._sections(npages, n, total)
    crcs = []
    off = CK.HEADER_SIZE
    for s in sizes:
        for o in range(0, s, chunk):
            crcs.append(zlib.crc32(raw[off + o : off + min(s, o + chunk)]))
        off += s
    table = struct.pack(f"<{len(crcs)}I", *crcs)
    return bytes(raw[:off]) + table + struct.pack("<I", zlib.crc32(table))


@pytest.fixture
def good(segs, tmp_path):
    """A valid checkpoint of a memory store (free pages left) and its parts' offsets."""
    a = segs(MEM)
    eng = fill(a)
    path = write_checkpoint(str(tmp_path), take_snapshot(a, eng.epoch), ckpt_id=3, wal_id=0)
    ck = load_checkpoint(path, MEM, 0)
    npages, n = len(ck.pt), len(ck.positions)
    offs = {"pt": CK.HEADER_SIZE}
    offs["pos"] = offs["pt"] + 8 * npages
    offs["buck"] = offs["pos"] + 8 * n
    offs["len"] = offs["buck"] + 8 * n
    offs["rec"] = offs["len"] + 8 * n
    with open(path, "rb") as f:
        raw = f.read()
    return path, raw, ck, offs, a


def forge(path: str, raw: bytes, at: int, word: int) -> None:
    b = bytearray(raw)
    struct.pack_into("<Q", b, at, word)
    with open(path, "wb") as f:
        f.write(resign(bytes(b)))


def refused(path: str, needle: str, offset: int) -> str:
    with pytest.raises(shmstore.CorruptionError) as ei:
        load_checkpoint(path, MEM, 0)
    msg = str(ei.value)
    assert path in msg and needle in msg and f"offset {offset}" in msg, msg
    return msg


def test_a_resigned_copy_loads(good):
    path, raw, ck, offs, _ = good
    with open(path, "wb") as f:
        f.write(resign(raw))
    assert len(load_checkpoint(path, MEM, 0).positions) == len(ck.positions)


def test_forged_bucket_between_two_slots(good):
    path, raw, ck, offs, _ = good
    b = int(ck.buckets[0])
    forge(path, raw, offs["buck"], b + 1)  # the next slot unit: inside the slot
    refused(path, "not on a slot boundary", offs["buck"])


def test_forged_bucket_into_a_free_page(good):
    path, raw, ck, offs, seg = good
    free_page = int(np.flatnonzero(ck.pt == 0)[0])
    ref = free_page << seg.ref_shift
    forge(path, raw, offs["buck"] + 8, (int(ck.buckets[1]) & ~0xFFFFFFFF) | (ref + 1))
    refused(path, "which is free", offs["buck"] + 8)


def test_forged_bucket_outside_the_pages(good):
    path, raw, ck, offs, _ = good
    forge(path, raw, offs["buck"], (int(ck.buckets[0]) & ~0xFFFFFFFF) | MEM.nrefs + 1)
    refused(path, "outside the pages", offs["buck"])


def test_forged_two_buckets_to_one_slot(good):
    path, raw, ck, offs, _ = good
    forge(path, raw, offs["buck"] + 8 * 2, int(ck.buckets[1]))
    refused(path, "two buckets name slot reference", offs["buck"] + 8 * 2)


def test_forged_page_table_entries(good):
    path, raw, ck, offs, _ = good
    used = int(np.flatnonzero(ck.pt)[0])
    forge(path, raw, offs["pt"] + 8 * used, (int(ck.pt[used]) & ~0xFF) | (len(MEM.classes) + 1))
    refused(path, f"page table entry {used}", offs["pt"] + 8 * used)
    forge(path, raw, offs["pt"] + 8 * used, ((ck.epoch + 1) << 8) | (int(ck.pt[used]) & 0xFF))
    refused(path, f"page table entry {used}", offs["pt"] + 8 * used)
    # a page of the records taken from its class: their buckets now point into a free page
    forge(path, raw, offs["pt"] + 8 * used, 0)
    refused(path, "which is free", offs["buck"])


def test_forged_lengths_and_headers(good):
    path, raw, ck, offs, seg = good
    big = seg.classes[-1] + 8
    forge(path, raw, offs["len"], big)
    refused(path, "impossible in its", offs["len"])
    forge(path, raw, offs["len"], int(ck.lengths[0]) + 8)
    refused(path, "do not add up", offs["len"])
    # a record's meta that claims a longer value than its length holds
    meta_at = offs["rec"] + 8 * L.S_META
    meta = int.from_bytes(raw[meta_at : meta_at + 8], "little")
    forge(path, raw, meta_at, meta + (8 << 32))
    refused(path, "not what its key and value need", offs["rec"])
    forge(path, raw, offs["rec"], 2 * ck.epoch + 4)  # a stamp from the future
    refused(path, "after the checkpoint's epoch", offs["rec"])
    forge(path, raw, offs["rec"], 2 * ck.epoch + 1)
    refused(path, "odd or zero", offs["rec"])


def test_positions_must_ascend(good):
    path, raw, ck, offs, _ = good
    forge(path, raw, offs["pos"] + 8, int(ck.positions[0]))
    refused(path, "not ascending", offs["pos"] + 8)


# -- the format before: refused with the way to migrate ----------------------------------


def _assert_migration_hint(msg: str) -> None:
    assert "shmstore scan NAME > FILE" in msg and "shmstore load NAME FILE" in msg, msg


def test_a_format_1_checkpoint_is_refused_with_the_migration(good):
    path, raw, *_ = good
    old = bytearray(raw[:80])  # format 1's 80-byte header: version 1 at offset 8
    struct.pack_into("<I", old, 8, 1)
    struct.pack_into("<I", old, 76, zlib.crc32(old[:76]))
    with open(path, "wb") as f:
        f.write(bytes(old) + raw[80:])
    with pytest.raises(shmstore.IncompatibleStoreError) as ei:
        load_checkpoint(path, MEM, 0)
    _assert_migration_hint(str(ei.value))
    assert path in str(ei.value)


def test_a_format_1_wal_file_is_refused_with_the_migration(tmp_path):
    p = tmp_path / "wal"
    head = bytearray(WalHeader(1, 2, 0, 0, MEM.fingerprint, 0).pack())
    struct.pack_into("<I", head, 8, 1)
    struct.pack_into("<I", head, 60, zlib.crc32(head[:60]))
    with pytest.raises(shmstore.IncompatibleStoreError) as ei:
        WalHeader.unpack(str(p), bytes(head))
    _assert_migration_hint(str(ei.value))


def _old_directory(path, name: str) -> None:
    """A data directory as shmstore wrote it for segment format 3: manifest format 1."""
    path.mkdir(mode=0o700)
    body = json.dumps({"format": 1, "name": name, "capacity": 100, "key_size": 16, "value_size": 64,
                       "schema_fp": 0, "layout_fp": 12345, "segment_instance": 7}).encode()
    (path / MANIFEST).write_bytes(body + b"\ncrc32:%08x\n" % zlib.crc32(body))
    (path / MANIFEST).chmod(0o600)


def test_an_old_data_directory_is_refused_with_the_migration(names, tmp_path):
    n = names("old")
    data = tmp_path / "old"
    _old_directory(data, n)
    with pytest.raises(shmstore.IncompatibleStoreError) as ei:
        DataDir(str(data)).read_manifest()
    _assert_migration_hint(str(ei.value))
    with pytest.raises(shmstore.IncompatibleStoreError) as ei:
        shmstore.serve(n, path=data)
    _assert_migration_hint(str(ei.value))
    assert not any(n in e for e in L.shm_entries())  # refused before any segment was made
    rep = shmstore.check(path=data)
    assert not rep.ok and "shmstore load NAME FILE" in str(rep), str(rep)


def test_the_manifest_records_the_whole_layout(served, tmp_path):
    data = tmp_path / "d"
    n, coord = served("mf", path=data, memory=2 << 20, growth=1.5, value_size=5000, capacity=300)
    with shmstore.connect(n) as s:
        s.put("a", "x" * 4000)
    m = DataDir(str(data)).read_manifest()
    assert m.format == 2 and m.layout == L.Layout(capacity=300, key_size=m.key_size, value_size=5000,
                                                   memory=2 << 20, growth=1.5)
    assert m.layout_fp == m.layout.fingerprint
    coord.stop()
    shmstore.destroy(n)
    # Served again from the directory alone: the same layout (memory and growth included).
    c2 = shmstore.serve(n, path=data)
    try:
        with shmstore.connect(n) as s:
            assert s.get("a") == "x" * 4000
            assert s._seg.layout == m.layout
    finally:
        c2.stop()
    with pytest.raises(shmstore.IncompatibleStoreError, match="growth=1.5"):
        shmstore.serve(n, path=data, growth=2.0)


def test_a_damaged_version_word_is_corruption_not_another_format(good):
    """A flipped bit in the version is damage (recovery falls back to an older
    checkpoint), never mistaken for a file of another format (which stops recovery)."""
    path, raw, *_ = good
    for bit in range(32):
        bad = bytearray(raw)
        bad[8 + bit // 8] ^= 1 << (bit % 8)
        with open(path, "wb") as f:
            f.write(bytes(bad))
        with pytest.raises(shmstore.CorruptionError, match="offset 0"):
            load_checkpoint(path, MEM, 0)
