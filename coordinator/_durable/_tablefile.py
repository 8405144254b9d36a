"""A checkpoint's numpy tables on disk: ``ckpt-<epoch>-<id>.tables`` next to the checkpoint.

Design
------
:func:`table_images` copies every table between two ops (in the coordinator thread);
:func:`write_tables_file` writes them next to the checkpoint (msgpack, crc32 trailer,
tmp + fsync + rename) BEFORE the checkpoint itself, so a checkpoint on disk always has
its tables beside it. :func:`restore_tables` recreates the tables from it during a
rebuild (``_rebuild``); :func:`read_tables_file` also serves ``shmstore.check``. The
live tables themselves are ``coordinator/_table.py``'s.
"""

from __future__ import annotations

import os
import struct
import zlib

from typing import Annotated

import msgspec
import numpy as np

from shmstore._errors import CorruptionError, ShmStoreError
from shmstore._table import MAX_ROWS, T_CREATED, T_EPOCH, check_table_name, dtype_to_text, text_to_dtype

from .._engine import Engine
from .._table import TableSet, unlink_tables
from ._atrest import FLAG_AESGCM, Codec

TABLES_MAGIC = b"SHMSTBL1"
_U64 = Annotated[int, msgspec.Meta(ge=0)]
#: the images, typed: decoding bounds the depth and checks every field's type
_decode = msgspec.msgpack.Decoder(list[tuple[str, str, int, _U64, _U64, bytes, bytes]]).decode
_encode = msgspec.msgpack.Encoder().encode


def table_images(engine: Engine) -> list:
    """Copies of every table, between two ops (coordinator thread)."""
    ts = getattr(engine, "tables", None)
    if ts is None:
        return []
    return [(tname, dtype_to_text(tm.dtype), tm.nrows, tm.q[T_EPOCH], tm.q[T_CREATED],
             tm.seqs.copy(), tm.data.copy()) for tname, tm in sorted(ts.tables.items())]


def tables_path(ckpt_path: str) -> str:
    return ckpt_path[: -len(".ckpt")] + ".tables" if ckpt_path.endswith(".ckpt") else ckpt_path + ".tables"


def write_tables_file(path: str, images: list, codec: object = None) -> None:
    """Write the images durably to ``path`` (tmp, fsync, rename; dir fsync by caller).

    The file is ``magic | flags u32 | body | crc32(flags + body)``; with a ``codec``
    (``_atrest.Codec``: compression, encryption) the body is sealed like the
    checkpoint it belongs to, so a table is never on disk in the clear when the store's
    data directory is encrypted.
    """
    body = _encode([[t, text, n, ep, cr, s.tobytes(), d.tobytes()] for t, text, n, ep, cr, s, d in images])
    flags = codec.flags if codec is not None else 0
    if flags:
        body = codec.seal(body, TABLES_MAGIC)
    body = struct.pack("<I", flags) + body
    blob = TABLES_MAGIC + body + struct.pack("<I", zlib.crc32(body))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, blob) if len(blob) < (1 << 30) else _write_all(fd, blob)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_all(fd: int, blob: bytes) -> None:
    mv = memoryview(blob)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def read_tables_file(path: str, key: bytes | None = None, *, verify_only: bool = False) -> list | None:
    """The table images a ``.tables`` file holds, checked (None: there is no such file).

    Each image is ``[name, dtype text, rows, epoch, created, stamps, data]``, its sizes
    checked against the dtype. With ``verify_only`` (no key at hand) an encrypted file
    has only its stored bytes' checksum verified, and ``[]`` is returned.

    Raises:
        CorruptionError: the file is damaged (or its key does not open it).
    """
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        return None  # a checkpoint of a store that had no tables
    if len(blob) < 16 or blob[:8] != TABLES_MAGIC or zlib.crc32(blob[8:-4]) != struct.unpack("<I", blob[-4:])[0]:
        raise CorruptionError(f"tables file {path}: bad magic or checksum (offset 0)")
    (flags,) = struct.unpack_from("<I", blob, 8)
    body = blob[12:-4]
    if flags:
        if verify_only and flags & FLAG_AESGCM:
            return []
        body = Codec(flags, key).open(body, TABLES_MAGIC, f"tables file {path}")
    try:
        images = _decode(body)
        for tname, text, nrows, _epoch, _created, seqs, data in images:
            check_table_name(tname)
            dt = text_to_dtype(text)
            if not 0 < nrows <= MAX_ROWS or len(seqs) != 8 * nrows or len(data) != dt.itemsize * nrows:
                raise ValueError(f"table {tname!r}: sizes do not match its {nrows} rows")
    except (ShmStoreError, ValueError, TypeError, msgspec.DecodeError) as e:
        raise CorruptionError(f"tables file {path}: unreadable ({e})") from None
    return images


def restore_tables(engine: Engine, ckpt_path: str, key: bytes | None = None) -> None:
    """Recreate the tables a checkpoint holds (during a rebuild; none: no tables).

    Raises:
        CorruptionError: the tables file is damaged.
    """
    unlink_tables(engine.seg.name)
    engine.tables = ts = TableSet(engine.seg, engine)
    path = tables_path(ckpt_path)
    images = read_tables_file(path, key)
    for tname, text, nrows, epoch, created, seqs, data in images or ():
        ts.create(tname, text, nrows, created)
        tm = ts.tables[tname]
        tm.seqs[:] = np.frombuffer(seqs, dtype=np.uint64)
        tm.data[:] = np.frombuffer(data, dtype=tm.dtype)
        tm.q[T_EPOCH] = epoch
