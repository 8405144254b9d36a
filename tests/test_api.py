"""The public API against a real coordinator: behaviour and every kind of bad input."""

from __future__ import annotations

import os
import pickle

import msgspec
import pytest

import shmstore
from shmstore import _layout as L


class Point(msgspec.Struct):
    x: int
    y: int


def test_str_and_bytes_keys_name_the_same_record(store):
    store.put("k", 1)
    assert store.get(b"k") == 1
    store.put(b"k", 2)
    assert store["k"] == 2
    assert len(store) == 1


def test_mapping_protocol(store):
    store["a"] = [1, 2]
    assert store["a"] == [1, 2]
    assert "a" in store and "b" not in store
    with pytest.raises(KeyError):
        store["b"]
    del store["a"]
    with pytest.raises(KeyError):
        del store["a"]
    assert len(store) == 0


def test_versions_are_monotonic_and_cas_checks_them(store):
    v1 = store.put("k", "one")
    v2 = store.put("k", "two")
    assert v2 > v1 and store.version("k") == v2
    assert store.version("nope") is None
    with pytest.raises(shmstore.VersionConflictError) as e:
        store.compare_and_set("k", "three", version=v1)
    assert "expected version" in str(e.value)
    assert store.get("k") == "two"
    v3 = store.compare_and_set("k", "three", version=v2)
    assert v3 > v2 and store.get("k") == "three"
    # version=0 means "must not exist yet"
    assert store.compare_and_set("new", 1, version=0) > 0
    with pytest.raises(shmstore.VersionConflictError):
        store.compare_and_set("new", 2, version=0)
    # a deleted record has version 0 again, and its new version is never reused
    store.delete("k")
    v4 = store.compare_and_set("k", "back", version=0)
    assert v4 > v3


def test_incr_counts_from_zero_and_refuses_non_integers(store):
    assert store.incr("n") == 1
    assert store.incr("n", 41) == 42
    assert store.incr("n", -2) == 40
    assert store.get("n") == 40
    store.put("s", "text")
    with pytest.raises(shmstore.ValueEncodingError):
        store.incr("s")
    assert store.get("s") == "text"
    with pytest.raises(shmstore.ValueEncodingError):
        store.incr("n", 1.5)
    with pytest.raises(shmstore.ValueEncodingError):
        store.incr("n", 2**64)
    with pytest.raises(shmstore.ValueEncodingError):
        store.incr("n", -(2**63) - 1)
    assert store.get("n") == 40


def test_batch_is_all_or_nothing(served):
    n, _ = served(capacity=3)
    with shmstore.connect(n) as s:
        with s.batch() as b:
            b.put("a", 1)
            b.put("b", 2)
            b.delete("zz")
        assert b.results[2] is False
        assert s.get_many(["a", "b"]) == [1, 2]
        # Needs 2 new records where 1 fits: nothing of it may be written.
        with pytest.raises(shmstore.StoreFullError):
            with s.batch() as b:
                b.put("a", 10)
                b.put("c", 3)
                b.put("d", 4)
        assert s.get_many(["a", "c", "d"]) == [1, None, None]
        # A batch whose block raises is not sent at all.
        with pytest.raises(RuntimeError):
            with s.batch() as b:
                b.put("a", 99)
                raise RuntimeError("user code failed")
        assert s.get("a") == 1


def test_store_full_then_delete_makes_room(served):
    n, _ = served(capacity=4)
    with shmstore.connect(n) as s:
        for i in range(4):
            s.put(f"k{i}", i)
        with pytest.raises(shmstore.StoreFullError) as e:
            s.put("k4", 4)
        assert "capacity" in str(e.value)
        # Updating an existing record still works in a full store (the spare slot).
        for _ in range(10):
            s.put("k0", "updated")
        assert s.get("k0") == "updated"
        s.delete("k1")
        s.put("k4", 4)
        assert sorted(s.keys()) == [b"k0", b"k2", b"k3", b"k4"]


def test_bad_keys_get_typed_errors_before_anything_is_sent(served):
    n, _ = served(capacity=10, key_size=8)
    with shmstore.connect(n) as s:
        ops_before = s.stats().ops
        with pytest.raises(shmstore.KeyTooLongError) as e:
            s.put("123456789", 1)
        assert "key_size" in str(e.value)
        with pytest.raises(shmstore.KeyTooLongError):
            s.get("123456789")
        with pytest.raises(shmstore.InvalidKeyError):
            s.put(42, 1)
        with pytest.raises(shmstore.InvalidKeyError):
            s.get(None)
        with pytest.raises(shmstore.InvalidKeyError):
            s.put("", 1)
        # the same error classes are the stdlib ones callers catch
        with pytest.raises(ValueError):
            s.put("123456789", 1)
        with pytest.raises(TypeError):
            s.put(3.5, 1)
        assert s.stats().ops == ops_before
        assert s.stats().writes == 0


def test_bad_values_get_typed_errors(served):
    n, _ = served(capacity=10, value_size=16)
    with shmstore.connect(n) as s:
        with pytest.raises(shmstore.ValueTooLargeError) as e:
            s.put("k", "x" * 100)
        assert "value_size" in str(e.value)
        with pytest.raises(shmstore.ValueEncodingError):
            s.put("k", object())
        with pytest.raises(shmstore.ValueEncodingError):
            s.put("k", 1 + 2j)
        assert s.get("k") is None and s.stats().writes == 0


def test_value_type_validates_on_write_and_decodes(served):
    n, _ = served(capacity=10, value_type=Point)
    with shmstore.connect(n, value_type=Point) as s:
        s.put("p", Point(1, 2))
        assert s.get("p") == Point(1, 2)
        assert s.get_many(["p", "q"]) == [Point(1, 2), None]
        with pytest.raises(shmstore.ValueEncodingError):
            s.put("p", {"x": "not an int", "y": 1})
        with pytest.raises(shmstore.ValueEncodingError):
            s.incr("p")
    # Another type is refused at connect; no type means read-only, plain decoding.
    class Other(msgspec.Struct):
        z: str

    with pytest.raises(shmstore.SchemaMismatchError):
        shmstore.connect(n, value_type=Other)
    with shmstore.connect(n) as raw:
        assert raw.get("p") == {"x": 1, "y": 2}
        with pytest.raises(shmstore.SchemaMismatchError):
            raw.put("p", {"x": 3, "y": 4})


def test_invalid_names_and_layouts(names):
    for bad in ["", "a/b", "x" * 65, "sp ace", "at@sign", None, 3]:
        with pytest.raises(shmstore.InvalidNameError):
            shmstore.serve(bad)
    n = names()
    with pytest.raises(shmstore.InvalidLayoutError):
        shmstore.serve(n, capacity=0)
    with pytest.raises(shmstore.InvalidLayoutError):
        shmstore.serve(n, key_size=10**6)
    with pytest.raises(shmstore.InvalidLayoutError):
        shmstore.serve(n, sync="sometimes")
    with pytest.raises(shmstore.InvalidLayoutError) as e:
        shmstore.serve(n, sync="always")  # durability needs a data directory
    assert "path=" in str(e.value)
    with pytest.raises(shmstore.StoreNotFoundError):
        shmstore.connect(n)


def test_second_coordinator_is_refused_with_the_pid(served):
    n, coord = served(capacity=10)
    with pytest.raises(shmstore.CoordinatorRunningError) as e:
        shmstore.serve(n)
    assert str(coord.pid) in str(e.value)
    with pytest.raises(shmstore.CoordinatorRunningError):
        shmstore.destroy(n)


def test_restart_with_other_sizes_is_refused(served):
    n, coord = served(capacity=10)
    coord.stop()
    with pytest.raises(shmstore.IncompatibleStoreError) as e:
        shmstore.serve(n, capacity=20)
    assert "capacity=10" in str(e.value)


def test_pipelined_writes_keep_order_and_flush_reports_the_first_error(served):
    n, _ = served(capacity=50, value_size=32)
    with shmstore.connect(n) as s:
        for i in range(200):
            assert s.put("k", i, wait=False) is None
        s.flush()
        assert s.get("k") == 199
        for i in range(40):
            s.put(f"n{i}", i, wait=False)
        s.flush()
        # 41 records now; capacity 50: the 10th new key fails, and later ones too.
        for i in range(20):
            s.put(f"m{i}", i, wait=False)
        s.delete("k", wait=False)
        with pytest.raises(shmstore.StoreFullError):
            s.flush()
        s.flush()  # the error was reported once
        assert s.get("k") is None  # ops after the failure still applied, in order


def test_get_many_returns_defaults_and_values(store):
    store.put("a", 1)
    store.put("c", {"x": [1, 2]})
    assert store.get_many(["a", "b", b"c"], default="-") == [1, "-", {"x": [1, 2]}]
    assert store.get_many([]) == []
    keys = [f"k{i}" for i in range(300)]
    with store.batch() as b:
        for i, k in enumerate(keys):
            b.put(k, i)
    assert store.get_many(keys) == list(range(300))


def test_items_and_keys_see_each_record_once(store):
    for i in range(50):
        store.put(f"k{i}", i)
    for i in range(50):
        store.put(f"k{i}", i * 2)  # rewrites leave freed slots behind
    for i in range(0, 50, 5):
        store.delete(f"k{i}")
    items = dict(store.items())
    assert items == {f"k{i}".encode(): i * 2 for i in range(50) if i % 5}
    assert sorted(store.keys()) == sorted(items)


def test_close_is_idempotent_and_closed_handles_say_so(served):
    n, _ = served(capacity=10)
    s = shmstore.connect(n)
    s.put("a", 1)
    s.close()
    s.close()
    assert s.closed
    with pytest.raises(shmstore.StoreClosedError):
        s.put("a", 2)
    with pytest.raises(shmstore.StoreClosedError):
        s["a"]


def test_open_serves_then_connects(names):
    n = names()
    s = shmstore.open(n, capacity=10)
    try:
        assert s.coordinator is not None and s.coordinator.alive()
        s.put("a", 1)
        s2 = shmstore.open(n)  # a coordinator runs now: just connect
        assert s2.coordinator is None and s2.get("a") == 1
        s2.close()
    finally:
        s.close()
        s.coordinator.stop()


def test_destroyed_and_recreated_store_is_not_read_through_a_stale_mapping(served, names):
    n, coord = served(capacity=10)
    s = shmstore.connect(n)
    s.put("k", "old")
    coord.stop()
    assert shmstore.destroy(n)
    with pytest.raises(shmstore.StoreNotFoundError):
        s.get("k")
    coord2 = shmstore.serve(n, capacity=10)
    names.coordinators.append(coord2)
    assert s.get("k") is None  # re-attached to the new segment, not the old data
    s.put("k", "new")
    assert s.get("k") == "new"
    s.close()


def test_errors_pickle_and_keep_their_class():
    errors = [cls("msg") for cls in shmstore._errors._REGISTRY.values()]
    for err in errors:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == "msg"
    assert isinstance(shmstore.StoreTimeoutError("x"), TimeoutError)
    assert isinstance(shmstore.StoreNotFoundError("x"), FileNotFoundError)
    assert type(shmstore._errors.from_wire("VersionConflictError", "m")) is shmstore.VersionConflictError
    assert "FutureError" in str(shmstore._errors.from_wire("FutureError", "m"))


def test_segments_are_mode_0600(served):
    n, _ = served(capacity=10)
    for suffix in ("", "@ch", "@lock"):
        assert os.stat(f"/dev/shm/shmstore.{n}{suffix}").st_mode & 0o777 == 0o600


def test_stats_count_ops(store):
    before = store.stats()
    for i in range(10):
        store.put(f"k{i}", i)
    store.delete("k0")
    st = store.stats()
    assert st.records == 9 and st.capacity == 1000
    assert st.ops - before.ops == 11 and st.writes == 11
    assert st.epoch == store.epoch and st.coordinator_pid is not None
    assert st.groups >= 1 and st.max_group >= 1
    r0 = st.reads
    for _ in range(5):
        store.get("k1")  # the fast path
    store.get(b"k2")  # the general path
    store.get_many(["k3", "k4"])
    assert store.stats().reads - r0 == 8


@pytest.mark.parametrize("memory", [0, 8 << 20])
def test_header_layout_constants_are_consistent(memory):
    lay = L.Layout(capacity=1000, key_size=13, value_size=100_000, memory=memory).validate()
    cls = lay.classes
    assert all(c % L.SLOT_UNIT == 0 and c >= L.MIN_SLOT for c in cls) and list(cls) == sorted(set(cls))
    assert cls[-1] >= L.slot_need(13, 100_000) and lay.page_size >= cls[-1]
    assert lay.page_size & (lay.page_size - 1) == 0
    assert lay.pt_offset % L.PAGE == 0 and lay.pages_offset % L.PAGE == 0 and lay.index_offset % L.PAGE == 0
    assert lay.pages_offset >= lay.pt_offset + 8 * lay.npages
    assert lay.index_offset == lay.pages_offset + lay.npages * lay.page_size
    assert lay.nbuckets & (lay.nbuckets - 1) == 0
    if memory:
        assert len(cls) > 1 and lay.npages == memory // lay.page_size and lay.nbuckets > 4 * lay.capacity // 3
    else:
        per = lay.page_size // cls[0]
        assert len(cls) == 1 and lay.npages * per >= lay.nslots == 1001 and lay.nbuckets >= 2 * lay.nslots
    assert lay.nrefs == lay.npages * lay.page_size // L.SLOT_UNIT < (1 << 32) - 1
    other = L.Layout(capacity=1000, key_size=13, value_size=100_001, memory=memory)
    assert other.fingerprint != lay.fingerprint
    # the header words the class table uses lie inside the header, past every H_* word
    assert L.class_word(L.MAX_CLASSES - 1, L.C_ASKED) < L.H_WORDS
    assert L.H_CLASSES > max(v for k, v in vars(L).items() if k.startswith("H_") and k not in ("H_CLASSES", "H_WORDS"))



def test_a_malformed_request_is_refused_and_the_coordinator_survives(store):
    from shmstore import _channel as C

    store.put("k", 1)
    for bad in ([C.OP_BATCH, 1, [[C.OP_PUT, b"k"]]], [C.OP_PUT, 1, b"k"], [C.OP_BATCH, 1, [7]], [99, 1]):
        with pytest.raises(shmstore.ProtocolError):
            store._request(bad, "bad")
    assert store.get("k") == 1 and store.put("k", 2) > 0 and store.get("k") == 2


def test_a_segment_caught_before_its_ftruncate_is_waited_for_not_mapped(names):
    """A client opening a segment between its creator's shm_open and ftruncate saw
    an empty file (ValueError from mmap); it must wait like for a half-made header."""
    import posix_ipc

    n = names()
    shm = posix_ipc.SharedMemory(L.data_name(n), posix_ipc.O_CREX, mode=0o600, size=0)
    try:
        with pytest.raises(shmstore.StoreTimeoutError):
            shmstore._shm.open_segment(n, timeout=0.2)
    finally:
        shm.close_fd()
        shm.unlink()
