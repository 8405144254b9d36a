"""RedisUpstream against a real redis-server (coordinator/_upstream/_redis.py).

Every test has a dataset of its own; tests that stop, freeze or restart Redis have a
server of their own.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time

import msgspec
import pytest

from shmstore._errors import (
    CorruptionError,
    InvalidArgumentError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    ValueEncodingError,
    VersionConflictError,
)
from shmstore.coordinator import _ops
from shmstore.coordinator._upstream import Entry
from shmstore.coordinator._upstream._redis import MAX_OPS_PER_CALL, RedisUpstream
from tests.upstream import _workers

enc = msgspec.msgpack.encode
NOW = 1_700_000_000_000_000_000  # a 19-digit ns instant: not exact as a double
PAST, FUTURE = NOW - 1, NOW + 1


@pytest.fixture
def up(shared_redis, dataset):
    u = RedisUpstream(shared_redis.url, dataset)
    yield u
    u.close()


def raw(server, dataset: str):
    """(plain client, meta key, records key, stream key) of a dataset."""
    return server.client(), f"{{{dataset}}}:meta", f"{{{dataset}}}:d", f"{{{dataset}}}:s"


def all_entries(u: RedisUpstream) -> list[Entry]:
    out, after = [], "0-0"
    while True:
        got = u.read(after, 500)
        if not got:
            return out
        out += got
        after = got[-1].id


def check_chain(u: RedisUpstream) -> list[Entry]:
    """The stream from the first entry: each names its predecessor, versions contiguous
    (each entry starts where the one before ended), and meta's head is the last."""
    es = all_entries(u)
    prev, v = "0-0", 0
    for e in es:
        assert (e.prev, e.epoch_before) == (prev, v), e
        assert e.version == v + (_ops.epochs_of(e.op) if e.op is not None else e.version - v)
        prev, v = e.id, e.version
    assert u.head() == (v, prev)
    return es


def records(u: RedisUpstream) -> dict[bytes, tuple[int, int, bytes]]:
    return {k: (ver, x, val) for k, ver, x, val in u.scan()}


# -- each op kind ----------------------------------------------------------------------


def test_put_cas_delete_results_and_entries(up):
    assert up.head() == (0, "0-0")
    r = up.submit([
        ("put", b"a", enc(1), 0),
        ("put", b"b", enc("x"), FUTURE),
        ("cas", b"a", enc(2), 0, 1),
        ("cas", b"a", enc(3), 0, 1),
        ("cas", b"new", enc(4), 0, 0),
        ("delete", b"b"),
        ("delete", b"missing"),
    ], NOW)
    ids = [i for i, _ in r]
    assert [res if not isinstance(res, Exception) else type(res) for _, res in r] == [
        1, 2, 3, VersionConflictError, 4, True, False]
    assert "expected version 1, found 3" in str(r[3][1])
    assert ids[3] is None and ids[6] is None
    es = check_chain(up)
    assert [e.id for e in es] == [i for i in ids if i]
    assert [e.version for e in es] == [1, 2, 3, 4, 5]
    assert es[1].op == _ops.Put(0, b"b", enc("x"), FUTURE)
    assert es[2].op == _ops.Put(0, b"a", enc(2), 0)  # a cas is replicated as a put
    assert es[4].op == _ops.Delete(0, b"b")
    assert records(up) == {b"a": (3, 0, enc(2)), b"new": (4, 0, enc(4))}
    assert up.entry(ids[0]) == es[0] and up.entry("1-1") is None


def test_ids_unique_per_call_and_versions_name_the_entry(up):
    ids = [up.submit([("put", b"k", enc(i), 0), ("put", b"j", enc(i), 0)], NOW) for i in range(3)]
    nonces = [{eid.split("-")[1] for eid, _ in call} for call in ids]
    assert all(len(n) == 1 for n in nonces)  # one nonce per call
    assert len(set.union(*nonces)) == 3
    assert [int(eid.split("-")[0]) for call in ids for eid, _ in call] == list(range(1, 7))
    check_chain(up)


def test_cas_expired_is_version_0_and_big_expected_is_refused_here(up):
    up.submit([("put", b"k", enc(1), PAST), ("put", b"live", enc(1), FUTURE)], NOW)
    (_, e1), (_, v), (_, e2), (_, v2), (eid, big) = up.submit([
        ("cas", b"k", enc(2), 0, 1),         # expired: current version is 0
        ("cas", b"k", enc(2), 0, 0),
        ("cas", b"live", enc(2), 0, 0),
        ("cas", b"live", enc(2), 0, 2),
        ("cas", b"live", enc(2), 0, 1 << 53),
    ], NOW)
    assert isinstance(e1, VersionConflictError) and "no record (version 0)" in str(e1)
    assert v == 3 and v2 == 4
    assert isinstance(e2, VersionConflictError) and "found 2" in str(e2)
    assert isinstance(big, VersionConflictError) and eid is None
    # expiries compare as exact decimals: NOW and NOW + 1 are one double apart or less
    up.submit([("put", b"edge", enc(1), NOW)], NOW)
    (_, r), = up.submit([("cas", b"edge", enc(2), 0, 0)], NOW)  # expiry == now: expired
    assert r == 6


def test_delete_of_missing_and_expired(up):
    up.submit([("put", b"old", enc(1), PAST), ("put", b"live", enc(1), FUTURE)], NOW)
    r = up.submit([("delete", b"old"), ("delete", b"live"), ("delete", b"none")], NOW)
    assert [(bool(i), res) for i, res in r] == [(True, False), (True, True), (False, False)]
    assert records(up) == {}
    es = check_chain(up)
    assert [e.op for e in es[2:]] == [_ops.Delete(0, b"old"), _ops.Delete(0, b"live")]


def test_expire_only_when_due(up):
    up.submit([("put", b"a", enc(1), NOW), ("put", b"b", enc(1), FUTURE), ("put", b"c", enc(1), 0)], NOW)
    r = up.submit([("expire", b"a", NOW), ("expire", b"b", NOW), ("expire", b"c", NOW),
                   ("expire", b"none", NOW)], 0)
    assert [res for _, res in r] == [True, False, False, False]
    assert r[0][0] is not None and all(i is None for i, _ in r[1:])
    assert set(records(up)) == {b"b", b"c"}
    assert check_chain(up)[-1].op == _ops.Expire(0, [b"a"], NOW)


def test_batch_results_and_one_entry(up):
    up.submit([("put", b"x", enc(0), PAST)], NOW)
    ops = [_ops.BatchPut(b"a", enc(1)), _ops.BatchDelete(b"x"), _ops.BatchDelete(b"zz"),
           _ops.BatchPut(b"b", enc(2), FUTURE), _ops.BatchPut(b"a", enc(3))]
    (eid, res), (eid2, res2) = up.submit([("batch", ops), ("put", b"after", enc(9), 0)], NOW)
    assert res == [2, True, False, 5, 6]  # a delete counts an expired record as present
    assert res2 == 7
    es = check_chain(up)
    assert es[1].id == eid and es[1].op == _ops.Batch(0, ops) and es[1].epoch_before == 1
    assert records(up) == {b"a": (6, 0, enc(3)), b"b": (5, FUTURE, enc(2)), b"after": (7, 0, enc(9))}
    with pytest.raises(InvalidArgumentError):
        up.submit([("batch", [])], NOW)


def test_fence_jumps_and_keeps_the_chain(up):
    up.submit([("put", b"a", enc(1), 0)], NOW)
    assert up.fence(0)[0] == 2  # at least one step
    v, eid = up.fence(1000)
    assert v == 1000 and up.head() == (1000, eid)
    (_, r), = up.submit([("put", b"a", enc(2), 0)], NOW)
    assert r == 1001
    es = check_chain(up)
    assert [e.op for e in es[1:3]] == [None, None] and es[2].epoch_before == 2
    with pytest.raises(InvalidArgumentError):
        up.fence(1 << 53)


# -- incr ------------------------------------------------------------------------------

BOUNDARY = sorted({s * v + d for v in (0, 1, 31, 32, 33, 127, 128, 255, 256, 1 << 15, 1 << 16, 1 << 31, 1 << 32,
                                       1 << 53, 1 << 63, 1 << 64) for s in (1, -1) for d in (-1, 0, 1)})
DELTAS = [0, 1, -1, 2, -33, 128, -129, 1 << 32, -(1 << 32), (1 << 63) - 1, -(1 << 63), (1 << 64) - 1,
          -((1 << 64) - 1), 1 << 64, (1 << 32) + 7]


def in_range(x: int) -> bool:
    return -(1 << 63) <= x < (1 << 64)


def test_incr_exact_at_the_boundaries(up, shared_redis, dataset):
    starts = [s for s in BOUNDARY if in_range(s)]
    pairs = [(s, d) for s in starts for d in DELTAS]
    keys = [b"k%d" % i for i in range(len(pairs))]
    up.submit([("put", k, enc(s), 0) for k, (s, _) in zip(keys, pairs)], NOW)
    r = up.submit([("incr", k, d) for k, (_, d) in zip(keys, pairs)], NOW)
    recs = records(up)
    for k, (s, d), (eid, res) in zip(keys, pairs, r):
        if in_range(s + d):
            assert res == s + d, (s, d)
            assert recs[k][2] == enc(s + d), (s, d, recs[k])
            e = up.entry(eid)
            assert e.op == _ops.Put(0, k, enc(s + d), 0)
        else:
            assert isinstance(res, ValueEncodingError) and eid is None, (s, d, res)
            assert "leaves the 64-bit range" in str(res) and str(s) in str(res)
            assert recs[k][2] == enc(s)
    check_chain(up)


def test_incr_counts_any_msgpack_integer_form(up):
    # every encoding Decoder(int) accepts, not only msgspec's shortest
    forms = {b"\xcc\x05": 5, b"\xcd\x00\x05": 5, b"\xce\x00\x00\x00\x05": 5, b"\xcf" + bytes(7) + b"\x05": 5,
             b"\xd0\x05": 5, b"\xd0\xfb": -5, b"\xd1\xff\xfb": -5, b"\xd2\xff\xff\xff\xfb": -5,
             b"\xd3" + b"\xff" * 7 + b"\xfb": -5, b"\xe0": -32}
    up.submit([("put", b"f%d" % i, vb, 0) for i, vb in enumerate(forms)], NOW)
    r = up.submit([("incr", b"f%d" % i, 1) for i in range(len(forms))], NOW)
    assert [res for _, res in r] == [v + 1 for v in forms.values()]
    rnd = random.Random(7)
    vals = [rnd.randrange(-(1 << 63), 1 << 64) for _ in range(200)]
    deltas = [rnd.randrange(-(1 << 64), 1 << 64) for _ in vals]
    up.submit([("put", b"r%d" % i, enc(v), 0) for i, v in enumerate(vals)], NOW)
    r = up.submit([("incr", b"r%d" % i, d) for i, d in enumerate(deltas)], NOW)
    recs = records(up)
    for i, (v, d, (_, res)) in enumerate(zip(vals, deltas, r)):
        if in_range(v + d):
            assert res == v + d and recs[b"r%d" % i][2] == enc(v + d)
        else:
            assert isinstance(res, ValueEncodingError)


def test_incr_refuses_a_value_that_is_not_one_integer(up):
    bad = [b"", b"\xc0", b"\xc3", b"\xa1a", b"\xcb" + bytes(8), b"\x01\x01", b"\xcd\x01", b"\xcf" + bytes(9),
           b"\x91\x01"]
    up.submit([("put", b"b%d" % i, vb, 0) for i, vb in enumerate(bad)], NOW)
    r = up.submit([("incr", b"b%d" % i, 1) for i in range(len(bad))], NOW)
    for (eid, res), vb in zip(r, bad):
        assert eid is None and isinstance(res, ValueEncodingError), vb
        assert "the stored value is not an integer" in str(res)
    assert up.head()[0] == len(bad)


def test_incr_expired_counts_from_0_and_live_keeps_its_expiry(up):
    up.submit([("put", b"old", enc(41), PAST), ("put", b"live", enc(41), FUTURE),
               ("put", b"oldtext", enc("x"), PAST)], NOW)
    r = up.submit([("incr", b"old", 1), ("incr", b"live", 1), ("incr", b"oldtext", 2), ("incr", b"none", 3)], NOW)
    assert [res for _, res in r] == [1, 42, 2, 3]
    recs = records(up)
    assert recs[b"old"] == (4, 0, enc(1)) and recs[b"live"] == (5, FUTURE, enc(42))
    assert up.entry(r[1][0]).op == _ops.Put(0, b"live", enc(42), FUTURE)


# -- reads, forged data ----------------------------------------------------------------


def test_read_blocks_until_an_entry_arrives(shared_redis, up):
    assert up.read("0-0", 10, block_ms=50) == []
    other = up.clone()
    t = threading.Timer(0.2, lambda: other.submit([("put", b"k", enc(1), 0)], NOW))
    t.start()
    try:
        got = up.read("0-0", 10, block_ms=5000)
    finally:
        t.join()
        other.close()
    assert [e.version for e in got] == [1]
    assert up.read(got[0].id, 10) == []
    with pytest.raises(InvalidArgumentError):
        up.read("nope", 10)


def test_a_trimmed_stream_shows_as_a_gap(shared_redis, dataset):
    with RedisUpstream(shared_redis.url, dataset, stream_max=10) as u:
        for i in range(300):
            u.submit([("put", b"k", enc(i), 0)], NOW)
        es = u.read("0-0", 1000)
        assert len(es) < 300 and es[-1].version == 300
        assert es[0].prev != "0-0"  # a replica at 0-0 sees that the chain does not start at its id
        assert u.read("0-0", 10, block_ms=0)[0] == es[0]


def test_scan_many_records(up):
    up.submit([("put", b"k%d" % i, enc(i), i) for i in range(2500)], NOW)
    recs = records(up)
    assert len(recs) == 2500 and recs[b"k7"] == (8, 7, enc(7))


def forge_entry(c, s, eid: str, fields: dict) -> None:
    c.xadd(s, fields, id=eid)


@pytest.mark.parametrize("fields, why", [
    ({"t": "1", "o": enc(_ops.Put(0, b"k", b"\x01", 0))}, "missing field p"),
    ({"p": "zz", "t": "1", "o": enc(_ops.Put(0, b"k", b"\x01", 0))}, "not a stream id"),
    ({"p": "0-0", "t": "1", "o": b"\xc1garbage"}, "not a logged op"),
    ({"p": "0-0", "t": "1", "o": enc(_ops.Cas(0, b"k", b"\x01", 1, 0))}, "not a put, delete"),
    ({"p": "0-0", "t": "1", "o": enc(_ops.Batch(0, [_ops.BatchDelete(b"k"), _ops.BatchDelete(b"j")]))},
     "its version is not"),
    ({"p": "0-0", "t": "x", "o": enc(_ops.Put(0, b"k", b"\x01", 0))}, "field t"),
    ({"p": "0-0", "t": "1", "k": "k", "v": enc("s"), "x": "0"}, "not an integer"),
    ({"p": "0-0", "t": "1", "k": "k", "v": b"\x01"}, "are not o, k/v/x or j"),
    ({"p": "0-0", "t": "1", "j": "2"}, "field j"),
])
def test_forged_entries_are_corruption(shared_redis, dataset, up, fields, why):
    c, meta, d, s = raw(shared_redis, dataset)
    forge_entry(c, s, "1-5", fields)
    with pytest.raises(CorruptionError, match=why):
        up.read("0-0", 10)
    with pytest.raises(CorruptionError, match="1-5"):
        up.entry("1-5")


def test_forged_records_and_meta_are_corruption(shared_redis, dataset, up):
    c, meta, d, s = raw(shared_redis, dataset)
    up.submit([("put", b"good", enc(1), 0)], NOW)
    c.hset(d, b"bad", b"12nospace")
    with pytest.raises(CorruptionError, match="'bad'"):
        list(up.scan())
    c.hset(d, b"bad", b"x 0 value")
    with pytest.raises(CorruptionError, match="'bad'"):
        list(up.scan())
    # an op that meets it fails alone; the others of the call apply
    r = up.submit([("cas", b"bad", enc(1), 0, 0), ("put", b"good", enc(2), 0), ("incr", b"bad", 1),
                   ("delete", b"bad"), ("expire", b"bad", NOW)], NOW)
    assert [type(res) for _, res in r] == [CorruptionError, int, CorruptionError, CorruptionError, CorruptionError]
    assert "'bad'" in str(r[0][1]) and r[1][1] == 2
    c.hset(meta, "v", "7")  # meta no longer names the stream's tail: nothing applies
    with pytest.raises(CorruptionError, match="does not match the stream tail"):
        up.submit([("put", b"good", enc(3), 0)], NOW)
    with pytest.raises(CorruptionError, match="disagree"):
        up.head()
    assert c.hget(d, b"good").endswith(enc(2))
    c.delete(meta)
    c.set(meta, "a string")
    with pytest.raises(CorruptionError, match="another type|is a string"):
        up.head()
    with pytest.raises(CorruptionError, match="is a string, not a hash"):
        up.submit([("put", b"good", enc(3), 0)], NOW)
    c.delete(meta)  # records and stream but no meta
    with pytest.raises(CorruptionError, match="no"):
        up.submit([("put", b"good", enc(3), 0)], NOW)


# -- construction and connection failures ----------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/0", "redis://", "redis://127.0.0.1:notaport/0", "unix://",
                                 "127.0.0.1:6379", 6379, "redis://127.0.0.1:6379/notadb",
                                 "unix:///tmp/x.sock?db=zz"])
def test_bad_urls_are_refused_at_construction(url):
    with pytest.raises(InvalidArgumentError):
        RedisUpstream(url, "x")


@pytest.mark.parametrize("kw", [{"name": "a{b}"}, {"name": ""}, {"timeout": 0}, {"timeout": float("nan")},
                                {"timeout": True}, {"stream_max": 0}])
def test_bad_arguments_are_refused(kw):
    args = {"name": "x", **kw}
    with pytest.raises(InvalidArgumentError):
        RedisUpstream("redis://127.0.0.1:6379/0", args.pop("name"), **args)


def test_unix_socket_url(shared_redis, dataset):
    with RedisUpstream(shared_redis.unix_url, dataset) as u:
        assert u.submit([("put", b"k", enc(1), 0)], NOW)[0][1] == 1
        assert u.head()[0] == 1


def test_redis_down_is_unavailable_quickly(redis_server, dataset):
    u = RedisUpstream(redis_server.url, dataset, timeout=2)
    try:
        u.submit([("put", b"k", enc(1), 0)], NOW)
        redis_server.stop()
        t0 = time.monotonic()
        with pytest.raises(UpstreamUnavailableError):
            u.submit([("put", b"k", enc(2), 0)], NOW)
        with pytest.raises(UpstreamUnavailableError):
            u.head()
        assert time.monotonic() - t0 < 2  # refused, not timed out
        redis_server.restart()  # no AOF: empty again, and the stale connection is replaced
        assert u.head() == (0, "0-0")
        assert u.submit([("put", b"k", enc(3), 0)], NOW)[0][1] == 1
    finally:
        u.close()


def test_redis_frozen_is_a_timeout(redis_server, dataset):
    u = RedisUpstream(redis_server.url, dataset, timeout=0.5)
    try:
        u.head()  # connected before the freeze
        redis_server.freeze()
        try:
            t0 = time.monotonic()
            with pytest.raises(UpstreamTimeoutError, match="may or may not"):
                u.submit([("put", b"k", enc(1), 0)], NOW)
            # the timed-out connection was dropped; a new one gets no answer to its
            # handshake: nothing of ours was sent, so nothing was applied
            with pytest.raises(UpstreamUnavailableError, match="handshake"):
                u.submit([("put", b"k", enc(2), 0)], NOW)
            with pytest.raises(UpstreamUnavailableError):
                u.head()
            with pytest.raises(UpstreamUnavailableError):
                u.read("0-0", 10, block_ms=100)
            assert time.monotonic() - t0 < 10  # bounded: a few timeouts, never a hang
        finally:
            redis_server.thaw()
        # the submit that timed out ran or did not (here it depends on whether the kernel
        # still held the request when the client closed): either way, whole
        assert u.head()[0] in (0, 1)
        check_chain(u)
    finally:
        u.close()


def test_restart_with_aof_always_keeps_data_and_stream(redis_aof, dataset):
    u = RedisUpstream(redis_aof.url, dataset)
    try:
        u.submit([("put", b"a", enc(1), FUTURE), ("incr", b"n", 5),
                  ("batch", [_ops.BatchPut(b"b", enc(2)), _ops.BatchDelete(b"a")])], NOW)
        before = (u.head(), all_entries(u), records(u))
        redis_aof.kill()  # SIGKILL: only what the AOF holds comes back
        redis_aof.restart()
        assert (u.head(), all_entries(u), records(u)) == before
        check_chain(u)
    finally:
        u.close()


def test_a_long_list_is_split_in_order(up):
    n = MAX_OPS_PER_CALL + 50
    r = up.submit([("put", b"k%d" % (i % 100), enc(i), 0) for i in range(n)], NOW)
    assert [res for _, res in r] == list(range(1, n + 1))
    assert len({eid.split("-")[1] for eid, _ in r}) == 2  # two calls, two nonces
    assert len(check_chain(up)) == n


# -- concurrency -----------------------------------------------------------------------


def test_four_processes_incr_and_cas(shared_redis, dataset):
    ctx = multiprocessing.get_context("spawn")
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    n_workers, n_ops = 4, 200
    barrier, out = ctx.Barrier(n_workers), ctx.Queue()
    procs = [ctx.Process(target=_workers.incr_and_cas, args=(shared_redis.url, dataset, w, n_ops, seed, barrier, out))
             for w in range(n_workers)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    report = f"seed {seed}: {results}"
    assert not any(errs for _, _, _, errs in results), report
    with RedisUpstream(shared_redis.url, dataset) as u:
        es = check_chain(u)  # versions contiguous, each entry names the one before
        recs = records(u)
        total = sum(t for _, t, _, _ in results)
        # the counter two ways: the record, and the last incr entry of the stream
        assert msgspec.msgpack.decode(recs[b"counter"][2]) == total, report
        last_incr = [e for e in es if e.op.key == b"counter"][-1]
        assert msgspec.msgpack.decode(last_incr.op.value) == total, report
        won = sorted(v for _, _, w, _ in results for v in w)
        assert len(won) == len(set(won)), report
        cas_entries = [e for e in es if e.op.key == b"cas"]
        assert [e.version for e in cas_entries] == won, report
        assert len(es) == n_workers * n_ops // 2 + len(won), report


def test_newest_after_waits_for_an_entry_and_reads_only_its_version(shared_redis, dataset):
    up = RedisUpstream(shared_redis.url, dataset, timeout=2.0)
    other = up.clone()
    try:
        t = time.monotonic()
        assert up.newest_after("0-0", 50) == 0  # nothing came within the wait
        assert time.monotonic() - t < 2
        (eid, v), = other.submit([("put", b"k", b"v", 0)], time.time_ns())
        assert up.newest_after("0-0", 50) == v == 1
        assert up.newest_after(eid, 50) == 0
        other.submit([("put", b"k", b"w", 0), ("put", b"j", b"w", 0)], time.time_ns())
        assert up.newest_after(eid, 50) == 2  # the first entry after the cursor
        with pytest.raises(InvalidArgumentError):
            up.newest_after("0-0", 0)
    finally:
        up.close()
        other.close()
