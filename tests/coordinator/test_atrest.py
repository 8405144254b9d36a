"""At-rest protection: zstd compression and AES-256-GCM encryption of checkpoints and WAL."""

from __future__ import annotations

import os

import pytest

import shmstore
from shmstore.coordinator._durable._atrest import FLAG_AESGCM, FLAG_ZSTD, load_key
from shmstore.coordinator._durable._checkpoint import peek_header
from shmstore.coordinator._durable._wal import HEADER_SIZE, WalHeader

pytest.importorskip("zstandard")
pytest.importorskip("cryptography")

MARKER = "plaintext-marker-" * 4


def write_some(s: shmstore.Store, n: int = 40, tag: str = "") -> None:
    for i in range(n):
        s.put(f"{tag}k{i}", {"m": MARKER, "i": i})
    s.delete(f"{tag}k1")
    s.incr(f"{tag}ctr", 5)


def state(s: shmstore.Store) -> dict:
    return {k: (s.version(k), v) for k, v in s.items()}


def file_flags(data) -> dict[str, int]:
    out = {}
    for p in data.iterdir():
        if p.name.startswith("ckpt-"):
            out[p.name] = peek_header(str(p)).flags
        elif p.name.startswith("wal-"):
            out[p.name] = WalHeader.unpack(str(p), p.read_bytes()[:HEADER_SIZE]).flags
    return out


@pytest.fixture
def keyfile(tmp_path):
    p = tmp_path / "key"
    p.write_text(os.urandom(32).hex())
    p.chmod(0o600)
    return p


@pytest.mark.parametrize("opts,flag", [
    ({"compression": "zstd"}, FLAG_ZSTD),
    ({"encryption": "aes-256-gcm"}, FLAG_AESGCM),
    ({"compression": "zstd", "encryption": "aes-256-gcm"}, FLAG_ZSTD | FLAG_AESGCM),
], ids=["zstd", "aesgcm", "both"])
def test_round_trip_through_checkpoint_and_wal(served, names, tmp_path, keyfile, opts, flag):
    data = tmp_path / "data"
    if "encryption" in opts:
        opts = dict(opts, key_file=keyfile)
    n, coord = served("ar", path=data, capacity=200, **opts)
    with shmstore.connect(n) as s:
        write_some(s)
        s.checkpoint()
        write_some(s, 10, "w")  # these are only in the WAL
        before = state(s)
        coord.kill()
        shmstore.destroy(n)
        flags = file_flags(data)
        assert flags and all(f == flag for f in flags.values()), flags
        if flag & FLAG_AESGCM:
            for p in data.iterdir():
                assert MARKER.encode() not in p.read_bytes(), p.name
        c2 = shmstore.serve(n, path=data, key_file=keyfile if "key_file" in opts else None)
        names.coordinators.append(c2)
        assert state(s) == before


def test_missing_and_wrong_key_are_refused_clearly(served, names, tmp_path, keyfile, monkeypatch):
    data = tmp_path / "data"
    n, coord = served("ar", path=data, capacity=50, encryption="aes-256-gcm", key_file=keyfile)
    with shmstore.connect(n) as s:
        write_some(s, 5)
    coord.stop()
    shmstore.destroy(n)
    monkeypatch.delenv("SHMSTORE_KEY", raising=False)
    monkeypatch.delenv("SHMSTORE_KEY_FILE", raising=False)
    with pytest.raises(shmstore.EncryptionKeyError, match="no key was given"):
        shmstore.serve(n, path=data)
    wrong = tmp_path / "wrong"
    wrong.write_text(os.urandom(32).hex())
    with pytest.raises(shmstore.EncryptionKeyError, match="does not open"):
        shmstore.serve(n, path=data, key_file=wrong)
    monkeypatch.setenv("SHMSTORE_KEY", os.urandom(32).hex())
    with pytest.raises(shmstore.EncryptionKeyError, match="does not open"):
        shmstore.serve(n, path=data)
    bad = tmp_path / "short"
    bad.write_text("abcd")
    with pytest.raises(shmstore.EncryptionKeyError, match="not 32 bytes"):
        shmstore.serve(n, path=data, key_file=bad)
    # The right key from the environment opens it.
    monkeypatch.setenv("SHMSTORE_KEY", keyfile.read_text())
    c2 = shmstore.serve(n, path=data)
    names.coordinators.append(c2)
    with shmstore.connect(n) as s:
        assert s.get("k0") == {"m": MARKER, "i": 0}


def test_encryption_cannot_be_switched_on_or_off_for_a_directory_with_data(served, names, tmp_path, keyfile):
    plain = tmp_path / "plain"
    n, coord = served("ar", path=plain, capacity=50)
    with shmstore.connect(n) as s:
        s.put("a", 1)
    coord.stop()
    with pytest.raises(shmstore.IncompatibleStoreError, match="not encrypted"):
        shmstore.serve(n, path=plain, encryption="aes-256-gcm", key_file=keyfile)
    shmstore.destroy(n)
    enc = tmp_path / "enc"
    n2, coord2 = served("ar", path=enc, capacity=50, encryption="aes-256-gcm", key_file=keyfile)
    coord2.stop()
    with pytest.raises(shmstore.IncompatibleStoreError, match="encrypted"):
        shmstore.serve(n2, path=enc, encryption="none", key_file=keyfile)


def test_compression_can_change_between_runs_each_file_says_how_it_is_stored(served, names, tmp_path):
    data = tmp_path / "data"
    n, coord = served("ar", path=data, capacity=200, compression="zstd")
    with shmstore.connect(n) as s:
        write_some(s, 20)
        coord.kill()
        shmstore.destroy(n)
        c2 = shmstore.serve(n, path=data, compression="none")  # reads zstd files, writes plain
        names.coordinators.append(c2)
        write_some(s, 20, "p")
        before = state(s)
        assert set(file_flags(data).values()) == {0, FLAG_ZSTD}  # old files zstd, new plain
        c2.kill()
        shmstore.destroy(n)
        c3 = shmstore.serve(n, path=data)  # the manifest's setting: none now
        names.coordinators.append(c3)
        assert state(s) == before


def test_load_key_formats(tmp_path, monkeypatch):
    monkeypatch.delenv("SHMSTORE_KEY", raising=False)
    monkeypatch.delenv("SHMSTORE_KEY_FILE", raising=False)
    assert load_key() is None
    raw = os.urandom(32)
    p = tmp_path / "raw"
    p.write_bytes(raw)
    assert load_key(p) == raw
    p.write_text(raw.hex() + "\n")
    assert load_key(p) == raw
    monkeypatch.setenv("SHMSTORE_KEY_FILE", str(p))
    assert load_key() == raw
    with pytest.raises(shmstore.EncryptionKeyError, match="cannot read"):
        load_key(tmp_path / "missing")


def test_at_rest_options_need_a_path(names):
    with pytest.raises(shmstore.InvalidLayoutError, match="needs path"):
        shmstore.serve(names("ar"), compression="zstd")
    with pytest.raises(shmstore.InvalidLayoutError, match="must be one of"):
        shmstore.serve(names("ar"), path="/nonexistent-never", encryption="rot13")


def test_tables_are_sealed_with_their_checkpoint_and_travel_in_backups(served, names, tmp_path, keyfile):
    """A numpy table's checkpoint image is encrypted like the checkpoint, a backup
    carries it, and a restored copy serves the same rows (only with the key)."""
    np = pytest.importorskip("numpy")
    data = tmp_path / "data"
    n, coord = served("art", path=data, capacity=50, encryption="aes-256-gcm", key_file=keyfile)
    marker = np.frombuffer(MARKER.encode()[:64], dtype="<u8")
    with shmstore.connect(n) as s:
        t = s.table("t", np.dtype("<u8"), 64)
        t.write(range(8), marker)
        s.checkpoint()
        expect = t.read_all()
        s.backup(str(tmp_path / "bk"))
    tables = [p for p in data.iterdir() if p.name.endswith(".tables")]
    assert tables, sorted(p.name for p in data.iterdir())
    for p in tables + [p for p in (tmp_path / "bk").iterdir() if p.name.endswith(".tables")]:
        assert MARKER.encode()[:16] not in p.read_bytes(), p
    coord.stop()
    shmstore.destroy(n)
    shmstore.restore(str(tmp_path / "bk"), str(tmp_path / "restored"), key_file=keyfile)
    coord = shmstore.serve(n, path=tmp_path / "restored", key_file=keyfile)
    names.coordinators.append(coord)
    with shmstore.connect(n) as s:
        assert (s.table("t").read_all() == expect).all()
