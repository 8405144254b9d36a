"""Probes for issue 13 (hardening): each test reproduces one numbered defect; the
start-up and durability ones (1, 5, 8, 10) are in tests/coordinator/test_hardening_start.py.

Real coordinators (``shmstore.serve``), real files, signals and mounts. Every test
names the defect it reproduces; each failed on the code of the day it was written and
passes once that defect is fixed. Tests that mount a tmpfs or unshare a mount
namespace are skipped with the reason when that is not permitted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

import shmstore
from tests.helpers.processes import python, reap, wait_for
from tests.helpers.rawclient import (
    OP_BATCH,
    OP_PUT,
    ST_ERROR,
    RawClient,
    append_wal_record,
    encode,
    nested_array,
    wal_chain_end,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finishes(fn, bound: float) -> tuple[bool, object]:
    """Run ``fn`` in a daemon thread: (finished within ``bound``, its result or exception).

    A call that does not finish is left blocked in its thread (the test then fails);
    the test's teardown stops the coordinator, which ends such a wait.
    """
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test to judge
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    return (not t.is_alive()), (out[0] if out else None)


@contextmanager
def stopped(pid: int):
    """SIGSTOP a process for the block; SIGCONT it whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# -- 2. malformed frames -------------------------------------------------------------

MALFORMED = {
    "empty-map": encode({}),
    "nested-200000": nested_array(200_000),
    "batch-op-is-a-map": encode([OP_BATCH, 1, [{"op": 1}]]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_frame_costs_its_sender_not_the_coordinator(served, kind):
    """Issue 13 defect 2: a frame ``{}``, an array nested 200,000 deep, or a batch
    whose op is a map, published in the sender's own ring, kills the coordinator
    today (raw KeyError / RecursionError). It must cost only the sender: an error
    reply or its channel closed; the coordinator keeps serving another client."""
    n, coord = served(kind[:8], capacity=100)
    with shmstore.connect(n) as other:
        other.put("before", 1)
        with RawClient(n) as raw:
            ticket = raw.send(MALFORMED[kind])
            wait_for(lambda: raw.done() >= ticket or raw.channel_closed()
                     or not coord.alive(), timeout=20, what="the coordinator to take the frame")
            assert coord.alive(), f"the coordinator died of a {kind} frame (exit {coord.returncode})"
            if not raw.channel_closed():
                status, result = raw.ch.reply()[1:]
                assert status == ST_ERROR, f"a {kind} frame was answered OK: {result!r}"
        assert other.put("after", 2, timeout=10) > 0
        assert other.get("after") == 2 and other.get("before") == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_wal_record_is_corruption_with_file_and_offset(names, tmp_path, kind):
    """Issue 13 defect 2 (recovery): the same payloads in a WAL record with a valid
    checksum crash recovery today (raw exception, serve() says the coordinator did not
    come up) and check() calls the file clean. Expected: CorruptionError naming the
    file and the offset, from serve(), and check() reporting it."""
    n = names("walfrm")
    d = tmp_path / "data"
    coord = shmstore.serve(n, path=d, capacity=100, sync="always")
    try:
        with shmstore.connect(n) as s:
            for i in range(5):
                s.put(f"k{i}", i)
    finally:
        coord.kill()
    shmstore.destroy(n)
    wal = wal_chain_end(str(d))
    off = append_wal_record(wal, MALFORMED[kind])

    report = shmstore.check(path=d)
    assert not report.ok and any(os.path.basename(wal) in str(p) and str(off) in str(p)
                                 for p in report.problems), (
        f"check() does not report the malformed record at {wal} offset {off}:\n{report}")

    coord2 = None
    try:
        with pytest.raises(shmstore.CorruptionError) as e:
            coord2 = shmstore.serve(n, path=d, timeout=30)
            names.coordinators.append(coord2)
        msg = str(e.value)
        assert os.path.basename(wal) in msg and str(off) in msg, msg
    finally:
        if coord2 is not None:
            coord2.kill()


# -- 3. a HEAD word far beyond the ring --------------------------------------------------


@pytest.mark.timeout(90)
def test_huge_head_word_does_not_wedge_the_coordinator(served):
    """Issue 13 defect 3: a client sets its HEAD to 2**50 over a ring of padding marks;
    today ``_drain_client`` loops without end (heartbeat frozen, other writers time out,
    SIGTERM ignored). Expected: another client's writes go on and SIGTERM stops the
    coordinator (exit 0)."""
    n, coord = served("head", capacity=100)
    with shmstore.connect(n, timeout=10) as other:
        other.put("before", 1)
        with RawClient(n) as raw:
            raw.fill_ring_with_padding()
            raw.set_head(2**50)
            raw.ring()
            ok, res = _finishes(lambda: other.put("after", 2, timeout=10), 30)
            assert ok and isinstance(res, int), f"another client's put: {res!r} (finished: {ok})"
            coord._proc.send_signal(signal.SIGTERM)
            try:
                code = coord._proc.wait(20)
            except subprocess.TimeoutExpired:
                code = None
            assert code == 0, f"the coordinator did not stop on SIGTERM (exit code {code})"


# -- 4. crafted expiry words ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_bad_expiry_frames_are_refused_before_a_slot_is_taken(served):
    """Issue 13 defect 4: a put frame with expiry -1 or a float is refused only after
    its slot left the free ring; today 30 of them leave a 20-record store unable to
    take anything (ProtocolError: pop from an empty deque), even updates."""
    n, coord = served("expiry", capacity=20)
    with shmstore.connect(n) as s, RawClient(n) as raw:
        s.put("keep", 0)
        for i in range(30):
            expiry = -1 if i % 2 else 1.5
            status, result = raw.request(encode([OP_PUT, 1, f"bad{i}".encode(), encode(i), expiry]))
            assert status == ST_ERROR, f"a put with expiry={expiry!r} was accepted: {result!r}"
        assert s.put("keep", 1) > 0
        for i in range(19):  # the store holds 20: "keep" and 19 more
            s.put(f"good{i}", i)
        assert s.get("keep") == 1 and all(s.get(f"good{i}") == i for i in range(19))
        assert all(s.get(f"bad{i}") is None for i in range(30))


@pytest.mark.timeout(60)
def test_batch_with_one_bad_expiry_is_all_or_nothing(served):
    """Issue 13 defect 4: a batch [put a, put b with expiry=-1] is half applied today
    (a visible, nothing logged, an error replied). Expected: an error, and neither."""
    n, coord = served("batchx", capacity=100)
    with RawClient(n) as raw:
        status, result = raw.request(encode([OP_BATCH, 1, [[OP_PUT, b"a", encode(1), 0],
                                                           [OP_PUT, b"b", encode(2), -1]]]))
        assert status == ST_ERROR, f"the batch was accepted: {result!r}"
    with shmstore.connect(n, read_cache=0) as s:
        assert (s.get("a"), s.get("b")) == (None, None), "the refused batch was half applied"


# -- 6. a reader and a stopped coordinator ---------------------------------------------


READ_MISSING = """
import json, sys, time, shmstore
s = shmstore.connect(sys.argv[1], timeout=2, read_cache=0)
print("ready", flush=True)
try:
    v = s.get("no-such-key")
    print(json.dumps(["returned", repr(v)]), flush=True)
except Exception as e:
    print(json.dumps([type(e).__name__, isinstance(e, shmstore.ShmStoreError)]), flush=True)
"""


@pytest.mark.timeout(90)
def test_get_of_a_missing_key_is_bounded_while_the_coordinator_is_stopped_mid_move(served):
    """Issue 13 defect 6: the coordinator is SIGSTOPped inside an index move (index
    generation odd: set here through a test-owned writable mapping, exactly what the
    stopped coordinator leaves); a reader's get() of a missing key waits as long as
    the stop lasts. Expected: it returns or raises a typed error within a bound."""
    from shmstore import _layout as L
    from shmstore._shm import open_segment

    n, coord = served("stop6", capacity=100)
    with shmstore.connect(n) as s:
        s.put("present", 1)
    seg = open_segment(n, writable=True)
    reader = None
    try:
        with stopped(coord.pid):
            gen = seg.q[L.H_INDEX_GEN]
            assert not gen & 1
            seg.q[L.H_INDEX_GEN] = gen + 1  # odd: "buckets moving"
            try:
                reader = python(READ_MISSING, n)
                assert reader.stdout.readline().strip() == "ready", reader.stderr.read()
                try:
                    out, errs = reader.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    pytest.fail("get() of a missing key was still waiting after 20 s of a stopped coordinator")
            finally:
                seg.q[L.H_INDEX_GEN] = gen
        result = json.loads(out.strip().splitlines()[-1])
        assert result[0] == "returned" or result[1] is True, f"raised {result[0]}, not a ShmStoreError: {errs}"
    finally:
        if reader is not None:
            reap(reader)
        seg.close()


# -- 7. nan timeouts -------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("call", ["put", "flush", "connect", "watch"])
def test_nan_timeout_is_refused_at_once(served, call):
    """Issue 13 defect 7: ``timeout=nan`` makes put, flush and connect block for ever
    (a deadline nothing ever passes) and watch raise a raw posix_ipc error. Expected:
    a typed error at once. The coordinator is stopped meanwhile, so a call that
    accepts nan can only hang (and fails the test after 8 s)."""
    n, coord = served("nan", capacity=100)
    nan = float("nan")
    with shmstore.connect(n) as s:
        s.put("warm", 1)  # the write channel is open
        with stopped(coord.pid):
            if call == "put":
                fn = lambda: s.put("k", 1, timeout=nan)  # noqa: E731
            elif call == "flush":
                s.put("q", 1, wait=False)
                fn = lambda: s.flush(timeout=nan)  # noqa: E731
            elif call == "connect":
                def fn():
                    with shmstore.connect(n, timeout=nan) as h:
                        return h.put("k", 1)
            else:
                fn = lambda: next(iter(s.watch(timeout=nan)))  # noqa: E731
            done, res = _finishes(fn, 8)
        assert done, f"{call}(timeout=nan) was still blocked after 8 s"
        assert isinstance(res, shmstore.ShmStoreError) and isinstance(res, ValueError), (
            f"{call}(timeout=nan) gave {res!r}")


# -- 9. bad inputs ------------------------------------------------------------------------------

BAD_KEY = "k\udcff"  # a lone surrogate: what a non-UTF-8 byte from the shell becomes


def _key_entries(s: shmstore.Store):
    def batch_put():
        with s.batch() as b:
            b.put(BAD_KEY, 1)

    def batch_delete():
        with s.batch() as b:
            b.delete(BAD_KEY)

    def snapshot_get():
        with s.snapshot() as snap:
            return snap.get(BAD_KEY)

    def setitem():
        s[BAD_KEY] = 1

    def delitem():
        del s[BAD_KEY]

    return {
        "get": lambda: s.get(BAD_KEY),
        "put": lambda: s.put(BAD_KEY, 1),
        "delete": lambda: s.delete(BAD_KEY),
        "incr": lambda: s.incr(BAD_KEY),
        "compare_and_set": lambda: s.compare_and_set(BAD_KEY, 1, version=0),
        "ttl": lambda: s.ttl(BAD_KEY),
        "version": lambda: s.version(BAD_KEY),
        "get_many": lambda: s.get_many(["ok", BAD_KEY]),
        "batch.put": batch_put,
        "batch.delete": batch_delete,
        "store[key]": lambda: s[BAD_KEY],
        "key in store": lambda: BAD_KEY in s,
        "store[key] = v": setitem,
        "del store[key]": delitem,
        "snapshot.get": snapshot_get,
        "changes(prefix=)": lambda: s.changes(0, prefix=BAD_KEY),
        "watch(prefix=)": lambda: next(iter(s.watch(prefix=BAD_KEY, timeout=0.1)), None),
    }


def _outcome(fn) -> str:
    try:
        fn()
        return "accepted"
    except shmstore.ShmStoreError:
        return "typed"
    except Exception as e:  # noqa: BLE001 - what escaped is the finding
        return f"{type(e).__name__}: {e}"


@pytest.mark.timeout(60)
def test_lone_surrogate_key_is_a_typed_error_at_every_key_entry(store):
    """Issue 13 defect 9: a key with a lone surrogate escapes as a raw
    UnicodeEncodeError at every key-taking entry and in ``changes(prefix=)``.
    Expected: a typed ShmStoreError at each, and nothing written."""
    got = {where: _outcome(fn) for where, fn in _key_entries(store).items()}
    bad = {w: o for w, o in got.items() if o != "typed"}
    assert not bad, f"not a typed error: {json.dumps(bad, indent=1)}"
    assert len(store) == 0


def _cli(*args: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable.encode(), b"-m", b"shmstore", *args], capture_output=True,
                          timeout=30, cwd=REPO)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cmd", ["get", "put", "put-value"])
def test_cli_with_a_non_utf8_key_fails_without_a_traceback(served, cmd):
    """Issue 13 defect 9: a key with a non-UTF-8 byte from the shell makes the CLI
    print a traceback. Expected: no traceback, ever; ``get`` of the (missing) key and
    ``put`` of a non-UTF-8 JSON value fail with a one-line error and a nonzero exit.

    (Changed with the fix: the CLI now takes a KEY as the bytes the shell passed
    (``os.fsencode``), so ``put`` of ``k\\xff`` writes the key ``b"k\\xff"`` and
    succeeds; what it asserts is that the bytes round-trip. The failing put is now
    the one whose JSON value is not UTF-8, which has no bytes to keep.)"""
    n, coord = served("cli", capacity=100)
    if cmd == "get":
        r = _cli(b"get", n.encode(), b"k\xff")
    elif cmd == "put":
        r = _cli(b"put", n.encode(), b"k\xff", b"1")
    else:
        r = _cli(b"put", n.encode(), b"k", b'"\xff"')
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    if cmd == "put":
        assert r.returncode == 0, err
        got = _cli(b"get", n.encode(), b"k\xff")
        assert (got.returncode, got.stdout.strip()) == (0, b"1"), got.stderr.decode(errors="replace")
        with shmstore.connect(n) as s:
            assert s.get(b"k\xff") == 1 and sorted(s.keys()) == [b"k\xff"]
        return
    assert r.returncode != 0, r.stdout
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmstore: error:"), err


def _deep(depth: int) -> list:
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


def _self_ref() -> list:
    v: list = []
    v.append(v)
    return v


@pytest.mark.timeout(60)
def test_bad_values_ttls_versions_and_timeouts_are_typed_errors(store):
    """Issue 13 defect 9: deep or self-referencing values (RecursionError),
    ttl=10**400 (OverflowError), compare_and_set versions -1/'1'/None/1.0/2**64 (plain
    ValueError/OverflowError) and True (accepted), get_many(None), string timeouts
    (failing only at the first write). Expected: a typed ShmStoreError each, raised in
    the caller, nothing written."""
    s = store
    s.put("x", 0)
    v0 = s.version("x")
    cases = {
        "put deep value": lambda: s.put("d", _deep(100_000)),
        "put self-referencing value": lambda: s.put("d", _self_ref()),
        "batch put self-referencing value": lambda: _batch_put(s, "d", _self_ref()),
        "put ttl=10**400": lambda: s.put("t", 1, ttl=10**400),
        "get_many(None)": lambda: s.get_many(None),
        "put timeout='1'": lambda: s.put("t", 1, timeout="1"),
        "connect timeout='1'": lambda: _connect_put(s.name, "1"),
    }
    for bad in (-1, "1", None, 1.0, 2**64, True):
        cases[f"compare_and_set version={bad!r}"] = lambda bad=bad: s.compare_and_set("x", 1, version=bad)
    got = {what: _outcome(fn) for what, fn in cases.items()}
    bad = {w: o for w, o in got.items() if o != "typed"}
    assert not bad, f"not a typed error: {json.dumps(bad, indent=1)}"
    assert s.get("x") == 0 and s.version("x") == v0 and sorted(s.keys()) == [b"x"]


def _batch_put(s, key, value) -> None:
    with s.batch() as b:
        b.put(key, value)


def _connect_put(name: str, timeout: object) -> None:
    with shmstore.connect(name, timeout=timeout) as h:
        h.put("t", 1)


@pytest.mark.timeout(60)
def test_serve_with_a_fractional_max_clients_is_refused_in_the_caller(names):
    """Issue 13 defect 9: serve(max_clients=1.5) is reported as "did not come up within
    N s" (the coordinator dies parsing its config). Expected: a typed error (a
    ValueError or TypeError) raised in the calling process, before any coordinator."""
    n = names("frac")
    with pytest.raises(shmstore.ShmStoreError) as e:
        names.coordinators.append(shmstore.serve(n, max_clients=1.5))
    assert isinstance(e.value, (ValueError, TypeError)), f"{type(e.value).__name__}: {e.value}"
