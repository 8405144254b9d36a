"""The compiled core (shmstore._native) against the layout and the pure-Python core.

What the C protocol does under concurrency is proven in tests/test_native_tsan.py; the
protocol tests (seqlock, read cache, get_many, snapshots, crash) run on both cores
(conftest ``core``). Here: the constants and the hash agree with ``_layout``; the
switch between cores; the extension's own arguments are hostile-proof; and, on raw
format-4 segments (no coordinator), the compiled reader and writer against the spec:
Core's stores byte for byte against a Python transcription of the spec, the class
rule and counters, page moves, clamps to the page, access bytes, the read cache's page
check.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmstore
from shmstore import _compiled
from shmstore import _layout as L

native = pytest.importorskip("shmstore._native", reason="the compiled core is not built")
_cwrite = pytest.importorskip("shmstore._cwrite", reason="the compiled core is not built")

#: a single-class store (every page assigned at creation) and a memory store of four
#: 1 MiB pages and four classes (64, 128, 256, 352), its pages free at creation
SMALL = L.Layout(capacity=8, key_size=16, value_size=24)
MEM = L.Layout(capacity=64, key_size=16, value_size=300, memory=4 << 20, growth=2.0)


@pytest.fixture
def raw(names):
    """Make segments straight from a Layout (create_segment + Segment, no coordinator):
    ``raw(layout)`` returns (segment, its _cwrite.Core, one FreeRing per class holding
    the slots of the pages assigned at creation). Everything is closed and unlinked at
    teardown, even on failure."""
    import posix_ipc

    from shmstore._shm import create_segment, unlink_quietly
    from shmstore.coordinator._freering import FreeRing

    made = []

    def make(layout: L.Layout):
        n = names("nat")
        seg = create_segment(n, layout, 0)
        seg.q[L.H_STATE] = L.STATE_READY  # what a coordinator stores once it serves
        core = _cwrite.Core(seg.mm, seg.sizes())
        made.append((n, seg, core))
        refs, classes = seg.slot_refs()
        frees = [FreeRing(int(r) for r, c in zip(refs, classes) if c == k) for k in range(len(seg.classes))]
        return seg, core, frees

    def drop(seg) -> None:
        """Close and unlink a segment now (hypothesis examples make many)."""
        for item in [m for m in made if m[1] is seg]:
            made.remove(item)
            item[2].close()
            seg.close()
            unlink_quietly(posix_ipc.SharedMemory, L.data_name(item[0]))

    make.drop = drop
    try:
        yield make
    finally:
        for n, seg, core in made:
            core.close()
            seg.close()
            unlink_quietly(posix_ipc.SharedMemory, L.data_name(n))


def test_word_indices_match_the_layout():
    for attr in ("H_STATE", "H_EPOCH", "H_INDEX_GEN", "H_LAST_DELETE_EPOCH", "H_BATCH_SEQ", "H_COUNT",
                 "STATE_READY", "FLAG_FREE", "FLAG_EVICTED", "SLOT_HEADER", "H_NCLASSES", "H_CLASSES",
                 "CLASS_WORDS", "C_SLOT_SIZE", "C_PAGES", "C_RECORDS", "C_ASKED", "MAX_CLASSES", "SLOT_UNIT",
                 "MIN_SLOT", "PTE_CLASS_BITS", "HEADER_SIZE"):
        assert getattr(native, attr) == getattr(L, attr), attr


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_key_hash_is_the_layouts(kb):
    assert native.key_hash(kb) == L.key_hash(kb)


def test_key_hash_at_the_modulus_edges():
    P = L.HASH_PRIME
    for x in (P - 1, P, P + 1, 2 * P, (1 << 64) - 1, (1 << 128) - 1, P * (1 << 70)):
        kb = x.to_bytes((x.bit_length() + 7) // 8, "little")
        assert native.key_hash(kb) == L.key_hash(kb), hex(x)
    for n in (8, 16, 4096):
        assert native.key_hash(b"\xff" * n) == L.key_hash(b"\xff" * n)


def test_native_flag_follows_the_environment():
    """NATIVE is True by default and False under SHMSTORE_NO_EXTENSIONS=1."""
    code = "import shmstore; print(shmstore.NATIVE)"
    env = {k: v for k, v in os.environ.items() if k != _compiled.ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    env[_compiled.ENV] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_missing_extension_fails_loudly():
    """Not asked for pure Python, and the extension does not load: the import fails,
    naming both fixes, rather than silently reading through the slow core."""
    code = "import sys; sys.modules['shmstore._native'] = None; import shmstore"
    env = {k: v for k, v in os.environ.items() if k != _compiled.ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "SHMSTORE_NO_EXTENSIONS=1" in out.stderr and "compiler" in out.stderr


def test_sizes_that_do_not_fit_the_mapping_are_refused(raw):
    """The extension never trusts sizes it is given: a layout larger than the mapping,
    pages or a page table that leave it, an index mask that is not a power of two minus
    one, a key size meta cannot hold, a ref shift that makes no page, refs that are not
    whole pages: each is refused before any load, by the reader and the writer alike."""
    seg, _, _ = raw(SMALL)
    good = seg.sizes()
    slot0, sw, nrefs, idx0, mask, ksz, vsz, size, pt0, shift = good
    native.Mapping(seg.mm, good, lambda waited: None).close()
    _cwrite.Core(seg.mm, good).close()

    def with_(**kw):
        names = ("slot0", "sw", "nrefs", "idx0", "mask", "ksz", "vsz", "size", "pt0", "shift")
        return tuple(kw.get(n, v) for n, v in zip(names, good))

    bad = [
        with_(size=size * 4),  # mapping size beyond the mapping
        with_(nrefs=nrefs * 1000),  # pages beyond the mapping
        with_(nrefs=nrefs + 1),  # refs that are not whole pages
        with_(mask=mask - 1),  # mask not 2**k - 1
        with_(ksz=70000),  # key size beyond what meta can hold
        with_(sw=3),  # a ref is 16 bytes, two words
        with_(shift=1),  # a page under 64 bytes
        with_(shift=40),
        with_(pt0=8),  # the page table inside the header
        with_(pt0=slot0),  # the page table over the pages
        with_(slot0=pt0),  # the pages over the page table
        with_(idx0=slot0 + 2 * nrefs - 8),  # the index over the last page
        with_(idx0=size // 8 - 2),  # the index past the end
        with_(vsz=1 << 40),  # value length beyond meta's 32 bits
        with_(vsz=(16 << shift)),  # the largest record does not fit a page
    ]
    for sizes in bad:
        with pytest.raises(ValueError):
            native.Mapping(seg.mm, sizes, lambda waited: None)
        with pytest.raises(ValueError):
            _cwrite.Core(seg.mm, sizes)
    with pytest.raises(TypeError):
        native.Mapping(seg.mm, good[:8], lambda waited: None)
    with pytest.raises(TypeError):
        _cwrite.Core(seg.mm, good[:8])


@pytest.mark.parametrize("damage", ["zero", "too-many", "unsorted", "unaligned", "too-small", "too-big"])
def test_a_damaged_class_table_is_refused(raw, damage):
    """Scans take the slot sizes from the header's class table: one no layout makes
    (count 0 or over 64; sizes not ascending, not multiples of 16, under 64 bytes,
    over a page) is refused when the mapping is made."""
    seg, _, _ = raw(MEM)
    q = seg.q
    n = q[L.H_NCLASSES]
    cw = [L.class_word(c, L.C_SLOT_SIZE) for c in range(n)]
    if damage == "zero":
        q[L.H_NCLASSES] = 0
    elif damage == "too-many":
        q[L.H_NCLASSES] = L.MAX_CLASSES + 1
    elif damage == "unsorted":
        q[cw[0]], q[cw[1]] = q[cw[1]], q[cw[0]]
    elif damage == "unaligned":
        q[cw[1]] += 8
    elif damage == "too-small":
        q[cw[0]] = 48
    else:
        q[cw[-1]] = seg.page_size * 2
    with pytest.raises(ValueError, match="class table"):
        native.Mapping(seg.mm, seg.sizes(), lambda waited: None)
    with pytest.raises(ValueError, match="class table"):
        _cwrite.Core(seg.mm, seg.sizes())


def test_a_reader_outlives_its_handle_safely(served):
    """A get bound method kept after close() holds its own export of the mapping: the
    mapping cannot be unmapped under it, so using it never touches freed memory."""
    if _compiled.native is None:
        pytest.skip("the pure-Python core runs here (SHMSTORE_NO_EXTENSIONS)")
    n, _ = served(capacity=8)
    s = shmstore.connect(n)
    s.put("k", "v")
    get = s.get
    s.close()
    assert get("k") == "v"  # still the old mapping, alive while this method is
    del get


def test_get_many_leaves_odd_keys_to_the_general_path(store):
    store.put("a", 1)
    store.put(b"b", 2)

    class Key(str):
        pass

    assert store.get_many([Key("a"), b"b", "zz"], default=0) == [1, 2, 0]
    with pytest.raises(shmstore.InvalidKeyError):
        store.get_many(["a", ""])
    with pytest.raises(shmstore.KeyTooLongError):
        store.get_many(["a", "x" * 1000])
    with pytest.raises(shmstore.InvalidKeyError):
        store.get_many(["a", 3.5])
    assert store.get_many([]) == []


def test_stats_count_get_many_keys_as_reads_not_cache_hits(store):
    store.put("a", 1)
    before = store.stats()
    store.get_many(["a"] * 40 + ["missing"] * 10)
    after = store.stats()
    assert after.reads - before.reads == 50
    assert after.read_cache_hits == before.read_cache_hits


# -- the layout's slots, through the compiled core (no coordinator) ---------------------
#
# A reference of the writer's stores, written from the spec (shmstore/_layout.py and
# the format-4 rules), word for word in Python: the C core must leave the same bytes.


def _ref_write_record(seg, ref, epoch, kb, vb, version, expiry, flags):
    q, mv = seg.q, seg.mv
    w = seg.slot0 + seg.slot_words * ref
    q[w] = 2 * epoch + 1
    q[w + 1] = version
    q[w + 2] = expiry
    q[w + 3] = len(kb) | flags << 16 | len(vb) << 32
    ko = 8 * w + L.SLOT_HEADER
    padded = kb + bytes(-len(kb) % 8)
    mv[ko:ko + len(padded)] = padded
    mv[ko + len(padded):ko + len(padded) + len(vb)] = vb
    q[w] = 2 * epoch + 2


def _ref_free_record(seg, ref, epoch, flags=L.FLAG_FREE):
    q = seg.q
    w = seg.slot0 + seg.slot_words * ref
    q[w] = 2 * epoch + 1
    q[w + 3] = (q[w + 3] & 0xFFFF) | flags << 16
    q[w + 2] = 0
    q[w] = 2 * epoch + 2


def _ref_page_assign(seg, page, cls, epoch):
    q = seg.q
    q[seg.pt0 + page] = epoch << L.PTE_CLASS_BITS | (cls + 1)
    size = seg.classes[cls]
    for i in range(seg.page_size // size):
        w = seg.slot0 + seg.slot_words * ((page << seg.ref_shift) + i * size // L.SLOT_UNIT)
        q[w] = 2 * epoch + 1
        q[w + 1] = 0
        q[w + 2] = 0
        q[w + 3] = L.FLAG_FREE << 16
        q[w] = 2 * epoch + 2


class RefEngine:
    """The spec's put/delete with the class rule and the class counters, on a segment,
    in Python (what Core.put / Core.delete must do)."""

    def __init__(self, seg, frees, capacity):
        self.seg, self.frees, self.capacity = seg, frees, capacity

    def _find(self, kb):
        seg, q = self.seg, self.seg.q
        h = L.key_hash(kb)
        pos = h & seg.mask
        while True:
            b = q[seg.idx0 + pos]
            if b == 0:
                return pos, -1
            if b >> 32 == h:
                ref = (b & 0xFFFFFFFF) - 1
                w = seg.slot0 + 2 * ref
                ko = 8 * w + L.SLOT_HEADER
                if q[w + 3] & 0xFFFF == len(kb) and bytes(seg.mv[ko:ko + len(kb)]) == kb:
                    return pos, ref
            pos = (pos + 1) & seg.mask

    def _account(self, cls, dr, da):
        q = self.seg.q
        q[L.class_word(cls, L.C_RECORDS)] = (q[L.class_word(cls, L.C_RECORDS)] + dr) % 2**64
        q[L.class_word(cls, L.C_ASKED)] = (q[L.class_word(cls, L.C_ASKED)] + da) % 2**64

    def _release(self, ref, epoch):
        seg = self.seg
        meta = seg.q[seg.slot0 + 2 * ref + 3]
        cls = seg.class_of(ref)
        self._account(cls, -1, -L.slot_need(meta & 0xFFFF, meta >> 32))
        _ref_free_record(seg, ref, epoch)
        self.frees[cls].append(ref)

    def put(self, kb, vb, expiry, epoch):
        seg, q = self.seg, self.seg.q
        need = L.slot_need(len(kb), len(vb))
        cls = seg.layout.class_for(need)
        pos, old = self._find(kb)
        if old < 0 and q[L.H_COUNT] >= self.capacity:
            return -1
        reserve = 1 if seg.page_size // seg.classes[cls] >= 4 else 0
        if len(self.frees[cls]) < (1 if old >= 0 else reserve + 1):
            return -1
        new = self.frees[cls].pop()
        seq = q[seg.slot0 + 2 * new]
        if seq >= 2 and (seq - 1) >> 1 > q[L.H_FEED_HORIZON]:
            q[L.H_FEED_HORIZON] = (seq - 1) >> 1
        _ref_write_record(seg, new, epoch, kb, vb, epoch, expiry, 0)
        q[seg.idx0 + pos] = L.key_hash(kb) << 32 | (new + 1)
        self._account(cls, 1, need)
        if old >= 0:
            self._release(old, epoch)
        else:
            q[L.H_COUNT] += 1
        q[L.H_EPOCH] = epoch
        return epoch

    def delete(self, kb, epoch):
        seg, q = self.seg, self.seg.q
        pos, ref = self._find(kb)
        if ref < 0:
            return False
        q[L.H_LAST_DELETE_EPOCH] = epoch
        g = q[L.H_INDEX_GEN]
        q[L.H_INDEX_GEN] = g + 1
        i = j = pos
        while True:  # backward-shift deletion, as protocol.h's shm_remove_bucket
            j = (j + 1) & seg.mask
            b = q[seg.idx0 + j]
            if b == 0:
                break
            home = (b >> 32) & seg.mask
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                q[seg.idx0 + i] = b
                i = j
        q[seg.idx0 + i] = 0
        q[L.H_INDEX_GEN] = g + 2
        q[L.H_COUNT] -= 1
        self._release(ref, epoch)
        q[L.H_EPOCH] = epoch
        return True


def _image(seg) -> bytes:
    mv = seg.mv
    o = L.H_INSTANCE * 8
    return bytes(mv[:o]) + bytes(mv[o + 8:])


_keys = st.sampled_from([b"a", b"b", b"k1", b"k2", b"key-3", b"longer-key-04", b"sixteen-bytes-05",
                         b"x" * 16, b"yy", b"\x00", b"\x00\x01"])
_mem_ops = st.lists(st.one_of(
    st.tuples(st.just("put"), _keys, st.integers(0, 300), st.sampled_from([0, 0, 7, 2**64 - 1])),
    st.tuples(st.just("delete"), _keys),
    st.tuples(st.just("assign"), st.integers(0, 3), st.integers(0, 3)),
), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=_mem_ops)
def test_core_leaves_the_bytes_the_spec_says(raw, seq):
    """Core.put / delete / page_assign on a memory store of four classes against the
    spec's stores written in Python (RefEngine): the same segment bytes (records with
    zero-padded keys and values at align8(klen), freed slots, stamped new pages, page
    entries, class counters, buckets, count, epochs, feed horizon), the same answers
    and the same free rings, op for op. A page moves only when none of its slots holds
    a record (the engine evicts first)."""
    c_seg, core, c_frees = raw(MEM)
    p_seg, _, p_frees = raw(MEM)
    try:
        _compare(c_seg, core, c_frees, p_seg, p_frees, seq)
    finally:
        raw.drop(c_seg)
        raw.drop(p_seg)


def _compare(c_seg, core, c_frees, p_seg, p_frees, seq):
    ref = RefEngine(p_seg, p_frees, MEM.capacity)
    epoch = 0
    expiry = {}
    for i, op in enumerate(seq):
        if op[0] == "put":
            vb = bytes([i % 251]) * op[2]
            got = core.put(op[1], vb, op[3], epoch + 1, c_frees, MEM.capacity)
            want = ref.put(op[1], vb, op[3], epoch + 1)
            assert got == want, (i, op)
            if got > 0:
                epoch = got
                expiry[op[1]] = op[3]
        elif op[0] == "delete":
            got = core.delete(op[1], epoch + 1, c_frees)
            assert got == ref.delete(op[1], epoch + 1), (i, op)
            epoch += got
        else:
            page, cls = op[1], op[2]
            old = c_seg.page_class(page)
            lo, hi = page << c_seg.ref_shift, (page + 1) << c_seg.ref_shift
            if old >= 0:
                free_here = sum(1 for r in c_frees[old] if lo <= r < hi)
                if free_here != c_seg.page_size // c_seg.classes[old]:
                    continue  # a record lives there
            epoch += 1
            for frees, seg in ((c_frees, c_seg), (p_frees, p_seg)):
                if old >= 0:
                    keep = [r for r in frees[old] if not lo <= r < hi]
                    frees[old].clear()
                    frees[old].extend(keep)
                    seg.q[L.class_word(old, L.C_PAGES)] -= 1
            core.page_assign(page, cls, epoch)
            _ref_page_assign(p_seg, page, cls, epoch)
            step = c_seg.classes[cls] // L.SLOT_UNIT
            for frees, seg in ((c_frees, c_seg), (p_frees, p_seg)):
                seg.q[L.class_word(cls, L.C_PAGES)] += 1
                frees[cls].extend(range(lo, lo + step * (seg.page_size // seg.classes[cls]), step))
        assert [list(f) for f in c_frees] == [list(f) for f in p_frees], (i, op)
        if _image(c_seg) != _image(p_seg):
            a, b = c_seg.q, p_seg.q
            diff = [w for w in range(len(a)) if w != L.H_INSTANCE and a[w] != b[w]]
            pytest.fail(f"after op {i} {op!r}: words {diff[:10]} differ")
    # Every record the reference holds reads back through the C reader.
    for kb in {op[1] for op in seq if op[0] != "assign"}:
        pos, r = ref._find(kb)
        got = c_seg.lookup(kb)
        if r < 0 or expiry[kb] == 7:  # missing, or expired at 7 ns past the Unix epoch
            assert got is None
        else:
            w = p_seg.slot0 + 2 * r
            assert got is not None and got[0] == r and got[1] == p_seg.q[w]


def test_put_follows_the_class_rule(raw):
    """An insert takes a free slot of its class only if one is left beyond the class's
    reserve (1: the spare for updates, where a page holds 4 slots or more; else 0) and
    the store is under capacity; an update only if one is. Otherwise put is -1 and
    put_frame 0, and nothing changed (bytes and rings)."""
    import msgspec

    seg, core, frees = raw(MEM)
    core.page_assign(0, 1, 1)  # class 1: 128-byte slots, 8192 of them
    frees[1].extend(int(r) for r in seg.slot_refs(cls=1)[0])
    keep = list(frees[1])[:2]
    frees[1].clear()
    frees[1].extend(keep)  # two free slots left in class 1
    v = b"v" * 60  # need 32 + 8 + 60 = 100: class 1
    assert core.put(b"a", v, 0, 2, frees, 64) == 2
    assert len(frees[1]) == 1
    before = _image(seg)
    assert core.put(b"b", v, 0, 3, frees, 64) == -1  # an insert needs two
    enc = msgspec.msgpack.encode
    assert core.put_frame(enc([1, 1, b"b", v, 0]), 3, frees, 64) == 0
    assert core.put(b"c", b"", 0, 3, frees, 64) == -1  # class 0 has no slot at all
    assert _image(seg) == before and list(frees[1]) == keep[1:]
    assert core.put(b"a", v + b"w", 0, 3, frees, 64) == 3  # an update needs one
    assert list(frees[1]) == [keep[0]]  # the old slot came back
    assert core.put_frame(enc([1, 1, b"a", v, 0]), 4, frees, 64) == 4
    # Capacity: an insert into a class with room is still refused at capacity.
    frees[1].extend(int(r) for r in seg.slot_refs(cls=1)[0][10:20])
    assert core.put(b"b", v, 0, 5, frees, 1) == -1
    assert core.put(b"b", v, 0, 5, frees, 2) == 5
    q = seg.q
    assert q[L.H_COUNT] == 2
    assert q[L.class_word(1, L.C_RECORDS)] == 2
    assert q[L.class_word(1, L.C_ASKED)] == 2 * L.slot_need(1, 60)
    assert core.delete(b"a", 6, frees) and core.delete(b"b", 7, frees)
    assert q[L.class_word(1, L.C_RECORDS)] == 0 and q[L.class_word(1, L.C_ASKED)] == 0


def test_a_class_of_fewer_than_four_slots_a_page_keeps_no_spare(raw):
    big = L.Layout(capacity=1, key_size=16, value_size=5000)  # 3 slots in a 16 KiB page
    seg, core, frees = raw(big)
    assert seg.page_size // seg.classes[0] < 4
    v = b"v" * 5000
    n = len(frees[0])
    for i in range(n):  # the last free slot too
        assert core.put(b"k%d" % i, v, 0, i + 1, frees, n) == i + 1
    assert not frees[0]
    assert core.put(b"k0", v, 0, n + 1, frees, n) == -1  # an update needs one
    assert core.delete(b"k1", n + 1, frees)
    assert core.put(b"k0", v, 0, n + 2, frees, n) == n + 2


def test_an_update_into_another_class_moves_the_accounting(raw):
    seg, core, frees = raw(MEM)
    for page, cls in ((0, 0), (1, 3)):
        core.page_assign(page, cls, 1)
        frees[cls].extend(int(r) for r in seg.slot_refs(cls=cls)[0])
    q = seg.q
    assert core.put(b"k", b"s", 0, 2, frees, 64) == 2
    r0 = seg.lookup(b"k")[0]
    assert seg.class_of(r0) == 0 and core.class_of(r0) == 0
    assert core.put(b"k", b"L" * 300, 0, 3, frees, 64) == 3
    r1, _, _, value, _ = seg.lookup(b"k")
    assert value == b"L" * 300 and seg.class_of(r1) == 3
    assert [q[L.class_word(c, L.C_RECORDS)] for c in range(4)] == [0, 0, 0, 1]
    assert [q[L.class_word(c, L.C_ASKED)] for c in range(4)] == [0, 0, 0, L.slot_need(1, 300)]
    assert frees[0][0] == r0  # appended to the ring's end: pop() returns it last
    assert seg.read_slot(r0)[3] == L.FLAG_FREE


def test_core_refuses_bad_refs_pages_and_classes(raw):
    seg, core, frees = raw(MEM)
    core.page_assign(1, 2, 1)  # class 2: 256-byte slots = 16 refs each
    base = 1 << seg.ref_shift
    core.write_record(base + 16, 2, b"k", b"v", 2, 0, 0)  # a slot: fine
    for bad in (seg.nslots, 2**64 - 1, base + 8, 0, base - 16):  # out of range, mid-slot, free page 0
        with pytest.raises(IndexError):
            core.write_record(bad, 2, b"k", b"v", 2, 0, 0)
        with pytest.raises(IndexError):
            core.free_record(bad, 2)
        with pytest.raises(IndexError):
            core.set_bucket(0, 1, bad)
    with pytest.raises(ValueError):
        core.write_record(base, 2, b"k", b"v" * 300, 2, 0, 0)  # 32+8+300 > 256
    with pytest.raises(ValueError):
        core.free_record(base, 2, 2)  # flags without FLAG_FREE
    with pytest.raises(ValueError):
        core.free_record(base, 2, 1 << 16)
    with pytest.raises(IndexError):
        core.page_assign(seg.npages, 0, 3)
    with pytest.raises(IndexError):
        core.page_assign(0, len(seg.classes), 3)
    with pytest.raises(TypeError):
        core.put(b"k", b"v", 0, 3, frees[:2], 64)  # one ring per class
    with pytest.raises(TypeError):
        core.delete(b"k", 3, frees[0])
    frees[2].extend([base + 8, base + 32])  # a ring whose next ref is no slot
    with pytest.raises(IndexError):
        core.put(b"k", b"v" * 200, 0, 3, frees, 64)
    with pytest.raises(ValueError):
        core.set_access(bytearray(seg.nslots // 4 - 1))
    with pytest.raises(BufferError):
        core.set_access(b"\0" * (seg.nslots // 4))  # read-only
    with pytest.raises(ValueError):
        core.write_record(base, 1, b"k" * 17, b"", 1, 0, 0)  # key longer than key_size


def test_a_page_move_leaves_no_stale_read(raw):
    """After a move, a ref of the old geometry that is not a slot of the new class
    reads as None (not a slot), one that is reads the new free slot; the change feed
    scans the new geometry only; a bucket left pointing into a free page makes the
    reader retry (it never reads a free page's bytes as a record)."""
    seg, core, frees = raw(MEM)
    core.page_assign(0, 0, 1)  # 64-byte slots: refs 0, 4, 8, ...
    frees[0].extend(int(r) for r in seg.slot_refs(cls=0)[0])
    assert core.put(b"k", b"v", 0, 2, frees, 64) == 2
    r = seg.lookup(b"k")[0]
    assert r == 0 and seg.read_slot(4)[3] == L.FLAG_FREE
    assert core.put(b"k2", b"v", 0, 3, frees, 64) == 3
    assert sorted(seg.core.changed_keys(2)) == [b"k", b"k2"]
    assert core.delete(b"k", 4, frees) and core.delete(b"k2", 5, frees)
    core.page_assign(0, 2, 6)  # 256-byte slots: refs 0, 16, 32, ...
    assert seg.read_slot(4) is None  # not a slot any more
    assert seg.read_slot(16) == (2 * 6 + 2, 0, 0, L.FLAG_FREE, b"", b"")
    assert seg.core.changed_keys(2) == []  # the new slots have klen 0
    # A bucket into a free page: the reader retries until on_stall gives up.
    h = L.key_hash(b"ghost")
    seg.q[seg.idx0 + (h & seg.mask)] = h << 32 | ((2 << seg.ref_shift) + 1)
    seg.stall_timeout = 0.01

    class Stalled(Exception):
        pass

    def give_up(waited):
        raise Stalled

    m = native.Mapping(seg.mm, seg.sizes(), give_up)
    m.stall_timeout = 0.01
    try:
        with pytest.raises(Stalled):
            m.lookup(b"ghost")
        assert m.retries > 0
        assert m.read_slot(2 << seg.ref_shift) is None  # a free page holds no slot
        assert m.read_slot(seg.nslots) is None and m.read_slot(2**64 - 1) is None  # no slot
        seg.q[seg.pt0 + 3] = 0x7F  # an entry naming a class the table lacks: no slot there
        assert m.read_slot(3 << seg.ref_shift) is None
        # The page's last whole slot is one; the bytes after it (1 MiB % 352) are not.
        core.page_assign(1, 3, 7)
        last = (1 << seg.ref_shift) + (seg.page_size // 352 - 1) * 22
        assert m.read_slot(last) is not None and m.read_slot(last + 22) is None
    finally:
        m.close()


def test_lengths_are_clamped_to_the_page(raw):
    """A meta word claiming more than the page holds (a torn or damaged one) is clamped
    to the page's end: a read of the page's last slot never leaves the page."""
    seg, core, frees = raw(MEM)
    core.page_assign(0, 3, 1)  # 352-byte slots: the last ends 2976 bytes... (1 MiB / 352)
    last = int(seg.slot_refs(cls=3)[0][-1])
    end = seg.page_end(last)
    w = seg.slot0 + 2 * last
    q = seg.q
    seg.mv[end:end + 64] = b"N" * 64  # the next page's first bytes: never read
    for klen, vlen in ((16, 2**32 - 1), (16, 300), (12, 300)):
        q[w + 3] = klen | (vlen << 32)
        key_off = 8 * w + 32
        got = seg.read_slot(last)
        room = end - key_off
        assert len(got[4]) == min(klen, room)
        assert len(got[5]) == min(vlen, MEM.value_size, max(0, room - (-(-min(klen, room) // 8) * 8)))
        assert b"N" not in got[4] + got[5]
    # A ref in the last 16 bytes of a page (no slot of any class; a damaged bucket):
    # its key and value clamp to nothing, whatever meta says.
    tail = ((1 << seg.ref_shift) - 1)
    core.page_assign(1, 0, 2)
    q[seg.slot0 + 2 * tail + 3] = 16 | (300 << 32)
    h = L.key_hash(b"t")
    q[seg.idx0 + (h & seg.mask)] = h << 32 | (tail + 1)
    assert seg.lookup(b"t") is None


def _mem_store_with(raw, records):
    seg, core, frees = raw(MEM)
    for page in (0, 1):  # classes 0 and 1 (64 and 128 bytes)
        core.page_assign(page, page, 1)
        frees[page].extend(int(r) for r in seg.slot_refs(cls=page)[0])
    e = 1
    for kb, vb in records:
        e += 1
        assert core.put(kb, vb, 0, e, frees, 64) == e
    return seg, core, frees


def test_every_hit_sets_its_access_byte(raw):
    """Reader(access=...): a get, a cache hit and a get_many hit each set byte ref >> 2
    of the access segment to 1; misses touch nothing; the coordinator's puts clear the
    byte of the slot they write (Core.set_access: a new record is unreferenced until a
    reader reads it, as Engine._store does)."""
    import mmap

    import msgspec

    seg, core, frees = _mem_store_with(raw, [])
    acc = mmap.mmap(-1, MEM.access_size)
    rd = None
    try:
        core.set_access(acc)
        enc = msgspec.msgpack.encode
        acc[:] = b"\1" * len(acc)
        for i in range(3):
            assert core.put(b"k%d" % i, enc(i), 0, 2 + i, frees, 64) == 2 + i
        refs = [seg.lookup(b"k%d" % i)[0] for i in range(3)]
        assert [acc[r >> 2] for r in refs] == [0, 0, 0]
        assert bytes(acc).count(0) == 3
        assert core.put_frame(enc([1, 1, b"k9", enc(9), 0]), 5, frees, 64) == 5
        r9 = seg.lookup(b"k9")[0]
        assert acc[r9 >> 2] == 0 and bytes(acc).count(0) == 4
        core.set_access(None)
        assert core.put(b"k8", enc(8), 0, 6, frees, 64) == 6  # access off: no byte
        assert bytes(acc).count(0) == 4
        acc[:] = bytes(len(acc))

        def stale(key, default):
            raise AssertionError(f"the general path for {key!r}")

        rd = native.Reader(seg.core, seg.mm, seg.sizes(), msgspec.msgpack.decode,
                           lambda b: msgspec.msgpack.decode(b), stale, None, 16, acc)
        assert rd.get(b"k1") == 1 and acc[refs[1] >> 2] == 1
        assert rd.get(b"nope") is None and sum(acc[:]) == 1
        acc[refs[1] >> 2] = 0
        assert rd.get(b"k1") == 1 and rd.cache_hits() == 1 and acc[refs[1] >> 2] == 1  # a cache hit
        assert rd.get_many([b"k0", b"k2", b"zz"], 0) == [0, 2, 0]
        assert acc[refs[0] >> 2] == acc[refs[2] >> 2] == 1 and sum(acc[:]) == 3
        with pytest.raises(ValueError):
            native.Reader(seg.core, seg.mm, seg.sizes(), msgspec.msgpack.decode, msgspec.msgpack.decode,
                          stale, None, 16, bytearray((seg.nslots - 1) >> 2))
        with pytest.raises(BufferError):  # read-only
            native.Reader(seg.core, seg.mm, seg.sizes(), msgspec.msgpack.decode, msgspec.msgpack.decode,
                          stale, None, 16, bytes(seg.nslots))
    finally:
        rd = None  # its export of acc goes with it
        core.set_access(None)
        acc.close()


def test_the_read_cache_rechecks_the_page_entry(raw):
    """A cached record is answered again only while its page keeps its entry: a
    coordinator that rewrites the entry (a move back to the same class at a later
    epoch) makes the next get read afresh."""
    import msgspec

    seg, core, frees = _mem_store_with(raw, [(b"k", msgspec.msgpack.encode("v"))])

    def stale(key, default):
        raise AssertionError(key)

    rd = native.Reader(seg.core, seg.mm, seg.sizes(), msgspec.msgpack.decode, msgspec.msgpack.decode,
                       stale, None, 16)
    assert rd.get(b"k") == "v" and rd.get(b"k") == "v" and rd.cache_hits() == 1
    pte = seg.q[seg.pt0 + 0]
    seg.q[seg.pt0 + 0] = pte + (1 << L.PTE_CLASS_BITS)  # same class, a later epoch
    assert rd.get(b"k") == "v" and rd.cache_hits() == 1  # read afresh, not from the cache
    assert rd.get(b"k") == "v" and rd.cache_hits() == 2


def test_get_many_compares_whole_key_words(raw):
    """Keys that share their first words, and a key that is another's prefix, are told
    apart (klen first, then ceil(klen / 8) words)."""
    import msgspec

    enc = msgspec.msgpack.encode
    ks = [b"abcdefgh", b"abcdefghi", b"abcdefgh12345678", b"abcdefgh1234567", b"a"]
    seg, core, frees = _mem_store_with(raw, [(k, enc(i)) for i, k in enumerate(ks)])
    rd = native.Reader(seg.core, seg.mm, seg.sizes(), msgspec.msgpack.decode, msgspec.msgpack.decode,
                       lambda k, d: d, None, 0)
    assert rd.get_many(ks + [b"abcdefg", b"abcdefgh1"], -1) == [0, 1, 2, 3, 4, -1, -1]
