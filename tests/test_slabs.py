"""Size classes, the memory budget and eviction (format 4), end to end.

Each test serves a real coordinator (the `served` fixture cleans up) and runs on both
cores (`core` fixture): the compiled one and pure Python.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time

import pytest

import shmstore
from shmstore import _layout as L
from shmstore._errors import InvalidLayoutError, StoreFullError

pytestmark = pytest.mark.usefixtures("core")

MiB = 1 << 20


@contextlib.contextmanager
def _opened(served, **kw):
    """Serve a fresh store with ``kw`` and connect: ``(name, coordinator, handle)``."""
    name, coord = served(**kw)
    s = shmstore.connect(name)
    try:
        yield name, coord, s
    finally:
        s.close()


def _kill(coord) -> None:
    os.kill(coord.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while coord.alive() and time.monotonic() < deadline:
        time.sleep(0.01)


def _shm_bytes(name: str) -> dict[str, int]:
    """Apparent sizes of the store's /dev/shm objects (segments only)."""
    out = {}
    for e in L.store_entries(name):
        if not e.startswith("sem."):
            out[e] = os.stat(os.path.join(L.SHM_DIR, e)).st_size
    return out


def test_values_of_every_size_round_trip_with_only_memory(served):
    with _opened(served, memory=16 * MiB) as (name, _, s):
        vals = {"tiny": b"x" * 10, "kib": os.urandom(1024), "fifty": os.urandom(50 * 1024),
                "doc": os.urandom(900 * 1024), "counter": 7}
        for k, v in vals.items():
            s.put(k, v)
        for k, v in vals.items():
            assert s.get(k) == v, k
        assert s.get_many(list(vals)) == list(vals.values())
        st = s.stats()
        assert st.memory == 16 * MiB and st.records == len(vals)
        used = [c for c in st.classes if c.records]
        assert len(used) >= 4  # 10 B, 1 KiB, 50 KiB and 900 KiB records in four classes
        assert sum(c.records for c in st.classes) == len(vals)
        for c in used:
            assert 0 <= c.fragmentation < 1 and c.bytes_asked <= c.bytes_spent == c.records * c.slot_size
        assert st.free_pages == st.pages - sum(c.pages for c in st.classes)
        # A value over value_size (1 MiB by default) is refused in the caller.
        with pytest.raises(shmstore.ValueTooLargeError):
            s.put("huge", b"x" * (1 << 20) + b"y" * 100)


def test_no_eviction_refuses_with_nothing_half_written(served):
    with _opened(served, memory=2 * MiB, value_size=2000, key_size=16) as (name, _, s):
        n = 0
        with pytest.raises(StoreFullError):
            while True:
                s.put(f"k{n}", b"v" * 1500)
                n += 1
        assert n > 0 and s.stats().records == n
        # An update of a full class still succeeds (the class keeps a spare slot).
        s.put("k0", b"w" * 1500)
        assert s.get("k0") == b"w" * 1500
        # A batch that does not fit writes nothing.
        before = s.stats().records
        with pytest.raises(StoreFullError):
            with s.batch() as b:
                for i in range(50):
                    b.put(f"new{i}", b"z" * 1500)
        assert s.stats().records == before and s.get("new0") is None
        assert s.get("k1") == b"v" * 1500


def test_lru_never_fails_keeps_the_hot_set_and_stays_in_budget(served):
    # 100 B - 10 KiB records fall into ~19 classes of 1 MiB pages: 32 pages give each
    # class a page or more (with far fewer, pages keep moving and take hot records along).
    memory = 32 * MiB
    with _opened(served, memory=memory, value_size=16 * 1024, key_size=16, eviction="lru") as (name, _, s):
        rng = random.Random(7)
        hot = {f"hot{i}": os.urandom(rng.randint(100, 10_000)) for i in range(40)}
        for k, v in hot.items():
            s.put(k, v)
        written = 0
        i = 0
        while written < 3 * memory:
            v = os.urandom(rng.randint(100, 10_000))
            s.put(f"cold{i}", v)  # never fails
            written += len(v)
            i += 1
            for k in hot:  # the hot set is read continuously
                assert s.get(k) == hot[k], k
        st = s.stats()
        assert st.evictions > 0
        assert st.memory_used <= memory
        lay_size = st.segment_bytes
        sizes = _shm_bytes(name)
        data = sizes.pop(L.data_name(name)[1:])
        assert data == lay_size
        index_and_header = lay_size - memory
        assert index_and_header < memory  # the index and the page table, not a copy of the data
        assert set(sizes) <= {f"shmstore.{name}@{s}" for s in ("ch", "acc", "redo", "lock")}


def test_evictions_are_logged_ops_visible_in_changes(served, tmp_path):
    with _opened(served, memory=2 * MiB, value_size=4000, key_size=16, eviction="lru",
                 path=str(tmp_path / "d"), sync="periodic") as (name, coord, s):
        since = s.epoch
        changed: set[bytes] = set()
        for i in range(2000):
            s.put(f"k{i}", b"v" * 3000)
            # A full store reuses the slots of its changes soon: a feed keeps up by
            # reading after each write (FeedTruncatedError otherwise, never a gap).
            keys, since = s.changes(since)
            changed.update(keys)
        st = s.stats()
        assert st.evictions > 0
        gone = [k for k in (f"k{i}" for i in range(2000)) if s.get(k) is None]
        assert len(gone) == st.evictions
        assert {k.encode() for k in gone} <= changed
        present = {f"k{i}" for i in range(2000)} - set(gone)
    # The evictions replay from the log: a rebuild from disk (checkpoint + WAL, after a
    # SIGKILL: no checkpoint at stop) holds the same records.
    _kill(coord)
    shmstore.destroy(name)
    coord2 = shmstore.serve(name, path=str(tmp_path / "d"))
    try:
        s = shmstore.connect(name)
        assert {f"k{i}" for i in range(2000) if s.get(f"k{i}") is not None} == present
        s.close()
    finally:
        coord2.stop()


def test_a_class_without_pages_gets_one_moved(served):
    # Two pages: fill both with small records, delete most, then ask for a big one:
    # a page moves (its records relocate within their class) and nothing is lost.
    with _opened(served, memory=2 * MiB, value_size=600 * 1024, key_size=16) as (name, _, s):
        n = 13000  # 6553 slots of 160 bytes a page: both pages, not full
        for i in range(n):
            s.put(f"s{i}", b"a" * 100, wait=False)
        s.flush()
        assert s.stats().free_pages == 0
        big = os.urandom(500 * 1024)
        with pytest.raises(StoreFullError):
            s.put("big", big)
        for i in range(n):
            if i % 4:
                s.delete(f"s{i}", wait=False)
        s.flush()
        s.put("big", big)
        assert s.get("big") == big
        assert all(s.get(f"s{i}") == b"a" * 100 for i in range(0, n, 4))
        assert s.stats().page_moves >= 1


def test_lru_moves_a_page_when_the_class_has_none(served):
    with _opened(served, memory=2 * MiB, value_size=600 * 1024, key_size=16, eviction="lru") as (name, _, s):
        for i in range(20000):
            s.put(f"s{i}", b"a" * 100, wait=False)
        s.flush()
        big = os.urandom(500 * 1024)
        s.put("big", big)
        assert s.get("big") == big
        st = s.stats()
        assert st.page_moves >= 1 and st.evictions > 0


def test_volatile_ttl_evicts_only_records_with_an_expiry(served):
    with _opened(served, memory=2 * MiB, value_size=4000, key_size=16, eviction="volatile-ttl") as (name, _, s):
        for i in range(100):
            s.put(f"keep{i}", b"k" * 3000)
        for i in range(2000):  # records with an expiry make room for each other
            s.put(f"tmp{i}", b"t" * 3000, ttl=3600 + i)
        assert s.stats().evictions > 0
        assert s.get("tmp0") is None and s.get("tmp1999") == b"t" * 3000  # soonest first
        # Records without an expiry evict the ones with one, then are refused.
        with pytest.raises(StoreFullError):
            for i in range(5000):
                s.put(f"more{i}", b"m" * 3000)
        assert all(s.get(f"keep{i}") == b"k" * 3000 for i in range(100))


@pytest.mark.parametrize("bad", [True, 1.5, float("nan"), -1, 0, "1M", 100])
def test_memory_argument_is_checked_in_the_caller(names, bad):
    with pytest.raises(InvalidLayoutError):
        shmstore.serve(names(), memory=bad)


@pytest.mark.parametrize("kw", [dict(eviction="fifo"), dict(eviction=True), dict(growth=1.0),
                                dict(growth=float("inf")), dict(growth=True)])
def test_eviction_and_growth_are_checked_in_the_caller(names, kw):
    with pytest.raises(InvalidLayoutError):
        shmstore.serve(names(), memory=4 * MiB, **kw)


def test_sizes_of_an_existing_memory_store_must_match(served):
    name, coord = served(memory=4 * MiB)
    coord.stop()
    with pytest.raises(shmstore.IncompatibleStoreError):
        shmstore.serve(name, memory=8 * MiB)
    c2 = shmstore.serve(name)  # None: the existing segment's sizes
    try:
        s = shmstore.connect(name)
        assert s.stats().memory == 4 * MiB
        s.close()
    finally:
        c2.stop()


def test_coordinator_killed_under_eviction_comes_back_consistent(served):
    with _opened(served, memory=2 * MiB, value_size=4000, key_size=16, eviction="lru") as (name, coord, s):
        for i in range(1500):
            s.put(f"k{i}", b"v" * 3000)
        _kill(coord)
        c2 = shmstore.serve(name, eviction="lru")
        try:
            st = s.stats()
            live = [i for i in range(1500) if s.get(f"k{i}") is not None]
            assert len(live) == st.records
            assert sum(c.records for c in st.classes) == st.records
            for i in range(1500, 2500):
                s.put(f"k{i}", b"v" * 3000)
        finally:
            c2.stop()


def test_a_segment_of_the_old_format_is_refused_naming_the_fix(names):
    import mmap

    import posix_ipc

    name = names("old")
    shm = posix_ipc.SharedMemory(L.data_name(name), posix_ipc.O_CREX, mode=0o600, size=L.PAGE)
    try:
        mm = mmap.mmap(shm.fd, L.PAGE)
        q = memoryview(mm).cast("Q")
        q[L.H_FORMAT] = 3
        q[L.H_STATE] = L.STATE_READY
        q[L.H_MAGIC] = L.MAGIC
        q.release()
        mm.close()
        with pytest.raises(shmstore.IncompatibleStoreError, match=r"format 3.*shmstore scan .*shmstore load"):
            shmstore.connect(name)
        with pytest.raises(shmstore.ShmStoreError, match=r"format 3"):
            shmstore.serve(name, memory=4 * MiB)
    finally:
        shm.close_fd()
        posix_ipc.unlink_shared_memory(L.data_name(name))


def test_read_slot_refuses_a_ref_past_the_last_whole_slot_of_its_page(served):
    # 80-byte slots: a 1 MiB page holds 13107 of them and 16 bytes over; the ref of
    # those 16 bytes is a multiple of the slot size but no slot.
    with _opened(served, memory=4 * MiB) as (name, _, s):
        s.put("k", b"x" * 30)  # 32 + 8 + 32 bytes: the 80-byte class
        seg = s._seg
        ref = seg.lookup(b"k")[0]
        assert seg.classes[seg.class_of(ref)] == 80
        page_start = (ref >> seg.ref_shift) << seg.ref_shift
        last = page_start + (seg.page_size // 80) * 80 // L.SLOT_UNIT
        assert ((last - page_start) * L.SLOT_UNIT) % 80 == 0
        assert seg.read_slot(last) is None
        assert seg.read_slot(last - 80 // L.SLOT_UNIT) is not None


def test_at_capacity_with_nothing_evictable_the_write_is_refused_at_once(served):
    # volatile-ttl with no record carrying an expiry: the record bound refuses the insert.
    with _opened(served, memory=2 * MiB, capacity=20, eviction="volatile-ttl") as (name, _, s):
        for i in range(20):
            s.put(f"k{i}", i)
        with pytest.raises(StoreFullError, match="capacity, and none can be evicted"):
            s.put("one-more", 1)
        with pytest.raises(StoreFullError, match="none can be evicted"):
            with s.batch() as b:
                b.put("new", 1)
        assert s.stats().records == 20 and s.get("one-more") is None and s.get("new") is None
