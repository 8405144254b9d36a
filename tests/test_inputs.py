"""Issue 13 defects 6, 7 and 9, beyond the probes in test_hardening.py: every public
argument is checked in the calling process and a bad one is a typed ShmStoreError
(that is also the ValueError/TypeError callers catch), with nothing written; every
reader wait ends, also while the coordinator is alive but stopped.

Real coordinators; nothing here asserts a time (bounds only guard against hangs).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading

import numpy as np
import pytest

import shmstore

NAN = float("nan")
BAD_TIMEOUTS = [NAN, math.inf, -math.inf, -1, -0.5, True, False, "1", b"1", 10**400, [1]]
BAD_KEY = "k\udcff"


def _typed(fn) -> str:
    try:
        fn()
        return "accepted"
    except shmstore.ShmStoreError as e:
        return "typed" if isinstance(e, (ValueError, TypeError)) else f"typed but {type(e).__name__}"
    except Exception as e:  # noqa: BLE001 - what escaped is the finding
        return f"{type(e).__name__}: {e}"


def _timeout_entries(s: shmstore.Store, tmp_path) -> dict:
    def arun(coro_fn):
        return lambda: asyncio.run(coro_fn())

    async def awatch(t):
        async for _ in s.awatch(timeout=t):
            break

    return {
        "put": lambda t: s.put("k", 1, timeout=t),
        "put wait=False": lambda t: s.put("k", 1, wait=False, timeout=t),
        "delete": lambda t: s.delete("x", timeout=t),
        "compare_and_set": lambda t: s.compare_and_set("k", 1, version=0, timeout=t),
        "incr": lambda t: s.incr("n", timeout=t),
        "flush": lambda t: s.flush(timeout=t),
        "snapshot": lambda t: s.snapshot(timeout=t).close(),
        "table": lambda t: s.table("tb", np.dtype([("a", "<i8")]), 4, timeout=t),
        "checkpoint": lambda t: s.checkpoint(timeout=t),
        "backup": lambda t: s.backup(tmp_path / "bk", timeout=t),
        "watch": lambda t: s.watch(timeout=t),
        "awatch": lambda t: asyncio.run(awatch(t)),
        "aput": lambda t: asyncio.run(s.aput("k", 1, timeout=t)),
        "aincr": lambda t: asyncio.run(s.aincr("n", timeout=t)),
        "adelete": lambda t: asyncio.run(s.adelete("x", timeout=t)),
        "acompare_and_set": lambda t: asyncio.run(s.acompare_and_set("k", 1, version=0, timeout=t)),
        "connect": lambda t: shmstore.connect(s.name, timeout=t).close(),
        "open": lambda t: shmstore.open(s.name, timeout=t).close(),
        "Store()": lambda t: shmstore.Store(s.name, timeout=t).close(),
    }


@pytest.mark.timeout(120)
def test_every_timeout_entry_refuses_bad_timeouts_at_once(store, tmp_path):
    """Defect 7: NaN, infinities (where a wait must end), negatives, bools, strings and
    unconvertible numbers are an InvalidArgumentError in the caller, at every entry
    taking ``timeout=``; nothing is written, no table or backup made."""
    s = store
    got = {}
    for where, fn in _timeout_entries(s, tmp_path).items():
        for t in BAD_TIMEOUTS:
            if where in ("watch", "awatch") and t == math.inf:
                continue  # watch: inf is None (wait for ever), checked below
            got[f"{where}(timeout={t!r:.12})"] = _typed(lambda: fn(t))
    bad = {w: o for w, o in got.items() if o != "typed"}
    assert not bad, f"not a typed error: {bad}"
    assert len(s) == 0 and not (tmp_path / "bk").exists()
    with pytest.raises(shmstore.TableNotFoundError):
        s.table("tb")
    with pytest.raises(shmstore.InvalidArgumentError) as e:
        s.put("k", 1, timeout=NAN)
    assert "timeout" in str(e.value) and "nan" in str(e.value)


@pytest.mark.timeout(60)
def test_good_timeouts_still_work(store):
    """0, ints, floats and numpy floats are timeouts; watch takes inf as 'for ever'."""
    s = store
    assert s.put("a", 1, timeout=3) and s.put("b", 2, timeout=np.float64(2.5))
    s.flush(timeout=0)
    it = s.watch(timeout=math.inf, since=s.epoch)
    s.put("c", 3)
    keys, _ = next(it)
    assert b"c" in keys
    with shmstore.connect(s.name, timeout=np.float32(1.0)) as h:
        assert h.get("a") == 1


def _key_entries(s: shmstore.Store) -> dict:
    many = [f"ok{i}" for i in range(40)]

    def snap(fn):
        def run():
            with s.snapshot() as snap:
                return fn(snap)
        return run

    async def abatch():
        async with s.abatch() as b:
            b.put(BAD_KEY, 1)

    return {
        "get_many (numpy path)": lambda: s.get_many([*many, BAD_KEY]),
        "get_many (first)": lambda: s.get_many([BAD_KEY]),
        "snapshot.get_many": snap(lambda sn: sn.get_many(["a", BAD_KEY])),
        "snapshot[key]": snap(lambda sn: sn[BAD_KEY]),
        "key in snapshot": snap(lambda sn: BAD_KEY in sn),
        "put wait=False": lambda: s.put(BAD_KEY, 1, wait=False),
        "aput": lambda: asyncio.run(s.aput(BAD_KEY, 1)),
        "aincr": lambda: asyncio.run(s.aincr(BAD_KEY)),
        "adelete": lambda: asyncio.run(s.adelete(BAD_KEY)),
        "acompare_and_set": lambda: asyncio.run(s.acompare_and_set(BAD_KEY, 1, version=0)),
        "abatch.put": lambda: asyncio.run(abatch()),
        "changes(prefix=b'..' as str)": lambda: s.changes(0, prefix="\ud800"),
        "watch(prefix=), at the call": lambda: s.watch(prefix=BAD_KEY),
        "table name": lambda: s.table(BAD_KEY),
    }


@pytest.mark.timeout(60)
def test_lone_surrogate_keys_at_the_other_entries(store):
    """Defect 9, the entries the probe does not list: get_many's numpy path, snapshot
    lookups, pipelined and async writes, table names. The fast ``get`` (its closure)
    raises too, and a valid key read through it afterwards still works."""
    s = store
    s.put("a", 1)
    got = {w: _typed(fn) for w, fn in _key_entries(s).items()}
    bad = {w: o for w, o in got.items() if o != "typed"}
    assert not bad, f"not a typed error: {bad}"
    s.flush()
    for _ in range(3):  # cached or not
        with pytest.raises(shmstore.InvalidKeyError) as e:
            s.get(BAD_KEY)
        assert "os.fsencode" in str(e.value)
        assert s.get("a") == 1
    assert sorted(s.keys()) == [b"a"]


@pytest.mark.timeout(60)
def test_wrong_containers_flags_deltas_ttls_and_versions(store):
    """Defect 9: get_many of None, a number, one str/bytes; Snapshot.get_many(None);
    wait= that is not a bool; incr deltas bool/str/float/out of 64 bits; ttls NaN,
    inf, bool, str, <= 0, 10**400; versions above 2**64 - 1 or of another type; values
    nested too deep (in a batch too). All typed, nothing written."""
    s = store
    s.put("x", 0)
    v0 = s.version("x")
    cases = {
        "get_many(None)": lambda: s.get_many(None),
        "get_many(5)": lambda: s.get_many(5),
        "get_many('abc')": lambda: s.get_many("abc"),
        "get_many(b'abc')": lambda: s.get_many(b"abc"),
        "snapshot.get_many(None)": lambda: _snap(s, lambda sn: sn.get_many(None)),
        "put wait=None": lambda: s.put("w", 1, wait=None),
        "put wait='yes'": lambda: s.put("w", 1, wait="yes"),
        "delete wait=2": lambda: s.delete("x", wait=2),
        "batch wait=nan": lambda: s.batch(wait=NAN),
        "connect spin_us=nan": lambda: shmstore.connect(s.name, spin_us=NAN),
        "connect spin_us=-1": lambda: shmstore.connect(s.name, spin_us=-1),
        "open read_cache=-1": lambda: shmstore.open(s.name, read_cache=-1),
        "watch since=-1": lambda: s.watch(since=-1),
        "watch min_interval=nan": lambda: s.watch(min_interval=NAN),
    }
    for d in (True, "1", 1.0, None, 2**64, -(2**63) - 1):
        cases[f"incr delta={d!r}"] = lambda d=d: s.incr("x", d)
    for t in (NAN, math.inf, True, "1", 0, -1, 10**400, 1e300):
        cases[f"put ttl={t!r:.12}"] = lambda t=t: s.put("t", 1, ttl=t)
        cases[f"batch put ttl={t!r:.12}"] = lambda t=t: _batch(s, lambda b: b.put("t", 1, ttl=t))
    for v in (-1, "1", None, 1.0, 2**64, 2**200, True, False, NAN):
        cases[f"compare_and_set version={v!r:.12}"] = lambda v=v: s.compare_and_set("x", 1, version=v)
        cases[f"acompare_and_set version={v!r:.12}"] = lambda v=v: asyncio.run(
            s.acompare_and_set("x", 1, version=v))
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    cases["batch put deep value"] = lambda: _batch(s, lambda b: b.put("d", deep))
    cases["compare_and_set deep value"] = lambda: s.compare_and_set("d", deep, version=0)
    got = {w: _typed(fn) for w, fn in cases.items()}
    bad = {w: o for w, o in got.items() if o != "typed"}
    assert not bad, f"not a typed error: {bad}"
    with pytest.raises(shmstore.InvalidTTLError):
        s.put("t", 1, ttl=10**400)
    with pytest.raises(shmstore.ValueEncodingError):
        s.incr("x", True)
    assert s.get("x") == 0 and s.version("x") == v0 and sorted(s.keys()) == [b"x"]
    assert s.compare_and_set("x", 5, version=v0) > v0  # a good version still works
    assert s.put("w", 1, wait=0) is None
    s.flush()
    assert s.get("w") == 1


def _snap(s, fn):
    with s.snapshot() as sn:
        return fn(sn)


def _batch(s, fn):
    with s.batch() as b:
        fn(b)


def test_argument_errors_pickle_and_are_stdlib_errors():
    """The new error crosses Pool boundaries and is caught as ValueError or TypeError."""
    import pickle

    e = pickle.loads(pickle.dumps(shmstore.InvalidArgumentError("timeout must be ...")))
    assert isinstance(e, shmstore.InvalidArgumentError) and str(e) == "timeout must be ..."
    assert issubclass(shmstore.InvalidArgumentError, (ValueError)) and issubclass(
        shmstore.InvalidArgumentError, TypeError)
    assert issubclass(shmstore.InvalidKeyError, ValueError)  # as UnicodeEncodeError was


@pytest.mark.timeout(90)
def test_read_of_a_slot_left_odd_by_a_stopped_coordinator_is_bounded(served):
    """Defect 6 for slots: a slot whose seq is odd (written by a coordinator that is
    then SIGSTOPped, set here through a test-owned writable mapping) makes a reader
    that must wait for it (``read_slot``, as change feeds do) raise StoreTimeoutError
    after the handle's timeout, naming the pid and what to do, although the pid is
    alive; once the coordinator runs again, reads work."""
    from shmstore._shm import open_segment

    n, coord = served("oddslot", capacity=20)
    with shmstore.connect(n, timeout=1) as s:
        s.put("a", 1)
        seg = s._seg
        refs, _ = seg.slot_refs()
        free = int(refs[refs != seg.lookup(b"a")[0]][0])  # a slot no bucket points to
        w = seg.slot0 + free * seg.slot_words
        wseg = open_segment(n, writable=True)
        out: list = []
        try:
            os.kill(coord.pid, signal.SIGSTOP)
            try:
                old = wseg.q[w]
                wseg.q[w] = old + 1  # odd: "being written"
                try:
                    t = threading.Thread(target=lambda: out.append(_raised(lambda: seg.read_slot(free))),
                                         daemon=True)
                    t.start()
                    t.join(30)
                finally:
                    wseg.q[w] = old
            finally:
                os.kill(coord.pid, signal.SIGCONT)
        finally:
            wseg.close()
        assert out, "read_slot of an odd slot was still waiting after 30 s of a stopped coordinator"
        err = out[0]
        assert isinstance(err, shmstore.StoreTimeoutError), repr(err)
        assert str(coord.pid) in str(err) and "SIGSTOP" in str(err), str(err)
        assert s.get("a") == 1
        s.put("b", 2)
        assert s.get("b") == 2


def _raised(fn):
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test
        return e
