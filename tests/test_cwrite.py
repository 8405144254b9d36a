"""The compiled write core (``shmstore._cwrite``) against the Python one.

The coordinator's Engine makes its slot and index stores through ``_cwrite.Core`` when
the compiled core runs, from Python otherwise (``coordinator/_engine.py``). Both must
leave byte-identical segments for the same ops: records (keys zero-padded to 8 bytes,
values after them), freed slots (key kept, value dropped), expiry words, buckets after
backward-shift deletions, the index generation, H_EPOCH, H_COUNT, H_LAST_DELETE_EPOCH,
H_BATCH_SEQ, the feed horizon, and on format 4 the page table, the pages' new slots,
the class counters and (LRU) the access bytes; and the same free rings per class.
Checked here by hypothesis over random op sequences on a single-class store (slot
reuse, full stores, colliding keys) and on a memory store of four size classes in
three pages (pages handed out, moved between classes, records evicted), plus the
constants the C file repeats.
"""

from __future__ import annotations

import numpy as np
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
from shmstore.coordinator._evict import make_evictor

pytestmark = pytest.mark.skipif(_compiled.native is None, reason="the compiled core is off (SHMSTORE_NO_EXTENSIONS)")

LAYOUT = L.Layout(capacity=8, key_size=16, value_size=24)
#: a memory store: three 1 MiB pages for four classes (64, 128, 256 and 352 bytes)
MEM = L.Layout(capacity=24, key_size=16, value_size=300, memory=3 << 20, growth=2.0)

# Keys of 1..16 bytes from a small set (so they repeat, collide and reuse slots with
# keys of other lengths: the zero padding of the key area is exercised).
keys = st.sampled_from([b"a", b"b", b"k1", b"k2", b"key-3", b"longer-key-04", b"sixteen-bytes-05",
                        b"x" * 16, b"yy", b"zzz", b"\x00", b"\x00\x01"])
values = st.binary(max_size=24)
# Values of every class of MEM (up to its value_size).
mem_values = st.one_of(st.binary(max_size=24), st.integers(0, 300).map(lambda n: b"v" * n))
expiries = st.sampled_from([0, 0, 1, 10**18, 2**64 - 1])
put = st.tuples(st.just("put"), keys, values, expiries)
delete = st.tuples(st.just("delete"), keys)
cas = st.tuples(st.just("cas"), keys, values, st.integers(0, 40), expiries)
incr = st.tuples(st.just("incr"), keys, st.integers(-5, 5))
batch = st.tuples(st.just("batch"), st.lists(st.one_of(
    st.tuples(st.just(C.OP_PUT), keys, values, expiries).map(list),
    st.tuples(st.just(C.OP_DELETE), keys).map(list)), max_size=6))
ops = st.lists(st.one_of(put, put, delete, cas, incr, batch), max_size=40)
mem_ops = st.lists(st.one_of(
    st.tuples(st.just("put"), keys, mem_values, expiries),
    st.tuples(st.just("put"), keys, mem_values, expiries),
    delete,
    st.tuples(st.just("cas"), keys, mem_values, st.integers(0, 40), expiries),
    incr,
    st.tuples(st.just("batch"), st.lists(st.one_of(
        st.tuples(st.just(C.OP_PUT), keys, mem_values, expiries).map(list),
        st.tuples(st.just(C.OP_DELETE), keys).map(list)), max_size=6)),
), max_size=40)


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
    """The segment's bytes, its random instance id left out (and the access bytes)."""
    mv = eng.seg.mv
    o = L.H_INSTANCE * 8
    acc = b"" if eng.access is None else eng.access.tobytes()
    return bytes(mv[:o]) + bytes(mv[o + 8:]) + acc


def _same(a: Engine, b: Engine) -> str | None:
    """None if the two engines' segments (and access bytes) are identical, else which
    words differ."""
    wa = np.frombuffer(a.seg.mm, np.uint64).copy()
    wb = np.frombuffer(b.seg.mm, np.uint64).copy()
    wa[L.H_INSTANCE] = wb[L.H_INSTANCE] = 0
    if not np.array_equal(wa, wb):
        return f"words {np.flatnonzero(wa != wb)[:10].tolist()} differ"
    if a.access is not None and not np.array_equal(a.access, b.access):
        return f"access bytes {np.flatnonzero(a.access != b.access)[:10].tolist()} differ"
    return None


@pytest.fixture
def engines(names):
    """Make pairs of engines (compiled, Python) on fresh segments: ``pair(layout=LAYOUT,
    lru=False)``; with lru, each has its own access bytes (the compiled core's through
    Core.set_access) and a CLOCK evictor, as the server sets them up."""
    made = []

    def pair(layout: L.Layout = LAYOUT, lru: bool = False):
        out = []
        for compiled in (True, False):
            n = names("cw")
            seg = create_segment(n, layout, 0)
            e = Engine(seg, compiled=compiled)
            made.append((n, e))
            if lru:
                buf = bytearray(layout.access_size)
                e.access = np.frombuffer(buf, np.uint8)
                if e.core is not None:
                    e.core.set_access(buf)
                e.evictor = make_evictor(L.EVICT_LRU, e, e.access)
                seg.q[L.H_EVICTION] = L.EVICT_LRU
            e.rebuild_free_list()
            out.append(e)
        return out

    try:
        yield pair
    finally:
        for n, e in made:
            if not e.seg.closed:
                _close(e)
            unlink_quietly(posix_ipc.SharedMemory, L.data_name(n))


def _close(e: Engine) -> None:
    if e.core is not None:
        e.core.set_access(None)
    e.access = e.evictor = None
    e.close()
    e.seg.close()


def _drop(engs):
    for e in engs:
        if not e.seg.closed:
            name = e.seg.name
            _close(e)
            unlink_quietly(posix_ipc.SharedMemory, L.data_name(name))


def _run_pair(c_eng: Engine, py_eng: Engine, seq: list) -> None:
    assert c_eng.core is not None and py_eng.core is None
    for i, op in enumerate(seq):
        rc, rp = _apply(c_eng, op), _apply(py_eng, op)
        assert rc == rp, f"op {i} {op!r}: compiled {rc!r}, Python {rp!r}"
        assert c_eng.epoch == py_eng.epoch
        assert [list(f) for f in c_eng.frees] == [list(f) for f in py_eng.frees], f"after op {i} {op!r}"
        assert c_eng.free_pages == py_eng.free_pages
        assert c_eng.next_expiry == py_eng.next_expiry
        diff = _same(c_eng, py_eng)
        if diff:
            pytest.fail(f"after op {i} {op!r} of {seq!r}: {diff}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=ops)
def test_compiled_and_python_engines_leave_identical_segments(engines, seq):
    c_eng, py_eng = engines()
    try:
        _run_pair(c_eng, py_eng, seq)
    finally:
        _drop([c_eng, py_eng])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=mem_ops, lru=st.booleans())
def test_memory_stores_are_identical_too(engines, seq, lru):
    """A memory store of four classes in three pages: records land in the class their
    size needs, pages are handed out and moved between classes, full classes refuse
    (or, with LRU, evict); both engines leave the same bytes, rings and free pages."""
    c_eng, py_eng = engines(MEM, lru)
    try:
        _run_pair(c_eng, py_eng, seq)
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
    assert (_cwrite.H_CLASSES, _cwrite.C_RECORDS, _cwrite.C_ASKED) == (L.H_CLASSES, L.C_RECORDS, L.C_ASKED)
    assert (_cwrite.FLAG_FREE, _cwrite.FLAG_EVICTED) == (L.FLAG_FREE, L.FLAG_EVICTED)
    assert (_cwrite.C_HEAD, _cwrite.C_TAIL, _cwrite.C_DONE, _cwrite.C_REPLY_LEN) == (
        C.C_HEAD, C.C_TAIL, C.C_DONE, C.C_REPLY_LEN)
    for kb in (b"a", b"user:1", b"x" * 8, b"y" * 9, bytes(range(1, 200)), b"\xff" * 64):
        assert _cwrite.key_hash(kb) == L.key_hash(kb)


def test_core_refuses_bad_arguments(engines):
    c_eng, _ = engines()
    core = c_eng.core
    with pytest.raises(IndexError):
        core.free_record(LAYOUT.nrefs, 1)  # past the pages
    with pytest.raises(IndexError):
        core.free_record(1, 1)  # inside slot 0
    with pytest.raises(IndexError):
        core.page_assign(LAYOUT.npages, 0, 1)
    with pytest.raises(IndexError):
        core.page_assign(0, 1, 1)  # one class only
    with pytest.raises(ValueError):
        core.write_record(0, 1, b"k" * 17, b"", 1, 0, 0)  # key longer than key_size
    with pytest.raises(ValueError):
        core.write_record(0, 1, b"k", b"v" * 25, 1, 0, 0)  # value longer than value_size
    with pytest.raises(IndexError):
        core.remove_bucket(c_eng.seg.mask + 1)
    c_eng.close()
    with pytest.raises(ValueError, match="closed"):
        core.find(b"k", 1)


def _frames():
    import msgspec

    enc = msgspec.msgpack.encode
    valid = st.builds(lambda op, wait, kb, vb, exp: enc([op, wait, kb, vb, exp]),
                      st.sampled_from([1, 1, 1, 2, 3]), st.sampled_from([0, 1, True, False, 2]),
                      st.binary(max_size=20), st.binary(max_size=30), st.sampled_from([0, 0, 0, 5, 2**40]))
    other = st.builds(lambda x: enc(x), st.one_of(
        st.lists(st.one_of(st.integers(-3, 300), st.binary(max_size=4), st.text(max_size=3)), max_size=6),
        st.tuples(st.just(1), st.just(0), st.text(max_size=8), st.binary(max_size=8), st.just(0))))

    def mutate(b: bytes, how: int, at: int, byte: int) -> bytes:
        at %= max(1, len(b))
        if how == 0:
            return b[:at]  # truncated
        if how == 1:
            return b + bytes([byte])  # trailing bytes
        return b[:at] + bytes([byte]) + b[at + 1:]  # one byte changed

    mutated = st.builds(mutate, valid, st.integers(0, 2), st.integers(0, 64), st.integers(0, 255))
    return st.one_of(valid, valid, other, mutated, st.binary(max_size=40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(_frames(), max_size=30))
def test_put_frame_applies_exactly_the_plain_puts_the_general_path_would(engines, frames):
    """The coordinator's C fast path (Core.put_frame) against the general path: a frame
    it applies decodes (msgspec, the client-frame decoder) to a put without expiry that
    Engine.put applies to the same segment; a frame it declines leaves the segment as
    it was, byte for byte."""
    import msgspec

    from shmstore.coordinator._ops import Put, decode_request

    c_eng, py_eng = engines()
    try:
        for f in frames:
            before = _image(c_eng)
            v = c_eng.core.put_frame(f, c_eng.epoch + 1, c_eng.frees, c_eng.capacity)
            if not v:
                assert _image(c_eng) == before, f"declined frame {f!r} changed the segment"
                continue
            c_eng.epoch = v
            try:
                op = decode_request(f)
            except msgspec.DecodeError as e:
                pytest.fail(f"put_frame applied {f!r}, which the general path refuses: {e}")
            assert type(op) is Put and op.expiry == 0 and op.wait == f[2] & 1, (f, op)
            py_eng.check_key(op.key)
            py_eng.check_value(op.value)
            assert py_eng.put(op.key, op.value, 0) == v
            assert _image(c_eng) == _image(py_eng), f"after {f!r}"
            assert [list(f) for f in c_eng.frees] == [list(f) for f in py_eng.frees]
    finally:
        _drop([c_eng, py_eng])


def test_put_frame_declines_a_full_store_and_takes_updates(engines):
    import msgspec

    c_eng, _ = engines()
    core = c_eng.core
    enc = msgspec.msgpack.encode
    for i in range(LAYOUT.capacity):
        v = core.put_frame(enc([1, 1, b"k%d" % i, b"v", 0]), c_eng.epoch + 1, c_eng.frees, c_eng.capacity)
        assert v == c_eng.epoch + 1
        c_eng.epoch = v
    before = _image(c_eng)
    assert core.put_frame(enc([1, 0, b"new", b"v", 0]), c_eng.epoch + 1, c_eng.frees, c_eng.capacity) == 0
    assert _image(c_eng) == before
    v = core.put_frame(enc([1, 0, b"k3", b"w" * 24, 0]), c_eng.epoch + 1, c_eng.frees, c_eng.capacity)
    assert v and c_eng.get(b"k3") == (v, b"w" * 24)


R = 128
RING_OFS = 256  # after the control words, as in a client block


def _valid_ring(payloads: list[bytes], start: int) -> tuple[bytes, int]:
    """A ring of R bytes holding ``payloads`` framed from offset ``start`` (wrapping with
    a padding mark as the client does); returns it and the HEAD after them."""
    import struct

    ring = bytearray(R)
    head = start
    for p in payloads:
        need = 8 + ((len(p) + 7) & ~7)
        if need > R:
            break
        off = head % R
        if off + need > R:
            struct.pack_into("<I", ring, off, C.PAD_MARK)
            head += R - off
            off = 0
        if head + need - start > R:
            break
        struct.pack_into("<II", ring, off, len(p), 0)
        ring[off + 8 : off + 8 + len(p)] = p
        head += need
    return bytes(ring), head


rings = st.one_of(
    st.builds(lambda ps, start: (*_valid_ring(ps, start), start),
              st.lists(st.binary(max_size=40), max_size=6), st.integers(0, 40).map(lambda k: 8 * k)),
    st.tuples(st.binary(min_size=R, max_size=R), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    st.tuples(st.binary(min_size=R, max_size=R), st.integers(0, 4 * R), st.integers(0, 4 * R)),
)


@settings(max_examples=500, deadline=None)
@given(ring=rings, flip=st.one_of(st.none(), st.tuples(st.integers(0, R - 1), st.integers(0, 255))),
       head_delta=st.sampled_from([0, 0, 0, 1, -8, 8, R]))
def test_ring_take_walks_a_hostile_ring_as_the_python_walk_does(ring, flip, head_delta):
    """``_cwrite.ring_take`` (the compiled coordinator's drain) against
    ``coordinator._server.walk_ring`` (the pure one) on valid, corrupted and random rings
    and HEAD/TAIL words: the same frames, the same stopping TAIL, the same refusal.
    The C walk reads only the ring (its buffer is exactly the block's size here)."""
    import mmap

    from shmstore import _cwrite
    from shmstore.coordinator._server import walk_ring

    data, head, tail = ring
    if flip is not None:
        data = data[:flip[0]] + bytes([flip[1]]) + data[flip[0] + 1:]
    head = (head + head_delta) % 2**64
    mm = mmap.mmap(-1, RING_OFS + R)
    try:
        mm[RING_OFS:RING_OFS + R] = data
        q = memoryview(mm).cast("Q")
        q[C.C_HEAD] = head
        q[C.C_TAIL] = tail
        q.release()
        got = _cwrite.ring_take(mm, 0, RING_OFS, R, tail)
        mv = memoryview(mm)
        want = walk_ring(mv, RING_OFS, R, head, tail)
        mv.release()
        assert got == want, (data, head, tail)
    finally:
        mm.close()


def test_ring_publish_then_take_round_trips(names):
    """A client's frames through ring_publish (wrapping, padding) come out of ring_take
    whole and in order; a frame with no room yet is refused (-1) without a store."""
    import mmap

    from shmstore import _cwrite

    mm = mmap.mmap(-1, RING_OFS + R)
    try:
        head = tail = 0
        sent = []
        for k in range(40):
            p = bytes([k]) * (k % 23)
            h = _cwrite.ring_publish(mm, 0, RING_OFS, R, head, p)
            if h < 0:
                frames, tail, bad = _cwrite.ring_take(mm, 0, RING_OFS, R, tail)
                assert bad is None and frames == sent
                _cwrite.store_release(mm, C.C_TAIL, tail)
                sent = []
                h = _cwrite.ring_publish(mm, 0, RING_OFS, R, head, p)
            assert h > head
            head = h
            sent.append(p)
        frames, tail, bad = _cwrite.ring_take(mm, 0, RING_OFS, R, tail)
        assert bad is None and frames == sent and tail == head
    finally:
        mm.close()
