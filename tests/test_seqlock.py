"""The rules of the epoch-stamped seqlock (DESIGN.md section 2), one test (or more) each.

1. Unique stamps: every write op takes a new epoch; no slot carries one even seq twice.
2. Never trust bytes before validation: lengths read mid-write are clamped.
3. Bounded spinning: an odd index generation left by a dead coordinator raises
   CoordinatorUnavailableError; the next coordinator repairs it.
4. No false negatives while buckets move (backward-shift deletion).
5. Memory ordering: non-x86-64 CPUs are refused.
6. Single 8-byte accesses; a slot the index points to is never written.
7. Clients map the data segment read-only; segments are mode 0600.

Protocol tests emulate a reader straddling writes deterministically: the coordinator is
stopped, the test maps the segment writable and drives ``coordinator._engine.Engine``
itself, and a reader's ``Segment.q`` / ``Segment.mv`` are replaced by spies that
forward every access to the real views and run the "writer" at a chosen point.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import threading

import msgspec
import numpy as np
import pytest

import shmstore
from shmstore import _layout as L
from shmstore._segment import Segment, make_readers, open_segment
from shmstore.coordinator._engine import Engine
from tests.helpers.hashes import same_hash_keys
from tests.helpers.processes import python, reap, reap_pids, shm_objects

enc = msgspec.msgpack.encode
dec = msgspec.msgpack.decode


# -- spies and helpers ---------------------------------------------------------------


class WordsSpy:
    """Stands in for ``Segment.q`` (the u64 view): forwards and logs every access.

    ``before_read[i]`` is a callable run once, just before word ``i`` is next read.
    """

    def __init__(self, q: memoryview, log: list) -> None:
        self.q = q
        self.log = log
        self.before_read: dict = {}

    def __getitem__(self, i: int) -> int:
        hook = self.before_read.pop(i, None)
        if hook is not None:
            hook()
        v = self.q[i]
        self.log.append(("qr", i, v))
        return v

    def __setitem__(self, i: int, v: int) -> None:
        self.log.append(("qw", i, v))
        self.q[i] = v

    def __len__(self) -> int:
        return len(self.q)


class BytesSpy:
    """Stands in for ``Segment.mv`` (the byte view): forwards and logs slices.

    ``before_slice(start, stop)`` runs before every slice read.
    """

    def __init__(self, mv: memoryview, log: list) -> None:
        self.mv = mv
        self.log = log
        self.before_slice = None

    def __getitem__(self, s: slice) -> memoryview:
        assert isinstance(s, slice), f"byte view indexed with {s!r}, not a slice"
        if self.before_slice is not None:
            self.before_slice(s.start, s.stop)
        self.log.append(("mr", s.start, s.stop))
        return self.mv[s]

    def __setitem__(self, s: slice, v: bytes) -> None:
        assert isinstance(s, slice), f"byte view indexed with {s!r}, not a slice"
        self.log.append(("mw", s.start, s.stop))
        self.mv[s] = v

    def __len__(self) -> int:
        return len(self.mv)


@contextlib.contextmanager
def spied(seg: Segment):
    """Install a WordsSpy/BytesSpy pair on a Segment; restore the real views after."""
    log: list = []
    q, mv = seg.q, seg.mv
    seg.q, seg.mv = WordsSpy(q, log), BytesSpy(mv, log)
    try:
        yield seg.q, seg.mv, log
    finally:
        seg.q, seg.mv = q, mv


class SlotGeometry:
    """Word and byte offsets of one slot."""

    def __init__(self, seg: Segment, slot: int) -> None:
        self.slot = slot
        self.w = seg.slot0 + slot * seg.slot_words  # the seq word
        self.base = self.w * 8
        self.kofs = self.base + L.SLOT_HEADER
        self.vofs = self.kofs + seg.key_size
        self.end = self.base + seg.slot_size


def slot_of_byte(seg: Segment, offset: int) -> int:
    return (offset - L.SLOTS_OFFSET) // seg.slot_size


@contextlib.contextmanager
def writer_side(served, **serve_kwargs):
    """A served store whose coordinator is then STOPPED: the test is the only writer.

    Yields ``(name, writable Segment, Engine)``.
    """
    n, coord = served(**serve_kwargs)
    coord.stop()
    seg = open_segment(n, writable=True)
    try:
        eng = Engine(seg)
        eng.rebuild_free_list()
        yield n, seg, eng
    finally:
        seg.close()


def bucket_pos(seg: Segment, kb: bytes) -> int:
    """The index position (0-based) whose bucket holds ``kb``'s record."""
    slot = seg.lookup(kb)[0]
    want = (L.key_hash(kb) << 32) | (slot + 1)
    hits = np.flatnonzero(seg.index_view() == np.uint64(want))
    assert len(hits) == 1, f"{kb!r}: {len(hits)} buckets point at slot {slot}"
    return int(hits[0])


def _outcome(fn):
    """``fn()``'s result, or the exception it raised."""
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - handed back to the test to assert on
        return e


# -- rule 1: unique stamps ------------------------------------------------------------


def test_every_write_op_stamps_with_a_new_epoch(store):
    """Rule 1 (unique stamps, ABA): through the public API, every op advances the
    epoch by one (a batch by its op count), every slot it changes gets a stamp newer
    than any before, stamps only grow, and no slot ever shows one even seq with two
    different contents. Watched through the read-only numpy view of the slot words."""
    seg = store._seg
    words = seg.slot_words_view()
    slot_bytes = np.ndarray((seg.nslots, seg.slot_size), np.uint8, buffer=seg.mm,
                            offset=L.SLOTS_OFFSET)
    assert not words.flags.writeable
    seen: dict[tuple[int, int], bytes] = {}

    def snapshot():
        return seg.q[L.H_EPOCH], words[:, L.S_SEQ].copy(), slot_bytes[:, 8:].copy()

    def note(seqs, body):
        for slot in range(seg.nslots):
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
    slot0 = seg.lookup(b"k")[0]
    before = int(words[slot0, L.S_SEQ])
    content_before = slot_bytes[slot0, 8:].tobytes()
    for i in range(seg.nslots + 1):
        store.put("k", 100 + i)
        if seg.lookup(b"k")[0] == slot0:
            break
    else:
        pytest.fail(f"slot {slot0} never carried key 'k' again")
    assert i >= 1, "the record must have left the slot and come back"
    assert slot_bytes[slot0, 8:].tobytes() != content_before
    assert int(words[slot0, L.S_SEQ]) != before, "a rewritten slot kept its old stamp (ABA)"


class StampRecorder(Engine):
    """The real Engine, noting every stamp it leaves in each slot."""

    def __init__(self, seg: Segment) -> None:
        super().__init__(seg)
        self.stamps: dict[int, list[int]] = {}

    def _note(self, slot: int) -> None:
        self.stamps.setdefault(slot, []).append(self.q[self._slot_word(slot)])

    def _write_slot(self, slot, *args) -> None:
        super()._write_slot(slot, *args)
        self._note(slot)

    def _free_slot(self, slot, epoch) -> None:
        super()._free_slot(slot, epoch)
        self._note(slot)


def test_no_slot_gets_the_same_stamp_twice_even_inside_a_batch(served):
    """Rule 1 (unique stamps) where the public API cannot look: inside one batch.

    A batch that writes one key several times moves its record away from a slot and
    back into it; with one epoch per batch (instead of per op) that slot would get
    the same even seq twice. The engine's every stamp per slot must strictly grow."""
    from shmstore._channel import OP_DELETE, OP_PUT

    with writer_side(served, capacity=4, key_size=8, value_size=32) as (n, seg, _):
        eng = StampRecorder(seg)
        eng.rebuild_free_list()
        e0 = eng.epoch
        eng.put(b"a", enc(0))
        ops = [[OP_PUT, b"a", enc(i), 0] for i in range(1, 6)]
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
    for i in range(1, seg.nslots + 2):
        v = enc("b" * i)
        eng.put(b"k", v)
        if seg.lookup(b"k")[0] == g.slot:
            assert i >= 2, "the record must leave the slot first"
            return v
    raise AssertionError("the record never came back to its first slot")


@pytest.mark.parametrize("path", ["read_slot", "lookup", "get"])
def test_a_read_straddling_two_writes_of_a_slot_is_rejected(served, path):
    """Rule 1 (unique stamps), the protocol itself: a reader takes s1 of slot X and
    copies meta; then two writes happen (the record moves out of X and back into it,
    so the bucket word ends up identical: only the stamp can tell); then it copies the
    value bytes. The bytes are from write 3, the length from write 1: the read must be
    rejected (s1 != s2) and retried, never returned. Checked for read_slot, lookup
    and the Store.get fast path."""
    with writer_side(served, capacity=4, key_size=8, value_size=64) as (n, wseg, eng):
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
                    slot, seq, _, value = reader.lookup(b"k")
                    assert slot == g.slot and seq == wseg.q[g.w]
                else:
                    get, probe_many = make_readers(reader, lambda raw: raw, lambda *a: pytest.fail("stale"))
                    value = get("k")
                    del get, probe_many
                assert fired, "the straddling writes never ran"
                v_final = fired[0]
                assert wseg.q[wseg.idx0 + bucket_pos(wseg, b"k")] == bucket, "bucket changed: not the ABA case"
                assert value == v_final, f"returned {value!r}: neither write's value ({v1!r}, {v_final!r})"
                seq_reads = [e for e in log if e[0] == "qr" and e[1] == g.w]
                assert len(seq_reads) >= 3, "the straddled read was not retried"
        finally:
            reader.close()


def test_a_reused_stamp_would_let_a_torn_value_through(served):
    """Rule 1 (unique stamps) is load-bearing: the same straddle as above, but the
    writer leaves slot X with the stamp the reader saw first (what one epoch for two
    writes would do). Validation then passes and read_slot returns bytes of two
    writes. This shows the straddle test above can tell the difference."""
    with writer_side(served, capacity=4, key_size=8, value_size=64) as (n, wseg, eng):
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
def test_garbage_lengths_read_mid_write_are_clamped(served, path):
    """Rule 2 (never trust bytes before validation): the reader loads the meta word
    while the slot is odd and holds a garbage meta (huge key and value lengths). Every
    copy it makes must stay inside the slot's key/value area, nothing may raise, and
    after validation fails it must return the completed write's value."""
    with writer_side(served, capacity=4, key_size=8, value_size=64) as (n, wseg, eng):
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
                    wmv[g.kofs : g.kofs + 1] = b"k"
                    wmv[g.vofs : g.vofs + len(v2)] = v2
                    wq[g.w] = 2 * e + 2
                    eng.publish()

                q.before_read[g.w + L.S_META] = begin
                if path == "read_slot":
                    value = reader.read_slot(g.slot)[5]
                elif path == "lookup":
                    value = reader.lookup(b"k")[3]
                else:
                    get, probe_many = make_readers(reader, lambda raw: raw, lambda *a: pytest.fail("stale"))
                    value = get("k")
                    del get, probe_many
            assert started, "the reader never loaded the meta word"
            assert ("qr", g.w + L.S_META, GARBAGE_META) in log, "the garbage meta was not read"
            slices = [(a, b) for kind, a, b in log if kind == "mr"]
            outside = [(a, b) for a, b in slices if not (g.kofs <= a <= b <= g.end)]
            assert not outside, f"copies outside slot {g.slot}'s bytes [{g.kofs}, {g.end}): {outside}"
            assert value == v2
        finally:
            reader.close()


GARBAGE_WRITER = r"""
import os, random, sys, time, msgspec
from shmstore import _layout as L
from shmstore._segment import open_segment, process_start_ms
name, slot = sys.argv[1], int(sys.argv[2])
seg = open_segment(name, writable=True)
q, mv = seg.q, seg.mv
# Stand in for the coordinator, so readers waiting on an odd seq keep waiting.
q[L.H_COORD_PID] = os.getpid()
q[L.H_COORD_START] = process_start_ms(os.getpid())
q[L.H_COORD_INCARNATION] = 12345
w = seg.slot0 + slot * seg.slot_words
kofs = w * 8 + L.SLOT_HEADER
vofs = kofs + seg.key_size
kb = bytes(mv[kofs : kofs + (q[w + 3] & 0xFFFF)])
epoch = q[L.H_EPOCH]
rnd = random.Random(1)
announced = False
while True:
    epoch += 1
    q[w] = 2 * epoch + 1
    q[w + 3] = rnd.getrandbits(64) | 0xFFFF | (0xFFFFFFF0 << 32)  # huge lengths
    mv[kofs : kofs + seg.key_size] = os.urandom(seg.key_size)
    mv[vofs : vofs + seg.value_size] = os.urandom(seg.value_size)
    vb = msgspec.msgpack.encode([epoch, bytes([epoch & 255]) * (epoch % 40)])
    q[w + 1] = epoch
    q[w + 3] = len(kb) | (len(vb) << 32)
    mv[kofs : kofs + len(kb)] = kb
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
from shmstore._segment import open_segment, process_start_ms
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
        waiter = threading.Thread(target=lambda: outcome.append(_outcome(lambda: s._seg.lookup(b"missing"))),
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
        free_slot = eng.free[-1]  # the next write would go here
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
        g = SlotGeometry(wseg, eng.free[-1])  # where the next record would be written
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


# -- rule 4: no false negatives during index changes ----------------------------------

CHURN_WRITER = r"""
import sys, shmstore
s = shmstore.connect(sys.argv[1], timeout=30)
churn = [bytes.fromhex(k) for k in sys.argv[2:]]
print("ready", flush=True)
i = 0
while True:
    i += 1
    if i % 4:
        for c in churn:
            s.delete(c)
            s.put(c, i)
    else:  # several shifts back to back in one batch
        with s.batch() as b:
            for c in churn:
                b.delete(c)
            for c in reversed(churn):
                b.put(c, i)
"""

STABLE_READER = r"""
import json, sys, shmstore
name, rounds = sys.argv[1], int(sys.argv[2])
stable = [bytes.fromhex(k) for k in sys.argv[3:]]
s = shmstore.connect(name)
seg = s._seg
want = {k: "stable-" + k.hex() for k in stable}
reads = misses = wrong = 0
examples = []
print("ready", flush=True)
sys.stdin.readline()
for r in range(rounds):
    for k in stable:
        try:
            v2 = s[k]
        except KeyError:
            v2 = None
        hit = seg.lookup(k)
        got = [s.get(k), v2, None if hit is None else s._decode(hit[3])]
        present = k in s
        reads += 4
        if not present or None in got:
            misses += 1
            examples.append((r, k.hex(), got, present))
        elif got != [want[k]] * 3:
            wrong += 1
            examples.append((r, k.hex(), got))
    vals = s.get_many(stable)
    reads += len(stable)
    if vals != [want[k] for k in stable]:
        misses += 1
        examples.append((r, "get_many", vals))
print(json.dumps({"reads": reads, "misses": misses, "wrong": wrong, "examples": examples[:5]}), flush=True)
"""


def _colliding_keys(mask: int, count: int) -> list[str]:
    """``count`` keys whose key_hash & mask (their home bucket) is the same."""
    homes: dict[int, list[str]] = {}
    for i in range(1_000_000):
        k = f"c{i}"
        group = homes.setdefault(L.key_hash(k.encode()) & mask, [])
        group.append(k)
        if len(group) == count:
            return group
    raise AssertionError("no colliding keys found")


@pytest.mark.parametrize("collide", ["home_bucket", "full_hash"])
def test_no_false_miss_while_deletes_move_buckets(served, collide):
    """Rule 4 (no false negatives): keys that are never deleted share one probe run
    with keys a writer process keeps deleting and re-inserting (singly and in
    batches), so backward-shift deletion keeps moving their buckets. Two reader
    processes look the stable keys up through get, store[key], lookup, `in` and
    get_many: every one must be found with its value, every time. Keys collide on
    their home bucket (key_hash & mask), or on the whole key_hash so every probe step reads
    a slot (slow walks that a shift can overtake)."""
    n, coord = served(capacity=16, key_size=16, value_size=32)
    s = shmstore.connect(n)
    seg = s._seg
    if collide == "home_bucket":
        keys = [k.encode() for k in _colliding_keys(seg.mask, 8)]
    else:
        keys = same_hash_keys(8)  # every probe step reads a slot: slow walks
    churn, stable = keys[0::2], keys[1::2]
    writer = None
    readers: list = []
    try:
        for c, k in zip(churn, stable):  # interleaved: C0 S0 C1 S1 ... in one run
            s.put(c, -1)
            s.put(k, "stable-" + k.hex())
        # The buckets really move: deleting C0 shifts S0 back by one.
        before = bucket_pos(seg, stable[0])
        s.delete(churn[0])
        after = bucket_pos(seg, stable[0])
        assert after == (before - 1) % seg.nbuckets, (before, after)
        s.put(churn[0], -1)
        writer = python(CHURN_WRITER, n, *(c.hex() for c in churn))
        readers = [python(STABLE_READER, n, "1500", *(k.hex() for k in stable), stdin=subprocess.PIPE)
                   for _ in range(2)]
        for p in [writer, *readers]:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        gen0 = seg.q[L.H_INDEX_GEN]
        for r in readers:
            r.stdin.write("go\n")
            r.stdin.flush()
        outs = [r.communicate(timeout=100) for r in readers]
        gen1 = seg.q[L.H_INDEX_GEN]
        assert writer.poll() is None, writer.stderr.read()
        results = [json.loads(out) if r.returncode == 0 and out else {"rc": r.returncode, "err": err[-2000:]}
                   for r, (out, err) in zip(readers, outs)]
        assert all("rc" not in x and x["misses"] == 0 and x["wrong"] == 0 and x["reads"] > 0
                   for x in results), results
        assert gen1 - gen0 >= 20, f"the writer barely moved buckets during the reads ({gen0} -> {gen1})"
    finally:
        reap(*[p for p in [writer, *readers] if p is not None])
        s.close()


def test_get_walks_a_probe_run_inline(served):
    """get's fast path walks past other keys' buckets itself: a key displaced from its
    home bucket is found, and a missing key whose home bucket is taken is a trusted
    miss at the run's end, neither through the full lookup (which is counted here)."""
    with writer_side(served, capacity=8, key_size=16, value_size=16) as (n, wseg, eng):
        keys = [k.encode() for k in _colliding_keys(wseg.mask, 5)]
        present, absent = keys[:4], keys[4]
        for k in present:
            eng.put(k, enc(k.decode()))
        assert bucket_pos(wseg, present[3]) == (L.key_hash(present[3]) + 3) & wseg.mask
        reader = open_segment(n)
        try:
            full = []
            real_lookup = reader.lookup
            reader.lookup = lambda kb: full.append(kb) or real_lookup(kb)
            get, probe_many = make_readers(reader, dec, lambda *a: pytest.fail("stale path"))
            assert [get(k) for k in present] == [k.decode() for k in present]
            assert get(absent, "none") == "none"
            assert full == [], f"took the full lookup for {full}"
            del get, probe_many
        finally:
            reader.close()


@pytest.mark.parametrize("path", ["lookup", "get", "get_many"])
def test_a_lookup_overtaken_by_a_backward_shift_probes_again(served, path):
    """Rule 4 (no false negatives), the race itself, deterministically: a reader walks
    the probe run C0 S0 C1 S1 looking for S1; just before it loads S1's bucket, C0 is
    deleted and the backward shift moves S1 one bucket back, behind the reader, which
    then meets an empty bucket. That miss must not be trusted (the index generation
    moved): the reader probes again and finds S1. (The concurrent test above rarely
    hits this window; this one hits it every time.)"""
    with writer_side(served, capacity=8, key_size=16, value_size=16) as (n, wseg, eng):
        c0, s0, c1, s1 = (k.encode() for k in _colliding_keys(wseg.mask, 4))
        for k in (c0, s0, c1, s1):
            eng.put(k, enc(k.decode()))
        home = L.key_hash(s1) & wseg.mask
        pos_s1 = bucket_pos(wseg, s1)
        assert pos_s1 == (home + 3) & wseg.mask
        gen0 = wseg.q[L.H_INDEX_GEN]
        reader = open_segment(n)
        try:
            fired = []
            with spied(reader) as (q, mv, log):

                def shift():
                    fired.append(eng.delete(c0))

                q.before_read[reader.idx0 + pos_s1] = shift
                if path == "lookup":
                    r = reader.lookup(s1)
                    value = None if r is None else dec(r[3])
                else:
                    get, probe_many = make_readers(reader, dec, lambda *a: pytest.fail("stale path"))
                    if path == "get":
                        value = get(s1.decode())
                    else:
                        fast, blob, found, _ = probe_many([s0, s1], np.array([len(s0), len(s1)]))
                        assert len(fast) == 0  # under 32 keys: the per-key probe
                        value = dec(found[1]) if 1 in found else None
                    del get, probe_many
            assert fired == [True], "the shift never ran"
            assert bucket_pos(wseg, s1) == (pos_s1 - 1) % wseg.nbuckets, "S1's bucket did not move back"
            assert wseg.q[L.H_INDEX_GEN] == gen0 + 2
            assert value == s1.decode(), f"false miss: {value!r}"
        finally:
            reader.close()


# -- rule 5: memory ordering / architecture --------------------------------------------


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "armv7l", "ppc64le", "riscv64"])
def test_weakly_ordered_cpus_are_refused(served, names, monkeypatch, machine):
    """Rule 5 (memory ordering): off x86-64 (TSO), plain Python loads and stores may be
    reordered, so check_platform, serve, connect and open_segment refuse with
    UnsupportedPlatformError naming the CPU, even for a store that exists."""
    n, _ = served(capacity=4)
    fresh = names()
    monkeypatch.setattr(platform, "machine", lambda: machine)
    calls = {
        "check_platform": L.check_platform,
        "serve": lambda: shmstore.serve(fresh),
        "connect": lambda: shmstore.connect(n),
        "open_segment": lambda: open_segment(n),
        "open": lambda: shmstore.open(n),
    }
    for what, call in calls.items():
        with pytest.raises(shmstore.UnsupportedPlatformError) as e:
            call()
        assert machine in str(e.value) and "x86-64" in str(e.value), (what, str(e.value))
    assert not shm_objects(fresh), "serve() created objects before refusing"


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_x86_64_is_accepted(served, monkeypatch, machine):
    """Rule 5 (memory ordering): x86-64, under either spelling, is accepted."""
    n, _ = served(capacity=4)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    L.check_platform()
    with shmstore.connect(n) as s:
        s.put("k", 1)
        assert s.get("k") == 1


# -- rule 6: single 8-byte accesses; a referenced slot is never written ----------------


@pytest.mark.parametrize("key_size,value_size", [(8, 8), (13, 29), (64, 1024), (1, 1), (255, 4093)])
def test_layout_puts_every_protocol_word_on_an_8_byte_boundary(key_size, value_size):
    """Rule 6 (single 8-byte accesses): whatever the sizes, slots, their seq words
    and the index start on 8-byte boundaries (so a 'Q' item is one aligned load)."""
    lay = L.Layout(capacity=37, key_size=key_size, value_size=value_size).validate()
    assert L.SLOTS_OFFSET % 8 == 0 and L.HEADER_SIZE % L.PAGE == 0
    assert lay.slot_size % 8 == 0 and lay.slot_size >= L.SLOT_HEADER + key_size + value_size
    assert lay.index_offset % L.PAGE == 0 and lay.index_offset >= L.SLOTS_OFFSET + lay.nslots * lay.slot_size
    assert lay.size % L.PAGE == 0 and lay.size >= lay.index_offset + lay.nbuckets * 8
    assert lay.nbuckets & (lay.nbuckets - 1) == 0 and lay.nbuckets >= 2 * lay.nslots
    header_words = [v for k, v in vars(L).items() if k.startswith("H_") and k != "H_WORDS"]
    assert all(isinstance(v, int) and 0 <= v < L.H_WORDS for v in header_words)


def test_segment_views_are_aligned_u64(store):
    """Rule 6 (single 8-byte accesses): Segment.q is a memoryview cast 'Q' (8-byte
    items) over a page-aligned mapping, and the numpy views are aligned uint64."""
    seg = store._seg
    assert seg.q.format == "Q" and seg.q.itemsize == 8 and seg.q.c_contiguous
    assert len(seg.q) * 8 == len(seg.mv)
    base = np.frombuffer(seg.mm, np.uint8)
    words = seg.slot_words_view()
    index = seg.index_view()
    try:
        assert base.ctypes.data % L.PAGE == 0
        for view in (words, index):
            assert view.dtype == np.uint64 and view.ctypes.data % 8 == 0
            assert all(st % 8 == 0 for st in view.strides)
        assert words.strides == (seg.slot_size, 8)
        for slot in range(seg.nslots):
            assert SlotGeometry(seg, slot).base % 8 == 0
    finally:
        del base, words, index


def test_readers_load_protocol_words_only_through_the_u64_view(served):
    """Rule 6 (single 8-byte accesses), reading side: read_slot, lookup (hit, and a
    miss past a colliding bucket) and the get fast path load seq, meta and buckets
    through Segment.q; the byte view is only ever sliced inside key/value areas."""
    with writer_side(served, capacity=8, key_size=8, value_size=16) as (n, wseg, eng):
        a, b, missing = _colliding_keys(wseg.mask, 3)
        eng.put(a.encode(), enc(1))
        eng.put(b.encode(), enc(2))
        reader = open_segment(n)
        try:
            with spied(reader) as (q, mv, log):
                g = SlotGeometry(reader, reader.lookup(a.encode())[0])
                reader.read_slot(g.slot)
                reader.lookup(b.encode())
                assert reader.lookup(missing.encode()) is None
                get, probe_many = make_readers(reader, dec, lambda *x: pytest.fail("stale path"))
                assert get(a) == 1 and get(b) == 2
                del get, probe_many
            word_reads = {i for kind, i, _ in log if kind == "qr"}
            assert g.w in word_reads and g.w + L.S_META in word_reads
            assert L.H_INDEX_GEN in word_reads
            assert any(reader.idx0 <= i < reader.idx0 + reader.nbuckets for i in word_reads)
            slices = [(x, y) for kind, x, y in log if kind == "mr"]
            assert slices
            for x, y in slices:
                sg = SlotGeometry(reader, slot_of_byte(reader, x))
                assert sg.kofs <= x <= y <= sg.end, f"byte-view copy [{x}, {y}) covers protocol words"
        finally:
            reader.close()


def test_engine_stores_protocol_words_whole_and_only_inside_odd_windows(served):
    """Rule 6 (single 8-byte accesses), writing side, and the write order of the
    seqlock: the engine stores seq, meta and buckets through the u64 view; every byte
    it copies into a slot, and every other word of that slot, is stored while the
    slot's seq is odd; a bucket is only pointed at a slot whose write is complete."""
    from shmstore._channel import OP_DELETE, OP_PUT

    with writer_side(served, capacity=6, key_size=8, value_size=32) as (n, wseg, eng):
        log: list = []
        eng.q, eng.mv = WordsSpy(wseg.q, log), BytesSpy(wseg.mv, log)
        eng.put(b"a", enc(1))
        eng.put(b"a", enc("x" * 20))
        eng.put(b"b", enc(2))
        eng.incr(b"n", 5)
        eng.delete(b"a")
        eng.batch([[OP_PUT, b"c", enc(3), 0], [OP_PUT, b"c", enc(4), 0], [OP_DELETE, b"b"]])
        eng.cas(b"c", enc(5), eng.get(b"c")[0])
        seq_of: dict[int, int] = {slot: wseg.q[SlotGeometry(wseg, slot).w] for slot in range(wseg.nslots)}
        # Replay the log in order, tracking each slot's seq as last stored.
        first_seq: dict[int, int] = {}
        slots_end = L.SLOTS_OFFSET + wseg.nslots * wseg.slot_size
        bucket_stores = 0
        seq_now: dict[int, int] = {}
        for entry in log:
            kind = entry[0]
            if kind == "qw":
                i, v = entry[1], entry[2]
                off = i * 8
                if L.SLOTS_OFFSET <= off < slots_end:
                    slot = slot_of_byte(wseg, off)
                    sg = SlotGeometry(wseg, slot)
                    if i == sg.w:
                        first_seq.setdefault(slot, v)
                        seq_now[slot] = v
                    else:
                        assert seq_now.get(slot, 0) & 1, f"word {i - sg.w} of slot {slot} stored while even"
                elif wseg.idx0 <= i < wseg.idx0 + wseg.nbuckets:
                    bucket_stores += 1
                    if v:
                        slot = (v & 0xFFFFFFFF) - 1
                        assert slot in seq_now and not seq_now[slot] & 1, (
                            f"bucket pointed at slot {slot} before its write completed")
            elif kind == "mw":
                x, y = entry[1], entry[2]
                slot = slot_of_byte(wseg, x)
                sg = SlotGeometry(wseg, slot)
                assert sg.kofs <= x <= y <= sg.end, f"byte copy [{x}, {y}) covers slot {slot}'s header words"
                assert seq_now.get(slot, 0) & 1, f"bytes copied into slot {slot} while its seq was even"
        assert first_seq and all(v & 1 for v in first_seq.values()), "a slot write did not start odd"
        assert all(not seq_now[s] & 1 and seq_now[s] == seq_of[s] for s in seq_now)
        assert bucket_stores >= 5


def sample_referenced_slots(seg: Segment, keep_going) -> dict:
    """Sample (bucket, its slot's seq) pairs; report referenced slots seen mid-write.

    A violation is: bucket b read, its slot's seq read odd, the same bucket read again
    still b, and H_EPOCH the same before and after, so the write cannot be the next op
    reusing the slot (ops publish H_EPOCH one by one; the writer must not batch).
    """
    q = seg.q
    idx0, nb = seg.idx0, seg.nbuckets
    slot0, sw = seg.slot0, seg.slot_words
    samples = stale = 0
    violations: list = []
    rounds = 0
    while keep_going(rounds):
        rounds += 1
        for pos in range(idx0, idx0 + nb):
            e1 = q[L.H_EPOCH]
            b1 = q[pos]
            if not b1:
                continue
            s = q[slot0 + ((b1 & 0xFFFFFFFF) - 1) * sw]
            samples += 1
            if s & 1:
                b2 = q[pos]
                e2 = q[L.H_EPOCH]
                if b1 == b2 and e1 == e2:
                    violations.append((pos - idx0, (b1 & 0xFFFFFFFF) - 1, s))
                else:
                    stale += 1
    return {"rounds": rounds, "samples": samples, "stale_odd": stale, "violations": violations[:10],
            "nviolations": len(violations)}


SINGLE_OP_WRITER = r"""
import sys, shmstore
s = shmstore.connect(sys.argv[1], timeout=30)
keys = [f"w{j}" for j in range(6)]
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    k = keys[i % 6]
    if i % 7 == 3:
        s.delete(k)
    elif i % 5 == 1:
        s.incr("n")
    else:
        s.put(k, "v" * (i % 50))
print("done", flush=True)
"""


def test_a_slot_the_index_points_to_is_never_seen_mid_write(served):
    """Rule 6 (the copy-on-write invariant behind it): while a writer process runs
    puts, deletes and incrs, the test samples every bucket and the seq of the slot it
    points to through its read-only mapping: no referenced slot is ever odd."""
    n, _ = served(capacity=16, key_size=8, value_size=64)
    s = shmstore.connect(n)
    writer = python(SINGLE_OP_WRITER, n, "4000", stdin=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
        e0 = s._seg.q[L.H_EPOCH]
        writer.stdin.write("go\n")
        writer.stdin.flush()
        report = sample_referenced_slots(s._seg, lambda r: writer.poll() is None)
        out, err = writer.communicate(timeout=100)
        assert writer.returncode == 0 and "done" in out, err
        moved = s._seg.q[L.H_EPOCH] - e0
        assert report["nviolations"] == 0 and report["samples"] > 0 and moved >= 3000, (report, moved)
    finally:
        reap(writer)
        s.close()


def test_the_referenced_slot_sampler_can_fail(served):
    """Rule 6: the sampler above reports a referenced slot that is odd (a writer that
    wrote in place would leave exactly that)."""
    with writer_side(served, capacity=4, key_size=8, value_size=16) as (n, wseg, eng):
        eng.put(b"k", enc(1))
        g = SlotGeometry(wseg, wseg.lookup(b"k")[0])
        with shmstore.connect(n) as s:
            assert sample_referenced_slots(s._seg, lambda r: r < 3)["nviolations"] == 0
            wseg.q[g.w] += 1  # in-place write in progress on a referenced slot
            report = sample_referenced_slots(s._seg, lambda r: r < 3)
            wseg.q[g.w] += 1
        assert report["nviolations"] == 3 and report["violations"][0][1] == g.slot, report


# -- rule 7: read-only client mappings, mode 0600 ---------------------------------------


def test_store_objects_are_mode_0600(store):
    """Rule 7: the data segment, the write channel and every other object of the
    store in /dev/shm are mode 0600."""
    store.put("k", 1)  # the channel and a reply semaphore are in use
    objects = shm_objects(store.name)
    assert f"shmstore.{store.name}" in objects and f"shmstore.{store.name}@ch" in objects, objects
    modes = {o: oct(os.stat(f"/dev/shm/{o}").st_mode & 0o777) for o in objects}
    assert set(modes.values()) == {oct(0o600)}, modes


def _mapping_perms(pid: int, name: str) -> list[str]:
    """Permissions of every mapping of store ``name``'s data segment in ``pid``."""
    path = f"/dev/shm/shmstore.{name}"
    perms = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip().removesuffix(" (deleted)") == path:
                perms.append(parts[1])
    return perms


def _read_only_problems(store: shmstore.Store) -> list[str]:
    """Why this process's mapping of the data segment is not read-only ([] if it is)."""
    problems = []
    seg = store._seg
    for what, write in (("mv", lambda: seg.mv.__setitem__(slice(0, 1), b"\0")),
                        ("q", lambda: seg.q.__setitem__(L.H_EPOCH, 0))):
        try:
            write()
            problems.append(f"writing through Store._seg.{what} worked")
        except TypeError:
            pass
    words = seg.slot_words_view()
    if words.flags.writeable:
        problems.append("the numpy slot view is writeable")
    del words
    perms = _mapping_perms(os.getpid(), store.name)
    if not perms or any("w" in p for p in perms):
        problems.append(f"mappings of the data segment: {perms}")
    if store.get("k") != 1:
        problems.append("cannot read through the mapping")
    return problems


def _spawned_read_only_check(name: str) -> None:
    code = 3
    try:
        with shmstore.connect(name) as s:
            problems = _read_only_problems(s)
            if problems:
                print(problems, file=sys.stderr, flush=True)
            code = 1 if problems else 0
    finally:
        os._exit(code)


def test_clients_map_the_data_segment_read_only(store):
    """Rule 7: a client's mapping of the data segment is PROT_READ (/proc maps shows
    no 'w'; the coordinator's shows one), and writing through Store._seg.mv or .q
    raises TypeError, in this process, in a forked child and in a spawned one."""
    store.put("k", 1)
    assert _read_only_problems(store) == []
    coord_perms = _mapping_perms(int(store._seg.q[L.H_COORD_PID]), store.name)
    assert coord_perms and all("w" in p for p in coord_perms), coord_perms  # the check can tell
    pids = []
    try:
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                code = 1 if _read_only_problems(store) else 0
            finally:
                os._exit(code)
        pids.append(pid)
        _, status = os.waitpid(pid, 0)
        pids.remove(pid)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child's mapping is writable"
    finally:
        reap_pids(pids)
    proc = mp.get_context("spawn").Process(target=_spawned_read_only_check, args=(store.name,))
    try:
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0, f"the spawned child's mapping is writable (exit {proc.exitcode})"
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
