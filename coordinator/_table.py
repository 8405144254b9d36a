"""The coordinator's side of numpy tables, and of snapshots: the ops 24-31.

Design
------
:class:`TableSet` holds the writable mappings of a store's table segments (layout:
``shmstore._table``). It is attached to the :class:`Engine` as ``engine.tables`` so
that WAL replay (``_durable.replay_record``) applies logged table ops the way the
server applied them.

A write at epoch E (see ``shmstore._table`` for why readers are safe)::

    redo area <- the request     T_WRITING odd
    seqs[rows] = 2E+1            data[rows] = values       seqs[rows] = 2E+2
    T_EPOCH = E                  T_WRITING even            H_EPOCH = E   redo cleared

Crash repair (:meth:`TableSet.pending_redo` before ``_recovery.repair`` clears the redo
area, :meth:`TableSet.finish_repair` after it): a table left with ``T_WRITING`` odd had
a write cut short; it is applied again, whole, from the redo copy, at a new epoch
above every stamp left behind. A write is idempotent as a whole (absolute values).

Checkpoints: :func:`table_images` copies every table between two ops (in the
coordinator thread); :func:`write_tables_file` writes them next to the checkpoint,
``ckpt-<epoch>-<id>.tables`` (msgpack, crc32 trailer, tmp + fsync + rename), BEFORE
the checkpoint itself, so a checkpoint on disk always has its tables beside it.
:func:`restore_tables` recreates the tables from it during a rebuild.
"""

from __future__ import annotations

import os
import struct
import zlib

import msgspec
import numpy as np
import posix_ipc

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import (
    CorruptionError,
    IncompatibleStoreError,
    InvalidRowsError,
    ProtocolError,
    RowOutOfRangeError,
    ShmStoreError,
    StoreFullError,
)
from shmstore._segment import Segment, unlink_quietly
from shmstore._table import (
    DESCR_OFFSET,
    MAX_ROWS,
    T_CREATED,
    T_DATA_OFFSET,
    T_DESCR_LEN,
    T_EPOCH,
    T_FORMAT,
    T_ITEMSIZE,
    T_MAGIC,
    T_MAGIC_VALUE,
    T_NROWS,
    T_STORE_INSTANCE,
    T_WRITING,
    TABLE_FORMAT,
    TableLayout,
    TableMap,
    check_room,
    check_table_name,
    dtype_to_text,
    map_table,
    table_prefix,
    table_segment_name,
    text_to_dtype,
)

TABLES_MAGIC = b"SHMSTBL1"
_decode = msgspec.msgpack.Decoder().decode
_encode = msgspec.msgpack.Encoder().encode


def _list_table_names(store: str) -> list[str]:
    prefix = table_prefix(store)
    try:
        return sorted(e[len(prefix):] for e in os.listdir("/dev/shm") if e.startswith(prefix))
    except FileNotFoundError:
        return []


def unlink_tables(store: str) -> int:
    """Remove every table segment of a store (destroy, or before a rebuild)."""
    n = 0
    for tname in _list_table_names(store):
        n += unlink_quietly(posix_ipc.SharedMemory, table_segment_name(store, tname))
    return n


class TableSet:
    """The writable table segments of one store (coordinator process only)."""

    def __init__(self, seg: Segment, engine: object) -> None:
        self.seg = seg
        self.engine = engine
        self.store = seg.name
        self.tables: dict[str, TableMap] = {}

    # -- lifecycle -------------------------------------------------------------------

    def adopt(self) -> None:
        """Map the tables left in /dev/shm; those of another store instance are removed."""
        for tname in _list_table_names(self.store):
            seg_name = table_segment_name(self.store, tname)
            try:
                tm = map_table(seg_name, writable=True)
            except IncompatibleStoreError:
                tm = None
            if tm is None or tm.instance != self.seg.instance:
                if tm is not None:
                    tm.close()
                unlink_quietly(posix_ipc.SharedMemory, seg_name)
                continue
            self.tables[tname] = tm

    def pending_redo(self, redo: object) -> list | None:
        """The request of a table write cut short by a death, read before repair()."""
        if any(tm.q[T_WRITING] & 1 for tm in self.tables.values()):
            blob = redo.read() if redo is not None else None
            if blob is None:
                raise CorruptionError(
                    f"store {self.store!r}: a table write was cut short by the previous "
                    f"coordinator's death and its redo copy is missing or damaged. Destroy the "
                    f"store and recover it from its data directory.")
            return _decode(blob)
        return None

    def finish_repair(self, op: list | None) -> int:
        """Re-apply a cut-short write whole (after repair() set the engine's epoch)."""
        top = 0
        for tm in self.tables.values():
            if tm.nrows:
                top = max(top, int(tm.seqs.max()))
        eng = self.engine
        eng.epoch = max(eng.epoch, (top - 1) // 2 if top else 0)
        eng.publish()
        if op is None:
            return 0
        tm = self.tables[op[2]]
        tm.q[T_WRITING] += 1  # even again; write() makes it odd while re-applying
        self.write(op, None)
        eng.publish()
        return 1

    def close(self) -> None:
        for tm in self.tables.values():
            tm.close()
        self.tables.clear()

    # -- ops -------------------------------------------------------------------------

    def create(self, tname: str, text: str, nrows: int, epoch: int) -> None:
        """Make a new table segment at ``epoch`` (the create op's)."""
        import mmap

        seg_name = table_segment_name(self.store, tname)
        unlink_quietly(posix_ipc.SharedMemory, seg_name)  # a stale one of no instance
        dt = text_to_dtype(text)
        lay = TableLayout(nrows, dt.itemsize)
        try:
            shm = posix_ipc.SharedMemory(seg_name, posix_ipc.O_CREX, mode=0o600, size=lay.size)
            try:
                mm = mmap.mmap(shm.fd, lay.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                shm.close_fd()
        except (OSError, posix_ipc.Error) as e:
            unlink_quietly(posix_ipc.SharedMemory, seg_name)
            raise StoreFullError(f"cannot make table {tname!r} ({lay.size} bytes of shared memory): {e}; "
                                 f"use fewer rows or free shared memory") from None
        raw = text.encode()
        mm[DESCR_OFFSET : DESCR_OFFSET + len(raw)] = raw
        q = memoryview(mm).cast("Q")
        q[T_FORMAT] = TABLE_FORMAT
        q[T_NROWS] = nrows
        q[T_ITEMSIZE] = dt.itemsize
        q[T_STORE_INSTANCE] = self.seg.instance
        q[T_EPOCH] = epoch
        q[T_CREATED] = epoch
        q[T_DESCR_LEN] = len(raw)
        q[T_DATA_OFFSET] = lay.data_offset
        # Invariant: the magic is stored last; a table without it is not one yet.
        q[T_MAGIC] = T_MAGIC_VALUE
        q.release()
        self.tables[tname] = TableMap(seg_name, mm)

    def check_create(self, tname: object, text: object, nrows: object) -> bool:
        """Validate a create; True if the same table exists already (nothing to do)."""
        check_table_name(tname)
        if not isinstance(text, str) or not isinstance(nrows, int) or not 1 <= nrows <= MAX_ROWS:
            raise ProtocolError("malformed table create request")
        dt = text_to_dtype(text)
        tm = self.tables.get(tname)
        if tm is not None:
            if tm.dtype != dt or tm.nrows != nrows:
                raise IncompatibleStoreError(
                    f"table {tname!r} exists with dtype={tm.dtype}, rows={tm.nrows}; open it with "
                    f"those, or use another table name")
            return True
        check_room(nrows, dt.itemsize)
        return False

    def check_write(self, op: list) -> tuple[TableMap, np.ndarray, np.ndarray]:
        """Validate a write request completely before anything is stored."""
        _, _, tname, rows_b, vals_b = op
        tm = self.tables.get(tname)
        if tm is None:
            from shmstore._errors import TableNotFoundError

            raise TableNotFoundError(f"store {self.store!r} has no table {tname!r}")
        if not isinstance(rows_b, bytes) or not isinstance(vals_b, bytes) or len(rows_b) % 8:
            raise ProtocolError("malformed table write request")
        rows = np.frombuffer(rows_b, dtype="<i8")
        n = len(rows)
        if len(vals_b) != n * tm.dtype.itemsize:
            raise InvalidRowsError(f"{n} rows but {len(vals_b)} bytes of values; want {n} x {tm.dtype.itemsize}")
        if n:
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi >= tm.nrows:
                raise RowOutOfRangeError(f"row {lo if lo < 0 else hi} is outside table {tname!r}'s {tm.nrows} rows")
            seen = np.zeros(tm.nrows, dtype=bool)
            seen[rows] = True
            if int(np.count_nonzero(seen)) != n:
                raise InvalidRowsError("a row appears more than once in one write")
        return tm, rows.astype(np.intp), np.frombuffer(vals_b, dtype=tm.dtype)

    def write(self, op: list, payload: bytes | None) -> int:
        """Apply a validated table write at a new epoch; returns the epoch."""
        tm, rows, vals = self.check_write(op)
        eng = self.engine
        redo = getattr(eng, "redo", None)
        q = tm.q
        if redo is not None and payload is not None:
            redo.write(payload)
        q[T_WRITING] += 1
        epoch = eng.next_epoch()
        seqs = tm.seqs
        seqs[rows] = 2 * epoch + 1
        tm.data[rows] = vals
        seqs[rows] = 2 * epoch + 2
        q[T_EPOCH] = epoch
        q[T_WRITING] += 1
        if redo is not None and payload is not None:
            redo.clear()
        return epoch

    def read_all(self, tname: object, handovers: object) -> str:
        """The whole table into a handover segment (the read fallback)."""
        tm = self.tables.get(tname)
        if tm is None:
            from shmstore._errors import TableNotFoundError

            raise TableNotFoundError(f"store {self.store!r} has no table {tname!r}")
        size = tm.nrows * tm.dtype.itemsize
        name, mm = handovers.create(size)
        try:
            out = np.frombuffer(mm, dtype=tm.dtype, count=tm.nrows, offset=64)
            out[:] = tm.data
            del out
        except BaseException:
            mm.close()
            raise
        handovers.seal(mm, size)
        return name


def tables_of(engine: object) -> TableSet:
    """The engine's TableSet, made (adopting what /dev/shm holds) on first use."""
    ts = getattr(engine, "tables", None)
    if ts is None:
        ts = engine.tables = TableSet(engine.seg, engine)
        ts.adopt()
    return ts


def apply_extra(server: object, op: list, payload: bytes) -> tuple[object, int | None]:
    """The server's branch for ops 24-31. Returns ``(result, epoch before)``; the epoch
    is None for ops that change nothing (they are not logged)."""
    from ._snapshot import write_snapshot

    kind = op[0]
    e = server.engine
    if kind == C.OP_SNAPSHOT:
        server.seg.q[L.H_FALLBACK_READS] += 1
        return [write_snapshot(server.seg, e.epoch, server.handovers), e.epoch], None
    ts = tables_of(e)
    if kind == C.OP_TABLE_READ:
        server.seg.q[L.H_FALLBACK_READS] += 1
        return [ts.read_all(op[2], server.handovers), e.epoch], None
    epoch0 = e.epoch
    if kind == C.OP_TABLE_CREATE:
        _, _, tname, text, nrows = op
        if ts.check_create(tname, text, nrows):
            return e.epoch, None
        ts.create(tname, text, nrows, e.next_epoch())
        e.publish()
        return e.epoch, epoch0
    if kind == C.OP_TABLE_WRITE:
        epoch = ts.write(op, payload)
        e.publish()
        return epoch, epoch0
    raise ProtocolError(f"unknown op {kind!r}")


def replay(engine: object, op: list) -> bool:
    """Apply a logged table op during recovery; False if ``op`` is not one."""
    kind = op[0]
    if kind == C.OP_TABLE_CREATE:
        ts = tables_of(engine)
        _, _, tname, text, nrows = op
        if ts.check_create(tname, text, nrows):
            raise CorruptionError(f"a logged create of table {tname!r} found it existing")
        ts.create(tname, text, nrows, engine.next_epoch())
        engine.publish()
        return True
    if kind == C.OP_TABLE_WRITE:
        tables_of(engine).write(op, None)
        engine.publish()
        return True
    return False


# -- checkpoints ---------------------------------------------------------------------


def table_images(engine: object) -> list:
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
        from ._atrest import FLAG_AESGCM, Codec  # noqa: PLC0415

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


def restore_tables(engine: object, ckpt_path: str, key: bytes | None = None) -> None:
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
