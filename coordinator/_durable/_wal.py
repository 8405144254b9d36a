"""The write-ahead log: one file per stretch between checkpoints, appended per group.

Design
------
The coordinator applies a group of ops to the segment, then appends one record per
applied op to the current WAL file with ONE ``write`` (group commit), and, in sync
mode ``always``, one ``fdatasync`` before any reply of the group is published. A file
is named ``wal-<start epoch, 20 digits>-<id, 16 hex>.wal`` and starts with a header::

    file header (64 bytes)
     0  8s   magic b"SHMSWAL1"
     8  u32  format version
    12  u32  salt: random per file; seeds every record checksum of the file
    16  u64  id: random, nonzero; what the next file and checkpoints link to
    24  u64  prev: id of the WAL file (or checkpoint) this file continues; 0: none
    32  u64  start epoch S: the store's epoch when the file was started
    40  u64  layout fingerprint of the store
    48  u64  schema fingerprint of the store
    56  u32  flags: how payloads are stored (``_atrest``: 0 plain, zstd, AES-GCM)
    60  u32  crc32 of bytes 0..60

    record, repeated (every record starts at a multiple of 8)
    +--------+--------+----------------+----------------+----------------+-------+
    | n u32  | crc u32| epoch_before   | synced u64     | payload        | 0-pad |
    |        |        | u64            |                | n bytes        | to 8  |
    +--------+--------+----------------+----------------+----------------+-------+
     n        payload length, 1 .. MAX_RECORD
     crc      crc32 of (epoch_before, synced, payload), seeded with the file's salt
     epoch_before  the store's epoch just before the op; replay sets the engine's
              epoch to it, so epochs and versions come out as they did the first time
     synced   the file offset that was known durable (fsynced) when the record was
              written: everything before it had reached the disk
     payload  the request exactly as the client sent it: msgpack ``[op, wait, *args]``,
              sealed (compressed / encrypted, see ``_atrest``) if the header's flags say
              so; the crc covers the bytes as stored

Torn tails and corruption
-------------------------
Reading stops at the first record that is cut short or fails its checksum, at
offset ``o``. Was it torn by a crash, or damaged after it was durable? Any valid
record found *after* ``o`` says how far the file had been fsynced when it was
written (its ``synced``). If some valid later record claims ``synced > o``, the bad
bytes had been durable: that is corruption, reported as :class:`CorruptionError`
naming the file and ``o``. Otherwise everything from ``o`` on was never promised to
be on disk (in sync mode ``always`` only the last group can be in that state; in
``periodic``, what was written after the last fsync) and is a torn tail: the file
is truncated at ``o``.

The one case no format can tell apart: damage inside the very last record(s), those
not followed by a record that proves they were synced, looks exactly like a torn
write and is truncated (SQLite's WAL and RocksDB's point-in-time recovery do the
same). What is left is always a prefix of the history, never garbage.

Invariant: a file other than the newest was fsynced in full before its successor was
created, so only the newest file of a chain can have a torn tail.
Invariant: a file is created under a temporary name and renamed once its header is
durable, so a damaged header is corruption, never a crash while creating the file.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from shmstore._errors import CorruptionError

from .._metrics import timed, timed_fsync_dir
from ._formats import old_format_error

WAL_MAGIC = b"SHMSWAL1"
#: 1: segment format 3; 2: segment format 4 (logs Evict and MovePage; refs are offsets)
WAL_VERSION = 2
HEADER = struct.Struct("<8sIIQQQQQI")  # ... up to the crc
HEADER_SIZE = 64
REC = struct.Struct("<IIQQ")
REC_SIZE = REC.size  # 24
MAX_RECORD = 1 << 31
_EB_SYNCED = struct.Struct("<QQ")
_AAD = struct.Struct("<QQ")  # file id, epoch_before: binds a sealed payload to its place
crc32 = zlib.crc32


def wal_name(start: int, file_id: int) -> str:
    """``wal-<start epoch, 20 digits>-<id, 16 hex>.wal``: sorts by start, never collides."""
    return f"wal-{start:020d}-{file_id:016x}.wal"


def parse_name(name: str, prefix: str, suffix: str) -> int | None:
    """The epoch in ``<prefix><20 digits>-<16 hex digits><suffix>``, or None."""
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    mid = name[len(prefix) : len(name) - len(suffix)]
    if len(mid) != 37 or mid[20] != "-" or not mid[:20].isdigit():
        return None
    try:
        int(mid[21:], 16)
    except ValueError:
        return None
    return int(mid[:20])


def new_id() -> int:
    return int.from_bytes(os.urandom(8), "little") | 1


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class WalHeader:
    salt: int
    id: int
    prev: int
    start: int
    layout_fp: int
    schema_fp: int
    flags: int = 0

    def pack(self) -> bytes:
        head = HEADER.pack(WAL_MAGIC, WAL_VERSION, self.salt, self.id, self.prev, self.start,
                           self.layout_fp, self.schema_fp, self.flags)
        return head + struct.pack("<I", crc32(head))

    @classmethod
    def unpack(cls, path: str, data: bytes) -> WalHeader:
        if len(data) < HEADER_SIZE:
            raise CorruptionError(f"WAL file {path}: header cut short at offset {len(data)} (of {HEADER_SIZE})")
        magic, version, salt, id_, prev, start, lfp, sfp, flags = HEADER.unpack_from(data, 0)
        (crc,) = struct.unpack_from("<I", data, 60)
        if magic != WAL_MAGIC or crc != crc32(data[:60]):
            raise CorruptionError(f"WAL file {path}: bad header (magic or checksum) at offset 0")
        if version != WAL_VERSION:
            raise old_format_error(f"WAL file {path}", version, WAL_VERSION)
        return cls(salt, id_, prev, start, lfp, sfp, flags)


def frame(salt: int, epoch_before: int, synced: int, payload: bytes) -> bytes:
    """One record, padded to a multiple of 8 bytes."""
    n = len(payload)
    mid = _EB_SYNCED.pack(epoch_before, synced)
    crc = crc32(payload, crc32(mid, salt))
    pad = -n & 7
    return struct.pack("<II", n, crc) + mid + payload + (b"\0" * pad if pad else b"")


@dataclass
class WalScan:
    """What reading one WAL file found."""

    path: str
    header: WalHeader
    #: (offset, epoch_before, payload) of every valid record, in order
    records: list[tuple[int, int, bytes]] = field(default_factory=list)
    #: where valid data ends (the next record would start here)
    end: int = HEADER_SIZE
    #: the file size; bytes from ``end`` to ``size`` are a torn tail
    size: int = 0

    @property
    def torn(self) -> bool:
        return self.end < self.size


def scan_wal(path: str, *, layout_fp: int | None = None, schema_fp: int | None = None,
             key: bytes | None = None, raw: bool = False) -> WalScan:
    """Read and check one WAL file.

    Args:
        key: the encryption key, for a file whose flags say it is encrypted.
        raw: keep payloads as stored (sealed): check checksums only, need no key.

    Returns:
        Its header and valid records; ``torn`` tells whether a torn tail follows them
        (the caller truncates it: :func:`truncate_torn`).

    Raises:
        CorruptionError: a damaged header, a record damaged before the torn tail
            (see the module docstring), or a file of another store.
        EncryptionKeyError: the file is encrypted and no key was given.
    """
    with open(path, "rb") as f:
        data = f.read()
    hdr = WalHeader.unpack(path, data)
    if layout_fp is not None and (hdr.layout_fp != layout_fp or hdr.schema_fp != schema_fp):
        raise CorruptionError(f"WAL file {path}: written for another store layout or schema (offset 8)")
    scan = WalScan(path, hdr, size=len(data))
    salt = hdr.salt
    off = HEADER_SIZE
    size = len(data)
    start = hdr.start
    last_eb = start - 1
    records = scan.records
    append = records.append
    mv = memoryview(data)
    unpack = REC.unpack_from
    while off + REC_SIZE <= size:
        n, crc, eb, _synced = unpack(data, off)
        end = off + REC_SIZE + n
        if n == 0 or n > MAX_RECORD or end > size or crc32(mv[off + 8 : end], salt) != crc:
            break
        if eb <= last_eb:
            raise CorruptionError(
                f"WAL file {path}: record at offset {off} has epoch {eb}, not after "
                f"{last_eb if last_eb >= start else start}; the log is not from one history"
            )
        last_eb = eb
        append((off, eb, data[off + REC_SIZE : end]))
        off = (end + 7) & ~7  # records start 8-aligned
    if off > size:  # the last record's padding was cut: the record itself is whole
        off = size
    scan.end = off
    if off < size:
        _check_tail(path, data, off, salt)
    if hdr.flags and not raw:
        from ._atrest import Codec  # noqa: PLC0415

        codec = Codec(hdr.flags, key)
        fid = hdr.id
        scan.records = [(o, eb, codec.open(p, _AAD.pack(fid, eb), f"WAL file {path}: record at offset {o}"))
                        for o, eb, p in records]
    return scan


def _check_tail(path: str, data: bytes, bad: int, salt: int) -> None:
    """Tell a torn tail from corruption: raise if any valid record after ``bad``
    proves the bytes at ``bad`` had been fsynced."""
    size = len(data)
    first = bad + 8
    if first + REC_SIZE > size:
        return
    words = np.frombuffer(data, dtype="<u4", count=(size - first) // 4, offset=first)
    cand = np.arange(0, len(words) - 5, 2)  # 8-aligned record starts
    if not len(cand):
        return
    pos = first + cand * 4
    n = words[cand].astype(np.int64)
    ok = (n > 0) & (pos + REC_SIZE + n <= size)
    mv = memoryview(data)
    for p in pos[ok].tolist():
        n_, crc, _eb, synced = REC.unpack_from(data, p)
        if crc32(mv[p + 8 : p + REC_SIZE + n_], salt) == crc and synced > bad:
            raise CorruptionError(
                f"WAL file {path}: record at offset {bad} is damaged (checksum or length), "
                f"but a later valid record (offset {p}) shows it had been synced to disk; "
                f"the log cannot be replayed past offset {bad}"
            )


def truncate_torn(path: str, end: int) -> None:
    """Cut a torn tail off, durably."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, end)
        os.fsync(fd)
    finally:
        os.close(fd)


class WalWriter:
    """The WAL file being appended to (coordinator thread only).

    ``add`` frames a record into the pending group; ``flush`` writes the group with
    one ``write``; ``sync`` makes everything written durable.
    """

    def __init__(self, path: str, fd: int, header: WalHeader, size: int, metrics: object = None,
                 codec: object = None) -> None:
        self.path = path
        #: a ``_atrest.Codec`` sealing each payload (None: plain)
        self.codec = codec
        #: a ``_metrics.DurabilityMetrics`` (or None): fsync latencies, bytes written
        self.metrics = metrics
        self.fd = fd
        self.header = header
        self.size = size  # bytes written
        self.synced = size  # bytes known durable
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        #: groups written since the last successful fsync (rewritten if it fails)
        self.unsynced: list[bytes] = []
        self.sync_failed = False
        self.records = 0

    @classmethod
    def create(cls, dirpath: str, *, start: int, prev: int, layout_fp: int, schema_fp: int,
               metrics: object = None, codec: object = None) -> WalWriter:
        """Create a new WAL file with its header, durably (file and directory)."""
        lat: list[int] = []
        hdr = WalHeader(salt=int.from_bytes(os.urandom(4), "little"), id=new_id(), prev=prev, start=start,
                        layout_fp=layout_fp, schema_fp=schema_fp, flags=codec.flags if codec else 0)
        path = os.path.join(dirpath, wal_name(start, hdr.id))
        # Invariant: a WAL file appears under its name only with its header durable,
        # so a damaged header is always corruption, never a torn creation.
        tmp = path + ".tmp"
        # Not O_APPEND: records go at explicit offsets, so a retried group overwrites
        # whatever a failed (partial) write left, and never lands after it.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, hdr.pack())
            timed(os.fdatasync, fd, lat)
            os.rename(tmp, path)
            tmp = path  # from here on, a failure removes the named file
            timed_fsync_dir(dirpath, lat)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)  # a file no chain names would make recovery refuse the directory
            except OSError:
                pass
            raise
        if metrics is not None:
            metrics.fsyncs(lat)
            metrics.wal_bytes(HEADER_SIZE)
        return cls(path, fd, hdr, HEADER_SIZE, metrics, codec if hdr.flags else None)

    def add(self, epoch_before: int, payload: bytes) -> None:
        if self.codec is not None:
            payload = self.codec.seal(payload, _AAD.pack(self.header.id, epoch_before))
        rec = frame(self.header.salt, epoch_before, self.synced, payload)
        self.pending.append(rec)
        self.pending_bytes += len(rec)
        self.records += 1

    def flush(self) -> bool:
        """Write the pending group (one write) at the end of the valid data.

        Returns whether there was one. On an OSError (disk full, read-only) the group
        stays pending and the next call writes it again at the same offset.
        """
        if self.sync_failed:
            self._rewrite_unsynced()
        if not self.pending:
            return False
        buf = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        _pwrite_all(self.fd, buf, self.size)
        self.pending = []
        self.pending_bytes = 0
        self.size += len(buf)
        self.unsynced.append(buf)
        if self.metrics is not None:
            self.metrics.wal_bytes(len(buf))
        return True

    def sync(self) -> None:
        """Make everything written durable. After a failed fsync the kernel may have
        dropped the written pages, so the next call writes them again first."""
        if self.sync_failed:
            self._rewrite_unsynced()
        if self.synced < self.size:
            t0 = time.perf_counter_ns()
            try:
                os.fdatasync(self.fd)
            except OSError:
                self.sync_failed = True
                raise
            if self.metrics is not None:
                self.metrics.fsync(time.perf_counter_ns() - t0)
            self.synced = self.size
            self.unsynced = []

    def _rewrite_unsynced(self) -> None:
        off = self.synced
        for buf in self.unsynced:
            _pwrite_all(self.fd, buf, off)
            off += len(buf)
        self.sync_failed = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(fd: int, buf: bytes, offset: int) -> None:
    mv = memoryview(buf)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


def _write_all(fd: int, buf: bytes) -> None:
    mv = memoryview(buf)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]
