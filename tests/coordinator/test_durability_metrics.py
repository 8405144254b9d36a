"""The journal's counters in the header (H_FSYNCS .. H_FSYNC_HIST) against known workloads."""

from __future__ import annotations

import shmstore
from shmstore import _layout as L
from shmstore._shm import open_segment
from shmstore.coordinator._metrics import hist_bucket
from shmstore.coordinator._durable._wal import HEADER_SIZE


def words(name: str) -> dict:
    seg = open_segment(name)
    try:
        q = seg.q
        d = {w: q[getattr(L, w)] for w in ("H_FSYNCS", "H_FSYNC_NS_TOTAL", "H_FSYNC_NS_MIN", "H_FSYNC_NS_MAX",
                                            "H_WAL_BYTES", "H_CHECKPOINTS", "H_CHECKPOINT_NS_LAST", "H_GROUPS")}
        d["hist"] = [q[L.H_FSYNC_HIST + b] for b in range(L.FSYNC_HIST_BUCKETS)]
        return d
    finally:
        seg.close()


def test_histogram_buckets_are_powers_of_two_microseconds():
    assert hist_bucket(0) == 0 and hist_bucket(999) == 0 and hist_bucket(1999) == 0
    assert hist_bucket(2000) == 1 and hist_bucket(3999) == 1 and hist_bucket(4000) == 2
    assert hist_bucket(10**18) == L.FSYNC_HIST_BUCKETS - 1


def test_sync_always_counts_one_fsync_per_group_and_every_wal_byte(served, tmp_path):
    n, coord = served("met", path=tmp_path / "d", capacity=100, sync="always")
    before = words(n)
    with shmstore.connect(n) as s:
        writes = 40
        for i in range(writes):  # one waiting write per group: N groups
            s.put(f"k{i}", "v" * (i % 13))
        after = words(n)
        groups = after["H_GROUPS"] - before["H_GROUPS"]
        assert groups == writes
        assert after["H_FSYNCS"] - before["H_FSYNCS"] >= groups
        assert sum(after["hist"]) == after["H_FSYNCS"]
        avg = after["H_FSYNC_NS_TOTAL"] / after["H_FSYNCS"]
        assert 0 < after["H_FSYNC_NS_MIN"] <= avg <= after["H_FSYNC_NS_MAX"]
        # One coordinator made every WAL file here and deleted none yet: the counter is
        # their sizes (headers and framed records).
        wal = [p for p in (tmp_path / "d").iterdir() if p.name.startswith("wal-")]
        assert after["H_WAL_BYTES"] == sum(p.stat().st_size for p in wal) > HEADER_SIZE * len(wal)
        ck0 = after["H_CHECKPOINTS"]
        assert s.checkpoint() > 0
        done = words(n)
        assert done["H_CHECKPOINTS"] == ck0 + 1
        assert done["H_CHECKPOINT_NS_LAST"] > 0
        # the checkpoint's data fsync, its directory fsync and the new WAL file's two
        assert done["H_FSYNCS"] >= after["H_FSYNCS"] + 2
        assert sum(done["hist"]) == done["H_FSYNCS"]


def test_sync_never_issues_no_wal_fsyncs(served, tmp_path):
    n, coord = served("met", path=tmp_path / "d", capacity=100, sync="never")
    before = words(n)
    with shmstore.connect(n) as s:
        for i in range(20):
            s.put(f"k{i}", i)
    after = words(n)
    assert after["H_FSYNCS"] == before["H_FSYNCS"]
    assert after["H_WAL_BYTES"] == before["H_WAL_BYTES"] == 0
