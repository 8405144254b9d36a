"""Recovery on format 4: repair of an adopted segment whose pages moved (a page move cut
short, odd slots, an index rebuilt through the page table), and rebuild from disk that
replays the coordinator's own logged ops (evictions, page moves)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

import shmstore
from shmstore import _layout as L
from shmstore._shm import create_segment
from shmstore.coordinator import Engine
from shmstore.coordinator._durable._datadir import DataDir
from shmstore.coordinator._durable._wal import scan_wal
from shmstore.coordinator._ops import Evict, MovePage, decode_logged
from shmstore.coordinator._recovery import repair

MEM = L.Layout(capacity=4000, key_size=16, value_size=2000, memory=8 << 20)


@pytest.fixture
def mem_segment(names):
    """A memory store's segment with records in a few classes, written by the Engine."""
    n = names("rp")
    seg = create_segment(n, MEM, 0)
    eng = Engine(seg, compiled=False)
    eng.rebuild_free_list()
    try:
        for i in range(200):
            eng.put(b"s%03d" % i, msgspec.msgpack.encode(i))  # the smallest class
        for i in range(40):
            eng.put(b"b%03d" % i, msgspec.msgpack.encode("x" * 1500))
        eng.publish()
        seg.q[L.H_STATE] = L.STATE_READY
        yield n, seg, eng
    finally:
        eng.close()
        seg.close()


def contents(eng: Engine, keys) -> dict:
    return {k: eng.get(k) for k in keys}


KEYS = [b"s%03d" % i for i in range(200)] + [b"b%03d" % i for i in range(40)]


def messages(name: str) -> str:
    return " | ".join(p.message for p in shmstore.check(name=name).problems)


def test_a_page_move_cut_short_is_repaired(mem_segment):
    n, seg, eng = mem_segment
    before = contents(eng, KEYS)
    big = seg.class_of(eng.find(b"b000", L.key_hash(b"b000"))[1])
    assert big > 0
    # The big class's page gives up its records (deleted here), then the move to the
    # smallest class dies after the page table entry and two of the new slots' headers.
    page = int(seg.slot_refs(cls=big)[0][0]) >> seg.ref_shift
    gone = [k for k in KEYS if k.startswith(b"b")]
    for k in gone:
        eng.delete(k)
    epoch = eng.next_epoch()
    size = seg.classes[0]
    seg.q[seg.pt0 + page] = (epoch << L.PTE_CLASS_BITS) | 1
    w0 = seg.slot0 + (page << seg.ref_shift) * seg.slot_words
    for i in range(2):
        w = w0 + i * size // 8
        seg.q[w] = 2 * epoch + 1
        seg.q[w + L.S_VERSION] = 0
        seg.q[w + L.S_EXPIRY] = 0
        seg.q[w + L.S_META] = L.FLAG_FREE << 16
        seg.q[w] = 2 * epoch + 2
    seg.q[w0 + 2 * size // 8] = 2 * epoch + 1  # the third was being stamped
    # (a move publishes its epoch when it is done: this one never did)
    # Elsewhere, a free slot of the smallest class left odd by a write in flight.
    other = next(r for r in eng.frees[0] if r >> seg.ref_shift != page)
    seg.q[seg.slot0 + other * seg.slot_words] = 2 * epoch + 3
    msgs = messages(n)
    assert f"page table entry {page}" in msgs and "left mid-write" in msgs, msgs
    # What the next coordinator does with the adopted segment:
    eng2 = Engine(seg, compiled=False)
    rep = repair(seg, eng2)
    # the moved page's slots no bucket names (its odd one too) are stale; the other is odd
    assert rep["odd_slots"] == 1 and rep["stale_slots"] > 2, rep
    assert seg.q[seg.slot0 + other * seg.slot_words] % 2 == 0
    assert shmstore.check(name=n).ok, messages(n)
    assert contents(eng2, KEYS) == {k: (None if k in gone else v) for k, v in before.items()}
    # Every slot of the moved page is a free slot of its new class with key length 0,
    # or never written (where the old class had written nothing, the page is zero).
    refs, cls = seg.slot_refs(cls=0)
    mine = refs[(refs >> seg.ref_shift) == page]
    assert len(mine) == seg.page_size // size
    head = seg.headers(mine)
    blank = ~head.any(axis=1)
    stamped_free = (((head[:, L.S_META] >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) != 0) & (
        (head[:, L.S_META] & np.uint64(0xFFFF)) == 0) & ((head[:, L.S_SEQ] & np.uint64(1)) == 0)
    assert np.all(blank | stamped_free)
    assert np.count_nonzero(stamped_free) > 2  # the old class's bytes were there
    assert set(mine.tolist()) <= set(eng2.frees[0])
    # and the repaired store takes writes
    for i in range(500):
        eng2.put(b"n%04d" % i, msgspec.msgpack.encode(i))
    assert eng2.get(b"n0000")[1] == msgspec.msgpack.encode(0)
    eng2.close()
    assert shmstore.check(name=n).ok, messages(n)


def test_an_odd_index_generation_rebuilds_the_index_through_the_page_table(mem_segment):
    n, seg, eng = mem_segment
    before = contents(eng, KEYS)
    idx = seg.index_view()
    pos = np.flatnonzero(idx)
    b0 = int(idx[pos[0]])
    # Damage that a cut-short bucket shift cannot make, but a rebuild must drop anyway:
    # a bucket into the middle of a slot, one into a free page, one past the pages.
    free_page = int(np.flatnonzero(seg.page_table() == 0)[0])
    empties = np.flatnonzero(idx == 0)[:3]
    idx[empties[0]] = b0 + 1
    idx[empties[1]] = (b0 & ~0xFFFFFFFF) | ((free_page << seg.ref_shift) + 1)
    idx[empties[2]] = (b0 & ~0xFFFFFFFF) | seg.nslots + 5
    del idx
    seg.q[L.H_INDEX_GEN] += 1
    msgs = messages(n)
    assert "not on a slot boundary" in msgs and "not assigned to a class" in msgs and "outside" in msgs, msgs
    eng2 = Engine(seg, compiled=False)
    rep = repair(seg, eng2)
    assert rep["index_rebuilt"] == 1
    assert contents(eng2, KEYS) == before
    assert shmstore.check(name=n).ok, messages(n)
    eng2.close()


def test_rebuild_from_disk_replays_evictions_and_page_moves(served, names, tmp_path):
    data = tmp_path / "d"
    n, coord = served("ev", path=data, memory=2 << 20, value_size=4000, capacity=20000, eviction="lru")
    with shmstore.connect(n) as s:
        for i in range(3000):  # ~480-byte records fill both pages of the store
            s.put(f"s{i:05d}", "v" * 400)
        s.checkpoint()
        for i in range(0, 3000, 2):
            s.delete(f"s{i:05d}")
        for i in range(400):  # large records: a page moves, then records are evicted
            s.put(f"b{i:04d}", "y" * 3000)
        st = s.stats()
        before = dict(s.items())
    assert st.evictions > 0 and st.page_moves > 0, st
    coord.kill()  # no shutdown checkpoint: the WAL after the checkpoint is replayed
    kinds = set()
    d = DataDir(str(data))
    for w in d.wal_files():
        for _, _, payload in scan_wal(w.path).records:
            kinds.add(type(decode_logged(payload)))
    assert Evict in kinds and MovePage in kinds, kinds
    shmstore.destroy(n)
    c2 = shmstore.serve(n, path=data)
    names.coordinators.append(c2)
    with shmstore.connect(n) as s:
        assert dict(s.items()) == before
    rep = shmstore.check(name=n, path=data)
    assert rep.ok, str(rep)


def test_a_page_move_cut_short_before_its_entry_is_cleared(mem_segment):
    """The compiled core's order: the entry goes to 0, the new slots are stamped, the
    entry is stored last. A death in between leaves a free page full of old bytes, which
    must be blank before the page is handed to a class as never-written."""
    n, seg, eng = mem_segment
    before = contents(eng, KEYS)
    big = seg.class_of(eng.find(b"b000", L.key_hash(b"b000"))[1])
    page = int(seg.slot_refs(cls=big)[0][0]) >> seg.ref_shift
    gone = [k for k in KEYS if k.startswith(b"b")]
    for k in gone:
        eng.delete(k)
    epoch = eng.next_epoch()
    seg.q[seg.pt0 + page] = 0
    w0 = seg.slot0 + (page << seg.ref_shift) * seg.slot_words
    seg.q[w0] = 2 * epoch + 2  # the first new slot stamped, then the death
    seg.q[w0 + L.S_META] = L.FLAG_FREE << 16
    msgs = messages(n)
    assert f"page {page} is free but not blank" in msgs, msgs
    eng2 = Engine(seg, compiled=False)
    rep = repair(seg, eng2)
    assert rep["pages_cleared"] == 1, rep
    lay = seg.layout
    start = lay.pages_offset + page * lay.page_size
    assert not any(seg.mv[start : start + lay.page_size])
    assert page in eng2.free_pages
    assert contents(eng2, KEYS) == {k: (None if k in gone else v) for k, v in before.items()}
    assert shmstore.check(name=n).ok, messages(n)
    eng2.close()
