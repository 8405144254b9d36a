"""The coordinator's side of numpy tables, and of snapshots: the ops 24-31.

:func:`apply_extra` dispatches them (called by ``Applier.apply``).

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

Checkpoints copy every table and write them next to the checkpoint file: see
``_durable/_tablefile.py``.

Snapshots (``Store.snapshot()``): :func:`write_snapshot` is called between two ops
(the coordinator applies one op at a time), so every slot the index points to is
stable: copying the index and those slots is the store exactly at the current epoch.
The copy goes into a handover segment (``shmstore._handover``) laid out as
``shmstore._snapshot.from_handover`` reads it::

    64   u64 x 5   epoch, records n, buckets, slot size, wall-clock ns of the copy
    128  u64 x nbuckets   the index, each bucket pointing to ``row + 1``
    ...  n x slot size    the slots, in row order
"""

from __future__ import annotations


import msgspec
import numpy as np
import posix_ipc

from shmstore import _layout as L
from shmstore._compiled import release
from shmstore._errors import (
    CorruptionError,
    IncompatibleStoreError,
    InvalidRowsError,
    ProtocolError,
    RowOutOfRangeError,
    StoreFullError,
)
from shmstore._handover import HANDOVER_HEADER, Handovers
from shmstore._segment import Segment
from shmstore._shm import unlink_quietly
from shmstore._snapshot import HIGH, SNAP_HEADER, U32
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
    map_table,
    table_prefix,
    table_segment_name,
    text_to_dtype,
)
from shmstore._ttl import now_ns

from ._engine import Engine
from ._ops import Snapshot, TableCreate, TableRead, TableWrite, decode_logged

_encode = msgspec.msgpack.Encoder().encode


def _list_table_names(store: str) -> list[str]:
    prefix = table_prefix(store)
    return [e[len(prefix):] for e in L.store_entries(store) if e.startswith(prefix)]


def unlink_tables(store: str) -> int:
    """Remove every table segment of a store (destroy, or before a rebuild)."""
    n = 0
    for tname in _list_table_names(store):
        n += unlink_quietly(posix_ipc.SharedMemory, table_segment_name(store, tname))
    return n


class TableSet:
    """The writable table segments of one store (coordinator process only)."""

    def __init__(self, seg: Segment, engine: Engine) -> None:
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
            try:
                op = decode_logged(blob)
            except msgspec.DecodeError:
                op = None
            if type(op) is not TableWrite or op.table not in self.tables:
                raise CorruptionError(
                    f"store {self.store!r}: a table write was cut short by the previous "
                    f"coordinator's death and its redo copy is not a table write. Destroy the "
                    f"store and recover it from its data directory.")
            return op
        return None

    def finish_repair(self, op: TableWrite | None) -> int:
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
        tm = self.tables[op.table]
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

    def check_write(self, op: TableWrite) -> tuple[TableMap, np.ndarray, np.ndarray]:
        """Validate a write request completely before anything is stored."""
        tname, rows_b, vals_b = op.table, op.rows, op.values
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

    def write(self, op: TableWrite, payload: bytes | None) -> int:
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
        release()  # stamps odd before the rows (the readers' fences pair with these)
        tm.data[rows] = vals
        release()  # the rows before the stamps even
        seqs[rows] = 2 * epoch + 2
        q[T_EPOCH] = epoch
        release()
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


def tables_of(engine: Engine) -> TableSet:
    """The engine's TableSet, made (adopting what /dev/shm holds) on first use."""
    ts = getattr(engine, "tables", None)
    if ts is None:
        ts = engine.tables = TableSet(engine.seg, engine)
        ts.adopt()
    return ts


def apply_extra(engine: Engine, handovers: Handovers, op: object, payload: bytes) -> tuple[object, int | None]:
    """``Applier.apply``'s branch for ops 24-31. Returns ``(result, epoch before)``; the
    epoch is None for ops that change nothing (they are not logged).

    Args:
        engine: the store's writer (its segment, its tables).
        handovers: where a snapshot or a whole-table read is handed to the client.
        op: the decoded request (``_ops``: Snapshot, TableRead, TableCreate, TableWrite).
        payload: its bytes (a table write keeps them in the redo area).
    """
    t = type(op)
    e = engine
    if t is Snapshot:
        e.seg.q[L.H_FALLBACK_READS] += 1
        return [write_snapshot(e.seg, e.epoch, handovers), e.epoch], None
    ts = tables_of(e)
    if t is TableRead:
        e.seg.q[L.H_FALLBACK_READS] += 1
        return [ts.read_all(op.table, handovers), e.epoch], None
    epoch0 = e.epoch
    if t is TableCreate:
        if ts.check_create(op.table, op.dtype, op.rows):
            return e.epoch, None
        ts.create(op.table, op.dtype, op.rows, e.next_epoch())
        e.publish()
        return e.epoch, epoch0
    if t is TableWrite:
        epoch = ts.write(op, payload)
        e.publish()
        return epoch, epoch0
    raise ProtocolError(f"unknown op {t.__name__}")


def write_snapshot(seg: Segment, epoch: int, handovers: Handovers) -> str:
    """Copy the store into a new handover segment; returns its name.

    The payload (``shmstore._snapshot.from_handover`` reads it): epoch, records n,
    buckets, row size 0 (rows of their own sizes), taken-at ns; the index with each
    bucket's slot field renumbered to its row + 1; n + 1 u64 row bounds from 0; then
    the rows back to back. A row is its record's slot bytes as in the segment (header,
    key padded to 8, value at ``32 + align8(klen)``), only the ``align8(slot_need)``
    bytes the record uses, whatever its class's slot size.
    """
    from ._durable._checkpoint import gather_records, record_lengths  # noqa: PLC0415

    idx = seg.index_view()
    pos = np.flatnonzero(idx)
    b = idx[pos]
    n = len(pos)
    nb = seg.nbuckets
    refs = (b & U32).astype(np.int64) - 1
    lengths = record_lengths(seg, refs)
    total = int(lengths.sum())
    size = SNAP_HEADER + 8 * nb + 8 * (n + 1) + total
    name, mm = handovers.create(size)
    try:
        o = HANDOVER_HEADER
        np.frombuffer(mm, dtype=np.uint64, count=5, offset=o)[:] = (epoch, n, nb, 0, now_ns())
        o += SNAP_HEADER
        out_idx = np.frombuffer(mm, dtype=np.uint64, count=nb, offset=o)
        out_idx[:] = idx
        out_idx[pos] = (b & HIGH) | np.arange(1, n + 1, dtype=np.uint64)
        o += 8 * nb
        bounds = np.frombuffer(mm, dtype=np.uint64, count=n + 1, offset=o)
        bounds[0] = 0
        np.cumsum(lengths, out=bounds[1:].view(np.int64))
        o += 8 * (n + 1)
        if total:
            np.frombuffer(mm, dtype=np.uint8, count=total, offset=o)[:] = gather_records(seg, refs, lengths)
        del out_idx, idx, bounds
    except BaseException:
        mm.close()
        raise
    Handovers.seal(mm, size)
    return name


def replay(engine: Engine, op: object) -> bool:
    """Apply a logged table op (``_ops``) during recovery; False if ``op`` is not one."""
    t = type(op)
    if t is TableCreate:
        ts = tables_of(engine)
        if ts.check_create(op.table, op.dtype, op.rows):
            raise CorruptionError(f"a logged create of table {op.table!r} found it existing")
        ts.create(op.table, op.dtype, op.rows, engine.next_epoch())
        engine.publish()
        return True
    if t is TableWrite:
        tables_of(engine).write(op, None)
        engine.publish()
        return True
    return False
