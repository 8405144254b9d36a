"""TTL: expired records read as missing everywhere, the coordinator reclaims them, and
expiry survives restarts. Time moves through the test clock file (shmstore/_ttl.py),
which the coordinator and every child process read too, so nothing sleeps for a ttl."""

from __future__ import annotations

import json
import math
import random

import numpy as np

import pytest

import shmstore
from shmstore import _layout as L
from shmstore import _ttl
from tests.helpers.processes import python, reap, wait_for


READER = """
import json, sys, shmstore
s = shmstore.connect(sys.argv[1])
def ttl(k):
    try:
        return s.ttl(k)
    except KeyError:
        return "missing"
print(json.dumps({"get": s.get("a", "default"), "in": "a" in s, "version": s.version("a"),
                  "many": s.get_many(["a", "b"]), "keys": sorted(k.decode() for k in s.keys()),
                  "items": sorted(k.decode() for k, _ in s.items()), "ttl_a": ttl("a"),
                  "ttl_b": ttl("b")}))
s.close()
"""


def _read_in_child(n: str) -> dict:
    p = python(READER, n)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        reap(p)
    assert p.returncode == 0, err
    return json.loads(out)


def test_bad_ttl_is_refused_before_anything_is_written(store):
    for bad in (0, -1, float("nan"), float("inf"), "10", True, 1e12):
        with pytest.raises(shmstore.InvalidTTLError) as e:
            store.put("k", 1, ttl=bad)
        assert isinstance(e.value, ValueError)
        with pytest.raises(shmstore.InvalidTTLError):
            store.compare_and_set("k", 1, version=0, ttl=bad)
        with pytest.raises(shmstore.InvalidTTLError):
            with store.batch() as b:
                b.put("k", 1, ttl=bad)
    assert "k" not in store and store.epoch == 0


def test_expired_record_reads_as_missing_in_another_process_without_a_coordinator(served, clock):
    n, coord = served(capacity=100)
    with shmstore.connect(n) as s:
        s.put("a", "soon gone", ttl=5)
        s.put("b", "stays")
        before = _read_in_child(n)
        assert before["get"] == "soon gone" and before["in"] and before["version"] == 1
        assert before["many"] == ["soon gone", "stays"] and before["keys"] == ["a", "b"]
        assert 0 < before["ttl_a"] <= 5 and before["ttl_b"] is None
        coord.stop()  # nobody can reclaim anything: the readers decide alone
        clock(6)
        after = _read_in_child(n)
        assert after == {"get": "default", "in": False, "version": None, "many": [None, "stays"],
                         "keys": ["b"], "items": ["b"], "ttl_a": "missing", "ttl_b": None}
        assert s.get("a") is None and "a" not in s and s.version("a") is None
        with pytest.raises(KeyError):
            s["a"]
        assert s.get_many(["a", "b"] * 20) == [None, "stays"] * 20  # the vectorized path too


def test_ttl_left_put_clears_incr_keeps(store):
    store.put("a", 1, ttl=60)
    left = store.ttl("a")
    assert 59 < left <= 60
    store.incr("a")  # keeps the expiry (as Redis INCR does)
    assert store.get("a") == 2 and 0 < store.ttl("a") <= left
    store.put("a", 3)  # a put without ttl= clears it (as Redis SET does)
    assert store.ttl("a") is None
    v = store.version("a")
    store.compare_and_set("a", 4, version=v, ttl=30)
    assert 0 < store.ttl("a") <= 30
    with store.batch() as b:
        b.put("b", 1, ttl=10)
        b.put("c", 1)
    assert 0 < store.ttl("b") <= 10 and store.ttl("c") is None
    with pytest.raises(KeyError):
        store.ttl("missing")


def test_ops_on_an_expired_record_treat_it_as_missing(served, clock):
    n, _ = served(capacity=100)
    with shmstore.connect(n) as s:
        for k in ("cas", "incr", "del", "put"):
            s.put(k, 10, ttl=1)
        clock(2)
        # Whether the coordinator's tick reclaimed them already or not, the answers agree.
        assert s.compare_and_set("cas", "new", version=0) > 0
        assert s.incr("incr") == 1 and s.ttl("incr") is None  # counts from 0, no expiry
        assert s.delete("del") is False
        s.put("put", 5)
        assert s.get_many(["cas", "incr", "del", "put"]) == ["new", 1, None, 5]


def test_coordinator_reclaims_expired_records_and_capacity_comes_back(served, clock):
    n, _ = served(capacity=64, key_size=16, value_size=32)
    with shmstore.connect(n) as s:
        e0 = s.epoch
        with s.batch() as b:
            for i in range(64):
                b.put(f"old{i}", i, ttl=1)
        with pytest.raises(shmstore.StoreFullError):
            s.put("new", 1)
        clock(2)
        # No reader asks for them: the coordinator's background reclaim frees the slots.
        wait_for(lambda: len(s) == 0, timeout=30, what="the coordinator to reclaim expired records")
        assert s._seg.q[L.H_EXPIRED] == 64
        st = s.stats()
        assert st.expired == 64 and "shmstore_expired_total{store=\"%s\"} 64" % n in shmstore.prometheus_text(st)
        # Each reclaim was a delete at its own epoch: the feed lists every expired key.
        keys, e1 = s.changes(e0)
        assert {f"old{i}".encode() for i in range(64)} <= set(keys)
        with s.batch() as b:
            for i in range(64):
                b.put(f"new{i}", i)  # no StoreFullError
        assert len(s) == 64 and s.get("new63") == 63
        # Those puts reused the reclaimed slots, erasing their deletions: a feed from
        # before them is refused, one from after the reclaim is complete.
        with pytest.raises(shmstore.FeedTruncatedError):
            s.changes(e0)
        assert s.changes(e1)[0] == sorted(f"new{i}".encode() for i in range(64))


def test_expiry_survives_restart_from_wal_and_checkpoint(served, names, clock, tmp_path):
    path = tmp_path / "data"
    n, coord = served(path=str(path), capacity=100)
    with shmstore.connect(n) as s:
        s.put("long", "L", ttl=1000)
        s.put("short", "S", ttl=1)
        s.put("none", "N")
        s.put("cas", 1, ttl=1)
        clock(5)
        # A logged purge before the CAS (or the tick's logged reclaim) must replay alike.
        s.compare_and_set("cas", 2, version=0)
        wait_for(lambda: s._seg.q[L.H_EXPIRED] >= 2, timeout=30, what="reclaim of 'short'")
        versions = {k: s.version(k) for k in ("long", "none", "cas")}
        left = s.ttl("long")
        cursor = s.epoch
    coord.kill()  # SIGKILL: recovery replays the WAL, OP_EXPIRE records included
    shmstore.destroy(n)  # no segment to adopt: rebuild from the data directory
    coord2 = shmstore.serve(n, path=str(path))
    names.coordinators.append(coord2)
    with shmstore.connect(n) as s:
        assert s.get_many(["long", "short", "none", "cas"]) == ["L", None, "N", 2]
        assert {k: s.version(k) for k in versions} == versions
        assert s.ttl("none") is None and s.ttl("cas") is None
        assert math.isclose(s.ttl("long"), left, abs_tol=30)
        # A rebuild from disk keeps no freed slots: a feed cursor from before must resync.
        with pytest.raises(shmstore.FeedTruncatedError):
            s.changes(cursor)
        assert s.changes(s.epoch) == ([], s.epoch)
        # ttl counts from the real clock plus the test clock's offset: 60 s outlasts a
        # slow stop, destroy and rebuild below; the test clock then moves past it.
        s.put("later", 1, ttl=60)
        s.checkpoint()
    coord2.stop()
    shmstore.destroy(n)  # rebuild from the checkpoint alone
    coord3 = shmstore.serve(n, path=str(path))
    names.coordinators.append(coord3)
    with shmstore.connect(n) as s:
        assert 0 < s.ttl("later") <= 60 and 900 < s.ttl("long") <= 1000
        clock(61)
        assert s.get("later") is None and s.get("long") == "L"


def _state(s: shmstore.Store) -> dict:
    """Every live record: value, version and the raw expiry word."""
    seg = s._seg
    out = {}
    for kb, value in s.items():
        slot, seq, version, _, _ = seg.lookup(kb)
        out[kb] = (value, version, seg.q[seg.slot0 + slot * seg.slot_words + L.S_EXPIRY])
    return out


def test_random_ops_with_expiries_replay_to_the_same_state(served, names, clock, tmp_path):
    """Random puts, CAS, incrs, deletes and batches with ttls while the clock jumps, so
    the coordinator both purges before ops and reclaims in the background; after a
    SIGKILL and a rebuild from the WAL alone every record, version and expiry is back."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    path = tmp_path / "data"
    n, coord = served(path=str(path), capacity=200, key_size=8, value_size=16)
    with shmstore.connect(n) as s:
        keys = [f"k{i}" for i in range(12)]
        for step in range(250):
            k = rng.choice(keys)
            ttl = rng.choice([None, 10, 20, 1000])
            r = rng.random()
            if r < 0.3:
                s.put(k, step, ttl=ttl)
            elif r < 0.45:
                try:
                    s.compare_and_set(k, step, version=s.version(k) or 0, ttl=ttl)
                except shmstore.VersionConflictError:
                    pass  # it expired between our read and the CAS: fine, nothing written
            elif r < 0.6:
                try:
                    s.incr(k)
                except shmstore.ValueEncodingError:
                    pass  # not an integer record
            elif r < 0.75:
                s.delete(k)
            elif r < 0.85:
                with s.batch() as b:
                    for j in rng.sample(keys, 3):
                        b.put(j, step, ttl=ttl)
            else:
                clock(15)
        clock(15)

        def nothing_due() -> bool:
            exp = s._seg.headers(s._seg.slot_refs()[0])[:, L.S_EXPIRY]
            return not ((exp != 0) & (exp <= np.uint64(_ttl.now_ns()))).any()

        wait_for(nothing_due, timeout=30, what="the coordinator to reclaim every due record")
        before = _state(s)
        assert s._seg.q[L.H_EXPIRED] > 0, f"seed {seed}: nothing expired; the test tests nothing"
    coord.kill()
    shmstore.destroy(n)
    coord2 = shmstore.serve(n, path=str(path))
    names.coordinators.append(coord2)
    with shmstore.connect(n) as s:
        assert _state(s) == before, f"seed {seed}"
