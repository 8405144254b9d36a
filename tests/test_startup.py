"""Start-up hardening beyond the issue-13 probes in test_hardening.py: the other holes a
WAL chain can have, the store's own temporaries, the data directory's mode.

Real coordinators and real files; each test names the defect of issue 13 it guards.
"""

from __future__ import annotations

import os
import stat

import pytest

import shmstore
from shmstore.coordinator._durable._checkpoint import peek_header  # noqa: I001


def _ckpts(d) -> list[str]:
    """Checkpoint paths, oldest first (names sort by epoch)."""
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.startswith("ckpt-") and n.endswith(".ckpt")]


def _damage(path: str) -> None:
    """Flip a byte in a checkpoint's body (its header stays readable)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def _three_checkpoints(names, d) -> tuple[str, dict]:
    """A stopped-by-SIGKILL durable store with three checkpoints and WAL after each."""
    n = names("chain")
    coord = shmstore.serve(n, path=d, capacity=200, sync="always", checkpoint_keep=3)
    try:
        with shmstore.connect(n) as s:
            for r in range(3):
                for i in range(20):
                    s.put(f"r{r}-{i}", i)
                s.checkpoint()
            for i in range(20):
                s.put(f"tail-{i}", i)
            want = {k.decode(): v for k, v in s.items()}
    finally:
        coord.kill()
    shmstore.destroy(n)
    assert len(_ckpts(d)) == 3
    return n, want


def _wal_of(ckpt: str) -> str:
    h = peek_header(ckpt)
    d = os.path.dirname(ckpt)
    (name,) = [x for x in os.listdir(d) if x.startswith("wal-") and x.endswith(f"-{h.wal_id:016x}.wal")]
    return os.path.join(d, name)


def _serve_refused(names, n, d) -> shmstore.CorruptionError:
    coord = None
    try:
        with pytest.raises(shmstore.CorruptionError) as e:
            coord = shmstore.serve(n, path=d)
        return e.value
    finally:
        if coord is not None:
            coord.kill()


@pytest.mark.timeout(120)
def test_damaged_newest_checkpoint_whose_wal_is_missing_is_not_a_fallback(names, tmp_path):
    """Issue 13 defect 1: the newest checkpoint is damaged (its header still says which
    WAL file follows it) and that file is gone. The older checkpoint's chain ends
    exactly at the newest's epoch, so a fallback looked complete and silently lost the
    missing file's writes. Expected: CorruptionError naming the missing file."""
    d = tmp_path / "data"
    n, _ = _three_checkpoints(names, d)
    newest = _ckpts(d)[-1]
    gone = _wal_of(newest)
    _damage(newest)
    os.unlink(gone)
    e = _serve_refused(names, n, d)
    assert os.path.basename(gone) in str(e), str(e)
    report = shmstore.check(path=d)
    assert not report.ok and any(os.path.basename(gone)[-20:-4] in str(p) for p in report.problems), str(report)


@pytest.mark.timeout(120)
def test_missing_wal_in_the_middle_is_named(names, tmp_path):
    """Issue 13 defect 1: the newest checkpoint is damaged, so recovery needs the older
    ones' chains, and a WAL file in the middle of them is missing. Expected: the error
    names that missing file (not only a later file as "not in the chain")."""
    d = tmp_path / "data"
    n, _ = _three_checkpoints(names, d)
    ck = _ckpts(d)
    gone = _wal_of(ck[1])
    _damage(ck[2])
    os.unlink(gone)
    e = _serve_refused(names, n, d)
    assert os.path.basename(gone) in str(e), str(e)


@pytest.mark.timeout(120)
def test_damaged_newest_checkpoint_falls_back_when_the_wal_covering_the_gap_is_there(names, tmp_path):
    """The one fallback allowed: a damaged newest checkpoint, every WAL file present."""
    d = tmp_path / "data"
    n, want = _three_checkpoints(names, d)
    _damage(_ckpts(d)[-1])
    coord = shmstore.serve(n, path=d)
    names.coordinators.append(coord)
    with shmstore.connect(n) as s:
        assert {k.decode(): v for k, v in s.items()} == want


@pytest.mark.timeout(120)
def test_missing_newest_checkpoint_with_its_wal_chained_loses_nothing(names, tmp_path):
    """A newest checkpoint deleted while the WAL after it exists and is chained to the
    older checkpoint's WAL: the older checkpoint + the whole chain is the full history,
    so it is recovered (nothing acknowledged is lost)."""
    d = tmp_path / "data"
    n, want = _three_checkpoints(names, d)
    os.unlink(_ckpts(d)[-1])
    coord = shmstore.serve(n, path=d)
    names.coordinators.append(coord)
    with shmstore.connect(n) as s:
        assert {k.decode(): v for k, v in s.items()} == want


# -- 8. the data directory ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_only_the_stores_own_temporaries_are_removed(names, tmp_path):
    """Issue 13 defect 8: what an interrupted write of the store left goes; the user's
    files with the same suffix stay."""
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    mine = ["notes.tmp", "ckpt-backup.tmp", "wal-old.tmp", "MANIFEST.bak.tmp"]
    ours = ["MANIFEST.tmp", f"wal-{0:020d}-{1:016x}.wal.tmp", f"ckpt-{0:020d}-{1:016x}.ckpt.tmp"]
    for f in mine + ours:
        (d / f).write_text("x")
    n = names("owntmp")
    coord = shmstore.serve(n, path=d, capacity=100)
    names.coordinators.append(coord)
    left = set(os.listdir(d))
    assert set(mine) <= left, f"serve() deleted the user's files: {sorted(set(mine) - left)}"
    assert not set(ours) & left, f"serve() left its own temporaries: {sorted(set(ours) & left)}"


@pytest.mark.timeout(60)
def test_an_open_directory_holding_other_files_is_refused_untouched(names, tmp_path):
    """Issue 13 defect 8: a 0755 directory with the user's files in it is refused with a
    typed error before the store writes anything into it (no LOCK, no MANIFEST)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "readme.txt").write_text("mine")
    os.chmod(d, 0o755)
    n = names("opendir")
    with pytest.raises(shmstore.StorageError, match="755"):
        names.coordinators.append(shmstore.serve(n, path=d, capacity=100))
    assert os.listdir(d) == ["readme.txt"]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755


@pytest.mark.timeout(60)
def test_an_empty_open_directory_is_made_0700(names, tmp_path):
    """Issue 13 defect 8: an empty directory made under a 022 umask is ours to fix."""
    d = tmp_path / "data"
    d.mkdir()
    os.chmod(d, 0o755)
    n = names("emptydir")
    coord = shmstore.serve(n, path=d, capacity=100)
    names.coordinators.append(coord)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
