"""numpy tables: records of one structured dtype addressed by row number.

Design
------
A table lives in a segment of its own, ``/shmstore.STORE@t.TABLE`` (mode 0600, mapped
read-only by clients, writable only by the coordinator), so the record segment's
format does not change::

    +----------------------+  0
    | header (4 KiB)       |  u64 words T_* below; the dtype descr (text) at byte 512
    +----------------------+  PAGE
    | seqs: nrows x u64    |  row i's seqlock stamp
    +----------------------+  data offset (page aligned)
    | data: nrows x dtype  |  row i's record, raw dtype bytes (no msgpack)
    +----------------------+

Rows are written **in place** under their seqlock, by the coordinator only, one write
op (any number of rows) at a time at epoch E: every row's seq goes to 2E+1, then every
row's bytes are stored, then every seq goes to 2E+2, then ``T_EPOCH = E`` (numpy
stores of aligned u64 words; x86-64 keeps their order). Before the first store the
coordinator copies the op into its redo area and makes ``T_WRITING`` odd, so a write
cut short by a SIGKILL is re-applied whole by the next coordinator before it serves
(rows half-written are odd meanwhile; readers wait on them, and report the dead
coordinator after the stall timeout, as for any slot).

A read of rows R, all vectorized. Fast path, the table-wide seqlock: ``T_WRITING`` is a
counter made odd before a write's first store and even after its last; a read that
sees it even and unchanged across its one gather of R's records (``np.take`` over the
rows viewed as a plain integer matrix) got every row whole and all of them as of one
epoch. Otherwise (a write ran meanwhile), per row: note ``e = T_EPOCH``; gather R's seqs, R's records,
R's seqs again; accept a row whose stamps are equal, even and at most ``2e+2`` (it was
last written at or before e, by a write that was complete). Rows that fail are read
again with a newer e, and the rows accepted earlier are accepted with it only if
their stamps have not moved (one more gather of R's seqs). After ``READ_TRIES`` rounds
the coordinator hands over a copy of the whole table. So every row read is whole, and
**all rows of one read are as of one epoch**: a write spanning rows you read is seen
all or not at all (at row granularity; the epoch is :attr:`Table.epoch` of the answer).

Durability: a table write is logged like any other op (WAL, group commit, the sync
mode's guarantees); checkpoints copy every table into ``<checkpoint>.tables``, and
recovery replays the WAL's table ops after it.
"""

from __future__ import annotations

import ast
import mmap
import os
import re
from typing import Any, Callable

import numpy as np
import posix_ipc

from . import _layout as L
from ._compiled import acquire as fence
from ._errors import (
    IncompatibleStoreError,
    StoreFullError,
    InvalidRowsError,
    InvalidNameError,
    RowOutOfRangeError,
    StoreClosedError,
    TableDtypeError,
    TableNotFoundError,
)

T_MAGIC_VALUE = 0x31_4C_42_54_4D_48_53  # b"SHMTBL1"
T_MAGIC = 0
T_FORMAT = 1
T_NROWS = 2
T_ITEMSIZE = 3
T_STORE_INSTANCE = 4  # H_INSTANCE of the store the table belongs to
T_EPOCH = 5  # the epoch of the last complete write (or the create)
T_WRITING = 6  # odd while a write is being applied
T_DESCR_LEN = 7
T_DATA_OFFSET = 8
T_CREATED = 9  # the epoch of the create op
TABLE_FORMAT = 1
DESCR_OFFSET = 512
MAX_DESCR = L.PAGE - DESCR_OFFSET
MAX_ROWS = 1 << 31
#: read rounds (re-reading only the rows that moved) before asking the coordinator
READ_TRIES = 8
#: try the table-wide seqlock first (tests turn it off to drive the per-row protocol)
FAST_PATH = True

TABLE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def check_table_name(tname: object) -> str:
    if not isinstance(tname, str) or not TABLE_NAME_RE.match(tname):
        raise InvalidNameError(f"invalid table name {tname!r}: use 1 to 32 characters from A-Z a-z 0-9 _ . -")
    return tname


def table_segment_name(store: str, tname: str) -> str:
    return L.table_prefix(store) + tname


def table_prefix(store: str) -> str:
    """Entries in /dev/shm of the store's tables start with this."""
    return L.table_prefix(store).lstrip("/")


def dtype_to_text(dtype: Any) -> str:
    """A literal text form of a dtype (the .npy header's), refused for object fields.

    Raises:
        TableDtypeError: not a dtype, object fields, or zero itemsize.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TableDtypeError(f"not a numpy dtype: {dtype!r} ({e})") from None
    if dt.hasobject:
        raise TableDtypeError(f"dtype {dt} has object fields, which cannot live in shared memory; "
                              f"use fixed-size fields (numbers, 'S16', 'U8', sub-arrays)")
    if dt.itemsize == 0:
        raise TableDtypeError(f"dtype {dt} has no bytes; give it at least one field")
    text = repr(np.lib.format.dtype_to_descr(dt))
    if len(text.encode()) > MAX_DESCR:
        raise TableDtypeError(f"dtype {dt} is too complex to describe in {MAX_DESCR} bytes; use fewer fields")
    return text


def text_to_dtype(text: str) -> np.dtype:
    """Parse :func:`dtype_to_text`'s form (a literal, never evaluated as code).

    Raises:
        TableDtypeError: not a dtype description.
    """
    if not isinstance(text, str) or len(text) > MAX_DESCR:
        raise TableDtypeError("a table dtype description must be a string of at most "
                              f"{MAX_DESCR} characters")
    try:
        dt = np.lib.format.descr_to_dtype(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError, KeyError, IndexError, RecursionError, MemoryError) as e:
        raise TableDtypeError(f"not a dtype description: {text[:80]!r} ({type(e).__name__})") from None
    if dt.hasobject or dt.itemsize == 0:
        raise TableDtypeError(f"dtype {dt} cannot be stored in a table (object fields or no bytes)")
    return dt


def check_room(nrows: int, itemsize: int) -> None:
    """Refuse a table /dev/shm has no room for (before anything is created).

    Raises:
        StoreFullError: the table's segment would not fit the free shared memory.
    """
    need = TableLayout(nrows, itemsize).size
    try:
        st = os.statvfs("/dev/shm")
        free = st.f_bavail * st.f_frsize
    except OSError:
        return
    if need > free:
        raise StoreFullError(f"a table of {nrows} rows x {itemsize} bytes needs {need} bytes of shared "
                             f"memory; /dev/shm has {free} free. Use fewer rows or free shared memory.")


class TableLayout:
    """Offsets of a table segment."""

    def __init__(self, nrows: int, itemsize: int) -> None:
        self.nrows = nrows
        self.itemsize = itemsize
        self.seq_offset = L.PAGE
        self.data_offset = L.align(L.PAGE + 8 * nrows, L.PAGE)
        self.size = L.align(self.data_offset + nrows * itemsize, L.PAGE)


class TableMap:
    """One process's mapping of a table segment, with numpy views of it."""

    def __init__(self, seg_name: str, mm: mmap.mmap) -> None:
        self.seg_name = seg_name
        self.mm = mm
        self.q = memoryview(mm).cast("Q")
        q = self.q
        if len(mm) < L.PAGE or q[T_MAGIC] != T_MAGIC_VALUE or q[T_FORMAT] != TABLE_FORMAT:
            self.close()
            raise IncompatibleStoreError(f"{seg_name} is not a shmstore table of this version")
        n = q[T_DESCR_LEN]
        self.dtype = text_to_dtype(bytes(mm[DESCR_OFFSET : DESCR_OFFSET + n]).decode())
        self.nrows = q[T_NROWS]
        lay = TableLayout(self.nrows, self.dtype.itemsize)
        if q[T_ITEMSIZE] != self.dtype.itemsize or q[T_DATA_OFFSET] != lay.data_offset or len(mm) < lay.size:
            self.close()
            raise IncompatibleStoreError(f"{seg_name}: its header disagrees with its size; destroy the store")
        self.instance = q[T_STORE_INSTANCE]
        self.seqs = np.ndarray((self.nrows,), dtype=np.uint64, buffer=mm, offset=lay.seq_offset)
        self.data = np.ndarray((self.nrows,), dtype=self.dtype, buffer=mm, offset=lay.data_offset)
        # The same bytes as a plain (nrows, k) integer matrix: numpy gathers rows of it
        # with np.take many times faster than it gathers records of a structured dtype.
        unit = next(u for u in (8, 4, 2, 1) if self.dtype.itemsize % u == 0)
        self.raw = np.ndarray((self.nrows, self.dtype.itemsize // unit), dtype=f"<u{unit}", buffer=mm,
                              offset=lay.data_offset)

    def close(self) -> None:
        for attr in ("seqs", "data", "raw"):
            self.__dict__.pop(attr, None)
        q = self.__dict__.pop("q", None)
        if q is not None:
            q.release()
        mm = self.__dict__.pop("mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # an array handed out still views it; the GC unmaps later
                pass


def map_table(seg_name: str, *, writable: bool = False) -> TableMap | None:
    """Map a table segment; None if it does not exist."""
    try:
        shm = posix_ipc.SharedMemory(seg_name, read_only=not writable)
    except posix_ipc.ExistentialError:
        return None
    try:
        size = os.fstat(shm.fd).st_size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=prot)
    finally:
        shm.close_fd()
    return TableMap(seg_name, mm)


def as_rows(rows: Any, nrows: int) -> np.ndarray | slice:
    """Row numbers as an int64 array (or a slice for a contiguous ``range``/``slice``).

    Raises:
        InvalidRowsError: not integers.
        RowOutOfRangeError: a row outside ``[0, nrows)``.
    """
    if isinstance(rows, (range, slice)):
        r = range(nrows)[rows] if isinstance(rows, slice) else rows
        if r.step == 1 or len(r) <= 1:
            if len(r) and (r.start < 0 or r[-1] >= nrows):
                raise RowOutOfRangeError(f"rows {r.start}..{r[-1]} reach outside the table's {nrows} rows "
                                         f"(0..{nrows - 1})")
            return slice(r.start, r.start + len(r)) if len(r) else slice(0, 0)
        rows = np.arange(r.start, r.stop, r.step)
    if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
        rows = [rows]
    arr = np.asarray(rows)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidRowsError(f"rows must be integers (a sequence, a 1-d integer array or a range), "
                               f"got {arr.dtype} of shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= nrows:
            bad = lo if lo < 0 else hi
            raise RowOutOfRangeError(f"row {bad} is outside the table's {nrows} rows (0..{nrows - 1}); "
                                     f"create a larger table to hold more rows")
    return arr


class Table:
    """A numpy table of a store: records of one structured dtype addressed by row.

    Made by :meth:`Store.table`. Reads are lock-free and vectorized (see the module
    docstring for the protocol); every row returned is whole, and all rows of one
    :meth:`read` are as of one epoch. Writes go through the coordinator as one atomic
    op, logged and made durable like every other write. Rows never written read as
    zeros. Thread-safe; a handle inherited across ``fork()`` keeps reading.
    """

    def __init__(self, store: Any, tname: str, tm: TableMap) -> None:
        self._store = store
        self.name = tname
        self._tm = tm
        #: the table's structured dtype
        self.dtype = tm.dtype
        #: the number of rows
        self.nrows = tm.nrows

    def __len__(self) -> int:
        return self.nrows

    def __repr__(self) -> str:
        return f"<shmstore.Table {self.name!r} rows={self.nrows} dtype={self.dtype}>"

    def _map(self) -> TableMap:
        tm = self._tm
        if tm is None:
            raise StoreClosedError(f"table {self.name!r} is closed; open it again with store.table()")
        seg = self._store._seg
        if seg is None or seg.q[L.H_STATE] == L.STATE_DESTROYED or tm.instance != seg.instance:
            # The store was destroyed (and maybe rebuilt from disk): follow it.
            seg = self._store._live_segment()
            if tm.instance != seg.instance:
                fresh = open_table(self._store, self.name)
                self._tm, fresh._tm = fresh._tm, None
                tm.close()
                tm = self._tm
        return tm

    @property
    def epoch(self) -> int:
        """The epoch of the table's last complete write."""
        return self._map().q[T_EPOCH]

    # -- reads -------------------------------------------------------------------------

    def read(self, rows: Any) -> np.ndarray:
        """Copy rows out, every row whole and all of them as of one epoch.

        Args:
            rows: row numbers (a sequence or 1-d integer array, in any order, repeats
                allowed) or a ``range``/``slice`` (contiguous ones are copied whole).

        Returns:
            A new structured array of the table's dtype, one record per row asked for.

        Raises:
            InvalidRowsError: rows are not integers.
            RowOutOfRangeError: a row outside ``[0, nrows)``.
        """
        tm = self._map()
        sel = as_rows(rows, self.nrows)
        out = self._read(tm, sel)
        self._store._counters.reads += len(out)
        return out

    def read_all(self) -> np.ndarray:
        """The whole table as of one epoch (a new array of ``nrows`` records)."""
        return self.read(slice(0, self.nrows))

    def scan(self, where: Callable[[np.ndarray], Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows whose records match a condition, from one consistent read of the table.

        Args:
            where: called once with the whole table as a structured array (as of one
                epoch); returns a boolean mask (e.g. ``lambda t: t["price"] > 10``).
                None matches every row.

        Returns:
            ``(rows, records)``: the matching row numbers (int64) and their records.

        Raises:
            InvalidRowsError: ``where`` did not return a boolean mask of ``nrows``.
        """
        data = self.read_all()
        if where is None:
            return np.arange(self.nrows, dtype=np.int64), data
        mask = np.asarray(where(data))
        if mask.dtype != np.bool_ or mask.shape != (self.nrows,):
            raise InvalidRowsError(f"where= must return a boolean mask of shape ({self.nrows},), got "
                                   f"{mask.dtype} of shape {mask.shape}")
        idx = np.flatnonzero(mask)
        return idx.astype(np.int64), data[idx]

    def _read(self, tm: TableMap, sel: np.ndarray | slice) -> np.ndarray:
        q = tm.q
        seqs = tm.seqs
        raw = tm.raw
        take = np.take
        # Fast path: no write ran during the copy (T_WRITING even and unchanged), so
        # every row copied is whole and all are as of one epoch; no row seqs needed.
        w1 = q[T_WRITING]
        fence()  # (acquire) every fence() here pairs with the coordinator's release()
        if not w1 & 1 and FAST_PATH:
            got = raw[sel].copy() if isinstance(sel, slice) else take(raw, sel, axis=0)
            fence()
            if q[T_WRITING] == w1:
                return got.view(self.dtype).reshape(-1)
        one = np.uint64(1)
        e = q[T_EPOCH]
        # Invariant: the passes run in this order: epoch, seqs, records, seqs again.
        fence()
        if isinstance(sel, slice):
            s1 = seqs[sel].copy()
            fence()
            got = raw[sel].copy()
            fence()
            s2 = seqs[sel]
        else:
            s1 = take(seqs, sel)
            fence()
            got = take(raw, sel, axis=0)
            fence()
            s2 = take(seqs, sel)
        out = got.view(self.dtype).reshape(-1)  # no copy: the records of got
        lim = np.uint64(2 * e + 2)
        if len(s1) == 0 or (np.array_equal(s1, s2) and not np.bitwise_or.reduce(s1) & one and s1.max() <= lim):
            return out
        bad = (s1 != s2) | ((s1 & one) != 0) | (s1 > lim)
        rows = np.arange(sel.start, sel.stop, dtype=np.int64) if isinstance(sel, slice) else sel
        stamps = s1
        store = self._store
        for _ in range(READ_TRIES):
            store._counters.read_retries += 1
            e = q[T_EPOCH]
            fence()
            bi = np.flatnonzero(bad)
            br = rows[bi]
            b1 = take(seqs, br)
            fence()
            got[bi] = take(raw, br, axis=0)
            fence()
            b2 = take(seqs, br)
            now = take(seqs, rows)
            stamps[bi] = b1
            lim = np.uint64(2 * e + 2)
            bad = (now != stamps) | ((stamps & one) != 0) | (stamps > lim)
            bad[bi] |= b1 != b2
            if not bad.any():
                return out
            os.sched_yield()
        return self._read_via_coordinator(sel)

    def _read_via_coordinator(self, sel: np.ndarray | slice) -> np.ndarray:
        from . import _channel as C
        from ._handover import open_handover

        seg_name, _ = self._store._request([C.OP_TABLE_READ, 1, self.name], "table read")
        mm, n = open_handover(seg_name)
        try:
            whole = np.frombuffer(mm, dtype=self.dtype, count=self.nrows, offset=64)
            out = whole[sel].copy()
            del whole
        finally:
            mm.close()
        return out

    # -- writes ------------------------------------------------------------------------

    def write(self, rows: Any, values: Any, *, timeout: float | None = None) -> int:
        """Write records to rows, atomically: readers see all of it or none of it.

        Args:
            rows: row numbers (no repeats) or a ``range``/``slice``.
            values: a structured array of exactly the table's dtype with one record per
                row (a single record for a single row), or anything
                ``np.asarray(values, dtype=table.dtype)`` accepts (a list of tuples).
            timeout: seconds to wait for the coordinator.

        Returns:
            The write's epoch (the rows' new stamp is ``2 * epoch + 2``).

        Raises:
            TableDtypeError: ``values`` is an array of another dtype (convert it with
                ``values.astype(table.dtype)`` if that is what you mean).
            InvalidRowsError: lengths differ, a row repeats, or rows are not integers.
            RowOutOfRangeError: a row outside ``[0, nrows)``.
            RequestTooLargeError: the write is larger than the client's queue; split
                it or serve the store with a larger ``ring_size``.
        """
        from . import _channel as C

        self._map()
        sel = as_rows(rows, self.nrows)
        rows_arr = np.arange(sel.start, sel.stop, dtype=np.int64) if isinstance(sel, slice) else sel
        vals = self._values(values, len(rows_arr))
        if len(rows_arr) > 1:
            seen = np.zeros(self.nrows, dtype=bool)
            seen[rows_arr] = True
            if int(np.count_nonzero(seen)) != len(rows_arr):
                dup = np.flatnonzero(np.bincount(rows_arr, minlength=self.nrows) > 1)[0]
                raise InvalidRowsError(f"row {dup} appears more than once in one write; give each row once")
        payload = [C.OP_TABLE_WRITE, 1, self.name, rows_arr.astype("<i8").tobytes(), vals.tobytes()]
        return self._store._request(payload, "table write", timeout=timeout)

    def _values(self, values: Any, n: int) -> np.ndarray:
        dt = self.dtype
        if isinstance(values, np.ndarray) or isinstance(values, np.void):
            if values.dtype != dt:
                raise TableDtypeError(
                    f"values have dtype {values.dtype}, table {self.name!r} has {dt}; convert them "
                    f"with values.astype(table.dtype) or build them with np.zeros(n, table.dtype)")
            vals = np.atleast_1d(values)
        else:
            try:
                vals = np.atleast_1d(np.asarray(values, dtype=dt))
            except (TypeError, ValueError) as e:
                raise TableDtypeError(f"cannot convert values to table {self.name!r}'s dtype {dt}: {e}") from None
        if vals.ndim != 1:
            raise InvalidRowsError(f"values must be one record per row (1-d), got shape {vals.shape}")
        if len(vals) != n:
            raise InvalidRowsError(f"{n} rows but {len(vals)} values; give one record per row")
        return np.ascontiguousarray(vals)

    def close(self) -> None:
        """Release the mapping. Idempotent; arrays already returned stay valid."""
        tm, self._tm = self._tm, None
        if tm is not None:
            tm.close()


def open_table(store: Any, tname: str, dtype: Any = None, rows: int | None = None,
               timeout: float | None = None) -> Table:
    """Store.table(): attach to a table, creating it through the coordinator if needed."""
    from . import _channel as C

    check_table_name(tname)
    seg = store._live_segment()
    text = None if dtype is None else dtype_to_text(dtype)
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or not 1 <= rows <= MAX_ROWS):
        raise InvalidRowsError(f"rows must be an integer from 1 to {MAX_ROWS}, got {rows!r}")
    seg_name = table_segment_name(store.name, tname)
    tm = map_table(seg_name)
    if tm is None:
        if text is not None and rows is not None:
            check_room(rows, text_to_dtype(text).itemsize)
        if text is None or rows is None:
            raise TableNotFoundError(f"store {store.name!r} has no table {tname!r}; create it with "
                                     f"store.table({tname!r}, dtype=..., rows=...)")
        store._request([C.OP_TABLE_CREATE, 1, tname, text, rows], "table create", timeout=timeout)
        tm = map_table(seg_name)
        if tm is None:
            raise TableNotFoundError(f"table {tname!r} was created but its segment is gone (destroyed?)")
    if tm.instance != seg.instance:
        tm.close()
        raise IncompatibleStoreError(f"table segment {seg_name} belongs to an earlier store of that name; "
                                     f"destroy the store (shmstore destroy {store.name}) and serve it again")
    if (text is not None and tm.dtype != text_to_dtype(text)) or (rows is not None and rows != tm.nrows):
        have = f"dtype={tm.dtype}, rows={tm.nrows}"
        tm.close()
        raise IncompatibleStoreError(f"table {tname!r} exists with {have}; open it with those (or with "
                                     f"neither: store.table({tname!r}))")
    return Table(store, tname, tm)
