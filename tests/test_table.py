"""numpy tables: reads whole rows as of one epoch, atomic writes, durability, crashes.

- API and bad input (typed errors that are also the stdlib class callers catch).
- Across real processes (fork and spawn): a writer rewrites rows with self-checking
  records (every field of a row equals the row's generation); readers check that
  every row is whole and that a block always written by one op is seen all-or-nothing.
- Durable restart (checkpoint + WAL replay) and adoption of a live segment.
- SIGKILL of the coordinator in the middle of a write (at a chosen point: half the
  rows written): the next coordinator rolls the write forward from its redo copy
  (adopted segment) or, rebuilding from disk, never shows it (it was never logged).
- SIGKILLs at random moments (seeded; SEED=... replays) with frequent checkpoints:
  every acknowledged write survives, the one in flight shows whole or not at all.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import numpy as np
import pytest

import shmstore
from tests.helpers.processes import python, reap, run_collecting

DT = np.dtype([("gen", "<i8"), ("x", "<f8"), ("tag", "S8"), ("arr", "<i4", (3,))])


def rec(gen: int, n: int = 1) -> np.ndarray:
    """Self-checking records: every field of a row says the same generation."""
    v = np.zeros(n, DT)
    v["gen"] = gen
    v["x"] = gen
    v["tag"] = str(gen).encode()[:8]
    v["arr"] = gen
    return v


def whole(rows: np.ndarray) -> np.ndarray:
    """Which rows are whole (every field from the same generation)."""
    g = rows["gen"]
    tag_ok = (rows["tag"] == np.char.encode(g.astype(str))) | ((g == 0) & (rows["tag"] == b""))  # never written
    return (rows["x"] == g) & tag_ok & np.all(rows["arr"] == g[:, None], axis=1)


def test_create_write_read_scan(store):
    t = store.table("prices", DT, 100)
    assert (t.nrows, t.dtype, len(t)) == (100, DT, 100)
    assert (t.read_all() == np.zeros(100, DT)).all()  # never written: zeros
    e = t.write([5, 1, 9], rec(7, 3))
    assert e == t.epoch == store.epoch
    got = t.read([9, 1, 5, 0, 9])
    assert got.dtype == DT and list(got["gen"]) == [7, 7, 7, 0, 7] and whole(got).all()
    t.write(range(10, 20), rec(3, 10))
    assert list(t.read(slice(9, 12))["gen"]) == [7, 3, 3]
    assert list(t.read(range(18, 22))["gen"]) == [3, 3, 0, 0]
    assert list(t.read(range(0, 30, 10))["gen"]) == [0, 3, 0]
    t.write(42, rec(9)[0])  # one row, one record
    t.write([43], [(11, 11.0, b"11", (11, 11, 11))])  # a list of tuples converts
    rows, recs = t.scan(lambda a: a["gen"] > 5)
    assert list(rows) == [1, 5, 9, 42, 43] and list(recs["gen"]) == [7, 7, 7, 9, 11]
    rows, recs = t.scan()
    assert len(rows) == 100 and (recs == t.read_all()).all()
    # Another handle (the same table), and the same table opened by name only.
    with shmstore.connect(store.name) as s2:
        t2 = s2.table("prices")
        assert (t2.read_all() == t.read_all()).all()
        with pytest.raises(shmstore.IncompatibleStoreError):
            s2.table("prices", DT, 101)
        with pytest.raises(shmstore.IncompatibleStoreError):
            s2.table("prices", np.dtype([("gen", "<i4")]), 100)
        assert s2.table("prices", DT, 100).nrows == 100  # same definition: just opens
    t.close()
    t.close()
    with pytest.raises(shmstore.StoreClosedError):
        t.read([1])


def test_bad_input_gets_typed_errors_that_say_what_to_do(store):
    t = store.table("t", DT, 10)
    with pytest.raises(shmstore.TableNotFoundError, match="create it with") as ei:
        store.table("nope")
    assert isinstance(ei.value, KeyError)
    with pytest.raises(shmstore.TableDtypeError, match="astype") as ei:
        t.write([1], np.zeros(1, [("gen", "<i4")]))
    assert isinstance(ei.value, TypeError)
    with pytest.raises(shmstore.TableDtypeError):
        t.write([1], [("not", "a", "record", "at all", 5)])
    with pytest.raises(shmstore.TableDtypeError, match="object"):
        store.table("objs", np.dtype([("o", object)]), 5)
    with pytest.raises(shmstore.RowOutOfRangeError, match="outside") as ei:
        t.write([10], rec(1))
    assert isinstance(ei.value, IndexError)
    with pytest.raises(shmstore.RowOutOfRangeError):
        t.read([-1])
    with pytest.raises(shmstore.RowOutOfRangeError):
        t.read(range(5, 11))
    with pytest.raises(shmstore.InvalidRowsError, match="one record per row") as ei:
        t.write([1, 2], rec(1, 3))
    assert isinstance(ei.value, ValueError)
    with pytest.raises(shmstore.InvalidRowsError, match="more than once"):
        t.write([1, 1], rec(1, 2))
    with pytest.raises(shmstore.InvalidRowsError):
        t.read([1.5])
    with pytest.raises(shmstore.InvalidRowsError):
        t.scan(lambda a: a["gen"])  # not a mask
    with pytest.raises(shmstore.InvalidNameError):
        store.table("bad/name", DT, 1)
    with pytest.raises(shmstore.InvalidRowsError):
        store.table("zero", DT, 0)
    big = store.table("big", DT, 200_000)
    with pytest.raises(shmstore.RequestTooLargeError, match="ring_size"):
        big.write(range(0, 200_000), rec(1, 200_000))
    # Nothing of the refused writes reached the table.
    assert (t.read_all() == np.zeros(10, DT)).all() and (big.read(range(5)) == np.zeros(5, DT)).all()


def test_the_coordinator_refuses_what_a_client_should_have(store):
    """A client that skips the checks (another version, a bug) is refused too."""
    from shmstore import _channel as C

    store.table("t", DT, 10)
    rows = np.array([3, 3], "<i8").tobytes()
    with pytest.raises(shmstore.InvalidRowsError):
        store._request([C.OP_TABLE_WRITE, 1, "t", rows, rec(1, 2).tobytes()], "table write")
    with pytest.raises(shmstore.RowOutOfRangeError):
        store._request([C.OP_TABLE_WRITE, 1, "t", np.array([10], "<i8").tobytes(), rec(1).tobytes()], "w")
    with pytest.raises(shmstore.InvalidRowsError):
        store._request([C.OP_TABLE_WRITE, 1, "t", np.array([1], "<i8").tobytes(), b"short"], "w")
    with pytest.raises(shmstore.TableNotFoundError):
        store._request([C.OP_TABLE_WRITE, 1, "zz", b"", b""], "w")
    assert (store.table("t").read_all() == np.zeros(10, DT)).all()


def test_read_via_the_coordinator_when_rows_keep_moving(store, monkeypatch):
    import shmstore._table as T

    t = store.table("t", DT, 50)
    t.write(range(50), rec(4, 50))
    monkeypatch.setattr(T, "READ_TRIES", 0)
    # Make the first pass fail as if a writer kept these rows odd: read the
    # coordinator's copy instead (the fallback path), which is the same table.
    got = t._read_via_coordinator(np.array([1, 49, 1]))
    assert list(got["gen"]) == [4, 4, 4] and whole(got).all()
    assert (t._read_via_coordinator(slice(0, 50)) == t.read_all()).all()


# -- across processes ----------------------------------------------------------------

BLOCK = 64  # rows 0..63 are always written together, by one op
ROWS = 256


def _table_writer(name: str, gens: int, seed: int) -> None:
    rng = random.Random(seed)
    s = shmstore.connect(name)
    t = s.table("t")
    for g in range(1, gens + 1):
        t.write(range(BLOCK), rec(g, BLOCK))
        some = rng.sample(range(BLOCK, ROWS), rng.randint(1, 64))
        t.write(some, rec(g, len(some)))
    s.close()


def _table_reader(name: str, seconds: float, fast: bool, out: mp.Queue) -> None:
    import shmstore._table as T

    T.FAST_PATH = fast  # one reader drives the per-row seqlock protocol only
    s = shmstore.connect(name)
    t = s.table("t")
    rng = np.random.default_rng(os.getpid())
    bad = []
    reads = 0
    last_block = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and len(bad) < 5:
            rows = rng.integers(0, ROWS, rng.integers(1, 300))
            got = t.read(rows) if reads % 4 else t.read_all()
            if reads % 4 == 0:
                rows = np.arange(ROWS)
            reads += 1
            if not whole(got).all():
                bad.append(f"torn row(s) {rows[~whole(got)][:5]}")
            inblock = got["gen"][rows < BLOCK]
            if len(inblock):
                if len(set(inblock.tolist())) != 1:
                    bad.append(f"half of a block write: generations {sorted(set(inblock.tolist()))}")
                if inblock[0] < last_block:
                    bad.append(f"went back from generation {last_block} to {inblock[0]}")
                last_block = int(inblock[0])
    except BaseException as e:
        bad.append(f"{type(e).__name__}: {e}")
    finally:
        s.close()
        out.put((os.getpid(), reads, s._counters.read_retries, bad))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_readers_see_whole_rows_and_whole_writes(served, method):
    seed = int(os.environ.get("SEED", time.time_ns() % 10**9))
    print(f"seed {seed}")
    n, _ = served(capacity=10)
    with shmstore.connect(n) as s:
        s.table("t", DT, ROWS)
    ctx = mp.get_context(method)
    out = ctx.Queue()
    writer = ctx.Process(target=_table_writer, args=(n, 1500, seed))
    readers = [ctx.Process(target=_table_reader, args=(n, 2.0, fast, out)) for fast in (True, False)]
    results = run_collecting([writer, *readers], out, len(readers))
    print(results)
    assert not [b for r in results for b in r[3]], f"seed {seed}: {results}"
    assert all(r[1] > 0 for r in results)
    with shmstore.connect(n) as s:
        final = s.table("t").read_all()
        assert whole(final).all() and (final["gen"][:BLOCK] == 1500).all()


# -- durability and crashes ------------------------------------------------------------


def test_durable_table_survives_restart_and_rebuild(names, tmp_path):
    n = names("dtbl")
    data = tmp_path / "data"
    coord = shmstore.serve(n, path=data, capacity=50)
    names.coordinators.append(coord)
    with shmstore.connect(n) as s:
        t = s.table("t", DT, 1000)
        t.write(range(0, 500), rec(1, 500))
        s.put("k", "v")
        s.checkpoint()  # the table goes into the checkpoint's .tables file ...
        t.write(range(250, 750), rec(2, 500))  # ... and these into the WAL after it
        s.table("later", np.dtype("<f8"), 7).write([3], [2.5])  # created after the checkpoint
        expect = t.read_all()
    old = shmstore.connect(n)
    old_t = old.table("t")  # a handle kept across the destroy and rebuild below
    coord.kill()  # SIGKILL: nothing acknowledged may be lost
    for destroy in (True, False):  # rebuild from the directory, then adopt the segment
        if destroy:
            shmstore.destroy(n)
        coord = shmstore.serve(n, path=data)
        names.coordinators.append(coord)
        with shmstore.connect(n) as s:
            assert (s.table("t").read_all() == expect).all()
            assert s.table("later").read([3, 4]).tolist() == [2.5, 0.0]
            assert s.get("k") == "v"
            assert (old_t.read_all() == expect).all()  # follows the rebuilt store
            e = s.table("t").write([999], rec(3))
            assert e == s.epoch
            expect[999] = rec(3)[0]
        coord.stop()
    old_t.close()
    old.close()
    assert any(p.name.endswith(".tables") for p in data.iterdir())



def test_a_failed_rebuild_leaves_no_table_segment(names, tmp_path):
    """A rebuild lays a checkpoint's tables into new segments before it replays the WAL;
    when the replay then fails (nothing is served), those segments go too."""
    import shutil

    from tests.helpers.processes import shm_objects

    n = names("ftbl")
    data = tmp_path / "data"
    coord = shmstore.serve(n, path=data, capacity=50)
    names.coordinators.append(coord)
    with shmstore.connect(n) as s:
        s.table("t", DT, 10).write([1], rec(1))
        s.checkpoint()
    coord.kill()
    shmstore.destroy(n)
    # The oldest checkpoint (before the create) given the newest one's tables: the
    # logged create then finds the table there, and the replay fails.
    first, newest = sorted(data.glob("ckpt-*.ckpt"))
    shutil.copy(newest.with_suffix(".tables"), first.with_suffix(".tables"))
    newest.unlink()
    newest.with_suffix(".tables").unlink()
    with pytest.raises(shmstore.CorruptionError, match="found it existing"):
        shmstore.serve(n, path=data)
    assert not [e for e in shm_objects(n) if "@t." in e]


KILL_MID_WRITE = """
import os, signal, sys
import msgspec
from shmstore.coordinator import ServerConfig
from shmstore.coordinator import _table
from shmstore.coordinator._server import main_serve

real = _table.TableSet.write
def dying_write(self, op, payload):
    # The first write of 100 rows dies after storing half of them: seqs odd,
    # half the records new, T_WRITING odd, the redo copy in place.
    if len(op[3]) == 800 and op[3][:8] == bytes(8):
        tm, rows, vals = self.check_write(op)
        self.engine.redo.write(payload)
        tm.q[6] += 1
        epoch = self.engine.next_epoch()
        tm.seqs[rows] = 2 * epoch + 1
        tm.data[rows[:50]] = vals[:50]
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, op, payload)
_table.TableSet.write = dying_write
cfg = msgspec.json.decode(sys.argv[1], type=ServerConfig)
sys.exit(main_serve(cfg, ready_fd=int(sys.argv[2])))
"""


@pytest.mark.parametrize("destroy", [False, True], ids=["adopt", "rebuild"])
def test_sigkill_in_the_middle_of_a_write(names, tmp_path, destroy):
    import msgspec

    from shmstore.coordinator import ServerConfig

    n = names("kill")
    data = tmp_path / "d"
    cfg = ServerConfig(name=n, capacity=20, path=str(data), sync="always")
    r, w = os.pipe()
    proc = python(KILL_MID_WRITE, msgspec.json.encode(cfg).decode(), str(w), pass_fds=(w,))
    os.close(w)
    try:
        assert os.read(r, 100).startswith(b"ok"), proc.stderr.read()
        with shmstore.connect(n, timeout=2) as s:
            t = s.table("t", DT, 200)
            t.write(range(100, 200), rec(1, 100))  # acknowledged
            with pytest.raises(shmstore.CoordinatorUnavailableError):
                t.write(range(100), rec(2, 100))  # dies half-way
            proc.wait(10)
            assert proc.returncode == -signal.SIGKILL
            # Readers never get half of it: the rows are odd, so they ask for the
            # coordinator, which is gone.
            with pytest.raises(shmstore.CoordinatorUnavailableError):
                t.read(range(0, 100))
            assert (t.read(range(100, 200))["gen"] == 1).all()
            t.close()
        if destroy:
            shmstore.destroy(n)
        coord = shmstore.serve(n, path=data)
        names.coordinators.append(coord)
        with shmstore.connect(n) as s:
            got = s.table("t").read_all()
            assert whole(got).all()
            # Adopted: rolled forward whole from the redo copy. Rebuilt from disk:
            # the write was never logged (never acknowledged), so none of it shows.
            assert (got["gen"][:100] == (0 if destroy else 2)).all(), got["gen"][:100]
            assert (got["gen"][100:] == 1).all()
            tm = s.table("t")._tm
            assert tm.q[6] % 2 == 0 and not (tm.seqs & np.uint64(1)).any()
    finally:
        os.close(r)
        reap(proc)


def test_random_sigkills_lose_no_acknowledged_write_and_tear_none(names, tmp_path):
    """The coordinator is SIGKILLed at random moments while one client writes random
    blocks of rows (each block one op, every row of it the op's generation) and
    checkpoints are taken every few ops. After each restart (adopting the segment,
    or rebuilding it from the data directory) every row must hold the generation of
    its last acknowledged write, or of the one write in flight at the kill, and that
    write must show in all of its rows or in none."""
    import threading

    seed = int(os.environ.get("SEED", time.time_ns() % 10**9))
    print(f"seed {seed}")
    rng = random.Random(seed)
    n = names("tkill")
    data = tmp_path / "d"
    nrows = 300
    expect = np.zeros(nrows, np.int64)  # the last acknowledged generation per row
    gen = 0
    in_flight = None
    for kill in range(6):
        coord = shmstore.serve(n, path=data, capacity=10, checkpoint_ops=rng.choice([5, 20, 1000]))
        names.coordinators.append(coord)
        s = shmstore.connect(n, timeout=3)
        try:
            t = s.table("t", DT, nrows)
            got = t.read_all()
            assert whole(got).all(), f"seed {seed}: torn rows after restart {kill}"
            diff = np.flatnonzero(got["gen"] != expect)
            if len(diff):  # only the write in flight at the kill may show, and all of it
                assert in_flight is not None and set(diff) <= set(in_flight[0]), (seed, diff)
                assert (got["gen"][in_flight[0]] == in_flight[1]).all(), (seed, kill)
                expect[in_flight[0]] = in_flight[1]
            in_flight = None
            timer = threading.Timer(rng.uniform(0.05, 0.4), coord.kill)
            timer.start()
            try:
                while True:
                    gen += 1
                    rows = np.array(rng.sample(range(nrows), rng.randint(1, 120)))
                    in_flight = (rows, gen)
                    t.write(rows, rec(gen, len(rows)))
                    expect[rows] = gen
                    in_flight = None
            except (shmstore.CoordinatorUnavailableError, shmstore.StoreTimeoutError):
                pass
            finally:
                timer.join()
            t.close()
        finally:
            s.close()
        coord.kill()
        if rng.random() < 0.5:
            shmstore.destroy(n)  # the reboot case: rebuild from checkpoint + WAL
    coord = shmstore.serve(n, path=data)
    names.coordinators.append(coord)
    with shmstore.connect(n) as s:
        got = s.table("t").read_all()
        assert whole(got).all()
        diff = np.flatnonzero(got["gen"] != expect)
        assert not len(diff) or (in_flight is not None and set(diff) <= set(in_flight[0])), (seed, diff)


def test_the_coordinator_refuses_bad_table_definitions(store):
    from shmstore import _channel as C

    for text in ("__import__('os').system('true')", "((((", "[('a', 'nope')]", "[('o', '|O')]", 5):
        with pytest.raises((shmstore.TableDtypeError, shmstore.ProtocolError)):
            store._request([C.OP_TABLE_CREATE, 1, "t", text, 10], "table create")
    with pytest.raises(shmstore.StoreFullError, match="fewer rows"):
        store._request([C.OP_TABLE_CREATE, 1, "huge", "'|V4096'", 1 << 31], "table create")
    with pytest.raises(shmstore.StoreFullError, match="fewer rows"):
        store.table("huge", np.dtype("V4096"), 1 << 31)
    with pytest.raises(shmstore.TableNotFoundError):
        store.table("t")  # none of those made a table
    assert store.table("ok", DT, 3).nrows == 3  # the coordinator is still serving


def test_the_coordinators_snapshot_of_a_memory_store_keeps_every_class(served, names, monkeypatch):
    """The handover snapshot (coordinator/_table.py ``write_snapshot``) of records in many
    size classes: each row is the bytes its record uses (not its class's slot), and every
    record reads back exactly, through a client and from the payload itself."""
    import msgspec

    from shmstore import _layout as L
    from shmstore import _snapshot as S
    from shmstore._handover import open_handover
    from shmstore.coordinator import CoordinatorServer, ServerConfig
    from shmstore.coordinator._table import write_snapshot

    model = {f"k{i}": "v" * (i * 37 % 4900) for i in range(200)}
    model["k1"] = "short"
    del model["k2"]
    n, _ = served("snapmem", memory=24 << 20, value_size=5000, capacity=1000)
    monkeypatch.setattr(S, "SNAPSHOT_TRIES", 0)  # the coordinator's copy, not the lock-free one
    with shmstore.connect(n) as s:
        for i in range(200):
            s.put(f"k{i}", "v" * (i * 37 % 4900))
        s.put("k1", "short")  # an update
        s.delete("k2")
        with s.snapshot() as snap:
            assert snap.via_coordinator
            assert {k.decode(): v for k, v in snap.items()} == model
            assert snap.get("k2") is None
    # The payload itself, from a coordinator in this process.
    m = names("snapraw")
    server = CoordinatorServer(ServerConfig(name=m, memory=24 << 20, value_size=5000, capacity=1000,
                                            max_clients=1))
    try:
        server.setup()
        e = server.engine
        for k, v in model.items():
            e.put(k.encode(), msgspec.msgpack.encode(v))
        mm, size = open_handover(write_snapshot(server.seg, e.epoch, server.handovers))
        try:
            epoch, idx, data, offsets, _ = S.from_handover(mm, size)
            assert epoch == e.epoch and len(offsets) == len(model) + 1
            lengths = np.diff(offsets)
            want = sorted(L.align(L.slot_need(len(k), len(msgspec.msgpack.encode(v))), 8)
                          for k, v in model.items())
            assert sorted(lengths.tolist()) == want
            assert offsets[-1] < sum(server.seg.classes[server.seg.layout.class_for(w)]
                                     for w in want)
            del idx, data, offsets
        finally:
            mm.close()
    finally:
        server.close()
