"""Consistent snapshots: one epoch across every key and every call.

- The copy's validation, driven directly with the coordinator's Engine on a segment
  of our own: a write after the epoch, a delete after it, a move of the index during
  the copy are each refused (never a copy that mixes epochs).
- Both ways of taking the copy (lock-free, and the coordinator's handover) answer the
  same, and a snapshot ignores everything written after it.
- The stress test of filelock's shape: writer processes move value between accounts in
  batches while reader processes (fork and spawn) check, inside snapshots, that the
  total never changes, read key by key with ``snap.get`` AND with ``snap.get_many``,
  and that the move counters agree with the writers' batch counters (a second,
  independent invariant). Seeded; set SEED=... to replay; the seed is printed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time

import msgspec
import posix_ipc
import pytest

import shmstore
import shmstore._snapshot as S
from tests.helpers.processes import run_collecting
from shmstore._layout import H_EPOCH, H_INDEX_GEN, Layout, data_name, key_hash
from shmstore._shm import create_segment, unlink_quietly
from shmstore.coordinator._engine import Engine

#: Every test here runs on both cores: the compiled one and pure Python (conftest.core).
pytestmark = pytest.mark.usefixtures("core")

enc = msgspec.msgpack.encode


@pytest.fixture
def engine(names):
    """The coordinator's Engine on a segment of our own (no coordinator process)."""
    n = names("eng")
    seg = create_segment(n, Layout(capacity=64, key_size=16, value_size=32), 0)
    e = Engine(seg)
    e.rebuild_free_list()
    try:
        yield e
    finally:
        seg.close()
        unlink_quietly(posix_ipc.SharedMemory, data_name(n))


def _as_dict(snap_tuple, key_size=16, value_size=32):
    epoch, idx, data, offsets = snap_tuple
    snap = S.Snapshot(epoch, idx, data, offsets, key_size, value_size, time.time_ns(),
                      msgspec.msgpack.decode, False)
    return {k.decode(): snap.get(k) for k in snap.keys()}


def test_optimistic_copy_is_the_store_at_its_epoch(engine):
    for i in range(10):
        engine.put(b"k%d" % i, enc(i))
    engine.delete(b"k3")
    r = S.copy_optimistic(engine.seg)
    assert r is not None and r[0] == engine.epoch
    assert _as_dict(r) == {f"k{i}": i for i in range(10) if i != 3}


def test_optimistic_copy_refuses_a_record_written_after_its_epoch(engine):
    for i in range(5):
        engine.put(b"k%d" % i, enc(i))
    # An op applied but not yet published: its stamp is above 2E+2 of H_EPOCH.
    h_epoch = engine.seg.q[H_EPOCH]
    h = key_hash(b"k1")
    engine._store(b"k1", h, *engine.find(b"k1", h), enc(100), 0, engine.next_epoch())
    assert engine.seg.q[H_EPOCH] == h_epoch
    assert S.copy_optimistic(engine.seg) is None
    engine.publish()
    assert _as_dict(S.copy_optimistic(engine.seg))["k1"] == 100


def test_optimistic_copy_refuses_a_delete_after_its_epoch(engine):
    for i in range(5):
        engine.put(b"k%d" % i, enc(i))
    pos, slot = engine.find(b"k2", key_hash(b"k2"))
    engine._unlink(pos, slot, engine.next_epoch())  # applied, not published
    assert S.copy_optimistic(engine.seg) is None, "a copy missing k2 would claim k2 was gone at E"
    engine.publish()
    assert "k2" not in _as_dict(S.copy_optimistic(engine.seg))


def test_optimistic_copy_refuses_a_moving_index(engine):
    engine.put(b"a", enc(1))
    engine.seg.q[H_INDEX_GEN] += 1  # a backward shift in progress
    assert S.copy_optimistic(engine.seg) is None
    engine.seg.q[H_INDEX_GEN] += 1
    assert S.copy_optimistic(engine.seg) is not None


@pytest.fixture
def memory_engine(names):
    """The Engine on a memory store of our own: pages handed to size classes on demand."""
    n = names("eng")
    seg = create_segment(n, Layout(capacity=400, key_size=24, value_size=600, memory=8 << 20, growth=2.0), 0)
    e = Engine(seg)
    e.rebuild_free_list()
    try:
        yield e
    finally:
        e.close()
        seg.close()
        unlink_quietly(posix_ipc.SharedMemory, data_name(n))


def _fill_classes(engine, rnd: random.Random) -> dict:
    """Records of every size (keys of 1 to 24 bytes, values of 1 to ~600): most classes."""
    model = {}
    for i in range(300):
        k = (f"k{i}:" + "x" * rnd.randrange(20))[:24]
        v = "v" * rnd.randrange(590)
        engine.put(k.encode(), enc(v))
        model[k] = v
    for k in list(model)[::7]:
        engine.delete(k.encode())
        del model[k]
    return model


def test_optimistic_copy_of_records_of_every_class(memory_engine):
    """Each bucket's slot is copied whole, whatever its class: keys of every length
    (the value follows the key padded to 8 bytes) and values of every size read back
    exactly from the copy."""
    rnd = random.Random(7)
    model = _fill_classes(memory_engine, rnd)
    seg = memory_engine.seg
    used = {seg.class_of(seg.lookup(k.encode())[0]) for k in model}
    assert len(used) >= 4, f"records in only {len(used)} classes"
    r = S.copy_optimistic(seg)
    assert r is not None
    assert _as_dict(r, 24, 600) == model


def test_optimistic_copy_refuses_a_page_moved_during_the_copy(memory_engine, monkeypatch):
    """A page handed to another class while the slots are copied (its entry changes
    between the loads before and after the copy) spoils the copy."""
    rnd = random.Random(8)
    _fill_classes(memory_engine, rnd)
    seg = memory_engine.seg
    real = S.gather_rows
    moved = []

    def gather_then_move(seg_, slots, pte):
        out = real(seg_, slots, pte)
        if not moved:  # what a page move does first: the entry, at a new epoch
            page = int(slots[0]) >> seg_.ref_shift
            w = seg_.pt0 + page
            old = seg.q[w]
            memory_engine.seg.q[w] = (old & 0xFF) | ((old >> 8) + 1) << 8
            moved.append((w, old))
        return out

    monkeypatch.setattr(S, "gather_rows", gather_then_move)
    assert S.copy_optimistic(seg) is None
    assert moved
    w, old = moved[0]
    memory_engine.seg.q[w] = old
    monkeypatch.setattr(S, "gather_rows", real)
    assert S.copy_optimistic(seg) is not None


@pytest.mark.parametrize("tries", [S.SNAPSHOT_TRIES, 0], ids=["lock-free", "coordinator"])
def test_snapshot_sees_one_epoch_and_nothing_after(served, monkeypatch, tries):
    monkeypatch.setattr(S, "SNAPSHOT_TRIES", tries)
    n, _ = served(capacity=200)
    with shmstore.connect(n) as s:
        for i in range(50):
            s.put(f"k{i}", {"i": i})
        s.delete("k7")
        before = {f"k{i}": {"i": i} for i in range(50) if i != 7}
        with s.snapshot() as snap:
            assert snap.via_coordinator == (tries == 0)
            assert snap.epoch == s.epoch
            s.put("k1", "changed")
            s.delete("k2")
            s.put("new", 1)
            with s.batch() as b:
                b.put("k3", "batched")
                b.put("k7", "back")
            assert snap.get("k1") == {"i": 1} and snap["k2"] == {"i": 2}
            assert snap.get("new") is None and "new" not in snap and "k7" not in snap
            assert snap.get_many(["k3", "k7", "k1", "nope"], default=0) == [{"i": 3}, 0, {"i": 1}, 0]
            assert {k.decode(): v for k, v in snap.items()} == before
            assert len(snap) == 49
            with pytest.raises(KeyError):
                snap["new"]
        with pytest.raises(shmstore.StoreClosedError):
            snap.get("k1")
        with s.snapshot() as snap2:
            assert snap2.get("k1") == "changed" and snap2.get("k7") == "back" and snap2.epoch > snap.epoch


def test_snapshot_of_an_empty_store_and_bad_keys(store):
    with store.snapshot() as snap:
        assert snap.get("x", 5) == 5 and len(snap) == 0 and list(snap.items()) == []
        with pytest.raises(shmstore.InvalidKeyError):
            snap.get(3)


# -- across processes ----------------------------------------------------------------

ACCOUNTS = 24
START = 1000


def _mover(name: str, wid: int, batches: int, seed: int) -> None:
    rng = random.Random(seed * 100 + wid)
    s = shmstore.connect(name)
    keys = [f"acct{i}" for i in range(ACCOUNTS)]
    for n in range(1, batches + 1):
        # A read-modify-write needs CAS to be exact with several writers; here each
        # writer owns a disjoint half of the accounts, so plain batches are exact.
        mine = keys[wid::2]
        a, b = rng.sample(mine, 2)
        va, vb = s.get_many([a, b])
        x = rng.randint(1, 50)
        with s.batch() as bt:
            bt.put(a, [va[0] - x, va[1] + 1])
            bt.put(b, [vb[0] + x, vb[1] + 1])
            bt.put(f"w{wid}", n)
    s.close()


def _checker(name: str, seconds: float, tries: int, out: mp.Queue) -> None:
    S.SNAPSHOT_TRIES = tries
    s = shmstore.connect(name)
    keys = [f"acct{i}" for i in range(ACCOUNTS)]
    bad = []
    snaps = coord = 0
    epochs = set()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and len(bad) < 5:
            with s.snapshot() as snap:
                snaps += 1
                coord += snap.via_coordinator
                epochs.add(snap.epoch)
                one = [snap.get(k) for k in keys]  # key by key
                many = snap.get_many(keys)  # in one call, later
                counters = snap.get_many(["w0", "w1"], default=0)
                total = sum(v[0] for v in one)
                moves = sum(v[1] for v in one)
                if total != ACCOUNTS * START:
                    bad.append(f"total {total} at epoch {snap.epoch}")
                if many != one:
                    bad.append(f"get_many disagrees with get inside one snapshot at epoch {snap.epoch}")
                if moves != 2 * sum(counters):
                    bad.append(f"moves {moves} != 2 x batches {counters} at epoch {snap.epoch}")
    except BaseException as e:  # report, never hang the parent
        bad.append(f"{type(e).__name__}: {e}")
    finally:
        s.close()
        out.put((os.getpid(), snaps, coord, len(epochs), bad))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_snapshot_total_never_changes_under_batched_moves(served, method):
    seed = int(os.environ.get("SEED", time.time_ns() % 10**9))
    print(f"seed {seed}")
    n, _ = served(capacity=200)
    with shmstore.connect(n) as s:
        with s.batch() as b:
            for i in range(ACCOUNTS):
                b.put(f"acct{i}", [START, 0])
            b.put("w0", 0)
            b.put("w1", 0)
    ctx = mp.get_context(method)
    out = ctx.Queue()
    writers = [ctx.Process(target=_mover, args=(n, w, 400, seed)) for w in range(2)]
    # One checker copies lock-free first; one always asks the coordinator.
    checkers = [ctx.Process(target=_checker, args=(n, 2.0, t, out)) for t in (S.SNAPSHOT_TRIES, 0)]
    results = run_collecting(writers + checkers, out, len(checkers))
    problems = [b for r in results for b in r[4]]
    print(results)
    assert not problems, f"seed {seed}: {results}"
    assert all(r[1] > 0 for r in results), results
    assert any(r[2] > 0 for r in results), f"the coordinator path was never taken: {results}"
    with shmstore.connect(n) as s:
        final = s.get_many([f"acct{i}" for i in range(ACCOUNTS)])
        assert sum(v[0] for v in final) == ACCOUNTS * START
        assert sum(v[1] for v in final) == 2 * 800 and s.get_many(["w0", "w1"]) == [400, 400]


def test_handovers_never_picked_up_are_removed(served, names):
    """A client that asks for a copy and never maps it (it died) leaves nothing behind:
    the coordinator removes it at its clean stop, destroy() after a SIGKILL."""
    from shmstore import _channel as C
    from tests.helpers.processes import shm_objects

    for stop in ("graceful", "sigkill"):
        n, coord = served(capacity=10)
        with shmstore.connect(n) as s:
            s.put("a", 1)
            seg_name, epoch = s._request([C.OP_SNAPSHOT, 1], "snapshot")
            assert seg_name.lstrip("/") in shm_objects(n) and epoch == s.epoch
        if stop == "graceful":
            coord.stop()
            assert not [o for o in shm_objects(n) if "@x" in o], shm_objects(n)
        else:
            coord.kill()
            shmstore.destroy(n)
            assert shm_objects(n) == []


@pytest.mark.parametrize("tries", [S.SNAPSHOT_TRIES, 0], ids=["lock-free", "coordinator"])
def test_snapshots_match_a_dict_model_at_their_epoch(served, monkeypatch, tries):
    """Seeded random puts, deletes and batches against a dict model; snapshots taken
    along the way must each keep showing the model as it was when they were taken."""
    monkeypatch.setattr(S, "SNAPSHOT_TRIES", tries)
    seed = int(os.environ.get("SEED", time.time_ns() % 10**9))
    print(f"seed {seed}")
    rng = random.Random(seed)
    n, _ = served(capacity=64, key_size=8, value_size=64)
    keys = [f"k{i}" for i in range(80)]
    model: dict[str, object] = {}
    snaps = []
    with shmstore.connect(n) as s:
        for step in range(400):
            r = rng.random()
            k = rng.choice(keys)
            if r < 0.45 and (k in model or len(model) < 64):
                s.put(k, [step, k])
                model[k] = [step, k]
            elif r < 0.7:
                s.delete(k)
                model.pop(k, None)
            elif r < 0.85:
                with s.batch() as b:
                    for k2 in rng.sample(keys, 3):
                        if k2 in model:
                            b.delete(k2)
                            model.pop(k2)
                        elif len(model) < 64:
                            b.put(k2, step)
                            model[k2] = step
            else:
                snaps.append((s.snapshot(), dict(model)))
            for snap, want in rng.sample(snaps, min(3, len(snaps))):
                probe = rng.sample(keys, 10)
                assert snap.get_many(probe, default="-") == [want.get(p, "-") for p in probe], seed
        for snap, want in snaps:
            assert {kb.decode(): v for kb, v in snap.items()} == want, seed
            snap.close()


def test_snapshot_judges_expiry_by_the_ttl_clock(served, tmp_path, monkeypatch, request):
    """A snapshot reads the clock every expiry check reads (shmstore/_ttl.py's, which a
    test clock moves), so it never shows a record that get() already reads as missing.
    The clock moves in this process only: the coordinator does not reclaim meanwhile."""
    from shmstore import _ttl

    n, _ = served(capacity=100)
    clock = tmp_path / "clock"
    clock.write_text("0")
    monkeypatch.setattr(_ttl, "_clock_path", None)  # restored after the test
    _ttl.set_test_clock(str(clock))  # this process only (the compiled core's clock too)
    request.addfinalizer(lambda: _ttl.set_test_clock(None))
    with shmstore.connect(n) as s:
        s.put("a", 1, ttl=5)
        s.put("b", 2)
        with s.snapshot() as snap:
            assert snap.get("a") == 1
        clock.write_text("10")
        assert s.get("a") is None and s.get("b") == 2
        with s.snapshot() as snap:
            assert not snap.via_coordinator
            assert snap.get("a") is None and "a" not in snap and snap.get("b") == 2
            assert sorted(snap.keys()) == [b"b"] and len(snap) == 1
