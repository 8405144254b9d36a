"""The rules of the epoch-stamped seqlock (DESIGN.md section 2), rules 1 to 3, one test
(or more) each; rules 4 to 7 are in test_seqlock_index.py, the spies in tests/helpers/seqlock.py.

1. Unique stamps: every write op takes a new epoch; no slot carries one even seq twice.
2. Never trust bytes before validation: lengths read mid-write are clamped.
3. Bounded spinning: an odd index generation left by a dead coordinator raises
   CoordinatorUnavailableError; the next coordinator repairs it.

Protocol tests emulate a reader straddling writes deterministically: the coordinator is
stopped, the test maps the segment writable and drives ``coordinator._engine.Engine``
itself, and a reader's ``Segment.q`` / ``Segment.mv`` are replaced by spies that
forward every access to the real views and run the "writer" at a chosen point.
"""

from __future__ import annotations

import json
import subprocess
import threading

import msgspec
import numpy as np
import pytest

import shmstore
from shmstore import _layout as L
from shmstore._readers import make_readers
from shmstore._segment import Segment
from shmstore._shm import open_segment
from shmstore.coordinator._engine import Engine
from tests.helpers.seqlock import (
    MiniWriter, SlotGeometry, bucket_pos, engine_side, mini_store, result_of, spied, writer_side,
)
from tests.helpers.processes import python, reap

#: Every test here runs on both cores: the compiled one and pure Python (conftest.core).
pytestmark = pytest.mark.usefixtures("core")

enc = msgspec.msgpack.encode
dec = msgspec.msgpack.decode




# -- rule 1: unique stamps ------------------------------------------------------------


def test_every_write_op_stamps_with_a_new_epoch(store):
    """Rule 1 (unique stamps, ABA): through the public API, every op advances the
    epoch by one (a batch by its op count), every slot it changes gets a stamp newer
    than any before, stamps only grow, and no slot ever shows one even seq with two
    different contents. Watched through the read-only numpy view of the slot words."""
    seg = store._seg
    refs, classes = seg.slot_refs()  # every slot (a single-class store: all pages assigned)
    assert len(set(classes.tolist())) == 1
    size = seg.classes[0]
    words = np.ndarray((len(seg.mm) // 8,), np.uint64, buffer=seg.mm)
    # one slot's bytes at every ref (16 bytes apart), indexed by the slots' refs
    at_ref = np.ndarray(((len(seg.mm) - 8 * seg.slot0 - size) // L.SLOT_UNIT + 1, size), np.uint8,
                        buffer=seg.mm, offset=8 * seg.slot0, strides=(L.SLOT_UNIT, 1))
    assert not words.flags.writeable and not at_ref.flags.writeable
    seq_words = seg.slot0 + seg.slot_words * refs
    slot_of = {r: i for i, r in enumerate(refs.tolist())}
    seen: dict[tuple[int, int], bytes] = {}

    def snapshot():
        return seg.q[L.H_EPOCH], words[seq_words], at_ref[refs][:, 8:]

    def note(seqs, body):
        for slot in range(len(refs)):
            key = (slot, int(seqs[slot]))
            content = body[slot].tobytes()
            assert seen.setdefault(key, content) == content, (
                f"slot {slot} carries stamp {key[1]} with two different contents")

    def check(nops: int, op) -> None:
        e0, seq0, body0 = snapshot()
        op()
        e1, seq1, body1 = snapshot()
        assert e1 - e0 == nops, f"{nops} op(s) moved the epoch {e0} -> {e1}"
        assert (seq1 >= seq0).all(), "a slot stamp went back"
        assert not (seq1 & np.uint64(1)).any(), "a slot is odd after the op returned"
        changed = np.flatnonzero((body1 != body0).any(axis=1))
        assert len(changed), "the op changed no slot"
        for slot in changed.tolist():
            s = int(seq1[slot])
            assert 2 * e0 + 2 < s <= 2 * e1 + 2, (
                f"slot {slot} rewritten but stamped {s}, not with one of epochs {e0 + 1}..{e1}")
        note(seq1, body1)

    _, seqs, body = snapshot()
    note(seqs, body)
    for i in range(8):
        check(1, lambda i=i: store.put("k", "v" * i))
    check(1, lambda: store.delete("k"))
    check(1, lambda: store.put("k", "back"))

    def batch_same_key():
        with store.batch() as b:
            b.put("k", 1)
            b.put("k", 2)
            b.delete("k")
            b.put("k", 3)

    check(4, batch_same_key)
    for _ in range(3):
        check(1, lambda: store.incr("n"))
    check(1, lambda: store.compare_and_set("k", 4, version=store.version("k")))

    # The ABA case itself: a slot observed before and after two writes of its key
    # (copy-on-write moves the record away, then back into the same slot).
    ref0 = seg.lookup(b"k")[0]
    slot0 = slot_of[ref0]
    before = int(words[seq_words[slot0]])
    content_before = at_ref[ref0, 8:].tobytes()
    for i in range(len(refs) + 1):
        store.put("k", 100 + i)
        if seg.lookup(b"k")[0] == ref0:
            break
    else:
        pytest.fail(f"slot {ref0} never carried key 'k' again")
    assert i >= 1, "the record must have left the slot and come back"
    assert at_ref[ref0, 8:].tobytes() != content_before
    assert int(words[seq_words[slot0]]) != before, "a rewritten slot kept its old stamp (ABA)"


class StampRecorder(Engine):
    """The real Engine, noting every stamp it leaves in each slot."""

    def __init__(self, seg: Segment) -> None:
        super().__init__(seg, compiled=False)  # the Python stores, which it hooks
        self.stamps: dict[int, list[int]] = {}

    def _note(self, slot: int) -> None:
        self.stamps.setdefault(slot, []).append(self.q[self._slot_word(slot)])

    def _write_slot(self, slot, *args) -> None:
        super()._write_slot(slot, *args)
        self._note(slot)

    def _stamp_free(self, slot, epoch, *args) -> None:
        super()._stamp_free(slot, epoch, *args)
        self._note(slot)


def test_no_slot_gets_the_same_stamp_twice_even_inside_a_batch(names):
    """Rule 1 (unique stamps) where the public API cannot look: inside one batch.

    A batch that writes one key several times moves its record away from a slot and
    back into it; with one epoch per batch (instead of per op) that slot would get
    the same even seq twice. The engine's every stamp per slot must strictly grow."""
    from shmstore._channel import OP_DELETE, OP_PUT

    with engine_side(names(), capacity=4, key_size=8, value_size=32) as (n, seg, _):
        eng = StampRecorder(seg)
        eng.rebuild_free_list()
        e0 = eng.epoch
        eng.put(b"a", enc(0))
        # every slot (the pages may hold more than capacity + 1) taken more than twice
        nslots = len(seg.slot_refs()[0])
        ops = [[OP_PUT, b"a", enc(i), 0] for i in range(1, 2 * nslots + 6)]
        ops += [[OP_DELETE, b"a"], [OP_PUT, b"a", enc(9), 0], [OP_PUT, b"b", enc(1), 0]]
        eng.batch(ops)
        eng.delete(b"a")
        eng.put(b"a", enc(10))
        assert eng.epoch - e0 == 1 + len(ops) + 2, "not one epoch per op"
        reused = [s for s, st in eng.stamps.items() if len(st) >= 3]
        assert reused, f"no slot was written repeatedly: {eng.stamps}"
        for slot, stamps in eng.stamps.items():
            assert all(s % 2 == 0 for s in stamps), (slot, stamps)
            assert stamps == sorted(set(stamps)), f"slot {slot} got a stamp twice or going back: {stamps}"


def _straddle_setup(seg: Segment, eng: Engine):
    """Key b"k" in some slot X with a long value; returns (geometry, v1, bucket word)."""
    v1 = enc("a" * 50)
    eng.put(b"k", v1)
    g = SlotGeometry(seg, seg.lookup(b"k")[0])
    bucket = seg.q[seg.idx0 + bucket_pos(seg, b"k")]
    return g, v1, bucket


def _two_writes_back_into(seg: Segment, eng: Engine, g: SlotGeometry) -> bytes:
    """Rewrite b"k" until its record is back in slot ``g.slot``; return its value."""
    for i in range(1, len(seg.slot_refs()[0]) + 2):
        v = enc("b" * i)
        eng.put(b"k", v)
        if seg.lookup(b"k")[0] == g.slot:
            assert i >= 2, "the record must leave the slot first"
            return v
    raise AssertionError("the record never came back to its first slot")


@pytest.mark.parametrize("path", ["read_slot", "lookup", "get"])
def test_a_read_straddling_two_writes_of_a_slot_is_rejected(names, path):
    """Rule 1 (unique stamps), the protocol itself: a reader takes s1 of slot X and
    copies meta; then two writes happen (the record moves out of X and back into it,
    so the bucket word ends up identical: only the stamp can tell); then it copies the
    value bytes. The bytes are from write 3, the length from write 1: the read must be
    rejected (s1 != s2) and retried, never returned. Checked for read_slot, lookup
    and the Store.get fast path."""
    with engine_side(names(), compiled=None, capacity=4, key_size=8, value_size=64) as (n, wseg, eng):
        g, v1, bucket = _straddle_setup(wseg, eng)
        reader = open_segment(n)
        try:
            fired = []
            with spied(reader) as (q, mv, log):
                trigger = g.kofs if path == "get" else g.vofs

                def straddle(start, stop):
                    if start == trigger and not fired:
                        fired.append(_two_writes_back_into(wseg, eng, g))

                mv.before_slice = straddle
                if path == "read_slot":
                    seq, _, _, _, key, value = reader.read_slot(g.slot)
                    assert key == b"k" and seq == wseg.q[g.w]
                elif path == "lookup":
                    slot, seq, _, value, _ = reader.lookup(b"k")
                    assert slot == g.slot and seq == wseg.q[g.w]
                else:
                    rd = make_readers(reader, lambda raw: raw, lambda *a: pytest.fail("stale"))
                    get = rd.get
                    value = get("k")
                    del rd
                assert fired, "the straddling writes never ran"
                v_final = fired[0]
                assert wseg.q[wseg.idx0 + bucket_pos(wseg, b"k")] == bucket, "bucket changed: not the ABA case"
                assert value == v_final, f"returned {value!r}: neither write's value ({v1!r}, {v_final!r})"
                seq_reads = [e for e in log if e[0] == "qr" and e[1] == g.w]
                assert len(seq_reads) >= 3, "the straddled read was not retried"
        finally:
            reader.close()


def test_a_reused_stamp_would_let_a_torn_value_through(names):
    """Rule 1 (unique stamps) is load-bearing: the same straddle as above, but the
    writer leaves slot X with the stamp the reader saw first (what one epoch for two
    writes would do). Validation then passes and read_slot returns bytes of two
    writes. This shows the straddle test above can tell the difference."""
    with engine_side(names(), compiled=None, capacity=4, key_size=8, value_size=64) as (n, wseg, eng):
        g, v1, _ = _straddle_setup(wseg, eng)
        s_old = wseg.q[g.w]
        reader = open_segment(n)
        try:
            fired = []
            with spied(reader) as (q, mv, log):

                def straddle(start, stop):
                    if start == g.vofs and not fired:
                        fired.append(_two_writes_back_into(wseg, eng, g))
                        wseg.q[g.w] = s_old  # the forbidden reuse of a stamp

                mv.before_slice = straddle
                _, _, _, _, _, value = reader.read_slot(g.slot)
            v_final = fired[0]
            assert value not in (v1, v_final) and value.startswith(v_final), value
        finally:
            reader.close()


# -- rule 2: never trust bytes before validation -------------------------------------

GARBAGE_META = (1 << 64) - 1  # key length 65535, every flag, value length 2**32 - 1


@pytest.mark.parametrize("path", ["read_slot", "lookup", "get"])
def test_garbage_lengths_read_mid_write_are_clamped(names, path):
    """Rule 2 (never trust bytes before validation): the reader loads the meta word
    while the slot is odd and holds a garbage meta (huge key and value lengths). Every
    copy it makes must stay inside the slot's key/value area, nothing may raise, and
    after validation fails it must return the completed write's value."""
    with engine_side(names(), compiled=None, capacity=4, key_size=8, value_size=64) as (n, wseg, eng):
        g, v1, _ = _straddle_setup(wseg, eng)
        wq, wmv = wseg.q, wseg.mv
        v2 = enc({"final": 2})
        reader = open_segment(n)
        try:
            with spied(reader) as (q, mv, log):
                started = []

                def begin():  # the writer starts rewriting X in place: seq odd, garbage
                    e = eng.next_epoch()
                    started.append(e)
                    wq[g.w] = 2 * e + 1
                    wq[g.w + L.S_META] = GARBAGE_META
                    wmv[g.kofs : g.end] = b"\xff" * (g.end - g.kofs)
                    q.before_read[g.w] = finish  # before the reader's s2 load

                def finish():  # ... and completes it
                    e = started[0]
                    wq[g.w + L.S_VERSION] = e
                    wq[g.w + L.S_META] = 1 | (len(v2) << 32)
                    wmv[g.kofs : g.vofs] = b"k".ljust(g.vofs - g.kofs, b"\0")  # zero-padded
                    wmv[g.vofs : g.vofs + len(v2)] = v2
                    wq[g.w] = 2 * e + 2
                    eng.publish()

                q.before_read[g.w + L.S_META] = begin
                if path == "read_slot":
                    value = reader.read_slot(g.slot)[5]
                elif path == "lookup":
                    value = reader.lookup(b"k")[3]
                else:
                    rd = make_readers(reader, lambda raw: raw, lambda *a: pytest.fail("stale"))
                    get = rd.get
                    value = get("k")
                    del rd
            assert started, "the reader never loaded the meta word"
            assert ("qr", g.w + L.S_META, GARBAGE_META) in log, "the garbage meta was not read"
            slices = [(a, b) for kind, a, b in log if kind == "mr"]
            outside = [(a, b) for a, b in slices if not (g.kofs <= a <= b <= g.end)]
            assert not outside, f"copies outside slot {g.slot}'s bytes [{g.kofs}, {g.end}): {outside}"
            assert value == v2
        finally:
            reader.close()


# -- format 4: page entries and page ends ---------------------------------------------
#
# A page handed from one class to another changes which bytes are a slot's header: a
# reader holding a stale reference can find its old seq word untouched (it now lies in
# the middle of another slot) and its bucket not yet changed, and only the page's entry
# tells it that what it copied is now someone else's bytes.

#: key 8, value 72: classes 64, 80, 112 bytes; a reference is a 16-byte unit
PAGE_MOVE_LAYOUT = dict(capacity=64, key_size=8, value_size=72, memory=2 << 20)


def _page_move_setup(w: MiniWriter):
    """Key b"k" (a 24-byte value) in the 64-byte slot at ref 4 (bytes 64..127) of page
    0, class 0. Moved to class 2 (112 bytes), those bytes are: 64..111 the value area
    of new slot 0 (untouched by the move, so the old seq word stays), 112..127 the
    header of new slot 1 (the tail of the old value is overwritten with its stamps)."""
    seg = w.seg
    assert seg.classes[:3] == (64, 80, 112), seg.classes
    w.assign_page(0, 0)
    w.put(b"d", enc("d" * 10))  # ref 0
    v1 = enc("a" * 22)  # 24 bytes: need 32 + 8 + 24 = 64
    ref = w.put(b"k", v1)
    assert ref == 4, ref
    return v1, SlotGeometry(seg, ref)


@pytest.mark.parametrize("path", ["read_slot", "lookup", "get"])
def test_a_read_straddling_a_page_move_is_rejected(names, python_core, path):
    """Format 4, "Reading a slot" step 4: the reader loads the page entry, the seq and
    the meta of key k's slot; the page is then handed to another class (entry first,
    then the new slots' headers), which overwrites the second half of k's value while
    leaving k's seq word as it was; then the reader copies the value. k's bucket goes
    only after the reader re-checked it (the real coordinator unlinks before it moves;
    this order leaves the page entry as the one word that tells), so the copy must be
    rejected by the entry alone, and the read ends with k's value as it was or a miss,
    never the mix."""
    with mini_store(names(), L.Layout(**PAGE_MOVE_LAYOUT)) as (w, reader):
        v1, g = _page_move_setup(w)
        seq_before = w.q[g.w]
        fired = []
        with spied(reader) as (q, mv, log):
            trigger = g.kofs if path == "get" else g.vofs  # get copies key and value at once

            def move(start, stop):
                if start == trigger and not fired:
                    fired.append(w.assign_page(0, 2))
                    q.before_read[g.page_word] = unlink  # the entry's re-check comes last

            def unlink():
                w.delete(b"k", free_slot=False)

            mv.before_slice = move
            if path == "read_slot":
                r = reader.read_slot(g.slot)
                value = None if r is None else r[5]
            elif path == "lookup":
                r = reader.lookup(b"k")
                value = None if r is None else r[3]
            else:
                rd = make_readers(reader, lambda raw: raw, lambda *a: pytest.fail("stale"))
                value = rd.get("k")
                del rd
        assert fired, "the page move never ran"
        assert w.q[g.w] == seq_before, "the old seq word changed: not the case under test"
        torn = bytes(reader.mv[g.vofs : g.vofs + len(v1)])
        assert torn != v1 and torn[:8] == v1[:8], "the move did not tear the value"
        assert value in (v1, None), f"returned {value!r}: the torn copy is {torn!r}"
        pte_reads = [i for i, e in enumerate(log) if e[:2] == ("qr", g.page_word)]
        copies = [i for i, e in enumerate(log) if e[0] == "mr"]
        assert pte_reads and copies and pte_reads[-1] > copies[0], "the page entry was not read after the copy"


def test_a_page_move_that_kept_its_entry_would_let_a_torn_value_through(names, python_core):
    """The page entry's check is load-bearing: the same move as above, but the writer
    puts the page's old entry back (what an entry without the move's epoch in it could
    do). Seq, bucket and entry then all validate and read_slot returns a value that is
    half the old record's, half the new slots' headers."""
    with mini_store(names(), L.Layout(**PAGE_MOVE_LAYOUT)) as (w, reader):
        v1, g = _page_move_setup(w)
        old_pte = w.q[g.page_word]
        fired = []
        with spied(reader) as (q, mv, log):

            def move(start, stop):
                if start == g.vofs and not fired:
                    fired.append(w.assign_page(0, 2))
                    w.q[g.page_word] = old_pte  # the forbidden reuse of an entry

            mv.before_slice = move
            value = reader.read_slot(g.slot)[5]
        assert fired
        assert value != v1 and value[:8] == v1[:8], value


def test_a_bucket_into_a_free_page_is_waited_out(names, python_core):
    """Step 1: a page entry of 0 (a page being moved, its records' buckets about to go)
    makes the reader re-read the bucket rather than read the slot; once the bucket is
    gone the read ends as a miss."""
    with mini_store(names(), L.Layout(**PAGE_MOVE_LAYOUT)) as (w, reader):
        v1, g = _page_move_setup(w)
        w.q[g.page_word] = 0  # the move's first store, as it were
        with spied(reader) as (q, mv, log):
            rounds = []

            def unlink():  # the coordinator removes k's bucket a few reads later
                rounds.append(1)
                if len(rounds) == 3:
                    w.delete(b"k")
                else:
                    q.before_read[g.page_word] = unlink

            q.before_read[g.page_word] = unlink
            assert reader.lookup(b"k") is None
            assert len(rounds) == 3
            assert not [e for e in log if e[0] == "mr"], "a slot of a free page was copied"


def test_a_bucket_naming_a_slot_past_the_pages_is_corruption(names, python_core):
    """A bucket whose slot field is beyond the pages' references (or 0 - 1) is damage,
    never an address to read: lookup and get raise CorruptionError; read_slot of a
    reference out of range answers None."""
    with mini_store(names(), L.Layout(**PAGE_MOVE_LAYOUT)) as (w, reader):
        _, g = _page_move_setup(w)
        word = w.seg.idx0 + bucket_pos(w.seg, b"k")
        rd = make_readers(reader, lambda raw: raw, lambda *a: pytest.fail("stale"))
        for bad_field in (reader.nslots + 1, (1 << 32) - 1, 0):
            w.q[word] = (L.key_hash(b"k") << 32) | bad_field if bad_field else L.key_hash(b"k") << 32
            with pytest.raises(shmstore.CorruptionError, match="damaged"):
                reader.lookup(b"k")
            with pytest.raises(shmstore.CorruptionError):
                rd.get("k")
        assert reader.read_slot(reader.nslots) is None and reader.read_slot(-1) is None
        del rd


@pytest.mark.parametrize("path", ["read_slot", "lookup", "get"])
def test_garbage_lengths_are_clamped_to_the_page(names, python_core, path):
    """Format 4, step 3: in a memory store a 64-byte slot's key and value lengths are
    clamped to key_size / value_size AND to the end of the slot's page, so a reader
    meeting a garbage meta mid-write in the last slot of a page never copies bytes of
    the next page (value_size alone would allow 4000 bytes)."""
    lay = L.Layout(capacity=64, key_size=8, value_size=4000, memory=2 << 20)
    with mini_store(names(), lay) as (w, reader):
        seg = w.seg
        w.assign_page(0, 0)
        last = (seg.page_size - seg.classes[0]) // L.SLOT_UNIT  # the page's last 64-byte slot
        w.free[0] = [last]
        v1 = enc("a" * 20)
        assert w.put(b"k", v1) == last
        g = SlotGeometry(seg, last)
        page_end = seg.page_end(last)
        assert g.end == page_end and g.vofs + lay.value_size > page_end
        v2 = enc(7)
        with spied(reader) as (q, mv, log):
            started = []

            def begin():  # a write in place of X: seq odd, garbage meta
                e = w.next_epoch()
                started.append(e)
                w.q[g.w] = 2 * e + 1
                w.q[g.w + L.S_META] = GARBAGE_META
                q.before_read[g.w] = finish  # before the reader's s2 load

            def finish():
                w.write_record(last, started[0], b"k", v2)
                w.publish()

            q.before_read[g.w + L.S_META] = begin
            if path == "read_slot":
                value = reader.read_slot(last)[5]
            elif path == "lookup":
                value = reader.lookup(b"k")[3]
            else:
                rd = make_readers(reader, lambda raw: raw, lambda *a: pytest.fail("stale"))
                value = rd.get("k")
                del rd
        assert started and ("qr", g.w + L.S_META, GARBAGE_META) in log
        slices = [(a, b) for kind, a, b in log if kind == "mr"]
        outside = [(a, b) for a, b in slices if not (g.kofs <= a <= b <= page_end)]
        assert not outside, f"copies past the page's end {page_end}: {outside}"
        assert value == v2


GARBAGE_WRITER = r"""
import os, random, sys, time, msgspec
from shmstore import _layout as L
from shmstore._liveness import process_start_ms
from shmstore._shm import open_segment
name, slot = sys.argv[1], int(sys.argv[2])
seg = open_segment(name, writable=True)
q, mv = seg.q, seg.mv
# Stand in for the coordinator, so readers waiting on an odd seq keep waiting.
q[L.H_COORD_PID] = os.getpid()
q[L.H_COORD_START] = process_start_ms(os.getpid())
q[L.H_COORD_INCARNATION] = 12345
w = seg.slot0 + slot * seg.slot_words
kofs = w * 8 + L.SLOT_HEADER
end = w * 8 + seg.classes[seg.class_of(slot)]  # the slot's last byte + 1
kb = bytes(mv[kofs : kofs + (q[w + 3] & 0xFFFF)])
vofs = kofs + L.align(len(kb), 8)
epoch = q[L.H_EPOCH]
rnd = random.Random(1)
announced = False
while True:
    epoch += 1
    q[w] = 2 * epoch + 1
    q[w + 3] = rnd.getrandbits(64) | 0xFFFF | (0xFFFFFFF0 << 32)  # huge lengths
    mv[kofs:end] = os.urandom(end - kofs)
    vb = msgspec.msgpack.encode([epoch, bytes([epoch & 255]) * (epoch % 40)])
    q[w + 1] = epoch
    q[w + 3] = len(kb) | (len(vb) << 32)
    mv[kofs:vofs] = kb + bytes(vofs - kofs - len(kb))
    mv[vofs : vofs + len(vb)] = vb
    q[w] = 2 * epoch + 2
    q[L.H_EPOCH] = epoch
    # Leave the slot even for ~20 us, as any real writer does between writes: a writer
    # that never stops rewriting one slot starves every seqlock reader (it is even for
    # ~0.1 us at a time), and the readers here would finish only when the scheduler
    # happened to preempt it right there. The slot is still odd ~20% of the time.
    t_end = time.perf_counter() + 20e-6
    while time.perf_counter() < t_end:
        pass
    if not announced:  # the slot holds a consistent record from here on
        print("ready", flush=True)
        announced = True
    for _ in range(rnd.randrange(30)):  # stay even a little while
        pass
"""

GARBAGE_READER = r"""
import json, sys, time, msgspec, shmstore
from shmstore import _layout as L
name, slot, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = shmstore.connect(name)
seg = s._seg
w = seg.slot0 + slot * seg.slot_words

def consistent(seq, version, vb):
    epoch, pad = msgspec.msgpack.decode(vb)
    return seq == 2 * epoch + 2 and version == epoch and pad == bytes([epoch & 255]) * (epoch % 40)

reads = bad = errors = garbage = 0
examples = []
print("ready", flush=True)
sys.stdin.readline()
# At least n reads, and on until the hazard was met at least once: on a loaded machine
# the writer can sit off the CPU for all of the first n (the deadline guards a hang).
deadline = time.monotonic() + 60
i = -1
while True:
    i += 1
    if i >= n and (garbage or time.monotonic() > deadline):
        break
    meta = seg.q[w + 3]  # unvalidated, only to show the hazard was live
    if (meta & 0xFFFF) > seg.key_size or (meta >> 32) > seg.value_size:
        garbage += 1
    try:
        if i % 3 == 0:
            seq, version, _, flags, kb, vb = seg.read_slot(slot)
            good = kb == b"k" and not flags & L.FLAG_FREE and consistent(seq, version, vb)
        elif i % 3 == 1:
            r = seg.lookup(b"k")
            good = r is not None and r[0] == slot and consistent(r[1], r[2], r[3])
        else:
            epoch, pad = s.get("k")
            good = pad == bytes([epoch & 255]) * (epoch % 40)
        reads += 1
        if not good:
            bad += 1
            examples.append(i)
    except Exception as e:
        errors += 1
        examples.append(repr(e)[:200])
print(json.dumps({"reads": reads, "bad": bad, "errors": errors, "garbage": garbage,
                  "examples": examples[:5]}), flush=True)
"""


def test_concurrent_garbage_writes_never_reach_readers(served):
    """Rule 2 (never trust bytes before validation), concurrently: a process rewrites
    one slot over and over, each time first filling it with random bytes and a meta
    word of huge lengths under an odd seq. Two reader processes read it through
    read_slot, lookup and get: every read must be a complete write (value consistent
    with its stamp), nothing may raise or crash; the readers also peek at the raw meta
    to show they really met garbage lengths."""
    n, coord = served(capacity=4, key_size=8, value_size=128)
    with shmstore.connect(n) as s:
        s.put("k", [0, b""])
        slot = s._seg.lookup(b"k")[0]
    coord.stop()  # the garbage writer is the only writer
    writer = python(GARBAGE_WRITER, n, str(slot))
    readers = [python(GARBAGE_READER, n, str(slot), "20000", stdin=subprocess.PIPE) for _ in range(2)]
    try:
        for p in [writer, *readers]:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for r in readers:
            r.stdin.write("go\n")
            r.stdin.flush()
        outs = [r.communicate(timeout=100) for r in readers]
        results = [json.loads(out) if r.returncode == 0 and out else {"rc": r.returncode, "err": err[-2000:]}
                   for r, (out, err) in zip(readers, outs)]
        ok = all(
            "rc" not in x and x["reads"] >= 20000 and x["bad"] == 0 and x["errors"] == 0 and x["garbage"] > 0
            for x in results)
        assert ok, results
    finally:
        reap(writer, *readers)


# -- rule 3: bounded spinning ---------------------------------------------------------

FAKE_COORDINATOR = r"""
import os, sys, time
from shmstore import _layout as L
from shmstore._liveness import process_start_ms
from shmstore._shm import open_segment
seg = open_segment(sys.argv[1], writable=True)
q = seg.q
q[L.H_COORD_PID] = os.getpid()
q[L.H_COORD_START] = process_start_ms(os.getpid())
q[L.H_COORD_INCARNATION] = int.from_bytes(os.urandom(8), "little") | 1
q[L.H_INDEX_GEN] += 1  # odd: "moving buckets"
# A backward shift cut short leaves one entry in two buckets: copy a live bucket
# into an empty one.
idx = seg.idx0
live = next(p for p in range(seg.nbuckets) if q[idx + p])
empty = next(p for p in range(seg.nbuckets) if not q[idx + p])
q[idx + empty] = q[idx + live]
print("ready", flush=True)
time.sleep(120)
"""


def test_odd_index_generation_waits_then_raises_when_the_coordinator_died(served, names):
    """Rule 3 (bounded spinning): a (fake) coordinator process leaves the index
    generation odd. While it lives, a lookup of a missing key keeps waiting (no false
    miss); after it is SIGKILLed the lookup raises CoordinatorUnavailableError with a
    clear message instead of spinning forever. A real coordinator then repairs the
    index, and reads work with every record intact."""
    n, coord = served(capacity=40, key_size=16, value_size=32)
    records = {f"r{i}": i * 11 for i in range(20)}
    with shmstore.connect(n) as s:
        with s.batch() as b:
            for k, v in records.items():
                b.put(k, v)
    coord.stop()
    s = shmstore.connect(n)
    s._seg.stall_timeout = 0.2
    fake = python(FAKE_COORDINATOR, n)
    try:
        assert fake.stdout.readline().strip() == "ready", fake.stderr.read()
        assert s._seg.q[L.H_INDEX_GEN] & 1
        outcome: list = []
        waiter = threading.Thread(target=lambda: outcome.append(result_of(lambda: s._seg.lookup(b"missing"))),
                                  daemon=True)
        waiter.start()
        waiter.join(1.0)  # five stall timeouts: the liveness check must say "alive"
        assert waiter.is_alive() and outcome == [], f"a lookup did not wait for the live coordinator: {outcome}"
        fake.kill()
        fake.wait()
        waiter.join(60)
        assert not waiter.is_alive(), "the lookup kept spinning after the coordinator died"
        err = outcome[0]
        assert isinstance(err, shmstore.CoordinatorUnavailableError), repr(err)
        assert "coordinator" in str(err) and "serve" in str(err), str(err)
        for public in (lambda: s.get("missing"), lambda: "missing" in s):
            with pytest.raises(shmstore.CoordinatorUnavailableError):
                public()
        coord2 = shmstore.serve(n)
        names.coordinators.append(coord2)
        assert s._seg.q[L.H_INDEX_GEN] % 2 == 0
        buckets = s._seg.index_view()
        live = buckets[buckets != 0]
        assert len(live) == len(np.unique(live)) == len(records), "the index was not rebuilt"
        del buckets, live
        assert s.get("missing") is None
        assert s.get_many(list(records)) == list(records.values())
        assert {k.decode(): v for k, v in s.items()} == records
        s.put("after", 1)
        assert len(s) == len(records) + 1
    finally:
        reap(fake)
        s.close()


def test_slot_left_odd_by_a_dead_coordinator_raises_then_is_restamped(served, names):
    """Rule 3 (bounded spinning) for slots, with rule 1: a slot left odd by a
    coordinator that died mid-write makes a reader raise CoordinatorUnavailableError
    (not spin forever); the next coordinator stamps it even with a new epoch, never
    its old stamp, and the published records are intact."""
    with writer_side(served, capacity=6, key_size=8, value_size=32) as (n, wseg, eng):
        eng.put(b"a", enc(1))
        eng.put(b"b", enc(2))
        free_slot = eng.frees[0][-1]  # the next write would go here
        g = SlotGeometry(wseg, free_slot)
        dying_epoch = eng.epoch + 1  # never published
        wseg.q[g.w] = 2 * dying_epoch + 1
        wseg.q[g.w + L.S_META] = GARBAGE_META
        odd_stamp = wseg.q[g.w]
    with shmstore.connect(n) as s:
        s._seg.stall_timeout = 0.2
        with pytest.raises(shmstore.CoordinatorUnavailableError):
            s._seg.read_slot(free_slot)
        assert s.get("a") == 1  # the published state is readable meanwhile
        coord2 = shmstore.serve(n)
        names.coordinators.append(coord2)
        new = s._seg.q[g.w]
        assert new % 2 == 0 and new > odd_stamp, (odd_stamp, new)
        seq, _, _, flags, _, _ = s._seg.read_slot(free_slot)
        assert flags & L.FLAG_FREE
        assert s.get_many(["a", "b"]) == [1, 2]
        s.put("c", 3)
        assert s._seg.q[L.H_EPOCH] > new // 2 - 1


def test_iterating_skips_a_slot_a_dead_coordinator_left_mid_write(served):
    """Rule 3 (bounded spinning) with DESIGN section 4 ("readers keep reading the last
    published state while the coordinator is down"): a slot left odd by a coordinator
    that died while writing a NEW record (copy-on-write: no bucket points at it) is
    not part of the published state, so iterating the store must list the published
    records, not fail on the unpublished slot."""
    with writer_side(served, capacity=6, key_size=8, value_size=32) as (n, wseg, eng):
        eng.put(b"a", enc(1))
        eng.put(b"b", enc(2))
        g = SlotGeometry(wseg, eng.frees[0][-1])  # where the next record would be written
        vb = enc(3)
        wseg.q[g.w] = 2 * (eng.epoch + 1) + 1  # died here, mid-write of record "c"
        wseg.q[g.w + L.S_META] = 1 | (len(vb) << 32)
        wseg.mv[g.kofs : g.kofs + 1] = b"c"
    with shmstore.connect(n) as s:
        s._seg.stall_timeout = 0.2
        assert s.get_many(["a", "b", "c"]) == [1, 2, None]  # the published state reads fine
        assert len(s) == 2
        assert sorted(s.keys()) == [b"a", b"b"]
        assert dict(s.items()) == {b"a": 1, b"b": 2}
