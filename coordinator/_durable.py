"""The durable journal: WAL + checkpoints in a data directory, and recovery from them.

Design
------
A data directory (mode 0700, files 0600) holds::

    MANIFEST                         the store's parameters (msgspec JSON), written once
                                     per new segment: name, capacity, key_size,
                                     value_size, schema and layout fingerprints, and the
                                     instance id of the segment the directory follows
    LOCK                             flock'ed by the coordinator using the directory
    ckpt-<epoch>-<id>.ckpt           checkpoints (see ``_checkpoint``), the last K kept
    wal-<start epoch>-<id>.wal       WAL files (see ``_wal``), one per checkpoint interval

Chains. Every WAL file names the file (or checkpoint) it continues (``prev``), and
every checkpoint names the WAL file whose records follow it (``wal_id``). Recovery from
checkpoint C replays the chain C -> wal_id -> the file whose prev is that -> ... and
accepts the result only if it is complete: every WAL file that starts at or after C is
in the chain (or is a file the chain continues, which holds nothing after C), and the
chain reaches the epoch of the newest checkpoint on disk. So a
fallback to an older checkpoint either reproduces the newest state or is refused.

Recovery at coordinator start (the server calls, in order):

1. :meth:`DurableJournal.prepare`, before the segment: create or lock the directory,
   compare its manifest with the parameters given (IncompatibleStoreError).
2. If no segment exists (a reboot, or ``shmstore.destroy``): the server creates one and
   calls :meth:`DurableJournal.restore`: the newest checkpoint that loads and whose chain
   is complete, plus replay of the chain's records through the Engine, which reproduces
   every epoch and version (ops are deterministic; each record carries the epoch before
   its op). A damaged checkpoint or a broken chain falls back to the previous
   checkpoint; if none works, :class:`CorruptionError` names every file and offset that
   failed, and nothing is served. A torn tail of the newest WAL file is cut off.
   Afterwards the epoch jumps by ``EPOCH_GAP``: ops the dead coordinator applied but
   never made durable may have shown their versions to readers; new writes must never
   reuse those versions.
3. :meth:`DurableJournal.open` after the server adopted and repaired the segment. An
   adopted segment is the truth: it holds every op the WAL holds and possibly more
   (ops applied but never committed: the coordinator died between apply and commit;
   never acknowledged, but visible to readers). If the WAL's chain ends exactly at the
   segment's epoch, the disk already agrees and logging just continues in a new file;
   otherwise a checkpoint is taken at once, so disk and segment agree again, and the
   new WAL file starts from that checkpoint.

What a crash loses, per sync mode (the same table is in :func:`shmstore.serve`):

=========  ======================================  ======================================
sync       SIGKILL of the coordinator              power loss / kernel crash
=========  ======================================  ======================================
always     nothing acknowledged                    nothing acknowledged (fsync per group
                                                   before any reply)
periodic   nothing acknowledged (each group is     up to ``sync_interval`` of
           written to the OS before replies)       acknowledged writes
never      nothing while the segment survives;     everything since the last checkpoint
           everything since the last checkpoint
           if the segment is gone too
=========  ======================================  ======================================

Invariant: a record is appended only for an op already applied to the segment, so the
segment is never behind the WAL of its own lineage.
Invariant: files are deleted only after the checkpoint that makes them unneeded is
durable, and only if no kept checkpoint's chain uses them.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from dataclasses import dataclass

import msgspec
import numpy as np

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import (
    CoordinatorRunningError,
    CorruptionError,
    IncompatibleStoreError,
    SchemaMismatchError,
    ShmStoreError,
)
from shmstore._segment import Segment
from shmstore._api import DurabilityUnavailableError as DurabilityError

from ._checkpoint import (
    LoadedCheckpoint,
    load_checkpoint,
    peek_header,
    restore_into,
    take_snapshot,
    write_checkpoint,
)
from ._engine import Engine
from ._expiry import replay_expire
from ._wal import WalHeader, WalScan, WalWriter, fsync_dir, new_id, parse_name, scan_wal, truncate_torn

MANIFEST = "MANIFEST"
LOCK = "LOCK"
MANIFEST_FORMAT = 1
#: Epochs skipped after a rebuild from disk: more than any number of ops a coordinator
#: can have applied and shown to readers without making them durable.
EPOCH_GAP = 1 << 40

DEFAULT_SYNC_INTERVAL = 0.1
DEFAULT_CHECKPOINT_OPS = 200_000
DEFAULT_CHECKPOINT_INTERVAL = 300.0
DEFAULT_CHECKPOINT_BYTES = 256 << 20
DEFAULT_CHECKPOINT_KEEP = 2

_decode = msgspec.msgpack.Decoder().decode


class Manifest(msgspec.Struct, kw_only=True):
    """The store parameters a data directory was written with."""

    format: int = MANIFEST_FORMAT
    name: str
    capacity: int
    key_size: int
    value_size: int
    schema_fp: int
    layout_fp: int
    #: the H_INSTANCE of the segment whose history this directory records
    segment_instance: int = 0

    @property
    def layout(self) -> L.Layout:
        return L.Layout(capacity=self.capacity, key_size=self.key_size, value_size=self.value_size)


@dataclass
class _WalInfo:
    """A WAL file as listed: its name's start epoch and id, its header if readable."""

    path: str
    start: int
    file_id: int
    header: WalHeader | None
    error: CorruptionError | None = None


class DataDir:
    """Files of one data directory; no state beyond the path and the lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_fd = -1

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def open_and_lock(self) -> None:
        created = False
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            os.mkdir(self.path, 0o700)
            created = True
        except FileExistsError:
            if not os.path.isdir(self.path):
                raise IncompatibleStoreError(f"data directory {self.path!r} exists and is not a directory") from None
        if created:
            os.chmod(self.path, 0o700)  # whatever the umask
            fsync_dir(parent)
        fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CoordinatorRunningError(
                f"data directory {self.path!r} is in use by another coordinator; each store "
                f"needs a directory of its own"
            ) from None
        self.lock_fd = fd

    def unlock(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def read_manifest(self) -> Manifest | None:
        p = self.file(MANIFEST)
        try:
            with open(p, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            m = msgspec.json.decode(raw, type=Manifest)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            # A flipped bit can make invalid UTF-8, which msgspec reports as such.
            raise CorruptionError(f"manifest {p}: unreadable ({e})") from None
        if m.format != MANIFEST_FORMAT:
            raise IncompatibleStoreError(f"manifest {p}: format {m.format}, this shmstore reads {MANIFEST_FORMAT}")
        return m

    def write_manifest(self, m: Manifest) -> None:
        p = self.file(MANIFEST)
        tmp = p + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, msgspec.json.encode(m) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        fsync_dir(self.path)

    def remove_temporaries(self) -> None:
        for n in os.listdir(self.path):
            if n.endswith(".tmp"):
                os.unlink(self.file(n))

    def checkpoints(self) -> list[tuple[int, str]]:
        """(epoch, path) of every checkpoint file, newest first."""
        out = []
        for n in os.listdir(self.path):
            e = parse_name(n, "ckpt-", ".ckpt")
            if e is not None:
                p = self.file(n)
                out.append((e, os.stat(p).st_mtime_ns, p))
        out.sort(reverse=True)
        return [(e, p) for e, _, p in out]

    def wal_files(self) -> list[_WalInfo]:
        """Every WAL file, by start epoch; an unreadable header is kept as its error."""
        names = sorted((s, n) for n in os.listdir(self.path) if (s := parse_name(n, "wal-", ".wal")) is not None)
        out = []
        for start, n in names:
            p = self.file(n)
            with open(p, "rb") as f:
                head = f.read(64)
            try:
                hdr = WalHeader.unpack(p, head)
                err = None
                if hdr.start != start or hdr.id != int(n[-20:-4], 16):
                    err = CorruptionError(f"WAL file {p}: its header (offset 16) does not match its name")
            except CorruptionError as e:
                hdr, err = None, e
            out.append(_WalInfo(p, start, int(n[-20:-4], 16), hdr if err is None else None, err))
        return out


class _Candidate:
    """One way to rebuild: a checkpoint and the WAL chain after it, all checked."""

    def __init__(self, ck: LoadedCheckpoint, chain: list[WalScan]) -> None:
        self.ck = ck
        self.chain = chain


def _chain(ck_id: int, ck_epoch: int, wal_id: int, wals: list[_WalInfo], path: str) -> list[_WalInfo]:
    """The WAL files that follow a checkpoint, in order, if the chain is complete."""
    by_id = {w.file_id: w for w in wals}
    by_prev: dict[int, list[_WalInfo]] = {}
    for w in wals:
        if w.header is not None:
            by_prev.setdefault(w.header.prev, []).append(w)
    if wal_id:
        cur = by_id.get(wal_id)
        if cur is None:
            raise CorruptionError(f"checkpoint {path}: the WAL file that follows it (id {wal_id:016x}) is missing")
        if cur.error is not None:
            raise cur.error
    else:
        nxt = by_prev.get(ck_id, [])
        cur = nxt[0] if len(nxt) == 1 else None
    chain = []
    while cur is not None:
        chain.append(cur)
        nxt = by_prev.get(cur.header.id, [])
        if len(nxt) > 1:
            raise CorruptionError(f"WAL file {cur.path}: continued by {len(nxt)} files; the history forks")
        cur = nxt[0] if nxt else None
    # Files the chain's first file continues may start at ck_epoch too (a checkpoint
    # taken before any write into them): they hold nothing after the checkpoint.
    inchain = {id(w) for w in chain}
    cur = chain[0] if chain else None
    while cur is not None and cur.header is not None and cur.header.prev in by_id:
        cur = by_id[cur.header.prev]
        if id(cur) in inchain:
            break
        inchain.add(id(cur))
    stray = [w for w in wals if w.start >= ck_epoch and id(w) not in inchain]
    if stray:
        if stray[0].error is not None:
            raise stray[0].error
        raise CorruptionError(
            f"checkpoint {path}: WAL file {stray[0].path} is newer but not in its chain; the "
            f"history after this checkpoint is incomplete"
        )
    return chain


def replay_record(engine: Engine, payload: bytes) -> None:
    """Apply one logged request again. The op succeeded the first time; from the same
    state with the same epoch it does again, or the log diverged (raises)."""
    op = _decode(payload)
    kind = op[0]
    if kind == C.OP_PUT:
        _, _, kb, vb, expiry = op
        engine.put(engine.check_key(kb), engine.check_value(vb), expiry)
    elif kind == C.OP_DELETE:
        if not engine.delete(engine.check_key(op[2])):
            raise CorruptionError("a logged delete found no record")
    elif kind == C.OP_CAS:
        _, _, kb, vb, version, expiry = op
        engine.cas(engine.check_key(kb), engine.check_value(vb), version, expiry)
    elif kind == C.OP_INCR:
        engine.incr(engine.check_key(op[2]), op[3])
    elif kind == C.OP_BATCH:
        engine.batch(op[2])
    elif kind == C.OP_EXPIRE:
        replay_expire(engine, op)
    else:
        raise CorruptionError(f"unknown op {kind!r} in the log")


class DurableJournal:
    """The Journal of a store served with ``path=``: WAL, checkpoints, recovery.

    Coordinator thread only, except that a periodic checkpoint's file is written by a
    helper thread from a private snapshot while the coordinator keeps serving.
    """

    def __init__(self, config: object) -> None:
        self.name = config.name
        self.dir = DataDir(os.fspath(config.path))
        self.sync = config.sync
        self.sync_interval = float(getattr(config, "sync_interval", DEFAULT_SYNC_INTERVAL))
        self.checkpoint_ops = int(getattr(config, "checkpoint_ops", DEFAULT_CHECKPOINT_OPS))
        self.checkpoint_interval = float(getattr(config, "checkpoint_interval", DEFAULT_CHECKPOINT_INTERVAL))
        self.checkpoint_bytes = int(getattr(config, "checkpoint_bytes", DEFAULT_CHECKPOINT_BYTES))
        self.keep = max(1, int(getattr(config, "checkpoint_keep", DEFAULT_CHECKPOINT_KEEP)))
        self._config = config
        self.manifest: Manifest | None = None
        self.seg: Segment | None = None
        self.engine: Engine | None = None
        self.wal: WalWriter | None = None
        self.restored: dict | None = None  # what restore() did, when it rebuilt the segment
        self.report: dict = {}
        self.ops_since = 0
        self.last_ckpt_epoch = -1
        self.last_ckpt_time = time.monotonic()
        self.last_sync = time.monotonic()
        self._bg: threading.Thread | None = None
        self._bg_result: tuple | None = None
        self._opened = False

    # -- start -------------------------------------------------------------------------

    def prepare(self) -> Manifest | None:
        """Open and lock the directory; check its manifest against the parameters.

        Returns:
            The manifest, or None for a new directory.
        """
        cfg = self._config
        self.dir.open_and_lock()
        self.dir.remove_temporaries()
        m = self.dir.read_manifest()
        if m is None:
            if self.dir.checkpoints() or self.dir.wal_files():
                raise CorruptionError(
                    f"data directory {self.dir.path!r} holds checkpoints or WAL files but no "
                    f"{MANIFEST}; it cannot be trusted"
                )
            return None
        if m.name != self.name:
            raise IncompatibleStoreError(
                f"data directory {self.dir.path!r} belongs to store {m.name!r}, not {self.name!r}; "
                f"give each store its own directory"
            )
        want = (cfg.capacity, cfg.key_size, cfg.value_size)
        have = (m.capacity, m.key_size, m.value_size)
        if any(w is not None and w != h for w, h in zip(want, have)):
            raise IncompatibleStoreError(
                f"data directory {self.dir.path!r} holds store {m.name!r} with capacity={have[0]}, "
                f"key_size={have[1]}, value_size={have[2]}; serve it with those sizes (or none)"
            )
        if m.layout_fp != m.layout.fingerprint:
            raise IncompatibleStoreError(
                f"manifest in {self.dir.path!r}: its layout fingerprint is not this shmstore's "
                f"for those sizes (written by another format version?)"
            )
        if cfg.schema_given and cfg.schema_fp != m.schema_fp:
            raise SchemaMismatchError(
                f"data directory {self.dir.path!r} holds values of another value_type (schema "
                f"fingerprint differs); serve it with the value_type it was written with"
            )
        self.manifest = m
        return m

    def restore(self, seg: Segment) -> dict:
        """Rebuild a new, empty segment from the directory (no readers see it yet).

        Raises:
            CorruptionError: no checkpoint with a complete chain could be loaded.
        """
        t0 = time.monotonic()
        m = self.manifest
        report = {"mode": "rebuild", "checkpoint": None, "records": 0, "torn": None, "failed": [], "damaged": []}
        ckpts = self.dir.checkpoints()
        wals = self.dir.wal_files()
        if m is None or (not ckpts and not wals):
            report["mode"] = "new"
            self.restored = report
            return report
        if not ckpts:
            raise CorruptionError(f"data directory {self.dir.path!r} has WAL files but no checkpoint to start from")
        newest = ckpts[0][0]
        scans: dict[str, WalScan | CorruptionError] = {}
        errors: list[str] = []
        for epoch, path in ckpts:
            try:
                try:
                    ck = load_checkpoint(path, m.layout, m.schema_fp)
                except CorruptionError:
                    report["damaged"].append(path)
                    raise
                chain = _chain(ck.id, ck.epoch, ck.wal_id, wals, path)
                scanned = []
                for i, w in enumerate(chain):
                    s = scans.get(w.path)
                    if s is None:
                        try:
                            s = scan_wal(w.path, layout_fp=m.layout_fp, schema_fp=m.schema_fp)
                        except CorruptionError as e:
                            s = e
                        scans[w.path] = s
                    if isinstance(s, CorruptionError):
                        raise s
                    if s.torn and i < len(chain) - 1:
                        raise CorruptionError(
                            f"WAL file {s.path}: damaged at offset {s.end}, and it is not the newest file "
                            f"(it was fsynced in full before its successor was started)"
                        )
                    scanned.append(s)
                end = self._replay(seg, ck, scanned)
                if end < newest and self.sync != "never":
                    raise CorruptionError(
                        f"checkpoint {path}: its WAL chain ends at epoch {end}, before the newest "
                        f"checkpoint's {newest}; recovering from it would lose acknowledged writes"
                    )
            except CorruptionError as e:
                errors.append(e.message)
                report["failed"].append(path)
                _zero(seg)
                continue
            if report["failed"] and end < newest:
                print(f"shmstore coordinator: store {self.name!r}: sync='never' recovery from {path} "
                      f"loses epochs {end + 1}..{newest}", file=sys.stderr)
            for s in scanned:
                # Records replayed now stand under new writes: make them durable first
                # (a tail the dead coordinator wrote but never synced).
                fd = os.open(s.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            report["checkpoint"] = path
            report["records"] = sum(len(s.records) for s in scanned)
            report["last_id"] = scanned[-1].header.id if scanned else ck.id
            report["end"] = end
            if scanned and scanned[-1].torn:
                s = scanned[-1]
                truncate_torn(s.path, s.end)
                report["torn"] = (s.path, s.end, s.size)
                print(f"shmstore coordinator: store {self.name!r}: cut the torn tail of {s.path} at "
                      f"offset {s.end} ({s.size - s.end} bytes never made durable)", file=sys.stderr)
            for bad in report["damaged"]:
                os.replace(bad, bad + ".corrupt")
                print(f"shmstore coordinator: store {self.name!r}: {bad} is damaged, renamed to *.corrupt; "
                      f"recovered from {path}", file=sys.stderr)
            if report["damaged"]:
                fsync_dir(self.dir.path)
            report["seconds"] = time.monotonic() - t0
            print(f"shmstore coordinator: store {self.name!r}: rebuilt {seg.q[L.H_COUNT]} records from "
                  f"{os.path.basename(path)} + {report['records']} WAL records in "
                  f"{report['seconds']:.2f} s", file=sys.stderr)
            self.restored = report
            return report
        raise CorruptionError(
            f"store {self.name!r}: no checkpoint in {self.dir.path!r} could be recovered with a "
            f"complete WAL; nothing was served. " + " | ".join(errors)
        )

    def _replay(self, seg: Segment, ck: LoadedCheckpoint, chain: list[WalScan]) -> int:
        restore_into(seg, ck)
        engine = Engine(seg)
        engine.rebuild_free_list()
        for s in chain:
            if s.header.start > engine.epoch:
                engine.epoch = s.header.start
            for off, eb, payload in s.records:
                if eb < ck.epoch:
                    continue  # already in the checkpoint
                if eb < engine.epoch:
                    raise CorruptionError(
                        f"WAL file {s.path}: record at offset {off} has epoch {eb}, behind the "
                        f"replayed state's {engine.epoch}; the log does not fit the checkpoint"
                    )
                engine.epoch = eb
                try:
                    replay_record(engine, payload)
                except (ShmStoreError, ValueError, TypeError, IndexError, msgspec.DecodeError) as e:
                    raise CorruptionError(
                        f"WAL file {s.path}: replaying the record at offset {off} failed "
                        f"({type(e).__name__}: {e}); the log does not fit the checkpoint"
                    ) from None
        engine.publish()
        return engine.epoch

    def open(self, seg: Segment, engine: Engine) -> None:
        """Called after the server adopted (and repaired) or restored the segment."""
        self.seg = seg
        self.engine = engine
        q = seg.q
        lay = seg.layout
        m = self.manifest
        if m is not None:
            if lay != m.layout or q[L.H_SCHEMA_FP] != m.schema_fp:
                raise IncompatibleStoreError(
                    f"store {self.name!r}: its segment has capacity={lay.capacity}, key_size="
                    f"{lay.key_size}, value_size={lay.value_size} (or another value_type) but data "
                    f"directory {self.dir.path!r} holds capacity={m.capacity}, key_size={m.key_size}, "
                    f"value_size={m.value_size}; destroy the segment to recover from the directory"
                )
        if self.restored is not None and self.restored["mode"] == "rebuild":
            self._open_restored(seg, engine)
        else:
            self._open_adopted(seg, engine)
        self._opened = True

    def _new_manifest(self, seg: Segment) -> None:
        lay = seg.layout
        self.manifest = Manifest(name=self.name, capacity=lay.capacity, key_size=lay.key_size,
                                 value_size=lay.value_size, schema_fp=seg.q[L.H_SCHEMA_FP],
                                 layout_fp=lay.fingerprint, segment_instance=seg.instance)
        self.dir.write_manifest(self.manifest)

    def _open_restored(self, seg: Segment, engine: Engine) -> None:
        r = self.restored
        # Versions the dead coordinator may have shown readers but never made durable
        # must not be handed out again.
        engine.epoch += EPOCH_GAP
        engine.publish()
        seg.q[L.H_LAST_DELETE_EPOCH] = engine.epoch
        self._new_manifest(seg)
        self.last_ckpt_epoch = -1
        self.ops_since = r["records"]
        if self.sync != "never":
            self.wal = self._new_wal(prev=r["last_id"])
        if r["failed"] or r["torn"]:
            self.checkpoint()  # restore redundancy at once

    def _open_adopted(self, seg: Segment, engine: Engine) -> None:
        m = self.manifest
        wals = self.dir.wal_files()
        ckpts = self.dir.checkpoints()
        if m is not None and m.segment_instance != seg.instance and (ckpts or wals):
            raise IncompatibleStoreError(
                f"store {self.name!r}: its segment was not made from data directory "
                f"{self.dir.path!r}, which holds other data. To recover the directory, stop the "
                f"store, shmstore.destroy({self.name!r}) and serve it again with this path; to keep "
                f"the segment, serve it with a new directory"
            )
        end, last_id = self._verified_end(ckpts, wals)
        if end is not None and end > engine.epoch:
            raise IncompatibleStoreError(
                f"store {self.name!r}: data directory {self.dir.path!r} is ahead of the segment "
                f"(epoch {end} > {engine.epoch}); destroy the segment to recover from the directory"
            )
        if m is None or m.segment_instance != seg.instance:
            self._new_manifest(seg)
        if end == engine.epoch:
            # The disk already holds exactly the segment's state: keep the chain going.
            for w in wals:
                if w.file_id == last_id:
                    fd = os.open(w.path, os.O_RDONLY)
                    try:
                        os.fsync(fd)  # a periodic-mode tail the dead coordinator never synced
                    finally:
                        os.close(fd)
            self.last_ckpt_epoch = ckpts[0][0] if ckpts else -1
            if self.sync != "never":
                self.wal = self._new_wal(prev=last_id)
            self.report = {"mode": "adopt", "checkpoint": None}
        else:
            self.checkpoint(base=True)
            self.report = {"mode": "adopt", "checkpoint": self.last_ckpt_epoch}

    def _verified_end(self, ckpts: list, wals: list[_WalInfo]) -> tuple[int | None, int]:
        """The epoch the directory's history reaches, following the newest checkpoint's
        chain with every checksum checked (its slots are not read), or None."""
        if not ckpts:
            return None, 0
        try:
            epoch, path = ckpts[0]
            h = peek_header(path)
            chain = _chain(h.id, h.epoch, h.wal_id, wals, path)
            end, last_id = h.epoch, h.id
            for i, w in enumerate(chain):
                s = scan_wal(w.path, layout_fp=h.layout_fp, schema_fp=h.schema_fp)
                if s.torn:
                    return None, 0
                end = max(end, s.header.start)
                last_id = s.header.id
                if s.records:
                    off, eb, payload = s.records[-1]
                    end = eb + _epochs_of(payload)
            return end, last_id
        except (CorruptionError, OSError, msgspec.DecodeError, IndexError, TypeError):
            return None, 0

    # -- the Journal protocol -------------------------------------------------------

    def append(self, epoch_before: int, payload: bytes) -> None:
        self.ops_since += 1
        w = self.wal
        if w is not None:
            w.add(epoch_before, payload)

    def commit(self) -> None:
        w = self.wal
        if w is None or not w.flush():
            return
        if self.sync == "always":
            w.sync()
        elif self.sync == "periodic":
            now = time.monotonic()
            if now - self.last_sync >= self.sync_interval:
                w.sync()
                self.last_sync = now

    def tick(self) -> None:
        if not self._opened:
            return
        now = time.monotonic()
        w = self.wal
        if w is not None and self.sync == "periodic" and w.synced < w.size and now - self.last_sync >= self.sync_interval:
            w.sync()
            self.last_sync = now
        if self._bg is not None:
            if self._bg.is_alive():
                return
            self._finish_background()
        due = self.ops_since >= self.checkpoint_ops or (
            self.ops_since and now - self.last_ckpt_time >= self.checkpoint_interval)
        if not due and w is not None and w.size >= self.checkpoint_bytes:
            due = True
        if due:
            self._start_checkpoint(background=True)

    def close(self) -> None:
        """Wait for a checkpoint in flight, make the WAL durable, release the directory.

        The server takes the clean-shutdown checkpoint before (:meth:`checkpoint`); this
        also runs after a failure, so it reports problems instead of raising them.
        """
        try:
            if self._bg is not None:
                self._bg.join()
                self._finish_background()
            w = self.wal
            if w is not None:
                self.wal = None
                try:
                    w.flush()
                    w.sync()
                finally:
                    w.close()
        except OSError as e:
            print(f"shmstore coordinator: store {self.name!r}: closing the WAL failed: {e}", file=sys.stderr)
        finally:
            self.dir.unlock()
            self.seg = None
            self.engine = None

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint(self, *, base: bool = False) -> int:
        """Take a checkpoint now and wait until it is durable. Returns its epoch.

        Called between ops: for ``store.checkpoint()``, at a clean shutdown and at start.
        With nothing written since the last checkpoint, it returns that one's epoch.
        """
        if self._bg is not None:
            self._bg.join()
            self._finish_background()
        if not base and self.engine.epoch == self.last_ckpt_epoch:
            return self.last_ckpt_epoch
        self._start_checkpoint(background=False, base=base)
        return self.last_ckpt_epoch

    def _new_wal(self, prev: int) -> WalWriter:
        m = self.manifest
        w = WalWriter.create(self.dir.path, start=self.engine.epoch, prev=prev, layout_fp=m.layout_fp,
                             schema_fp=m.schema_fp)
        self.last_sync = time.monotonic()
        return w

    def _start_checkpoint(self, *, background: bool, base: bool = False) -> None:
        """Snapshot now (consistent: between ops), start the next WAL file, write."""
        epoch = self.engine.epoch
        old = self.wal
        if old is not None:
            old.flush()
            old.sync()  # Invariant: a file is durable in full before its successor exists
        snap = take_snapshot(self.seg, epoch)
        wal_id = 0
        if self.sync != "never":
            self.wal = self._new_wal(prev=0 if base or old is None else old.header.id)
            wal_id = self.wal.header.id
            if old is not None:
                old.close()
        elif old is not None:
            old.close()
            self.wal = None
        ck_id = new_id()
        self.ops_since = 0
        self.last_ckpt_time = time.monotonic()
        args = (snap, ck_id, wal_id, base)
        if background:
            self._bg_result = None
            self._bg = threading.Thread(target=self._write, args=args, name="shmstore-checkpoint", daemon=True)
            self._bg.start()
        else:
            self._write(*args)
            self._bg = None
            self._finish(self._bg_result, background=False)

    def _write(self, snap: object, ck_id: int, wal_id: int, base: bool) -> None:
        try:
            path = write_checkpoint(self.dir.path, snap, ckpt_id=ck_id, wal_id=wal_id)
            self._bg_result = (snap.epoch, path, base, None)
        except OSError as e:
            self._bg_result = (snap.epoch, None, base, e)

    def _finish_background(self) -> None:
        self._bg.join()
        self._bg = None
        self._finish(self._bg_result)

    def _finish(self, result: tuple, *, background: bool = True) -> None:
        epoch, path, base, err = result
        if err is not None:
            # The WAL still holds everything since the last checkpoint: nothing is lost.
            msg = f"store {self.name!r}: checkpoint at epoch {epoch} in {self.dir.path!r} failed: {err}"
            if not background:
                raise DurabilityError(msg) from err
            print(f"shmstore coordinator: {msg}; will retry", file=sys.stderr)
            return
        self.last_ckpt_epoch = epoch
        if self.seg is not None:
            self.seg.q[L.H_LAST_CHECKPOINT_EPOCH] = epoch
        self._retain(base)

    def _retain(self, base: bool) -> None:
        """Delete checkpoints beyond the newest K, and WAL files no kept chain uses."""
        ckpts = self.dir.checkpoints()
        keep, drop = ckpts[: self.keep], ckpts[self.keep :]
        wals = self.dir.wal_files()
        needed: set[str] = set()
        if self.wal is not None:
            needed.add(self.wal.path)
        for i, (_, path) in enumerate(keep):
            try:
                h = peek_header(path)
                chain = _chain(h.id, h.epoch, h.wal_id, wals, path)
            except CorruptionError:
                continue
            if base and i > 0:
                continue  # a base checkpoint starts a new history: older chains are moot
            needed.update(w.path for w in chain)
        for _, path in drop:
            os.unlink(path)
        for w in wals:
            if w.path not in needed:
                os.unlink(w.path)


def _epochs_of(payload: bytes) -> int:
    op = _decode(payload)
    return len(op[2]) if op[0] in (C.OP_BATCH, C.OP_EXPIRE) else 1


def _zero(seg: Segment) -> None:
    """Undo a failed restore attempt: the segment back to all-zero slots and index."""
    lay = seg.layout
    arr = np.ndarray((lay.size - L.SLOTS_OFFSET,), dtype=np.uint8, buffer=seg.mm, offset=L.SLOTS_OFFSET)
    arr[:] = 0
    del arr
    q = seg.q
    for w in (L.H_EPOCH, L.H_COUNT, L.H_LAST_DELETE_EPOCH, L.H_INDEX_GEN, L.H_BATCH_SEQ, L.H_LAST_CHECKPOINT_EPOCH):
        q[w] = 0
