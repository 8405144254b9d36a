"""Backups (store.backup), restores (shmstore.restore) and their CLI commands."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

import shmstore
from tests.helpers.processes import python, reap


def state(s: shmstore.Store) -> dict:
    return {k: (s.version(k), v) for k, v in s.items()}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmstore", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def serve_again(names, n: str, path, **kw) -> shmstore.Coordinator:
    c = shmstore.serve(n, path=path, **kw)
    names.coordinators.append(c)
    return c


def assert_private(d) -> None:
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for f in os.listdir(d):
        assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o600, f


@pytest.mark.parametrize("durable", [False, True], ids=["memory-only", "durable"])
def test_backup_is_a_data_directory_that_serve_recovers(served, names, tmp_path, durable):
    kw = {"path": tmp_path / "data"} if durable else {}
    n, coord = served("bk", capacity=300, key_size=16, value_size=64, **kw)
    dest = tmp_path / "backups" / "one"  # missing parents are made
    with shmstore.connect(n) as s:
        for i in range(100):
            s.put(f"k{i}", {"i": i})
        s.delete("k7")
        s.incr("ctr", 3)
        before = state(s)
        epoch = s.backup(dest)
        assert epoch == s.epoch
        s.put("after", 1)  # not in the backup
        assert sorted(os.listdir(dest))[0] == "MANIFEST" and len(os.listdir(dest)) == 2
        assert_private(dest)
        assert not [p for p in dest.parent.iterdir() if p.name != "one"]  # no temporary left
        coord.stop()
        shmstore.destroy(n)
        serve_again(names, n, dest)
        assert state(s) == before
        assert s.epoch > epoch  # versions shown before the backup are never reused
        assert s.put("k1", "new") > max(v for v, _ in before.values())


def test_backup_into_an_existing_empty_directory_and_refusals(served, tmp_path):
    n, coord = served("bk", capacity=50)
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious").write_text("keep me")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with shmstore.connect(n) as s:
        s.put("a", 1)
        assert s.backup(empty) == s.epoch
        assert "MANIFEST" in os.listdir(empty)
        assert_private(empty)
        with pytest.raises(shmstore.StorageError, match="not empty"):
            s.backup(full)
        assert os.listdir(full) == ["precious"]
        with pytest.raises(shmstore.StorageError, match="not a directory"):
            s.backup(afile)
        with pytest.raises(shmstore.StorageError, match="not empty"):
            s.backup(empty)  # now holds a backup
    assert sorted(os.listdir(tmp_path)) == ["afile", "empty", "full"]  # no temporaries


def test_backup_on_a_read_only_destination_leaves_nothing(served, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only bind mount here (mount needs root and a mount namespace)")
    try:
        n, coord = served("bk", capacity=50)
        with shmstore.connect(n) as s:
            s.put("a", 1)
            with pytest.raises(shmstore.StorageError, match="cannot write a backup"):
                s.backup(ro / "dest")
        assert os.listdir(ro) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_backup_is_consistent_while_another_process_writes(served, names, tmp_path):
    """A writer keeps a == b with atomic batches; every backup must agree."""
    n, coord = served("bk", capacity=100)
    writer = python(
        "import shmstore, sys\n"
        "s = shmstore.connect(sys.argv[1])\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    with s.batch() as b:\n"
        "        b.put('a', i); b.put('b', i)\n", n)
    try:
        with shmstore.connect(n) as s:
            for j in range(4):
                dest = tmp_path / f"bk{j}"
                s.backup(dest)
                r = tmp_path / f"r{j}"
                shmstore.restore(dest, r, name=f"{n}")
                rep = shmstore.check(path=r)
                assert rep.ok, str(rep)
        reap(writer)
        coord.stop()
        for j in range(4):
            shmstore.destroy(n)
            c = serve_again(names, n, tmp_path / f"r{j}")
            with shmstore.connect(n) as s:
                assert s.get("a") == s.get("b"), j
            c.stop()
    finally:
        reap(writer)


def test_restore_refuses_non_empty_and_damaged_sources(served, tmp_path):
    n, coord = served("bk", capacity=50)
    with shmstore.connect(n) as s:
        for i in range(10):
            s.put(f"k{i}", i)
        s.backup(tmp_path / "bk")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(shmstore.StorageError, match="not empty"):
        shmstore.restore(tmp_path / "bk", full)
    assert os.listdir(full) == ["x"]
    ck = next(p for p in (tmp_path / "bk").iterdir() if p.name.startswith("ckpt-"))
    raw = bytearray(ck.read_bytes())
    raw[200] ^= 0x10
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in (tmp_path / "bk").iterdir():
        (bad / p.name).write_bytes(bytes(raw) if p == ck else p.read_bytes())
    with pytest.raises(shmstore.CorruptionError, match="fails its check"):
        shmstore.restore(bad, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    with pytest.raises(shmstore.CorruptionError, match="not a data directory|no checkpoint"):
        shmstore.restore(full, tmp_path / "r2")


def test_restore_of_a_running_stores_directory_is_refused(served, tmp_path):
    n, coord = served("bk", path=tmp_path / "data", capacity=50)
    with pytest.raises(shmstore.CoordinatorRunningError, match="backup"):
        shmstore.restore(tmp_path / "data", tmp_path / "r")


def test_restored_copy_is_not_mixed_with_a_live_segment(served, names, tmp_path):
    n, coord = served("bk", capacity=50)
    with shmstore.connect(n) as s:
        s.put("a", 1)
        s.backup(tmp_path / "bk")
    coord.stop()
    shmstore.restore(tmp_path / "bk", tmp_path / "r")
    with pytest.raises(shmstore.IncompatibleStoreError, match="destroy"):
        shmstore.serve(n, path=tmp_path / "r")  # the old segment still exists


def test_cli_checkpoint_backup_restore_end_to_end(served, names, tmp_path):
    n, coord = served("bk", path=tmp_path / "data", capacity=50)
    with shmstore.connect(n) as s:
        for i in range(20):
            s.put(f"k{i}", i)
        r = cli("checkpoint", n)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == s.epoch
        r = cli("backup", n, str(tmp_path / "bk"))
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == s.epoch
        before = state(s)
    r = cli("backup", n, str(tmp_path / "bk"))
    assert r.returncode == 1 and r.stderr.startswith("shmstore: error: ") and "not empty" in r.stderr
    assert r.stderr.count("\n") == 1
    r = cli("restore", str(tmp_path / "bk"), str(tmp_path / "r"), "--name", n)
    assert r.returncode == 0, r.stderr
    r = cli("restore", str(tmp_path / "bk"), str(tmp_path / "r"))
    assert r.returncode == 1 and "not empty" in r.stderr
    r = cli("restore", str(tmp_path / "bk"))
    assert r.returncode == 2
    r = cli("checkpoint", names("bk-none"))
    assert r.returncode == 1 and "no store named" in r.stderr
    coord.stop()
    shmstore.destroy(n)
    serve_again(names, n, tmp_path / "r")
    with shmstore.connect(n) as s:
        assert state(s) == before


def test_checkpoint_of_a_memory_only_store_is_a_clear_cli_error(served):
    n, coord = served("bk", capacity=10)
    r = cli("checkpoint", n)
    assert r.returncode == 1 and "memory-only" in r.stderr


def test_encrypted_store_backup_needs_the_key_to_restore(served, names, tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    monkeypatch.delenv("SHMSTORE_KEY", raising=False)
    monkeypatch.delenv("SHMSTORE_KEY_FILE", raising=False)
    n, coord = served("bk", path=tmp_path / "data", capacity=50, encryption="aes-256-gcm", key_file=key)
    with shmstore.connect(n) as s:
        s.put("secret", "plaintext-marker")
        s.backup(tmp_path / "bk")
    for p in (tmp_path / "bk").iterdir():
        assert b"plaintext-marker" not in p.read_bytes()
    rep = shmstore.check(path=tmp_path / "bk")  # without the key: the stored bytes' checksums only
    assert rep.ok and any("no key" in note for note in rep.notes), str(rep)
    with pytest.raises(shmstore.EncryptionKeyError, match="needs its key"):
        shmstore.restore(tmp_path / "bk", tmp_path / "r")
    wrong = tmp_path / "wrong"
    wrong.write_text(os.urandom(32).hex())
    with pytest.raises(shmstore.EncryptionKeyError, match="does not open"):
        shmstore.restore(tmp_path / "bk", tmp_path / "r", key_file=wrong)
    assert not (tmp_path / "r").exists()
    shmstore.restore(tmp_path / "bk", tmp_path / "r", key_file=key)
    coord.stop()
    shmstore.destroy(n)
    with pytest.raises(shmstore.EncryptionKeyError):
        shmstore.serve(n, path=tmp_path / "r")
    serve_again(names, n, tmp_path / "r", key_file=key)
    with shmstore.connect(n) as s:
        assert s.get("secret") == "plaintext-marker"


def test_backup_of_a_memory_store_restores_its_classes_and_pages(served, names, tmp_path):
    """A store of size classes (memory=): the backup carries the whole layout and the
    page table, so the restored store places every record where it was."""
    n, coord = served("bkmem", memory=24 << 20, growth=1.5, value_size=3000, capacity=2000)
    dest = tmp_path / "bk"
    with shmstore.connect(n) as s:
        for i in range(300):
            s.put(f"k{i}", "v" * (i * 11 % 2800))
        for i in range(0, 300, 4):
            s.delete(f"k{i}")
        before = state(s)
        lay = s._seg.layout
        pt = s._seg.page_table().copy()
        s.backup(dest)
        coord.stop()
        shmstore.destroy(n)
        restored = tmp_path / "restored"
        shmstore.restore(dest, restored)
        serve_again(names, n, restored)
        assert state(s) == before
        assert s._seg.layout == lay and (s._seg.page_table() == pt).all()
    assert shmstore.check(name=n, path=restored).ok
