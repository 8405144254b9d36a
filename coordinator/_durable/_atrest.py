"""Optional at-rest protection of checkpoints and WAL files: zstd compression and
AES-256-GCM encryption. Both off by default; both need an extra
(``pip install 'shmstore[zstd]'``, ``'shmstore[crypto]'``).

Design
------
Each file says how it is stored: a flags word in its header (WAL offset 56,
checkpoint offset 72; 0 = plain) with ``FLAG_ZSTD`` and ``FLAG_AESGCM``. The manifest
records the directory's settings and, when encrypted, a *key check* (a GCM tag over an
empty message under the key), so a wrong or missing key is found when the directory
is opened, before any file is read, and is reported as :class:`EncryptionKeyError`.

A sealed blob is ``compress(data)`` (zstd) then, when encrypted,
``nonce (12 random bytes) || AES-256-GCM(key, nonce, data, aad)``. The ``aad`` binds a
blob to its place (file id and epoch for a WAL record, checkpoint id and frame number
for a checkpoint frame), so blobs cannot be swapped between places unnoticed.

- WAL: each record's payload is sealed on its own; the record's CRC covers the sealed
  bytes, so the torn-tail logic and ``shmstore.check`` work without the key.
- Checkpoint: everything after the 80-byte header (the plain body and its checksum
  table) is cut into frames of ``FRAME`` plain bytes, each stored as
  ``u32 sealed length | u32 crc32 of the sealed bytes | sealed bytes``.

The key (32 bytes) comes from ``key_file=`` (given to ``serve``/``restore``/``check``),
else the file named by ``$SHMSTORE_KEY_FILE``, else ``$SHMSTORE_KEY``. A key file holds
the 32 raw bytes, or 64 hex digits; ``$SHMSTORE_KEY`` holds 64 hex digits. Make one
with ``python -c "import os; print(os.urandom(32).hex())" > key; chmod 600 key``.
The key never enters the manifest, the command line of the coordinator, or a log.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import zlib

from shmstore._errors import CorruptionError, EncryptionKeyError, IncompatibleStoreError

FLAG_ZSTD = 1
FLAG_AESGCM = 2
COMPRESSIONS = ("none", "zstd")
ENCRYPTIONS = ("none", "aes-256-gcm")
KEY_ENV = "SHMSTORE_KEY"
KEY_FILE_ENV = "SHMSTORE_KEY_FILE"
FRAME = 16 << 20
NONCE = 12
_FRAME_HDR = struct.Struct("<II")
_KEY_CHECK_AAD = b"shmstore key check v1"


def _zstd():
    try:
        import zstandard  # noqa: PLC0415
    except ImportError:
        raise IncompatibleStoreError(
            "compression='zstd' needs the zstandard package: pip install 'shmstore[zstd]'"
        ) from None
    return zstandard


def _aesgcm():
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415
    except ImportError:
        raise EncryptionKeyError(
            "encryption='aes-256-gcm' needs the cryptography package: pip install 'shmstore[crypto]'"
        ) from None
    return AESGCM


def _parse_key(raw: bytes, where: str) -> bytes:
    text = raw.strip()
    if len(raw) == 32 and len(text) != 64:
        return raw
    try:
        key = binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise EncryptionKeyError(
            f"the key in {where} is not 32 bytes (raw) or 64 hex digits; make one with "
            f"python -c \"import os; print(os.urandom(32).hex())\""
        )
    return key


def load_key(key_file: str | os.PathLike | None = None) -> bytes | None:
    """The encryption key from ``key_file``, ``$SHMSTORE_KEY_FILE`` or ``$SHMSTORE_KEY``.

    Returns:
        32 bytes, or None if no key is given anywhere.

    Raises:
        EncryptionKeyError: a key file cannot be read, or a key is malformed.
    """
    path = key_file if key_file is not None else os.environ.get(KEY_FILE_ENV)
    if path:
        try:
            with open(path, "rb") as f:
                raw = f.read(4096)
        except OSError as e:
            raise EncryptionKeyError(f"cannot read the key file {os.fspath(path)!r}: {e.strerror}") from None
        return _parse_key(raw, f"key file {os.fspath(path)!r}")
    text = os.environ.get(KEY_ENV)
    if text:
        return _parse_key(text.encode(), f"${KEY_ENV}")
    return None


def key_check(key: bytes) -> str:
    """A value stored in the manifest that tells whether a key is the directory's."""
    nonce = os.urandom(NONCE)
    tag = _aesgcm()(key).encrypt(nonce, b"", _KEY_CHECK_AAD)
    return base64.b64encode(nonce + tag).decode()


def verify_key(key: bytes, check: str, where: str) -> None:
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415

    try:
        blob = base64.b64decode(check)
        _aesgcm()(key).decrypt(blob[:NONCE], blob[NONCE:], _KEY_CHECK_AAD)
    except (InvalidTag, ValueError, binascii.Error):
        raise EncryptionKeyError(
            f"the encryption key given does not open {where}; give the key it was written "
            f"with (key_file= or ${KEY_ENV})"
        ) from None


class Codec:
    """Seals and opens blobs for one flags value. Thread-safe (no shared state but the key)."""

    def __init__(self, flags: int, key: bytes | None = None) -> None:
        self.flags = flags
        self.key = key
        self._aead = None
        if flags & FLAG_ZSTD:
            self._zstd = _zstd()
        if flags & FLAG_AESGCM:
            if key is None:
                raise EncryptionKeyError(
                    f"this data is encrypted (AES-256-GCM) and no key was given; set ${KEY_ENV} "
                    f"or ${KEY_FILE_ENV}, or pass key_file="
                )
            self._aead = _aesgcm()(key)

    def seal(self, data: bytes, aad: bytes) -> bytes:
        if self.flags & FLAG_ZSTD:
            data = self._zstd.ZstdCompressor(level=3).compress(data)
        if self._aead is not None:
            nonce = os.urandom(NONCE)
            data = nonce + self._aead.encrypt(nonce, data, aad)
        return data

    def open(self, blob: bytes, aad: bytes, where: str) -> bytes:
        """The plain bytes of a sealed blob.

        Raises:
            CorruptionError: the blob fails its GCM tag or does not decompress.
        """
        data = bytes(blob)
        if self._aead is not None:
            from cryptography.exceptions import InvalidTag  # noqa: PLC0415

            try:
                data = self._aead.decrypt(data[:NONCE], data[NONCE:], aad)
            except (InvalidTag, ValueError):
                raise CorruptionError(f"{where}: fails its AES-GCM authentication (damaged or moved)") from None
        if self.flags & FLAG_ZSTD:
            try:
                data = self._zstd.ZstdDecompressor().decompress(data)
            except self._zstd.ZstdError as e:
                raise CorruptionError(f"{where}: does not decompress ({e})") from None
        return data

    # -- checkpoint bodies: a sequence of sealed frames --------------------------------

    def seal_frames(self, pieces, ckpt_id: int, write) -> None:
        """Seal the plain bytes yielded by ``pieces`` in frames of ``FRAME`` bytes; pass
        each stored frame to ``write``."""
        buf: list = []
        size = 0
        index = 0

        def emit() -> None:
            nonlocal buf, size, index
            sealed = self.seal(b"".join(buf), struct.pack("<QQ", ckpt_id, index))
            write(_FRAME_HDR.pack(len(sealed), zlib.crc32(sealed)) + sealed)
            buf, size, index = [], 0, index + 1

        for piece in pieces:
            mv = memoryview(piece)
            while len(mv):
                take = min(len(mv), FRAME - size)
                buf.append(bytes(mv[:take]))
                size += take
                mv = mv[take:]
                if size == FRAME:
                    emit()
        if size or index == 0:
            emit()

    def open_frames(self, data: memoryview, base: int, ckpt_id: int, path: str, *, verify_only: bool = False) -> bytes:
        """The plain body of a sealed checkpoint (``data`` starts at file offset ``base``).

        With ``verify_only`` only the frames' CRCs are checked (no key needed).
        """
        out = []
        off = 0
        index = 0
        while off < len(data):
            if off + _FRAME_HDR.size > len(data):
                raise CorruptionError(f"checkpoint {path}: frame header cut short at offset {base + off}")
            n, crc = _FRAME_HDR.unpack_from(data, off)
            blob = data[off + _FRAME_HDR.size : off + _FRAME_HDR.size + n]
            if len(blob) != n or zlib.crc32(blob) != crc:
                raise CorruptionError(f"checkpoint {path}: frame at offset {base + off} is damaged (checksum or length)")
            if not verify_only:
                out.append(self.open(blob, struct.pack("<QQ", ckpt_id, index), f"checkpoint {path}: frame at offset {base + off}"))
            off += _FRAME_HDR.size + n
            index += 1
        return b"".join(out)


def flags_for(compression: str, encryption: str) -> int:
    return (FLAG_ZSTD if compression == "zstd" else 0) | (FLAG_AESGCM if encryption == "aes-256-gcm" else 0)


def describe(flags: int) -> str:
    parts = [p for f, p in ((FLAG_ZSTD, "zstd"), (FLAG_AESGCM, "aes-256-gcm")) if flags & f]
    return "+".join(parts) or "plain"
