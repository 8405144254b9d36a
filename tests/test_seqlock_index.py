"""The rules of the epoch-stamped seqlock (DESIGN.md section 2), rules 4 to 7:

4. No false negatives while buckets move (backward-shift deletion).
5. Memory ordering: non-x86-64 CPUs are refused.
6. Single 8-byte accesses; a slot the index points to is never written.
7. Clients map the data segment read-only; segments are mode 0600.

Rules 1 to 3, and how the protocol tests drive a reader and a writer deterministically,
are in test_seqlock.py; the spies are in tests/helpers/seqlock.py.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys

import msgspec
import numpy as np
import pytest

import shmstore
from shmstore import _compiled
from shmstore import _layout as L
from shmstore._readers import make_readers
from shmstore._segment import Segment
from shmstore._shm import open_segment
from tests.helpers.hashes import same_hash_keys
from tests.helpers.seqlock import (
    BytesSpy, SlotGeometry, WordsSpy, bucket_pos, colliding_keys, slot_of_byte, spied, engine_side,
)
from tests.helpers.processes import python, reap, reap_pids, shm_objects

#: Every test here runs on both cores: the compiled one and pure Python (conftest.core).
pytestmark = pytest.mark.usefixtures("core")

enc = msgspec.msgpack.encode
dec = msgspec.msgpack.decode




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
import json, sys, time, shmstore
from shmstore import _layout as L
name, rounds = sys.argv[1], int(sys.argv[2])
stable = [bytes.fromhex(k) for k in sys.argv[3:]]
s = shmstore.connect(name)
seg = s._seg
want = {k: "stable-" + k.hex() for k in stable}
reads = misses = wrong = 0
examples = []
print("ready", flush=True)
sys.stdin.readline()
# At least `rounds` rounds, and on until the writer has moved buckets 40 times (the
# compiled core reads 1500 rounds in milliseconds, before a loaded machine may even
# schedule the writer), within 30 s.
gen_start = seg.q[L.H_INDEX_GEN]
deadline = time.monotonic() + 30
r = -1
while r + 1 < rounds or (seg.q[L.H_INDEX_GEN] - gen_start < 40 and time.monotonic() < deadline):
    r += 1
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
        keys = [k.encode() for k in colliding_keys(seg.mask, 8)]
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


def test_get_walks_a_probe_run_inline(names):
    """get's fast path walks past other keys' buckets itself: a key displaced from its
    home bucket is found, and a missing key whose home bucket is taken is a trusted
    miss at the run's end, neither through the full lookup (which is counted here)."""
    with engine_side(names(), compiled=None, capacity=8, key_size=16, value_size=16) as (n, wseg, eng):
        keys = [k.encode() for k in colliding_keys(wseg.mask, 5)]
        present, absent = keys[:4], keys[4]
        for k in present:
            eng.put(k, enc(k.decode()))
        assert bucket_pos(wseg, present[3]) == (L.key_hash(present[3]) + 3) & wseg.mask
        reader = open_segment(n)
        try:
            full = []
            real_lookup = reader.lookup
            reader.lookup = lambda kb: full.append(kb) or real_lookup(kb)
            rd = make_readers(reader, dec, lambda *a: pytest.fail("stale path"))
            get = rd.get
            assert [get(k) for k in present] == [k.decode() for k in present]
            assert get(absent, "none") == "none"
            assert full == [], f"took the full lookup for {full}"
            del rd
        finally:
            reader.close()


@pytest.mark.parametrize("path", ["lookup", "get", "get_many"])
def test_a_lookup_overtaken_by_a_backward_shift_probes_again(names, path):
    """Rule 4 (no false negatives), the race itself, deterministically: a reader walks
    the probe run C0 S0 C1 S1 looking for S1; just before it loads S1's bucket, C0 is
    deleted and the backward shift moves S1 one bucket back, behind the reader, which
    then meets an empty bucket. That miss must not be trusted (the index generation
    moved): the reader probes again and finds S1. (The concurrent test above rarely
    hits this window; this one hits it every time.)"""
    with engine_side(names(), compiled=None, capacity=8, key_size=16, value_size=16) as (n, wseg, eng):
        c0, s0, c1, s1 = (k.encode() for k in colliding_keys(wseg.mask, 4))
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
                    rd = make_readers(reader, dec, lambda *a: pytest.fail("stale path"))
                    get = rd.get
                    if path == "get":
                        value = get(s1.decode())
                    else:
                        fast, blob, found, _ = rd.probe_many([s0, s1], np.array([len(s0), len(s1)]))
                        assert len(fast) == 0  # under 32 keys: the per-key probe
                        value = dec(found[1]) if 1 in found else None
                    del rd
            assert fired == [True], "the shift never ran"
            assert bucket_pos(wseg, s1) == (pos_s1 - 1) % wseg.nbuckets, "S1's bucket did not move back"
            assert wseg.q[L.H_INDEX_GEN] == gen0 + 2
            assert value == s1.decode(), f"false miss: {value!r}"
        finally:
            reader.close()


# -- rule 5: memory ordering / architecture --------------------------------------------


@pytest.mark.parametrize("machine", ["armv7l", "ppc64le", "riscv64", "s390x"])
def test_other_cpus_are_refused(served, names, monkeypatch, machine):
    """Rule 5 (memory ordering): off x86-64 and aarch64 the protocol is not known to
    be safe, so check_platform, serve, connect and open_segment refuse with
    UnsupportedPlatformError naming the CPU, even for a store that exists."""
    _refused_everywhere(served, names, monkeypatch, machine)


@pytest.mark.parametrize("machine", ["aarch64", "arm64"])
def test_aarch64_needs_the_compiled_core(served, names, monkeypatch, machine):
    """Rule 5 (memory ordering): pure Python cannot issue barriers, so on aarch64 the
    pure-Python core is refused everywhere, naming the fix."""
    monkeypatch.setattr(_compiled, "native", None)
    _refused_everywhere(served, names, monkeypatch, machine)


def _refused_everywhere(served, names, monkeypatch, machine):
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


@pytest.mark.parametrize("machine", ["x86_64", "AMD64", "aarch64", "arm64"])
def test_x86_64_and_aarch64_with_the_compiled_core_are_accepted(served, monkeypatch, machine):
    """Rule 5 (memory ordering): x86-64, under either spelling, is accepted; so is
    aarch64 when the compiled core runs (C11 atomics order every protocol access,
    protocol.h)."""
    if machine.startswith("a") and machine != "AMD64" and _compiled.native is None:
        pytest.skip("the pure-Python core runs here (test_aarch64_needs_the_compiled_core covers it)")
    n, _ = served(capacity=4)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    L.check_platform()
    with shmstore.connect(n) as s:
        s.put("k", 1)
        assert s.get("k") == 1


# -- rule 6: single 8-byte accesses; a referenced slot is never written ----------------


@pytest.mark.parametrize("key_size,value_size,memory", [
    (8, 8, 0), (13, 29, 0), (64, 1024, 0), (1, 1, 0), (255, 4093, 0), (13, 29, 4 << 20), (255, 70000, 8 << 20)])
def test_layout_puts_every_protocol_word_on_an_8_byte_boundary(key_size, value_size, memory):
    """Rule 6 (single 8-byte accesses): whatever the sizes, the page table, the pages,
    every slot of every class (so its seq word) and the index start on 8-byte
    boundaries (so a 'Q' item is one aligned load); the regions do not overlap; a
    single-class store has room for its capacity + 1 slots."""
    lay = L.Layout(capacity=37, key_size=key_size, value_size=value_size, memory=memory).validate()
    assert L.HEADER_SIZE % L.PAGE == 0 and lay.pt_offset >= L.HEADER_SIZE
    assert lay.pages_offset % L.PAGE == 0 and lay.pages_offset >= lay.pt_offset + 8 * lay.npages
    assert lay.page_size & (lay.page_size - 1) == 0 and lay.page_size % L.SLOT_UNIT == 0
    assert L.SLOT_UNIT % 8 == 0 and all(c % L.SLOT_UNIT == 0 for c in lay.classes)
    assert list(lay.classes) == sorted(set(lay.classes)) and lay.classes[0] >= L.MIN_SLOT or not memory
    assert lay.largest_slot >= L.slot_need(key_size, value_size) and lay.largest_slot <= lay.page_size
    assert lay.index_offset % L.PAGE == 0 and lay.index_offset >= lay.pages_offset + lay.npages * lay.page_size
    assert lay.size % L.PAGE == 0 and lay.size >= lay.index_offset + lay.nbuckets * 8
    assert lay.nbuckets & (lay.nbuckets - 1) == 0
    if not memory:
        assert lay.nbuckets >= 2 * lay.nslots
        assert lay.npages * (lay.page_size // lay.largest_slot) >= lay.nslots == lay.capacity + 1
    header_words = [v for k, v in vars(L).items() if k.startswith("H_") and k != "H_WORDS"]
    assert all(isinstance(v, int) and 0 <= v < L.H_WORDS for v in header_words)
    assert L.class_word(L.MAX_CLASSES - 1, L.C_ASKED) < L.H_WORDS


def test_segment_views_are_aligned_u64(store):
    """Rule 6 (single 8-byte accesses): Segment.q is a memoryview cast 'Q' (8-byte
    items) over a page-aligned mapping, and the numpy views are aligned uint64."""
    seg = store._seg
    assert seg.q.format == "Q" and seg.q.itemsize == 8 and seg.q.c_contiguous
    assert len(seg.q) * 8 == len(seg.mv)
    base = np.frombuffer(seg.mm, np.uint8)
    pt = seg.page_table()
    index = seg.index_view()
    try:
        assert base.ctypes.data % L.PAGE == 0
        for view in (pt, index):
            assert view.dtype == np.uint64 and view.ctypes.data % 8 == 0
            assert all(st % 8 == 0 for st in view.strides)
        refs, _ = seg.slot_refs()
        assert len(refs) >= seg.layout.capacity + 1
        for slot in refs.tolist():
            assert SlotGeometry(seg, slot).base % 8 == 0
        assert seg.headers(refs).dtype == np.uint64
    finally:
        del base, pt, index


def test_readers_load_protocol_words_only_through_the_u64_view(names):
    """Rule 6 (single 8-byte accesses), reading side: read_slot, lookup (hit, and a
    miss past a colliding bucket) and the get fast path load seq, meta and buckets
    through Segment.q; the byte view is only ever sliced inside key/value areas."""
    with engine_side(names(), compiled=None, capacity=8, key_size=8, value_size=16) as (n, wseg, eng):
        a, b, missing = colliding_keys(wseg.mask, 3)
        eng.put(a.encode(), enc(1))
        eng.put(b.encode(), enc(2))
        reader = open_segment(n)
        try:
            with spied(reader) as (q, mv, log):
                g = SlotGeometry(reader, reader.lookup(a.encode())[0])
                reader.read_slot(g.slot)
                reader.lookup(b.encode())
                assert reader.lookup(missing.encode()) is None
                rd = make_readers(reader, dec, lambda *x: pytest.fail("stale path"))
                get = rd.get
                assert get(a) == 1 and get(b) == 2
                del rd
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


def test_engine_stores_protocol_words_whole_and_only_inside_odd_windows(names):
    """Rule 6 (single 8-byte accesses), writing side, and the write order of the
    seqlock: the engine stores seq, meta and buckets through the u64 view; every byte
    it copies into a slot, and every other word of that slot, is stored while the
    slot's seq is odd; a bucket is only pointed at a slot whose write is complete.

    The Python stores (the pure core's), spied on through the engine's views; the
    compiled writer makes the same stores in C (protocol.h's W1-W4, proved by the
    ThreadSanitizer harness) and leaves the same segment (tests/test_cwrite.py)."""
    from shmstore._channel import OP_DELETE, OP_PUT

    with engine_side(names(), compiled=False, capacity=6, key_size=8, value_size=32) as (n, wseg, eng):
        log: list = []
        eng.q, eng.mv = WordsSpy(wseg.q, log), BytesSpy(wseg.mv, log)
        eng.put(b"a", enc(1))
        eng.put(b"a", enc("x" * 20))
        eng.put(b"b", enc(2))
        eng.incr(b"n", 5)
        eng.delete(b"a")
        eng.batch([[OP_PUT, b"c", enc(3), 0], [OP_PUT, b"c", enc(4), 0], [OP_DELETE, b"b"]])
        eng.cas(b"c", enc(5), eng.get(b"c")[0])
        seq_of: dict[int, int] = {slot: wseg.q[SlotGeometry(wseg, slot).w] for slot in wseg.slot_refs()[0].tolist()}
        # Replay the log in order, tracking each slot's seq as last stored.
        first_seq: dict[int, int] = {}
        pages_start = 8 * wseg.slot0
        slots_end = pages_start + wseg.npages * wseg.page_size
        bucket_stores = 0
        seq_now: dict[int, int] = {}
        for entry in log:
            kind = entry[0]
            if kind == "qw":
                i, v = entry[1], entry[2]
                off = i * 8
                if pages_start <= off < slots_end:
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


def test_the_referenced_slot_sampler_can_fail(names):
    """Rule 6: the sampler above reports a referenced slot that is odd (a writer that
    wrote in place would leave exactly that)."""
    with engine_side(names(), compiled=None, capacity=4, key_size=8, value_size=16) as (n, wseg, eng):
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
    for what, view in (("page table", seg.page_table()), ("index", seg.index_view())):
        if view.flags.writeable:
            problems.append(f"the numpy {what} view is writeable")
    del view
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
