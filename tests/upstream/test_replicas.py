"""Replica stores against a real redis-server on 127.0.0.1 (issue 18's done-when).

Several "hosts" on one machine: each replica is a store of its own name, all with the
same ``upstream_name``. Every test's stores, coordinators and processes are cleaned up
by the ``names`` fixture and the redis fixtures, also when the test fails.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

import shmstore
from shmstore import _layout as L
from shmstore.coordinator import _replica as replica_mod
from tests.upstream._replica_workers import writer

CTX = multiprocessing.get_context("fork")


def _serve(served, url: str, dataset: str, tag: str, **kw):
    kw.setdefault("capacity", 20_000)
    kw.setdefault("value_size", 256)
    return served(tag, upstream=url, upstream_name=dataset, upstream_timeout=1.0, **kw)


def _int(record: bytes) -> int:
    import msgspec  # noqa: PLC0415

    return msgspec.msgpack.decode(record.split(b" ", 2)[2])


def _records(name: str) -> dict[bytes, tuple[int, object]]:
    s = shmstore.connect(name)
    try:
        return {k: (s.version(k), v) for k, v in s.items()}
    finally:
        s.close()


def _wait_converged(names_: list[str], redis_client, dataset: str, timeout: float = 20.0) -> None:
    """Until every replica's epoch is the upstream's version."""
    deadline = time.monotonic() + timeout
    while True:
        v = int(redis_client.hget(f"{{{dataset}}}:meta", "v") or 0)
        epochs = [shmstore.connect(n).epoch for n in names_]
        if all(e == v for e in epochs):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas did not converge: upstream at {v}, replicas at {epochs}")
        time.sleep(0.05)


def _run_writers(names_: list[str], seconds: float, during=None) -> list[dict]:
    q = CTX.Queue()
    procs = [CTX.Process(target=writer, args=(n, f"h{i}", seconds, q)) for i, n in enumerate(names_)]
    for p in procs:
        p.start()
    try:
        if during is not None:
            during()
        results = [q.get(timeout=seconds + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return results


def _check_converged(names_: list[str], results: list[dict], *, exact: bool) -> dict:
    recs = [_records(n) for n in names_]
    for r in recs[1:]:
        assert r == recs[0], "replicas hold different records or versions"
    rec = recs[0]
    acked_incrs = sum(r["incrs"] for r in results)
    unknown = sum(r["unknown_incrs"] for r in results)
    counter = rec[b"counter"][1]
    if exact:
        assert counter == acked_incrs
    else:
        assert acked_incrs <= counter <= acked_incrs + unknown, [
            (r["incrs"], r["unknown_incrs"], r["errors"]) for r in results]
    won = [v for r in results for v in r["cas"]]
    assert len(won) == len(set(won)), "a CAS version was won twice"
    if exact:
        assert rec[b"cas"][1] == len(won)
    else:
        assert rec[b"cas"][1] >= len(won)
    for r in results:
        for k, v in r["puts"].items():
            assert rec[k.encode()][1] == v, f"acknowledged put {k} lost"
    return rec


# -- the done-when -----------------------------------------------------------------------


def test_three_replicas_converge_with_incr_and_cas_races(redis_server, served, dataset):
    names_ = [_serve(served, redis_server.url, dataset, f"h{i}")[0] for i in range(3)]
    results = _run_writers(names_, 3.0)
    assert sum(r["incrs"] for r in results) > 30
    assert all(not r["errors"] for r in results), results
    _wait_converged(names_, redis_server.client(), dataset)
    rec = _check_converged(names_, results, exact=True)
    assert sum(len(r["cas"]) for r in results) > 0
    # every record's version is the global one: the upstream's record says the same
    c = redis_server.client()
    up = c.hget(f"{{{dataset}}}:d", b"counter")
    assert int(up.split(b" ", 1)[0]) == rec[b"counter"][0]
    st = shmstore.connect(names_[0]).stats()
    assert st.upstream_state == "ok" and st.upstream_resyncs == 0 and st.upstream_applied > 0


def test_replica_sigkilled_and_served_again_mid_run(redis_server, served, names, dataset):
    (n0, c0), (n1, c1) = (_serve(served, redis_server.url, dataset, f"k{i}") for i in range(2))

    def kill_and_serve():
        time.sleep(1.0)
        os.kill(c1.pid, signal.SIGKILL)
        c1._proc.wait(timeout=10)
        time.sleep(0.5)
        names.coordinators.append(
            shmstore.serve(n1, upstream=redis_server.url, upstream_name=dataset, upstream_timeout=1.0))

    results = _run_writers([n0, n1], 4.0, during=kill_and_serve)
    assert c1.returncode == -signal.SIGKILL
    _wait_converged([n0, n1], redis_server.client(), dataset)
    c = redis_server.client()
    up = c.hget(f"{{{dataset}}}:d", b"counter")
    incr_entries = sum(1 for _, f in c.xrange(f"{{{dataset}}}:s") if f.get(b"k") == b"counter")
    assert _int(up) == incr_entries  # each incr applied once: one entry each
    _check_converged([n0, n1], results, exact=False)


def test_redis_restarted_mid_run_with_aof(redis_aof, served, dataset):
    names_ = [_serve(served, redis_aof.url, dataset, f"a{i}")[0] for i in range(2)]

    def restart():
        time.sleep(1.0)
        redis_aof.restart()

    results = _run_writers(names_, 4.0, during=restart)
    _wait_converged(names_, redis_aof.client(), dataset)
    _check_converged(names_, results, exact=False)
    # appendfsync always: nothing acknowledged was lost, so no replica had to resync
    for n in names_:
        st = shmstore.connect(n).stats()
        assert st.upstream_state == "ok"
        assert st.upstream_resyncs == 0


def test_stream_trimmed_while_a_replica_is_stopped(redis_server, served, dataset):
    (n0, c0), (n1, c1) = (_serve(served, redis_server.url, dataset, f"t{i}") for i in range(2))
    s0 = shmstore.connect(n0)
    for i in range(50):
        s0.put(f"a{i}", i)
    _wait_converged([n0, n1], redis_server.client(), dataset)
    c1.stop(timeout=5)
    for i in range(50):
        s0.put(f"b{i}", i)
    s0.delete("a0")
    s0.incr("a1", 10)
    c = redis_server.client()
    c.xtrim(f"{{{dataset}}}:s", maxlen=5, approximate=False)
    c1b = shmstore.serve(n1, upstream=redis_server.url, upstream_name=dataset, upstream_timeout=1.0)
    try:
        _wait_converged([n0, n1], c, dataset)
        assert _records(n1) == _records(n0)
        st = shmstore.connect(n1).stats()
        assert st.upstream_resyncs == 1 and st.upstream_state == "ok"
        assert shmstore.connect(n1).get("a1") == 11 and shmstore.connect(n1).get("a0") is None
        # and it follows the stream again
        s0.put("after", 1)
        _wait_converged([n0, n1], c, dataset)
        assert shmstore.connect(n1).get("after") == 1
    finally:
        c1b.stop(timeout=5)
        s0.close()


# -- divergence, unreachability, what a replica refuses -------------------------------------


def test_a_replaced_history_is_noticed_and_resynced(redis_server, served, dataset):
    """A failover that lost entries, or a restart without the tail: another history
    reaches the same versions. The replica must not take it for its own."""
    (n0, c0), (n1, c1) = (_serve(served, redis_server.url, dataset, f"f{i}") for i in range(2))
    s0 = shmstore.connect(n0)
    for i in range(10):
        s0.put(f"k{i}", i)
    _wait_converged([n0, n1], redis_server.client(), dataset)
    c1.stop(timeout=5)
    c0.stop(timeout=5)
    c = redis_server.client()
    c.delete(f"{{{dataset}}}:meta", f"{{{dataset}}}:d", f"{{{dataset}}}:s")  # Redis lost it all
    # a third host writes a new history of the same length
    n2, c2 = _serve(served, redis_server.url, dataset, "f2")
    s2 = shmstore.connect(n2)
    for i in range(10):
        s2.put(f"other{i}", i)
    assert int(c.hget(f"{{{dataset}}}:meta", "v")) == 10
    c1b = shmstore.serve(n1, upstream=redis_server.url, upstream_name=dataset, upstream_timeout=1.0)
    try:
        _wait_converged([n1, n2], c, dataset)
        assert _records(n1) == _records(n2)
        assert shmstore.connect(n1).get("k3") is None and shmstore.connect(n1).get("other3") == 3
        st = shmstore.connect(n1).stats()
        assert st.upstream_resyncs == 1
        assert st.epoch > 10  # versions never go back: the resync fenced past its old epoch
    finally:
        c1b.stop(timeout=5)
        s0.close()
        s2.close()


def test_upstream_unreachable_reads_go_on_writes_fail_typed_then_resume(redis_aof, served, dataset):
    n0, c0 = _serve(served, redis_aof.url, dataset, "u0")
    s = shmstore.connect(n0)
    s.put("k", "v")
    redis_aof.stop()
    t = time.monotonic()
    with pytest.raises(shmstore.UpstreamUnavailableError):
        s.put("k", "w")
    assert time.monotonic() - t < 5
    assert s.get("k") == "v"  # reads go on
    deadline = time.monotonic() + 5
    while s.stats().upstream_state != "unreachable" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.stats().upstream_state == "unreachable"
    redis_aof.restart()
    deadline = time.monotonic() + 10
    while True:
        try:
            s.put("k", "w")
            break
        except shmstore.UpstreamError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert s.get("k") == "w"
    assert s.stats().upstream_state == "ok"
    assert s.stats().upstream_resyncs == 0  # the AOF kept everything: no resync
    s.close()


def test_frozen_upstream_bounds_a_write_by_its_timeout(redis_server, served, dataset):
    n0, c0 = _serve(served, redis_server.url, dataset, "z0")
    s = shmstore.connect(n0)
    s.put("k", 1)
    redis_server.freeze()
    try:
        t = time.monotonic()
        with pytest.raises(shmstore.UpstreamError):
            s.put("k", 2)
        assert time.monotonic() - t < 10
        assert s.get("k") in (1, 2)  # reads go on; the write's outcome is unknown
    finally:
        redis_server.thaw()
    deadline = time.monotonic() + 10
    while s.stats().upstream_state != "ok" or s.epoch != int(redis_server.client().hget(f"{{{dataset}}}:meta", "v")):
        assert time.monotonic() < deadline, s.stats().upstream_state
        time.sleep(0.05)
    assert s.version("k") == int(redis_server.client().hget(f"{{{dataset}}}:d", b"k").split(b" ")[0])
    s.close()


def test_replica_settings_refused_in_the_caller(redis_server, names):
    n = names("r")
    url = redis_server.url
    with pytest.raises(shmstore.ReplicaUnsupportedError):
        shmstore.serve(n, upstream=url, eviction="lru", memory=8 << 20)
    with pytest.raises(shmstore.ReplicaUnsupportedError):
        shmstore.serve(n, upstream=url, path="/tmp/nowhere-shmstore", sync="always")
    with pytest.raises(shmstore.ReplicaUnsupportedError):
        shmstore.serve(n, upstream=url, path="/tmp/nowhere-shmstore", encryption="aes-256-gcm")
    for bad in ("http://127.0.0.1:1/", "", 5, True):
        with pytest.raises(shmstore.InvalidLayoutError):
            shmstore.serve(n, upstream=bad)
    with pytest.raises(shmstore.InvalidLayoutError):
        shmstore.serve(n, upstream_name="x")
    with pytest.raises(shmstore.InvalidNameError):
        shmstore.serve(n, upstream=url, upstream_name="bad name{}")
    for bad in (float("nan"), 0, -1, True, "2"):
        with pytest.raises(shmstore.InvalidLayoutError):
            shmstore.serve(n, upstream=url, upstream_timeout=bad)


def test_what_a_replica_does_and_refuses(redis_server, served, dataset, clock, tmp_path):
    (n0, _), (n1, _) = (_serve(served, redis_server.url, dataset, f"w{i}") for i in range(2))
    s0, s1 = shmstore.connect(n0), shmstore.connect(n1)
    try:
        with pytest.raises(shmstore.ReplicaUnsupportedError):
            s0.table("t", dtype="i8", rows=4)
        with pytest.raises(shmstore.DurabilityUnavailableError):
            s0.checkpoint()
        s0.put("before-backup", 1)
        assert s0.backup(str(tmp_path / "b")) >= 1  # a local copy of the replica
        # get_many, a change feed and a snapshot see the other host's writes
        e0 = s1.epoch
        s0.put("a", 1)
        with s0.batch() as b:
            b.put("b", 2)
            b.put("c", 3)
        _wait_converged([n0, n1], redis_server.client(), dataset)
        assert s1.get_many(["a", "b", "c", "d"]) == [1, 2, 3, None]
        keys, _ = s1.changes(e0)
        assert set(keys) >= {b"a", b"b", b"c"}
        with s1.snapshot() as snap:
            assert snap.get("c") == 3
        # TTL: the record expires on every host (the upstream removes it once)
        s0.put("t", "x", ttl=5)
        _wait_converged([n0, n1], redis_server.client(), dataset)
        assert s1.get("t") == "x" and s1.ttl("t") is not None
        clock(10)
        assert s1.get("t") is None  # readers hide it at once
        deadline = time.monotonic() + 10
        while redis_server.client().hexists(f"{{{dataset}}}:d", b"t"):
            assert time.monotonic() < deadline, "the expired record was not removed upstream"
            time.sleep(0.05)
        _wait_converged([n0, n1], redis_server.client(), dataset)
        assert b"t" not in dict(s0.items()) and b"t" not in dict(s1.items())
        # incr and a CAS decided upstream; errors typed as on a store of its own
        s0.put("s", "text")
        with pytest.raises(shmstore.ValueEncodingError):
            s1.incr("s")
        with pytest.raises(shmstore.VersionConflictError):
            s1.compare_and_set("a", 5, version=s1.version("a") + 1000)
    finally:
        s0.close()
        s1.close()


def test_a_replica_refuses_a_write_beyond_its_capacity(redis_server, served, dataset):
    n0, _ = _serve(served, redis_server.url, dataset, "c0", capacity=100)
    s = shmstore.connect(n0)
    try:
        for i in range(100):
            s.put(f"k{i}", i)
        with pytest.raises(shmstore.StoreFullError):
            s.put("one-more", 1)
        s.put("k5", 55)  # an update still goes
        assert s.get("k5") == 55
        assert s.stats().upstream_state == "ok"
    finally:
        s.close()


def test_a_new_replica_loads_an_existing_dataset(redis_server, served, dataset):
    n0, _ = _serve(served, redis_server.url, dataset, "n0")
    s0 = shmstore.connect(n0)
    for i in range(300):
        s0.put(f"k{i}", {"i": i}, ttl=3600 if i % 2 else None)
    n1, _ = _serve(served, redis_server.url, dataset, "n1")
    _wait_converged([n0, n1], redis_server.client(), dataset)
    assert _records(n1) == _records(n0)
    s1 = shmstore.connect(n1)
    assert s1.ttl("k1") is not None and s1.ttl("k2") is None
    assert s1.stats().upstream_resyncs == 1
    s0.close()
    s1.close()
    assert L.UP_STATE_NAMES[L.UP_OK] == "ok"


def test_forged_entries_stall_the_replica_without_killing_it(redis_server, served, dataset):
    """Every byte in Redis is hostile. An entry that does not parse, or parses but cannot
    be applied here (a key longer than this store's key_size), with a valid chain,
    stalls the replica: its coordinator lives, reads go on, writes are refused with a
    typed error, and its periodic resync attempt meets the same entry and survives it."""
    import msgspec  # noqa: PLC0415

    (n0, c0), (n1, c1) = (_serve(served, redis_server.url, dataset, f"g{i}", key_size=16) for i in range(2))
    s0, s1 = shmstore.connect(n0), shmstore.connect(n1)
    c = redis_server.client()
    meta = f"{{{dataset}}}:meta"

    def forge(fields: dict) -> str:
        v, last = int(c.hget(meta, "v")), c.hget(meta, "last").decode()
        eid = f"{v + 1}-12345"
        c.xadd(f"{{{dataset}}}:s", {"p": last, "t": "1", **fields}, id=eid)
        c.hset(meta, mapping={"v": v + 1, "last": eid})
        return eid

    def wait_stalled(s) -> None:
        deadline = time.monotonic() + 10
        while s.stats().upstream_state != "stalled":
            assert time.monotonic() < deadline, s.stats().upstream_state
            time.sleep(0.05)

    def check_stalled(value: int) -> None:
        for co, s in ((c0, s0), (c1, s1)):
            wait_stalled(s)
            assert co.alive()
            assert s.get("k") == value
            with pytest.raises(shmstore.UpstreamError, match="stalled"):
                s.put("k", 2)

    try:
        s0.put("k", 1)
        _wait_converged([n0, n1], c, dataset)
        forge({"o": b"\xc1garbage"})  # not msgpack at all
        check_stalled(1)
        # The periodic resync takes the records for the truth (the forged entry changed
        # none) and fences past it: both replicas follow again, equal.
        deadline = time.monotonic() + replica_mod.STALLED_RETRY_S + 10
        while s0.stats().upstream_state != "ok" or s1.stats().upstream_state != "ok":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        s0.put("k", 5)
        _wait_converged([n0, n1], c, dataset)
        assert s1.get("k") == 5 and _records(n0) == _records(n1)
        forge({"o": msgspec.msgpack.encode([1, 0, b"x" * 40, msgspec.msgpack.encode(1), 0])})  # too long here
        check_stalled(5)
    finally:
        s0.close()
        s1.close()


def test_a_replica_restarts_from_its_checkpoint_without_a_resync(redis_server, served, names, dataset, tmp_path):
    """path=: a checkpoint to restart fast. After its segment is gone (a reboot), the
    replica lays its checkpoint and reads only the entries written since; a damaged
    checkpoint is ignored (a resync instead)."""
    n0, c0 = _serve(served, redis_server.url, dataset, "p0")
    n1, c1 = _serve(served, redis_server.url, dataset, "p1", path=str(tmp_path / "d1"))
    s0 = shmstore.connect(n0)
    c = redis_server.client()
    try:
        for i in range(200):
            s0.put(f"k{i}", i)
        _wait_converged([n0, n1], c, dataset)
        assert c1.stop(timeout=10) == 0  # a clean stop writes the checkpoint
        shmstore.destroy(n1)  # as after a reboot: the segment is gone
        for i in range(20):
            s0.put(f"later{i}", i)
        s0.delete("k0")

        def again():
            co = shmstore.serve(n1, upstream=redis_server.url, upstream_name=dataset, upstream_timeout=1.0,
                                capacity=20_000, value_size=256, path=str(tmp_path / "d1"))
            names.coordinators.append(co)
            return co

        c1 = again()
        _wait_converged([n0, n1], c, dataset)
        assert _records(n1) == _records(n0)
        st = shmstore.connect(n1).stats()
        assert st.upstream_resyncs == 0 and st.upstream_applied == 21  # only what came after
        assert c1.stop(timeout=10) == 0
        shmstore.destroy(n1)
        ck = tmp_path / "d1" / "replica.ckpt"
        data = bytearray(ck.read_bytes())
        data[len(data) // 2] ^= 0xFF  # damaged: its checksum fails
        ck.write_bytes(bytes(data))
        s0.put("after-damage", 1)
        again()
        _wait_converged([n0, n1], c, dataset)
        assert _records(n1) == _records(n0)
        assert shmstore.connect(n1).stats().upstream_resyncs == 1
    finally:
        s0.close()


def _pipeline(name: str, n: int, out: object) -> None:
    s = shmstore.connect(name)
    for i in range(n):
        s.put("p", i, wait=False)
        s.put(f"p{i % 100}", i, wait=False)
    s.flush(timeout=60)
    out.put(s.get("p"))
    s.close()


def _pipeline_forever(name: str) -> None:
    s = shmstore.connect(name)
    i = 0
    while True:
        s.put(f"q{i % 1000}", i, wait=False)
        i += 1


def test_a_pipelining_client_is_settled_in_slices_in_order(redis_server, served, dataset):
    """A client's frames beyond replica.MAX_FRAMES wait for later groups (another
    client's sync writes go in between): its writes still apply in its order, each
    once; a client killed with frames waiting costs nobody else anything."""
    n0, c0 = _serve(served, redis_server.url, dataset, "s0")
    q = CTX.Queue()
    n = 3 * replica_mod.MAX_FRAMES + 17
    p = CTX.Process(target=_pipeline, args=(n0, n, q))
    killed = CTX.Process(target=_pipeline_forever, args=(n0,))
    s = shmstore.connect(n0)
    try:
        p.start()
        killed.start()
        for i in range(50):
            s.put("sync", i)  # answered while the others' frames wait in slices
        time.sleep(0.3)
        os.kill(killed.pid, signal.SIGKILL)
        killed.join()
        assert q.get(timeout=60) == n - 1
        p.join(timeout=10)
        assert s.get("p") == n - 1 and s.get("sync") == 49
        assert [s.get(f"p{j}") for j in range(100)] == [max(i for i in range(n) if i % 100 == j) for j in range(100)]
        s.put("after", 1)
        assert c0.alive() and s.get("after") == 1
        _wait_converged([n0], redis_server.client(), dataset)
    finally:
        for proc in (p, killed):
            if proc.is_alive():
                proc.kill()
            proc.join()
        s.close()


def _new_keys(name: str, seconds: float) -> None:
    s = shmstore.connect(name)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        s.put(f"n{i % 8000}", i, wait=False)  # new keys: the resync's window adds some
        if i % 3 == 0:
            s.delete(f"n{(i // 2) % 8000}", wait=False)
        i += 1
    s.flush()
    s.close()


def test_a_replica_joining_while_another_host_writes_converges(redis_server, served, dataset):
    """The resync reads the records while they change (HSCAN is not a snapshot): it folds
    the entries written meanwhile into what it read, fencing past them."""
    n0, _ = _serve(served, redis_server.url, dataset, "j0")
    s0 = shmstore.connect(n0)
    for i in range(2000):
        s0.put(f"base{i}", i, wait=False)
    s0.flush()
    p = CTX.Process(target=_new_keys, args=(n0, 3.0))
    p.start()
    try:
        time.sleep(0.5)
        names_ = [n0] + [_serve(served, redis_server.url, dataset, f"j{i}")[0] for i in (1, 2)]
        p.join(timeout=60)
        assert p.exitcode == 0
        _wait_converged(names_, redis_server.client(), dataset)
        recs = [_records(n) for n in names_]
        assert recs[1] == recs[0] and recs[2] == recs[0]
        assert len(recs[0]) > 2000
    finally:
        if p.is_alive():
            p.kill()
        p.join()
        s0.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["empty-map", "nested-200000", "batch-op-is-a-map", "huge-head"])
def test_hostile_frames_cost_their_sender_not_the_replica(redis_server, served, dataset, kind):
    """The replica's applier decodes every frame as the store's own does: a malformed
    frame, or impossible ring words, cost only their sender; nothing reaches Redis."""
    from tests.helpers.rawclient import OP_BATCH, ST_ERROR, RawClient, encode, nested_array  # noqa: PLC0415
    from tests.helpers.processes import wait_for  # noqa: PLC0415

    frames = {"empty-map": encode({}), "nested-200000": nested_array(200_000),
              "batch-op-is-a-map": encode([OP_BATCH, 1, [{"op": 1}]])}
    n, coord = _serve(served, redis_server.url, dataset, "x")
    c = redis_server.client()
    with shmstore.connect(n, timeout=10) as other:
        other.put("before", 1)
        v = int(c.hget(f"{{{dataset}}}:meta", "v"))
        with RawClient(n) as raw:
            if kind == "huge-head":
                raw.fill_ring_with_padding()
                raw.set_head(2**50)
                raw.ring()
            else:
                ticket = raw.send(frames[kind])
                wait_for(lambda: raw.done() >= ticket or raw.channel_closed() or not coord.alive(),
                         timeout=20, what="the replica to take the frame")
                if not raw.channel_closed():
                    assert raw.ch.reply()[1] == ST_ERROR
            assert coord.alive()
            assert int(c.hget(f"{{{dataset}}}:meta", "v")) == v  # nothing went upstream
            assert other.put("after", 2, timeout=10) > v
        assert other.get("after") == 2 and other.get("before") == 1


def test_hostile_arguments_are_typed_errors_and_never_reach_redis(redis_server, served, dataset):
    n, _ = _serve(served, redis_server.url, dataset, "y", key_size=16, value_size=64)
    c = redis_server.client()
    s = shmstore.connect(n)
    try:
        s.put("k", 1)
        v = int(c.hget(f"{{{dataset}}}:meta", "v"))
        for call, err in [
            (lambda: s.put("x" * 17, 1), shmstore.KeyTooLongError),
            (lambda: s.put("k", "v" * 100), shmstore.ValueTooLargeError),
            (lambda: s.put("k", 1, ttl=float("nan")), shmstore.InvalidTTLError),
            (lambda: s.compare_and_set("k", 2, version=True), shmstore.ShmStoreError),
            (lambda: s.compare_and_set("k", 2, version=2**64 - 1), shmstore.VersionConflictError),
            (lambda: s.incr("k", 2**64 - 1), shmstore.ValueEncodingError),
            (lambda: s.incr("k", True), shmstore.ShmStoreError),
            (lambda: s.incr("k", 1.5), shmstore.ShmStoreError),
        ]:
            with pytest.raises(err):
                call()
        assert int(c.hget(f"{{{dataset}}}:meta", "v")) == v  # none of them took a version
        assert s.get("k") == 1 and s.incr("k", -(2**63)) == 1 - 2**63 and s.incr("k", -1) == -(2**63)
        with pytest.raises(shmstore.ValueEncodingError):
            s.incr("k", -1)  # below -2**63: refused in Redis, nothing changed
        assert s.get("k") == -(2**63)
    finally:
        s.close()
