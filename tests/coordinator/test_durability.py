"""Durable stores (``serve(path=...)``): WAL, checkpoints, recovery, sync modes.

Crash loops with SIGKILL and corruption of the files are in test_crash.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import msgspec
import pytest

import shmstore
from shmstore import _layout as L
from shmstore.coordinator import CoordinatorServer, ServerConfig
from shmstore.coordinator._durable._checkpoint import load_checkpoint, take_snapshot, write_checkpoint
from shmstore.coordinator._durable import EPOCH_GAP, Manifest
from shmstore.coordinator._durable._wal import HEADER_SIZE, WalWriter, scan_wal
from tests.helpers.processes import wait_for


class Point(msgspec.Struct):
    x: int
    y: int


def state(store: shmstore.Store) -> dict:
    """Every record as key -> (version, value)."""
    return {k.decode(): (store.version(k), v) for k, v in store.items()}


def files(path, prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith(prefix) and not n.endswith(".corrupt"))


def write_everything(s: shmstore.Store) -> None:
    """Every kind of op, including ones whose replay depends on earlier state."""
    for i in range(50):
        s.put(f"k{i}", {"i": i, "pad": "x" * (i % 7)})
    s.delete("k3")
    s.compare_and_set("k4", "cas", version=s.version("k4"))
    s.compare_and_set("fresh", 1, version=0)
    for _ in range(5):
        s.incr("ctr", 3)
    with s.batch() as b:
        b.put("b1", 1)
        b.delete("k5")
        b.put("b2", [1, 2])
        b.delete("never-there")
    for i in range(20):
        s.put(f"k{i}", i, wait=False)  # pipelined: one group holds many records
    s.flush()
    s.delete("k6")


@pytest.mark.parametrize("keep_segment", [True, False], ids=["adopt", "rebuild"])
def test_sigkill_then_restart_keeps_every_record_and_version(served, names, tmp_path, keep_segment):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=200, key_size=16, value_size=64)
    with shmstore.connect(n) as s:
        write_everything(s)
        before = state(s)
        epoch = s.epoch
        coord.kill()
        if not keep_segment:
            shmstore.destroy(n)
        coord2 = shmstore.serve(n, path=data)
        names.coordinators.append(coord2)
        assert state(s) == before  # the same handle reads the recovered store
        if keep_segment:
            assert s.epoch >= epoch
        else:
            assert s.epoch >= epoch + EPOCH_GAP  # versions the dead one showed are never reused
        v = s.put("k0", "after")
        assert v > max(ver for ver, _ in before.values())
        assert s.incr("ctr") == 16


def test_clean_stop_checkpoints_and_restart_replays_nothing(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=100)
    with shmstore.connect(n) as s:
        for i in range(30):
            s.put(f"k{i}", i)
        before = state(s)
        assert coord.stop() == 0
        newest = files(data, "ckpt-")[-1]
        assert int(newest[5:25]) == s.epoch  # the shutdown checkpoint holds everything
        shmstore.destroy(n)
        coord2 = shmstore.serve(n, path=data)
        names.coordinators.append(coord2)
        assert state(s) == before


def test_directory_and_files_are_private(served, tmp_path):
    data = tmp_path / "a" / "b" / "data"  # missing parents are created too
    n, coord = served("dur", path=data, capacity=10)
    with shmstore.connect(n) as s:
        s.put("k", 1)
        s.checkpoint()
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    names = os.listdir(data)
    assert "MANIFEST" in names and files(data, "ckpt-") and files(data, "wal-")
    for f in names:
        assert stat.S_IMODE(os.stat(data / f).st_mode) == 0o600, f
    m = msgspec.json.decode((data / "MANIFEST").read_bytes().split(b"\n")[0], type=Manifest)  # line 2: its crc32
    assert (m.name, m.capacity) == (n, 10)


def test_relative_path_is_resolved_against_the_callers_directory(served, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    n, coord = served("dur", path="rel-data", capacity=10)
    with shmstore.connect(n) as s:
        s.put("k", 1)
    assert (tmp_path / "rel-data" / "MANIFEST").exists()


def test_restart_with_other_parameters_is_refused(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=50, key_size=16, value_size=64, value_type=Point)
    with shmstore.connect(n, value_type=Point) as s:
        s.put("p", Point(1, 2))
    coord.stop()
    shmstore.destroy(n)
    with pytest.raises(shmstore.IncompatibleStoreError, match="capacity=50"):
        shmstore.serve(n, path=data, capacity=51)
    with pytest.raises(shmstore.IncompatibleStoreError, match="value_size=64"):
        shmstore.serve(n, path=data, value_size=65)
    with pytest.raises(shmstore.SchemaMismatchError):
        shmstore.serve(n, path=data, value_type=dict)
    other = names("other")
    with pytest.raises(shmstore.IncompatibleStoreError, match="belongs to store"):
        shmstore.serve(other, path=data)
    # Nothing of the refused attempts stayed behind; the right parameters work.
    coord2 = shmstore.serve(n, path=data, value_type=Point)
    names.coordinators.append(coord2)
    with shmstore.connect(n, value_type=Point) as s:
        assert s.get("p") == Point(1, 2)


def test_a_segment_from_another_history_is_refused(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=20)
    with shmstore.connect(n) as s:
        s.put("k", "from disk")
    coord.stop()
    shmstore.destroy(n)
    mem = shmstore.serve(n, capacity=20)  # a memory-only store of the same name
    with shmstore.connect(n) as s:
        s.put("k", "in memory")
    mem.stop()
    with pytest.raises(shmstore.IncompatibleStoreError, match="not made from data directory"):
        shmstore.serve(n, path=data)
    shmstore.destroy(n)
    coord2 = shmstore.serve(n, path=data)
    names.coordinators.append(coord2)
    with shmstore.connect(n) as s:
        assert s.get("k") == "from disk"


def test_a_memory_store_becomes_durable_when_served_with_a_path(served, names, tmp_path):
    n, mem = served("dur", capacity=20)
    with shmstore.connect(n) as s:
        s.put("k", 1)
        mem.stop()
        coord = shmstore.serve(n, path=tmp_path / "data")
        names.coordinators.append(coord)
        s.put("j", 2)
        before = state(s)
        coord.kill()
        shmstore.destroy(n)
        coord2 = shmstore.serve(n, path=tmp_path / "data")
        names.coordinators.append(coord2)
        assert state(s) == before


def test_one_directory_serves_one_store_at_a_time(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=10)
    with pytest.raises(shmstore.CoordinatorRunningError, match="in use"):
        shmstore.serve(names("two"), path=data)


def test_checkpoint_rotates_and_keeps_the_last_k(served, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=100, checkpoint_keep=2)
    with shmstore.connect(n) as s:
        epochs = []
        for round_ in range(4):
            for i in range(10):
                s.put(f"k{i}", round_)
            epochs.append(s.checkpoint())
        assert epochs == sorted(epochs) and epochs[-1] == s.epoch
        assert s.checkpoint() == epochs[-1]  # nothing new: no new file
        ckpts = files(data, "ckpt-")
        assert [int(c[5:25]) for c in ckpts] == epochs[-2:]
        # WAL files: only what the two kept checkpoints' chains need.
        wals = files(data, "wal-")
        assert len(wals) == 2 and int(wals[0][4:24]) == epochs[-2]


def test_checkpoints_are_taken_every_n_ops_in_the_background(served, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=100, checkpoint_ops=25)
    with shmstore.connect(n) as s:
        for i in range(60):
            s.put(f"k{i % 10}", i)
        wait_for(lambda: len(files(data, "ckpt-")) == 2 and
                 int(files(data, "ckpt-")[-1][5:25]) >= s.epoch - 35,
                 what="two automatic checkpoints")


def test_checkpoint_of_a_memory_store_is_refused(store):
    with pytest.raises(shmstore.DurabilityUnavailableError, match="memory-only"):
        store.checkpoint()


def test_sync_arguments_are_checked(names, tmp_path):
    n = names()
    with pytest.raises(shmstore.InvalidLayoutError):
        shmstore.serve(n, sync="always")  # needs path=
    with pytest.raises(shmstore.InvalidLayoutError):
        shmstore.serve(n, path=tmp_path, sync="sometimes")
    with pytest.raises(shmstore.InvalidLayoutError):
        shmstore.serve(n, path=tmp_path, sync_interval=0)
    with pytest.raises(shmstore.InvalidLayoutError):
        shmstore.serve(n, path=tmp_path, checkpoint_keep=0)


def test_periodic_mode_keeps_acknowledged_writes_across_sigkill(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=100, sync="periodic", sync_interval=0.05)
    with shmstore.connect(n) as s:
        write_everything(s)
        before = state(s)
        coord.kill()  # written to the OS before the replies: the page cache keeps it
        shmstore.destroy(n)
        coord2 = shmstore.serve(n, path=data, sync="periodic")
        names.coordinators.append(coord2)
        assert state(s) == before


def test_never_mode_keeps_what_the_last_checkpoint_holds(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=100, sync="never")
    with shmstore.connect(n) as s:
        s.put("a", 1)
        s.checkpoint()
        at_checkpoint = state(s)
        s.put("b", 2)
        assert files(data, "wal-") == []  # no log at all
        coord.kill()
        shmstore.destroy(n)  # the segment is gone too: back to the checkpoint
        coord2 = shmstore.serve(n, path=data, sync="never")
        names.coordinators.append(coord2)
        assert state(s) == at_checkpoint
        s.put("c", 3)
        after = state(s)
        coord2.stop()  # a clean stop checkpoints
        shmstore.destroy(n)
        coord3 = shmstore.serve(n, path=data, sync="never")
        names.coordinators.append(coord3)
        assert state(s) == after


def test_a_handle_survives_restarts_and_writes_fail_clearly_meanwhile(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=20)
    with shmstore.connect(n, timeout=0.3) as s:
        s.put("k", 1)
        for destroy in (False, True):
            coord.kill()
            if destroy:
                shmstore.destroy(n)
            with pytest.raises((shmstore.CoordinatorUnavailableError, shmstore.StoreNotFoundError)):
                s.put("k", "during")
            coord = shmstore.serve(n, path=data)
            names.coordinators.append(coord)
            assert s.get("k") == 1
        assert s.put("k", 2) > 0 and s.get("k") == 2


def test_a_coordinator_killed_while_rebuilding_leaves_nothing_half_built(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=20_000, key_size=16, value_size=32,
                      checkpoint_ops=10**6)
    with shmstore.connect(n) as s:
        for i in range(0, 20_000, 500):
            with s.batch() as b:
                for j in range(i, i + 500):
                    b.put(f"k{j}", j)
        before = state(s)
    coord.kill()
    shmstore.destroy(n)
    config = ServerConfig(name=n, path=str(data), sync="always")
    for delay in (0.05, 0.3, 0.6):
        p = subprocess.Popen([sys.executable, "-m", "shmstore.coordinator", "--config",
                              msgspec.json.encode(config).decode()], stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.kill()
        p.wait()
    coord2 = shmstore.serve(n, path=data, timeout=60)
    names.coordinators.append(coord2)
    with shmstore.connect(n) as s:
        assert state(s) == before


def test_recovery_falls_back_to_the_previous_checkpoint_plus_wal(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=100)
    with shmstore.connect(n) as s:
        s.put("a", 1)
        s.checkpoint()
        s.put("b", 2)
        s.checkpoint()
        s.put("c", 3)
        before = state(s)
        coord.kill()
        shmstore.destroy(n)
        newest = data / files(data, "ckpt-")[-1]
        raw = bytearray(newest.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        newest.write_bytes(bytes(raw))
        coord2 = shmstore.serve(n, path=data)
        names.coordinators.append(coord2)
        assert state(s) == before
        assert (data / (newest.name + ".corrupt")).exists()  # set aside, not used again


def test_a_checkpoint_right_after_a_rebuild_is_the_one_recovered_next(served, names, tmp_path):
    """Regression: the WAL file a rebuild starts and the file a checkpoint taken before
    any write starts share their start epoch; the first is not a stray newer file."""
    data = tmp_path / "data"
    n, coord = served("dur", path=data, capacity=50)
    with shmstore.connect(n) as s:
        s.put("a", 1)
        for _ in range(2):
            coord.kill()
            shmstore.destroy(n)
            coord = shmstore.serve(n, path=data)
            names.coordinators.append(coord)
            epoch = s.checkpoint()  # no write since the rebuild
            assert int(files(data, "ckpt-")[-1][5:25]) == epoch
        before = state(s)
        coord.kill()
        shmstore.destroy(n)
        coord = shmstore.serve(n, path=data)
        names.coordinators.append(coord)
        assert state(s) == before
        assert not [f for f in os.listdir(data) if f.endswith(".corrupt")]
        assert s.put("b", 2) > epoch


# -- the file formats, in-process ----------------------------------------------------


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _wal(tmp_path, groups: list[list[bytes]], sync_after: set[int]) -> tuple[str, list[int]]:
    """A WAL file of records in groups; fsync after the groups listed. Returns the path
    and every record's offset."""
    w = WalWriter.create(str(tmp_path), start=0, prev=0, layout_fp=1, schema_fp=0)
    offsets = []
    epoch = 0
    for g, recs in enumerate(groups):
        for payload in recs:
            offsets.append(w.size + sum(len(p) for p in w.pending))
            w.add(epoch, payload)
            epoch += 1
        w.flush()
        if g in sync_after:
            w.sync()
    w.close()
    return w.path, offsets


def test_wal_records_round_trip(tmp_path):
    payloads = [msgspec.msgpack.encode([1, 1, b"k%d" % i, b"v" * i, 0]) for i in range(10)]
    path, offsets = _wal(tmp_path, [payloads[:3], payloads[3:]], {0, 1})
    scan = scan_wal(path)
    assert [p for _, _, p in scan.records] == payloads
    assert [o for o, _, _ in scan.records] == offsets and offsets[0] == HEADER_SIZE
    assert not scan.torn


def test_wal_torn_tail_vs_damage_before_a_synced_record(tmp_path):
    payloads = [b"\x95\x01\x01\xa1k\xa1v\x00" * (i + 1) for i in range(6)]
    path, offsets = _wal(tmp_path, [payloads[:2], payloads[2:4], payloads[4:]], {0})
    raw = _read(path)
    # Damage after the last sync (groups 2 and 3 were written, never fsynced): a
    # power loss can leave exactly that, in any page order. It is a torn tail.
    hole = bytearray(raw)
    hole[offsets[2] : offsets[3]] = bytes(offsets[3] - offsets[2])
    _write(path, hole)
    scan = scan_wal(path)
    assert len(scan.records) == 2 and scan.torn and scan.end == offsets[2]
    # Damage before the synced offset is corruption, reported with file and offset.
    path2, offsets2 = _wal(tmp_path, [payloads[:2], payloads[2:4], payloads[4:]], {0, 1, 2})
    bad = bytearray(_read(path2))
    bad[offsets2[1] + 30] ^= 1
    _write(path2, bad)
    with pytest.raises(shmstore.CorruptionError, match=f"{os.path.basename(path2)}.*offset {offsets2[1]}"):
        scan_wal(path2)
    # A cut in the middle of the last record is a torn tail.
    good = bytes(bad)
    good = good[: offsets2[1] + 30] + bytes([good[offsets2[1] + 30] ^ 1]) + good[offsets2[1] + 31 :]
    _write(path2, good[: offsets2[-1] + 10])
    scan = scan_wal(path2)
    assert scan.torn and scan.end == offsets2[-1] and len(scan.records) == len(payloads) - 1


def test_checkpoint_round_trip_and_checks(names, tmp_path):
    lay = L.Layout(capacity=50, key_size=8, value_size=16)
    n = names()
    server = CoordinatorServer(ServerConfig(name=n, capacity=50, key_size=8, value_size=16, max_clients=1))
    try:
        server.setup()
        e = server.engine
        for i in range(30):
            e.put(b"k%d" % i, msgspec.msgpack.encode(i))
        e.delete(b"k7")
        snap = take_snapshot(server.seg, e.epoch)
        path = write_checkpoint(str(tmp_path), snap, ckpt_id=5, wal_id=6)
        ck = load_checkpoint(path, lay, 0)
        assert (ck.id, ck.wal_id, ck.epoch, len(ck.positions)) == (5, 6, e.epoch, 29)
        raw = _read(path)
        for off in (3, 90, len(raw) // 2, len(raw) - 2):
            bad = bytearray(raw)
            bad[off] ^= 0x40
            _write(path, bad)
            with pytest.raises(shmstore.CorruptionError, match=os.path.basename(path)):
                load_checkpoint(path, lay, 0)
        _write(path, raw[:-1])
        with pytest.raises(shmstore.CorruptionError, match="cut short"):
            load_checkpoint(path, lay, 0)
        _write(path, raw)
        with pytest.raises(shmstore.CorruptionError, match="another store layout"):
            load_checkpoint(path, L.Layout(capacity=51, key_size=8, value_size=16), 0)
    finally:
        server.close()
