"""The per-handle read cache of ``get``: a hit is exactly as current as a fresh read.

A cached record is answered again only while the index bucket that found it still
points to its slot, the slot still carries the seq it was read under and the slot's
page still has the page-table entry it had, checked on every hit (shmstore/_segment.py,
make_readers). Every hit, cached or not, touches the slot's access byte when the store
evicts by LRU.
"""

from __future__ import annotations

import multiprocessing as mp

import msgspec
import numpy as np
import pytest

import shmstore
from shmstore import _layout as L
from shmstore._segment import make_readers
from shmstore._shm import open_segment
import posix_ipc

from shmstore._many import key_words
from tests.helpers.seqlock import MiniWriter, SlotGeometry, bucket_pos, colliding_keys, engine_side, mini_store

#: Every test here runs on both cores: the compiled one and pure Python (conftest.core).
pytestmark = pytest.mark.usefixtures("core")

enc = msgspec.msgpack.encode
dec = msgspec.msgpack.decode


def test_hits_follow_every_change(served):
    n, _ = served(capacity=100)
    with shmstore.connect(n) as reader, shmstore.connect(n) as writer:
        writer.put("k", "v1")
        assert reader.get("k") == "v1"
        assert reader._readers.cached() == 1
        assert reader.get("k") == "v1"  # a hit
        writer.put("k", "v2")
        assert reader.get("k") == "v2"
        writer.delete("k")
        assert reader.get("k", "gone") == "gone"
        writer.put("k", "v3", ttl=3600)
        assert reader.get("k") == "v3"
        with writer.batch() as b:
            b.put("k", "v4")
            b.put("other", 1)
        assert [reader.get("k"), reader.get("other")] == ["v4", 1]
        writer.incr("other")
        assert reader.get("other") == 2
        assert reader.get(b"k") == "v4"  # the same record under its bytes name


def test_cached_misses_follow_inserts_and_moves(served):
    """A miss is cached too (the empty bucket that ended the walk and the index
    generation): inserting the key fills that bucket, and deleting any key bumps
    the generation, so a cached miss never hides a record."""
    n, _ = served(capacity=100)
    with shmstore.connect(n) as reader, shmstore.connect(n) as writer:
        assert reader.get("absent", 1) == 1
        assert reader._readers.cached() == 1
        assert reader.get("absent", 2) == 2  # a hit: the caller's default each time
        assert reader.stats().read_cache_hits == 1
        writer.put("absent", "here")
        assert reader.get("absent", 3) == "here"
        writer.delete("absent")
        assert reader.get("absent", 4) == 4
        assert reader.get("absent", 5) == 5
        writer.put("other", 1)
        writer.delete("other")  # moves buckets: bumps the index generation
        writer.put("absent", "back")
        assert reader.get("absent") == "back"


def test_a_cached_miss_is_refused_when_its_empty_bucket_fills(names):
    """Keys sharing a home bucket: the miss of C is cached at the run's end; a put of
    C lands exactly there (no delete, so the generation does not move)."""
    with engine_side(names(), compiled=None, capacity=8, key_size=16, value_size=16) as (n, wseg, eng):

        a, b, c = (k.encode() for k in colliding_keys(wseg.mask, 3))
        eng.put(a, enc("a"))
        eng.put(b, enc("b"))
        reader = open_segment(n)
        try:
            rd = make_readers(reader, dec, lambda *x: pytest.fail("stale path"), read_cache=16)
            get = rd.get
            gen = wseg.q[L.H_INDEX_GEN]
            assert get(c, "none") == "none" and rd.cached() == 1
            eng.put(c, enc("c"))
            assert wseg.q[L.H_INDEX_GEN] == gen  # only the empty bucket tells
            assert get(c, "none") == "c"
            # Now the other way: the miss is cached at the run's end, a delete shifts
            # the run back, and the key lands before that bucket, which stays empty:
            # only the index generation tells.
            eng.delete(c)
            assert get(c, "none") == "none"
            end = bucket_pos(wseg, b) + 1
            eng.delete(a)  # b moves back one bucket
            eng.put(c, enc("c2"))
            assert bucket_pos(wseg, c) == end - 1 and wseg.q[wseg.idx0 + end] == 0
            assert get(c, "none") == "c2"
            del rd
        finally:
            reader.close()


def test_stats_count_the_hits(served):
    n, _ = served(capacity=100)
    with shmstore.connect(n) as s:
        s.put("a", 1)
        s.put("b", [1])
        got = [s.get("a"), s.get("a"), s.get("b"), s.get("b"), s.get("b"), s.get("nope")]
        assert got == [1, 1, [1], [1], [1], None]
        assert s.get("nope") is None
        st = s.stats()
        assert (st.read_cache_hits, st.read_cache_records) == (4, 3)
        assert st.reads >= 6


def test_mutable_values_are_decoded_anew_on_each_hit(served):
    n, _ = served(capacity=100)
    with shmstore.connect(n) as s:
        s.put("d", {"a": [1]})
        v = s.get("d")
        v["a"].append(2)
        v["b"] = 0
        assert s.get("d") == {"a": [1]}
        assert s.get("d") is not s.get("d")


def test_a_hit_is_refused_once_the_bucket_points_elsewhere(names):
    """A coordinator that died between pointing the key's bucket at a new slot and
    freeing the old one leaves the old slot's seq unchanged: a cache that checked
    only the seq would go on answering the old value while fresh reads see the new.
    The bucket check makes the cached reader see the new value too."""
    with engine_side(names(), compiled=None, capacity=8, key_size=16, value_size=16) as (n, wseg, eng):
        kb = b"key"
        eng.put(kb, enc("old"))
        reader = open_segment(n)
        try:
            rd = make_readers(reader, dec, lambda *a: pytest.fail("stale path"),
                                           read_cache=16)
            get = rd.get
            assert get(kb) == "old" and rd.cached() == 1
            # Half an update: new slot written and published, old slot left as it was.
            h = L.key_hash(kb)
            pos, old_slot = eng.find(kb, h)
            new_slot = eng.frees[0].pop()
            epoch = eng.next_epoch()
            eng._write_slot(new_slot, epoch, kb, enc("new"), epoch, 0, 0)
            wseg.q[wseg.idx0 + pos] = (h << 32) | (new_slot + 1)
            assert wseg.q[eng._slot_word(old_slot)] % 2 == 0  # the old slot is untouched
            assert get(kb) == "new"
            del rd
        finally:
            reader.close()


def test_a_hit_is_refused_when_a_new_record_reuses_the_slot(served):
    """Delete and put again until the key's new record lands in the same slot at the
    same bucket: the bucket word is then the same as when the value was cached, and
    only the slot's seq (a new epoch) tells the cached value is stale."""
    n, _ = served(capacity=1)
    with shmstore.connect(n) as reader, shmstore.connect(n) as writer:
        writer.put("k", "v0")
        assert reader.get("k") == "v0"
        seg = reader._seg
        bucket = next(int(b) for b in seg.index_view() if b)
        for i in range(1, 10):
            writer.delete("k")
            writer.put("k", f"v{i}")
            if next(int(b) for b in seg.index_view() if b) == bucket:
                break
        else:
            pytest.fail("the slot was never reused")
        assert reader.get("k") == f"v{i}"


def test_hits_do_not_read_the_slot(names):
    """Shows the hit path is taken: bytes changed under an unchanged seq (which the
    coordinator never does) are not seen by a hit, and are by a handle without cache."""
    with engine_side(names(), compiled=None, capacity=8, key_size=16, value_size=16) as (n, wseg, eng):
        kb = b"key"
        eng.put(kb, enc("aaaa"))
        reader = open_segment(n)
        try:
            rd = make_readers(reader, dec, lambda *a: pytest.fail("stale path"), read_cache=16)
            get = rd.get
            rd2 = make_readers(reader, dec, lambda *a: pytest.fail("stale path"), read_cache=0)
            plain = rd2.get
            assert get(kb) == "aaaa" == plain(kb)
            _, slot = eng.find(kb, L.key_hash(kb))
            vo = eng._slot_word(slot) * 8 + L.SLOT_HEADER + L.align(len(kb), 8)
            wseg.mv[vo : vo + 5] = enc("bbbb")
            assert get(kb) == "aaaa"
            assert plain(kb) == "bbbb" and rd2.cached() == 0
            del rd, rd2, plain
        finally:
            reader.close()


def test_read_cache_option(served):
    n, _ = served(capacity=200)
    with shmstore.connect(n) as w:
        for i in range(100):
            w.put(f"k{i}", i)
    with shmstore.connect(n, read_cache=0) as s:
        assert [s.get(f"k{i}") for i in range(100)] == list(range(100))
        assert s._readers.cached() == 0
    with shmstore.connect(n, read_cache=8) as s:
        assert [s.get(f"k{i}") for i in range(100)] == list(range(100))
        assert s._readers.cached() == 8  # full: the first 8 stay until 8 x 8 more misses
        assert [s.get(f"k{i}") for i in range(100)] == list(range(100))
        assert s._readers.cached() <= 8
    with shmstore.open(n, read_cache=0) as s:
        assert s.get("k1") == 1 and s._readers.cached() == 0
    for bad in (-1, 1.5, "10", True, None):
        with pytest.raises(shmstore.InvalidLayoutError, match="read_cache"):
            shmstore.connect(n, read_cache=bad)


def test_a_recreated_store_is_not_answered_from_the_old_cache(served, names):
    n, coord = served(capacity=100)
    with shmstore.connect(n) as w:
        w.put("k", "first")
    s = shmstore.connect(n)
    try:
        assert s.get("k") == "first" and s._readers.cached() == 1
        coord.stop()
        shmstore.destroy(n)
        coord2 = shmstore.serve(n, capacity=100)
        names.coordinators.append(coord2)
        with shmstore.connect(n) as w:
            w.put("k", "second")
        assert s.get("k") == "second"
    finally:
        s.close()


def _child_reads(name: str, want: object) -> None:
    got = _HANDLE.get("k")  # the handle the parent forked with
    raise SystemExit(0 if got == want else 1)


_HANDLE = None


def test_a_forked_child_validates_the_inherited_cache(served):
    global _HANDLE
    n, _ = served(capacity=100)
    with shmstore.connect(n) as s, shmstore.connect(n) as w:
        w.put("k", "before")
        assert s.get("k") == "before" and s._readers.cached() == 1
        w.put("k", "after")
        _HANDLE = s
        try:
            p = mp.get_context("fork").Process(target=_child_reads, args=(n, "after"))
            p.start()
            p.join(30)
        finally:
            _HANDLE = None
        assert p.exitcode == 0, "the child answered the inherited cached value"


# -- format 4: the page entry, the access bytes -------------------------------------------


def test_a_hit_is_refused_once_the_page_entry_changes(names, python_core):
    """The cache keeps the slot's page entry and re-checks it with the bucket and the
    seq: value bytes changed under an unchanged seq and bucket (which the coordinator
    never does) are answered from the cache while the page entry holds, and read
    fresh once the entry changed (the page was reassigned)."""
    lay = L.Layout(capacity=64, key_size=16, value_size=64, memory=2 << 20)
    with mini_store(names(), lay) as (w, reader):
        kb = b"key"
        ref = w.put(kb, enc("aaaa"))
        g = SlotGeometry(w.seg, ref)
        rd = make_readers(reader, dec, lambda *a: pytest.fail("stale path"), read_cache=16)
        get = rd.get
        assert get(kb) == "aaaa" and rd.cached() == 1
        w.mv[g.vofs : g.vofs + 5] = enc("bbbb")
        assert get(kb) == "aaaa", "not a hit: the test shows nothing"
        pte = w.q[g.page_word]
        w.q[g.page_word] = ((pte >> L.PTE_CLASS_BITS) + 1) << L.PTE_CLASS_BITS | (pte & 0xFF)
        hits = rd.cache_hits()
        assert get(kb) == "bbbb"
        assert rd.cache_hits() == hits, "answered from the cache after the page entry changed"
        del rd, get


def _lru_store(names, *, eviction: int = L.EVICT_LRU, access_size: int | None = None):
    """A mini store (memory 2 MiB) with an access segment of ``access_size`` bytes (the
    layout's by default; 0: none) and the header's eviction word."""
    lay = L.Layout(capacity=64, key_size=16, value_size=64, memory=2 << 20)
    name = names()
    ctx = mini_store(name, lay)
    w, reader = ctx.__enter__()
    try:
        size = lay.access_size if access_size is None else access_size
        if size:
            shm = posix_ipc.SharedMemory(L.access_name(name), posix_ipc.O_CREX, mode=0o600, size=size)
            shm.close_fd()
        w.q[L.H_EVICTION] = eviction
    except BaseException:
        ctx.__exit__(None, None, None)
        raise
    return ctx, w, reader


def test_every_hit_touches_its_access_byte(names, python_core):
    """LRU stores: a reader maps the access segment read-write and sets byte
    ``ref >> 2`` to 1 after every hit: a fresh read, a cache hit, the full lookup and
    get_many's numpy probe; a miss touches nothing."""
    ctx, w, reader = _lru_store(names)
    try:
        acc = reader.open_access()
        assert acc is not None and not acc.readonly and len(acc) == reader.layout.access_size
        view = np.frombuffer(acc, np.uint8)
        refs = {k: w.put(k, enc(k.decode() * 3)) for k in (b"a", b"bb", b"ccc")}
        assert len({r >> 2 for r in refs.values()}) == 3, "two records share an access byte"
        rd = make_readers(reader, dec, lambda *a: pytest.fail("stale path"), read_cache=16, access=acc)

        def touched():
            return set(np.flatnonzero(view).tolist())

        assert touched() == set()
        assert rd.get("missing", 0) == 0 and touched() == set()
        assert rd.get("a") == "aaa" and touched() == {refs[b"a"] >> 2}
        view[:] = 0  # the coordinator's clock went by
        assert rd.get("a") == "aaa" and rd.cache_hits() >= 1
        assert touched() == {refs[b"a"] >> 2}, "a cache hit did not touch"
        view[:] = 0
        assert reader.lookup(b"bb") is not None and touched() == {refs[b"bb"] >> 2}
        view[:] = 0
        keys = [f"m{i}" for i in range(40)] + ["a", "bb", "ccc"]
        for k in keys[:40]:
            refs[k.encode()] = w.put(k, enc(k))
        view[:] = 0
        words, lens = key_words(keys, reader.key_size)
        fast, blob, slow, top = rd.probe_many(keys, lens, words)
        assert len(fast) == len(keys), "not the numpy path"
        assert touched() == {refs[k.encode()] >> 2 for k in keys}
        del rd, view
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("case", ["not lru", "no access segment", "too small"])
def test_no_access_bytes_means_no_touching(names, python_core, case):
    """Readers touch only when the header says LRU at connect, and a missing or short
    access segment is no error: reads work, nothing is touched."""
    kwargs = {"not lru": dict(eviction=L.EVICT_NONE), "no access segment": dict(access_size=0),
              "too small": dict(access_size=16)}[case]
    ctx, w, reader = _lru_store(names, **kwargs)
    try:
        assert reader.open_access() is None and reader.access is None
        w.put(b"k", enc(1))
        rd = make_readers(reader, dec, lambda *a: pytest.fail("stale path"), read_cache=16,
                          access=reader.access)
        assert rd.get("k") == 1 == rd.get("k")
        del rd
    finally:
        ctx.__exit__(None, None, None)


def test_a_handle_maps_the_access_segment_and_unmaps_it_at_close(names):
    """connect() opens the access segment of an LRU store and its gets touch; the last
    handle's close unmaps it."""
    ctx, w, reader = _lru_store(names)
    try:
        ref = w.put(b"k", enc("v"))
        s = shmstore.connect(reader.name)
        try:
            seg = s._seg
            assert seg.access is not None
            assert s.get("k") == "v"
            assert seg.access[ref >> 2] == 1
        finally:
            s.close()
        assert seg.closed and seg.access is None
    finally:
        ctx.__exit__(None, None, None)


def test_a_forked_child_touches_through_the_inherited_access_mapping(names):
    """Fork safety: the access segment is mapped shared, like the data segment, so a
    forked child's hits set the bytes the coordinator (here: the parent) sees."""
    import os

    ctx, w, reader = _lru_store(names)
    try:
        ref = w.put(b"k", enc("v"))
        s = shmstore.connect(reader.name)
        try:
            acc = s._seg.access
            assert acc is not None
            acc[ref >> 2] = 0
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    code = 0 if s.get("k") == "v" else 1
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert acc[ref >> 2] == 1, "the child's hit did not reach the shared access bytes"
        finally:
            s.close()
    finally:
        ctx.__exit__(None, None, None)
