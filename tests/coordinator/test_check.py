"""shmstore.check: good stores pass; damaged data files and segments are named."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import msgspec
import numpy as np
import pytest

import shmstore
from shmstore import _layout as L
from shmstore._shm import create_segment
from shmstore.coordinator import Engine
from shmstore.coordinator._durable._wal import REC_SIZE, scan_wal


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmstore", *args], capture_output=True, text=True, timeout=60)


def digest(path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture
def stopped_dir(served, tmp_path):
    """A data directory with two checkpoints and a WAL after the newest (store stopped)."""
    data = tmp_path / "data"
    n, coord = served("chk", path=data, capacity=200, key_size=16, value_size=64)
    with shmstore.connect(n) as s:
        for i in range(60):
            s.put(f"k{i}", i)
        s.checkpoint()
        for i in range(40):
            s.put(f"k{i}", -i)
        s.delete("k50")
    coord.kill()  # no shutdown checkpoint: the WAL after the newest checkpoint matters
    return n, data


def damaged_copy(src, dst, name: str, offset: int) -> None:
    shutil.copytree(src, dst)
    p = dst / name
    raw = bytearray(p.read_bytes())
    raw[offset] ^= 0x04
    p.write_bytes(bytes(raw))


def test_good_directory_and_segment_pass(stopped_dir, names):
    n, data = stopped_dir
    before = digest(data)
    rep = shmstore.check(path=data)
    assert rep.ok, str(rep)
    assert rep.checkpoints >= 1 and rep.wal_files >= 1 and rep.wal_records >= 41
    assert digest(data) == before  # read-only
    c = shmstore.serve(n, path=data)
    names.coordinators.append(c)
    rep = shmstore.check(name=n, path=data)
    assert rep.ok, str(rep)
    assert rep.records == 59
    r = cli("check", n, "--path", str(data))
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr


def test_flipped_checkpoint_byte_is_named_with_file_and_offset(stopped_dir, tmp_path):
    n, data = stopped_dir
    ck = sorted(p.name for p in data.iterdir() if p.name.startswith("ckpt-"))[-1]
    size = (data / ck).stat().st_size
    bad = tmp_path / "bad"
    damaged_copy(data, bad, ck, size // 2)
    before = digest(bad)
    rep = shmstore.check(path=bad)
    assert not rep.ok
    p = rep.problems[0]
    assert p.source == str(bad / ck) and p.offset is not None and p.offset <= size // 2, str(rep)
    assert digest(bad) == before
    r = cli("check", "--path", str(bad), "--json")
    assert r.returncode == 1
    out = msgspec.json.decode(r.stdout)
    assert out["ok"] is False and out["problems"][0]["source"] == str(bad / ck)


def test_flipped_wal_record_before_the_end_is_named(stopped_dir, tmp_path):
    n, data = stopped_dir
    wal = sorted(p.name for p in data.iterdir() if p.name.startswith("wal-"))[-1]
    recs = scan_wal(str(data / wal)).records
    assert len(recs) > 3
    off = recs[1][0] + REC_SIZE  # inside the second record's payload; later records prove it synced
    bad = tmp_path / "bad"
    damaged_copy(data, bad, wal, off)
    rep = shmstore.check(path=bad)
    assert not rep.ok
    assert any(p.source == str(bad / wal) and p.offset == recs[1][0] for p in rep.problems), str(rep)
    r = cli("check", "--path", str(bad))
    assert r.returncode == 1 and "DAMAGED" in r.stdout and wal in r.stdout


def test_damaged_wal_header_and_manifest_are_named(stopped_dir, tmp_path):
    n, data = stopped_dir
    wal = sorted(p.name for p in data.iterdir() if p.name.startswith("wal-"))[-1]
    bad = tmp_path / "bad"
    damaged_copy(data, bad, wal, 20)
    rep = shmstore.check(path=bad)
    assert any(p.source == str(bad / wal) and p.offset == 0 for p in rep.problems), str(rep)
    bad2 = tmp_path / "bad2"
    damaged_copy(data, bad2, "MANIFEST", 3)
    rep = shmstore.check(path=bad2)
    assert not rep.ok and rep.problems[0].source == str(bad2 / "MANIFEST"), str(rep)


def test_torn_tail_is_a_note_not_a_problem(stopped_dir, tmp_path):
    n, data = stopped_dir
    wal = sorted(p.name for p in data.iterdir() if p.name.startswith("wal-"))[-1]
    shutil.copytree(data, tmp_path / "torn")
    p = tmp_path / "torn" / wal
    with open(p, "ab") as f:
        f.write(b"\x10\x00\x00\x00partial")
    rep = shmstore.check(path=tmp_path / "torn")
    assert rep.ok and any("torn tail" in n for n in rep.notes), str(rep)


def test_missing_wal_file_breaks_the_chain(stopped_dir, tmp_path):
    n, data = stopped_dir
    shutil.copytree(data, tmp_path / "gap")
    wal = sorted(p.name for p in (tmp_path / "gap").iterdir() if p.name.startswith("wal-"))[-1]
    os.unlink(tmp_path / "gap" / wal)
    rep = shmstore.check(path=tmp_path / "gap")
    assert not rep.ok and any("missing" in p.message for p in rep.problems), str(rep)


def test_not_a_data_directory(tmp_path):
    rep = shmstore.check(path=tmp_path)
    assert not rep.ok and "not a data directory" in rep.problems[0].message
    with pytest.raises(ValueError):
        shmstore.check()


@pytest.fixture
def raw_segment(names):
    """A throwaway segment with 20 records written by the coordinator's Engine."""
    n = names("chkseg")
    seg = create_segment(n, L.Layout(capacity=64, key_size=16, value_size=32), 0)
    eng = Engine(seg)
    eng.rebuild_free_list()
    for i in range(20):
        eng.put(f"k{i}".encode(), msgspec.msgpack.encode(i))
    eng.put(b"k3", b"\x01")  # an update frees a slot
    eng.delete(b"k4")
    eng.publish()
    seg.q[L.H_STATE] = L.STATE_READY
    try:
        yield n, seg
    finally:
        seg.close()


def _bucket_of(seg, key: bytes) -> int:
    from shmstore._layout import key_hash

    idx = seg.index_view()
    h = key_hash(key)
    pos = h & seg.mask
    while (int(idx[pos]) >> 32) != h:
        pos = (pos + 1) & seg.mask
    return pos


def test_segment_checks(raw_segment):
    n, seg = raw_segment
    assert shmstore.check(name=n).ok, str(shmstore.check(name=n))
    q = seg.q
    idx = seg.index_view()
    # 1. the header count is off
    q[L.H_COUNT] += 1
    rep = shmstore.check(name=n)
    assert any("H_COUNT" in p.message for p in rep.problems), str(rep)
    q[L.H_COUNT] -= 1
    # 2. a slot left odd
    p5 = _bucket_of(seg, b"k5")
    slot5 = (int(idx[p5]) & 0xFFFFFFFF) - 1
    w = seg.slot0 + slot5 * seg.slot_words
    q[w] += 1
    rep = shmstore.check(name=n)
    assert any(f"slot {slot5} is left mid-write" in p.message for p in rep.problems), str(rep)
    q[w] -= 1
    # 3. two buckets to one slot (k6's bucket points at k5's slot: wrong hash too)
    p6 = _bucket_of(seg, b"k6")
    old6 = int(idx[p6])
    slot6 = (old6 & 0xFFFFFFFF) - 1
    idx[p6] = (old6 & ~0xFFFFFFFF) | (slot5 + 1)
    rep = shmstore.check(name=n)
    msgs = " | ".join(p.message for p in rep.problems)
    assert f"slot {slot5} is pointed to by 2" in msgs and "does not hash" in msgs, msgs
    assert f"slot {slot6} holds a record no index bucket points to" in msgs, msgs  # k6's slot is orphaned
    idx[p6] = old6
    # 4. a bucket to a free slot
    free = [s for s in range(seg.nslots) if (q[seg.slot0 + s * seg.slot_words + L.S_META] >> 16) & L.FLAG_FREE]
    assert free
    idx[p6] = (old6 & ~0xFFFFFFFF) | (free[0] + 1)
    rep = shmstore.check(name=n)
    assert any("marked free" in p.message for p in rep.problems), str(rep)
    idx[p6] = old6
    # 5. a bucket moved away from its probe chain (an empty bucket in between)
    # Its old bucket becomes empty and lies on the way from the key's home to the new one.
    empty = next(p for p in range(seg.nbuckets) if idx[p] == 0 and (p - p6) % seg.nbuckets > 2)
    idx[p6] = 0
    idx[empty] = old6
    rep = shmstore.check(name=n)
    assert any("cannot be reached" in p.message for p in rep.problems), str(rep)
    idx[empty] = 0
    idx[p6] = old6
    del idx
    assert shmstore.check(name=n).ok
    r = cli("check", n)
    assert r.returncode == 0, r.stdout + r.stderr


def test_damaged_tables_file_is_named_and_not_restored(served, tmp_path):
    """A checkpoint's ``.tables`` companion is checked too: recovery refuses a checkpoint
    whose tables file is damaged, so check() must not call the directory good, nor
    restore() copy it."""
    import numpy as np

    n, coord = served("chkt", capacity=100)
    dt = np.dtype([("id", "<i8"), ("x", "<f8")])
    with shmstore.connect(n) as s:
        s.put("a", 1, ttl=3600)
        rows = np.ones(3, dt)
        s.table("t1", dt, rows=10).write([0, 1, 2], rows)
        s.backup(tmp_path / "bk")
    assert shmstore.check(path=tmp_path / "bk").ok
    (tables,) = (tmp_path / "bk").glob("*.tables")
    damaged_copy(tmp_path / "bk", tmp_path / "bad", tables.name, 20)
    rep = shmstore.check(path=tmp_path / "bad")
    assert not rep.ok
    assert any(p.source.endswith(".tables") for p in rep.problems), str(rep)
    with pytest.raises(shmstore.CorruptionError):
        shmstore.restore(tmp_path / "bad", tmp_path / "rs")
    assert not (tmp_path / "rs").exists()


def test_compressed_tables_file_is_decompressed_by_check_without_a_key(served, tmp_path):
    """Compression needs no key: a compressed ``.tables`` body that does not decompress
    (its stored checksum recomputed, so only the contents are wrong) is a problem."""
    import struct
    import zlib

    import numpy as np

    pytest.importorskip("zstandard")
    n, coord = served("chkz", capacity=100, path=tmp_path / "data", compression="zstd")
    dt = np.dtype([("id", "<i8")])
    with shmstore.connect(n) as s:
        s.table("t1", dt, rows=1000).write([1], np.ones(1, dt))
        s.backup(tmp_path / "bk")
    assert shmstore.check(path=tmp_path / "bk").ok
    (tables,) = (tmp_path / "bk").glob("*.tables")
    raw = tables.read_bytes()
    body = bytearray(raw[8:-4])
    body[4] ^= 0x01  # the first byte after the flags word: the zstd frame's magic
    tables.write_bytes(raw[:8] + bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    rep = shmstore.check(path=tmp_path / "bk")
    assert any(p.source == str(tables) for p in rep.problems), str(rep)


@pytest.fixture
def mem_segment(names):
    """A memory store's segment (several classes, free pages left), written by the Engine."""
    n = names("chkmem")
    seg = create_segment(n, L.Layout(capacity=1000, key_size=16, value_size=2000, memory=32 << 20), 0)
    eng = Engine(seg, compiled=False)
    eng.rebuild_free_list()
    for i in range(100):
        eng.put(f"k{i}".encode(), msgspec.msgpack.encode("v" * (i * 13 % 1900)))
    for i in range(0, 100, 5):
        eng.delete(f"k{i}".encode())
    eng.publish()
    seg.q[L.H_STATE] = L.STATE_READY
    try:
        yield n, seg, eng
    finally:
        eng.close()
        seg.close()


def test_segment_checks_of_pages_and_class_counters(mem_segment):
    n, seg, eng = mem_segment
    assert shmstore.check(name=n).ok, str(shmstore.check(name=n))
    q = seg.q
    pt = seg.page_table()
    used = [int(p) for p in range(seg.npages) if pt[p]]
    assert len(used) > 2 and 0 in pt
    c = seg.page_class(used[-1])

    def problems() -> str:
        return " | ".join(p.message for p in shmstore.check(name=n).problems)

    # 1. each class counter against a recount, and the free pages
    for field in ("C_PAGES", "C_RECORDS", "C_ASKED"):
        w = L.class_word(c, getattr(L, field))
        q[w] += 1
        assert f"the header's {field} is {q[w]}, a recount finds {q[w] - 1}" in problems()
        q[w] -= 1
    q[L.H_FREE_PAGES] += 1
    assert "H_FREE_PAGES" in problems()
    q[L.H_FREE_PAGES] -= 1
    # 2. a page table entry of no class of the store
    old = int(pt[used[0]])
    pt[used[0]] = (old & ~0xFF) | (len(seg.classes) + 1)
    msgs = problems()
    assert f"page table entry {used[0]} ({int(pt[used[0]]):#x}) is neither" in msgs, msgs
    assert "not assigned to a class" in msgs  # its records' buckets now point into no page
    pt[used[0]] = old
    # 3. a bucket between two slots
    idx = seg.index_view()
    p = int(np.flatnonzero(idx)[0])
    b = int(idx[p])
    idx[p] = b + 1
    assert f"index bucket {p} points to slot {b & 0xFFFFFFFF}, which is not on a slot boundary" in problems()
    idx[p] = b
    # 4. a free slot stamped before its page went to its class (old bytes of another class)
    page = used[-1]
    pt[page] = (5 << L.PTE_CLASS_BITS) | (c + 1)  # assigned at epoch 5 ...
    ref = next(r for r in eng.frees[c] if r >> seg.ref_shift == page)
    w = seg.slot0 + ref * seg.slot_words
    saved = [q[w + i] for i in range(4)]
    q[w], q[w + L.S_META] = 6, 3  # ... but stamped at epoch 2, with a key
    assert f"slot {ref} is stamped before its page {page}" in problems()
    for i in range(4):
        q[w + i] = saved[i]
    pt[page] = (int(pt[page]) & 0xFF)
    del idx, pt
    assert shmstore.check(name=n).ok, problems()
