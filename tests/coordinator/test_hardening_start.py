"""Issue 13's start-up and durability probes (defects 1, 5, 8, 10), each written before its
fix; the client-facing ones (2, 3, 4, 6, 7, 9) are in tests/test_hardening.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import shmstore
from tests.helpers.mounts import tmpfs
from tests.helpers.processes import shm_objects
from tests.helpers.rawclient import (
    wal_chain_end,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- 1. a missing WAL link -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_missing_wal_after_checkpoint_is_corruption_not_a_shorter_history(names, tmp_path):
    """Issue 13 defect 1: the WAL file the newest checkpoint names as its continuation
    is deleted; serve() must raise CorruptionError naming it (today it rebuilds 300 of
    600 acknowledged records from the older checkpoint, silently), and check() must
    report it (today: clean)."""
    n = names("wallink")
    d = tmp_path / "data"
    coord = shmstore.serve(n, path=d, capacity=1000, sync="always")
    try:
        with shmstore.connect(n) as s:
            for i in range(300):
                s.put(f"a{i}", i)
            s.checkpoint()
            for i in range(300):
                s.put(f"b{i}", i)
    finally:
        coord.kill()
    shmstore.destroy(n)
    gone = wal_chain_end(str(d))
    os.unlink(gone)
    gone_id = os.path.basename(gone)[-20:-4]

    report = shmstore.check(path=d)
    assert not report.ok and any(gone_id in str(p) for p in report.problems), (
        f"check() does not report the missing WAL file {gone}:\n{report}")

    coord2 = None
    try:
        with pytest.raises(shmstore.CorruptionError) as e:
            coord2 = shmstore.serve(n, path=d)
            names.coordinators.append(coord2)
            with shmstore.connect(n) as s:
                found = sum(s.get(f"{p}{i}") == i for p in "ab" for i in range(300))
            pytest.fail(f"serve() recovered {found} of 600 acknowledged records without an error")
        assert gone_id in str(e.value), str(e.value)
    finally:
        if coord2 is not None:
            coord2.kill()


# -- 5. sizes against /dev/shm; a coordinator dying at start; destroy of any object --------


def _in_private_shm(code: str, mount_opts: str, timeout: float = 90) -> tuple[dict, str]:
    """Run ``code`` (Python; it prints one JSON line last) in a mount namespace of its
    own whose /dev/shm is a fresh tmpfs mounted with ``mount_opts``: nothing it does
    touches the host's /dev/shm. Returns (that JSON, stderr)."""
    script = f"mount -t tmpfs -o {mount_opts} tmpfs /dev/shm && exec {sys.executable} -c \"$0\""
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                            textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout,
                           cwd=REPO)
    except FileNotFoundError:
        pytest.skip("unshare(1) is not installed")
    if r.returncode and ("Operation not permitted" in r.stderr or "mount:" in r.stderr
                         and not r.stdout):
        pytest.skip(f"cannot make a private /dev/shm here: {r.stderr.strip()[-300:]}")
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines, f"the probe printed no result (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(lines[-1]), r.stderr


@pytest.mark.timeout(120)
def test_serve_refuses_a_size_larger_than_dev_shm_before_creating_anything():
    """Issue 13 defect 5: serve() never checks the size against /dev/shm's free space;
    an oversized store fills it (shared with the whole host) and the coordinator dies
    of SIGBUS; serve() says it "did not come up". Expected: a typed error in the
    caller naming the numbers, and nothing created (checked by name: the segment would
    be sparse, so free space alone proves nothing). Runs on a private 64 MiB /dev/shm."""
    res, err = _in_private_shm("""
        import json, os, shmstore
        free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
        out = {"free": free}
        try:
            c = shmstore.serve("t-big", capacity=200_000, value_size=1024, timeout=60)
            out["error"] = None
            c.kill()
        except Exception as e:
            out["error"] = [type(e).__name__, isinstance(e, shmstore.ShmStoreError), str(e)]
        out["left"] = sorted(os.listdir("/dev/shm"))
        print(json.dumps(out))
    """, "size=64m")
    assert res["error"] is not None, f"a 200 MB store was served on a {res['free']} B /dev/shm"
    name, typed, msg = res["error"]
    assert typed and "did not come up" not in msg, f"{name}: {msg}"
    assert res["left"] == [], f"serve() created {res['left']} before refusing"


@pytest.mark.timeout(120)
def test_coordinator_dying_at_start_is_reported_with_its_last_words():
    """Issue 13 defect 5: a coordinator that dies at start (here /dev/shm is read-only,
    in a private namespace) makes serve() say only "did not come up within N s (exit
    code 1); see its stderr above". Expected: a typed error saying why: the exit
    status and the coordinator's last log line (or that line as a typed error)."""
    res, err = _in_private_shm("""
        import json, shmstore
        try:
            shmstore.serve("t-rofs", capacity=100, timeout=30)
            out = {"error": None}
        except Exception as e:
            out = {"error": [type(e).__name__, isinstance(e, shmstore.ShmStoreError), str(e)]}
        print(json.dumps(out))
    """, "ro,size=1m")
    assert res["error"] is not None, "a coordinator started on a read-only /dev/shm"
    name, typed, msg = res["error"]
    last = [x for x in err.splitlines() if x.strip()][-1].strip()
    assert typed and (last in msg or msg in last), (
        f"serve() raised {name}: {msg!r}\nthe coordinator's last line was {last!r}")


@pytest.mark.timeout(120)
def test_destroy_and_cli_remove_an_oversized_store_object():
    """Issue 13 defect 5: a 128 PiB (sparse) store segment cannot be mapped, and
    destroy(), `shmstore destroy` and `shmstore cleanup` fail on it with a raw OSError.
    Expected: each removes it. Runs on a private /dev/shm."""
    res, err = _in_private_shm("""
        import json, os, subprocess, sys
        import posix_ipc, shmstore
        from shmstore import _layout as L
        out = {}
        for how in ("api", "cli-destroy", "cli-cleanup"):
            n = "t-huge" + how.replace("-", "")
            posix_ipc.SharedMemory(L.data_name(n), posix_ipc.O_CREX, mode=0o600, size=1 << 57).close_fd()
            if how == "api":
                try:
                    shmstore.destroy(n)
                    got = "ok"
                except Exception as e:
                    got = f"{type(e).__name__}: {e}"
            else:
                args = ["destroy", n] if how == "cli-destroy" else ["cleanup"]
                r = subprocess.run([sys.executable, "-m", "shmstore", *args], capture_output=True,
                                   text=True, timeout=30)
                got = "ok" if "Traceback" not in r.stderr else r.stderr.strip().splitlines()[-1]
            out[how] = [got, sorted(e for e in os.listdir("/dev/shm") if n in e)]
        print(json.dumps(out))
    """, "size=16m")
    bad = {how: v for how, v in res.items() if v != ["ok", []]}
    assert not bad, f"not removed cleanly (outcome, what is left): {bad}"


# -- 8. the data directory -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_serve_leaves_the_users_tmp_files_alone(names, tmp_path):
    """Issue 13 defect 8: serve(path=D) deletes every ``*.tmp`` in D (the user's too)
    before reading any manifest. Only the store's own files may be touched."""
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    (d / "notes.tmp").write_text("mine")
    n = names("tmpf")
    coord = shmstore.serve(n, path=d, capacity=100)
    names.coordinators.append(coord)
    assert (d / "notes.tmp").exists(), f"serve() deleted the user's notes.tmp: {sorted(os.listdir(d))}"


@pytest.mark.timeout(60)
def test_serve_refuses_or_fixes_a_world_writable_data_directory(names, tmp_path):
    """Issue 13 defect 8: a 0777 data directory stays 0777 (DESIGN §4: directory 0700).
    Expected: the start refused with a typed error, or the mode made 0700."""
    d = tmp_path / "data"
    d.mkdir()
    os.chmod(d, 0o777)
    n = names("mode")
    try:
        coord = shmstore.serve(n, path=d, capacity=100)
    except shmstore.ShmStoreError:
        return  # refused: fine
    names.coordinators.append(coord)
    mode = stat.S_IMODE(os.stat(d).st_mode)
    assert mode == 0o700, f"the data directory was served with mode {mode:o}"


@pytest.mark.timeout(60)
def test_serve_refuses_an_empty_path(names, tmp_path, monkeypatch):
    """Issue 13 defect 8: ``path=""`` makes the working directory the data directory.
    Expected: a typed error (ValueError), and nothing written in the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    n = names("empty")
    coord = None
    try:
        with pytest.raises(shmstore.ShmStoreError):
            coord = shmstore.serve(n, path="", capacity=100)
    finally:
        if coord is not None:
            coord.kill()
    assert os.listdir(cwd) == [], f"serve(path='') wrote {os.listdir(cwd)} into the working directory"


# -- 10. a full disk ----------------------------------------------------------------------------


def _fill_space(mnt) -> None:
    st = os.statvfs(mnt)
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize))


def _fill_inodes(mnt) -> int:
    """Create empty files until no inode is left; returns how many."""
    os.makedirs(mnt / "inodes", exist_ok=True)
    i = 0
    while True:
        try:
            open(mnt / "inodes" / str(i), "wb").close()
        except OSError:
            return i
        i += 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.timeout(90)
def test_failed_start_on_a_full_disk_leaves_nothing_behind(names, tmp_path):
    """Issue 13 defect 10: a start that fails on a full disk leaves the half-made
    segment behind, so the next connect() waits 5 s and says "still being created".
    Expected: a typed error from serve(), nothing of the store in /dev/shm, and the
    next connect() failing at once with StoreNotFoundError."""
    with tmpfs(tmp_path / "mnt", "size=1m") as mnt:
        _fill_space(mnt)
        n = names("fulls")
        with pytest.raises(shmstore.ShmStoreError):
            names.coordinators.append(shmstore.serve(n, path=mnt / "data", capacity=100))
        left = shm_objects(n)
        with pytest.raises(shmstore.ShmStoreError) as e:
            shmstore.connect(n, timeout=2).close()
        assert f"shmstore.{n}" not in left, f"the failed start left its data segment: {left}"
        assert isinstance(e.value, shmstore.StoreNotFoundError), f"{type(e.value).__name__}: {e.value}"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.timeout(120)
def test_failing_checkpoint_backs_off(names, tmp_path, capfd):
    """Issue 13 defect 10: a checkpoint that keeps failing is retried at every 0.1 s
    tick, logging (and copying the whole segment) each time. Here the data directory
    has no inode left: the WAL still grows, but no new file (next WAL, checkpoint) can
    be made. Expected: retries back off, so in a 4 s window far fewer than the ~40
    attempts of a 0.1 s tick (at most 10: a backoff doubling from 0.1 s makes ~5).
    A slow machine only makes fewer attempts, never more."""
    with tmpfs(tmp_path / "mnt", "size=32m,nr_inodes=64") as mnt:
        n = names("ckfail")
        coord = shmstore.serve(n, path=mnt / "data", capacity=1000, sync="always", checkpoint_ops=20)
        names.coordinators.append(coord)
        try:
            with shmstore.connect(n) as s:
                s.put("warm", 0)
                filled = _fill_inodes(mnt)
                assert filled > 0
                capfd.readouterr()
                for i in range(40):  # due: checkpoint_ops=20
                    s.put(f"k{i}", i)
                time.sleep(4)  # the observation window; the assertion is on a count
                text = capfd.readouterr().err
                attempts = text.count("checkpoint")
                assert attempts, f"no failing checkpoint was logged (the probe did not reproduce):\n{text}"
                assert attempts <= 10, f"{attempts} checkpoint attempts logged in 4 s:\n{text[:2000]}"
                assert s.get("k39") == 39
        finally:
            import shutil

            shutil.rmtree(mnt / "inodes", ignore_errors=True)
            coord.stop(timeout=10)
