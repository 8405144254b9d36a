"""A full and a read-only data directory, on a small tmpfs mounted by the test.

Needs permission to mount (root in a mount namespace); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

import shmstore
from tests.helpers.mounts import tmpfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def fill(mnt, leave: int) -> str:
    """A file taking all but about ``leave`` bytes of the file system."""
    p = mnt / "filler"
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(p, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return str(p)


def put_once_writable(s: shmstore.Store, key: str, value: object, timeout: float) -> float:
    """Retry ``s.put`` while the store refuses writes (``StorageError``), until it is
    taken; fail after ``timeout`` s. Returns that deadline (monotonic clock)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.put(key, value)
            return deadline
        except shmstore.StorageError:
            assert time.monotonic() < deadline, "writes did not resume"
            time.sleep(0.05)


def test_disk_full_refuses_writes_then_resumes_and_loses_nothing(names, tmp_path):
    with tmpfs(tmp_path / "mnt", "size=8m") as mnt:
        n = names("full")
        coord = shmstore.serve(n, path=mnt / "data", capacity=2000, key_size=16, value_size=4096,
                               sync="always")
        try:
            s = shmstore.connect(n, timeout=10)
            t = s.table("t", "<i8", 4)
            filler = fill(mnt, 64 * 1024)
            acked = {}
            failed = None
            for i in range(1000):
                v = "v" * 3000 + str(i)
                try:
                    s.put(f"k{i}", v)
                    acked[f"k{i}"] = v
                except shmstore.StorageError as e:
                    failed = (f"k{i}", v, str(e))
                    break
            assert failed is not None, "the disk never filled"
            assert "NOT acknowledged" in failed[2] and "ENOSPC" in failed[2], failed[2]
            # Applied in memory (documented): readers see it although it was not acknowledged.
            assert s.get(failed[0]) == failed[1]
            # Every further write is refused before it is applied, table writes too.
            with pytest.raises(shmstore.StorageError, match="refuses writes") as ei:
                s.put("refused", 1)
            assert isinstance(ei.value, OSError)
            assert s.get("refused") is None
            with pytest.raises(shmstore.StorageError, match="refuses writes"):
                t.write([0], [7])
            assert t.read([0]).tolist() == [0]
            with pytest.raises(shmstore.StorageError, match="refuses writes"):
                s.table("t2", "<i8", 4)  # creating a table writes too
            with pytest.raises(shmstore.StorageError):
                s.checkpoint()
            # Space comes back: writes resume by themselves.
            os.unlink(filler)
            put_once_writable(s, "after", 1, timeout=10)
            # Nothing acknowledged is lost, and the group that failed became durable too.
            coord.kill()
            shmstore.destroy(n)
            coord = shmstore.serve(n, path=mnt / "data")
            for k, v in acked.items():
                assert s.get(k) == v, k
            assert s.get(failed[0]) == failed[1]
            assert s.get("after") == 1 and s.get("refused") is None
            assert shmstore.check(path=mnt / "data").ok
            s.close()
        finally:
            coord.stop()


def test_read_only_data_directory_is_refused_at_start(names, tmp_path):
    with tmpfs(tmp_path / "mnt", "size=4m") as mnt:
        n = names("ro")
        coord = shmstore.serve(n, path=mnt / "data", capacity=50)
        with shmstore.connect(n) as s:
            s.put("a", 1)
        coord.stop()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for destroy in (False, True):  # adopting the segment, and rebuilding from disk
            if destroy:
                shmstore.destroy(n)
            with pytest.raises(shmstore.StorageError, match="read-only") as ei:
                shmstore.serve(n, path=mnt / "data")
            assert "data directory" in str(ei.value)
        # A new directory on the read-only file system: the same clear error.
        with pytest.raises(shmstore.StorageError, match="read-only"):
            shmstore.serve(names("ro"), path=mnt / "new")
        # Backups there are refused too, and leave nothing.
        n2 = names("ro")
        c2 = shmstore.serve(n2, capacity=10)
        try:
            with shmstore.connect(n2) as s:
                with pytest.raises(shmstore.StorageError):
                    s.backup(mnt / "bk")
        finally:
            c2.stop()
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert sorted(os.listdir(mnt)) == ["data"]


def test_expiry_reclaim_on_a_full_disk_waits_for_it_and_the_coordinator_lives(names, tmp_path, clock):
    """Records whose TTL runs out while the WAL cannot be written: the coordinator's
    background reclaim must neither die of the write error nor lose the reclaim; once
    the disk has room the records are gone, also after a rebuild from disk."""
    with tmpfs(tmp_path / "mnt", "size=8m") as mnt:
        n = names("fullttl")
        coord = shmstore.serve(n, path=mnt / "data", capacity=400, key_size=32, value_size=64,
                               sync="always")
        try:
            s = shmstore.connect(n, timeout=10)
            with s.batch() as b:  # the reclaim's log record (~9 KB of keys) needs new pages
                for i in range(300):
                    b.put(f"t{i:03d}-" + "x" * 26, i, ttl=5)
            s.put("keep", "kept")
            filler = fill(mnt, 0)
            clock(10)  # every t* record is now expired; the reclaim's WAL write fails
            time.sleep(1.0)  # several coordinator ticks
            assert coord.alive(), "the coordinator died of a failed reclaim write"
            assert s.get("t000-" + "x" * 26) is None and s.get("keep") == "kept"  # readers judge expiry
            os.unlink(filler)
            # The journal writes the pending reclaim first, then takes writes again.
            deadline = put_once_writable(s, "after", 1, timeout=20)
            while len(s) != 2:
                assert time.monotonic() < deadline, f"expired records not reclaimed: {len(s)} left"
                time.sleep(0.05)
            assert coord.alive()
            coord.kill()
            shmstore.destroy(n)
            coord = shmstore.serve(n, path=mnt / "data")
            assert len(s) == 2 and s.get("keep") == "kept" and s.get("after") == 1
            assert shmstore.check(path=mnt / "data").ok
            s.close()
        finally:
            coord.stop()
