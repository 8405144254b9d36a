"""The compiled write core (``shmstore._cwrite``) against the Python one.

The coordinator's Engine makes its slot and index stores through ``_cwrite.Core`` when
the compiled core runs, from Python otherwise (``coordinator/_engine.py``). Both must
leave byte-identical segments for the same ops: records, freed slots (key kept, value
dropped), key-area zero padding past a shorter key, expiry words, buckets after
backward-shift deletions, the index generation, H_EPOCH, H_COUNT, H_LAST_DELETE_EPOCH,
H_BATCH_SEQ and the feed horizon. Checked here by hypothesis over random op sequences
on small stores (slot reuse, full stores, colliding keys), plus the constants the C
file repeats.
"""

from __future__ import annotations

import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmstore import _channel as C
from shmstore import _compiled
from shmstore import _layout as L
from shmstore._errors import ShmStoreError
from shmstore._shm import create_segment, unlink_quietly
from shmstore.coordinator._engine import Engine

pytestmark = pytest.mark.skipif(_compiled.native is None, reason="the compiled core is off (SHMSTORE_NO_EXTENSIONS)")

LAYOUT = L.Layout(capacity=8, key_size=16, value_size=24)

# Keys of 1..16 bytes from a small set (so they repeat, collide and reuse slots with
# keys of other lengths: the zero padding of the key area is exercised).
keys = st.sampled_from([b"a", b"b", b"k1", b"k2", b"key-3", b"longer-key-04", b"sixteen-bytes-05",
                        b"x" * 16, b"yy", b"zzz", b"\x00", b"\x00\x01"])
values = st.binary(max_size=24)
expiries = st.sampled_from([0, 0, 1, 10**18, 2**64 - 1])
put = st.tuples(st.just("put"), keys, values, expiries)
delete = st.tuples(st.just("delete"), keys)
cas = st.tuples(st.just("cas"), keys, values, st.integers(0, 40), expiries)
incr = st.tuples(st.just("incr"), keys, st.integers(-5, 5))
batch = st.tuples(st.just("batch"), st.lists(st.one_of(
    st.tuples(st.just(C.OP_PUT), keys, values, expiries).map(list),
    st.tuples(st.just(C.OP_DELETE), keys).map(list)), max_size=6))
ops = st.lists(st.one_of(put, put, delete, cas, incr, batch), max_size=40)


def _apply(eng: Engine, op: tuple) -> object:
    try:
        kind = op[0]
        if kind == "put":
            return eng.put(op[1], op[2], op[3])
        if kind == "delete":
            return eng.delete(op[1])
        if kind == "cas":
            return eng.cas(op[1], op[2], op[3], op[4])
        if kind == "incr":
            return eng.incr(op[1], op[2])
        return eng.batch(op[1])
    except ShmStoreError as e:
        return type(e).__name__


def _image(eng: Engine) -> bytes:
    """The segment's bytes, its random instance id left out."""
    mv = eng.seg.mv
    o = L.H_INSTANCE * 8
    return bytes(mv[:o]) + bytes(mv[o + 8:])


@pytest.fixture
def engines(names):
    """Make pairs of engines (compiled, Python) on fresh segments of LAYOUT."""
    made = []

    def pair():
        out = []
        for compiled in (True, False):
            n = names("cw")
            seg = create_segment(n, LAYOUT, 0)
            e = Engine(seg, compiled=compiled)
            e.rebuild_free_list()
            made.append((n, e))
            out.append(e)
        return out

    try:
        yield pair
    finally:
        for n, e in made:
            e.close()
            e.seg.close()
            unlink_quietly(posix_ipc.SharedMemory, L.data_name(n))


def _drop(engs):
    for e in engs:
        e.close()
        e.seg.close()
        unlink_quietly(posix_ipc.SharedMemory, L.data_name(e.seg.name))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=ops)
def test_compiled_and_python_engines_leave_identical_segments(engines, seq):
    c_eng, py_eng = engines()
    try:
        assert c_eng.core is not None and py_eng.core is None
        for i, op in enumerate(seq):
            rc, rp = _apply(c_eng, op), _apply(py_eng, op)
            assert rc == rp, f"op {i} {op!r}: compiled {rc!r}, Python {rp!r}"
            assert c_eng.epoch == py_eng.epoch
            assert list(c_eng.free) == list(py_eng.free), f"after op {i} {op!r}"
            assert c_eng.next_expiry == py_eng.next_expiry
            if _image(c_eng) != _image(py_eng):
                a, b = c_eng.seg.q, py_eng.seg.q
                diff = [w for w in range(len(a)) if w != L.H_INSTANCE and a[w] != b[w]]
                pytest.fail(f"after op {i} {op!r} of {seq!r}: words {diff[:10]} differ")
    finally:
        _drop([c_eng, py_eng])


def test_full_store_and_backward_shift(engines):
    """Fill the store (the put that does not fit is refused by both, storing nothing),
    then delete every other key (backward shifts over colliding keys)."""
    from tests.helpers.seqlock import colliding_keys

    c_eng, py_eng = engines()
    ks = [k.encode() for k in colliding_keys(c_eng.seg.mask, 8)]
    for e in (c_eng, py_eng):
        for i, k in enumerate(ks):
            e.put(k, bytes([i]) * (i + 1), 0)
        with pytest.raises(ShmStoreError, match="full"):
            e.put(b"one-too-many", b"", 0)
        gen = e.seg.q[L.H_INDEX_GEN]
        for k in ks[::2]:
            assert e.delete(k)
        assert e.seg.q[L.H_INDEX_GEN] == gen + 8
        assert not e.delete(ks[0])
    assert _image(c_eng) == _image(py_eng)
    for k in ks[1::2]:
        assert c_eng.get(k) == py_eng.get(k) is not None


def test_constants_match_the_python_modules():
    from shmstore import _cwrite

    assert _cwrite.H_FEED_HORIZON == L.H_FEED_HORIZON
    assert (_cwrite.C_HEAD, _cwrite.C_TAIL, _cwrite.C_DONE, _cwrite.C_REPLY_LEN) == (
        C.C_HEAD, C.C_TAIL, C.C_DONE, C.C_REPLY_LEN)
    for kb in (b"a", b"user:1", b"x" * 8, b"y" * 9, bytes(range(1, 200)), b"\xff" * 64):
        assert _cwrite.key_hash(kb) == L.key_hash(kb)


def test_core_refuses_bad_arguments(engines):
    c_eng, _ = engines()
    core = c_eng.core
    with pytest.raises(IndexError):
        core.free_record(LAYOUT.nslots if hasattr(LAYOUT, "nslots") else 10**6, 1)
    with pytest.raises(ValueError):
        core.write_record(0, 1, b"k" * 17, b"", 1, 0, 0)  # key longer than key_size
    with pytest.raises(ValueError):
        core.write_record(0, 1, b"k", b"v" * 25, 1, 0, 0)  # value longer than value_size
    with pytest.raises(IndexError):
        core.remove_bucket(c_eng.seg.mask + 1)
    c_eng.close()
    with pytest.raises(ValueError, match="closed"):
        core.find(b"k", 1)
