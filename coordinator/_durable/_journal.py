"""The durable journal: WAL + checkpoints in a data directory, and recovery from them.

Design
------
The directory's files and how WAL files chain to checkpoints are described in
``_datadir``; the rebuild from them in ``_rebuild``.

Recovery at coordinator start (the server calls, in order):

1. :meth:`DurableJournal.prepare`, before the segment: create or lock the directory,
   compare its manifest with the parameters given (IncompatibleStoreError).
2. If no segment exists (a reboot, or ``shmstore.destroy``): the server creates one and
   calls :meth:`DurableJournal.restore`: the newest checkpoint that loads and whose chain
   is complete, plus replay of the chain's records through the Engine, which reproduces
   every epoch and version (ops are deterministic; each record carries the epoch before
   its op). A damaged checkpoint falls back to the previous checkpoint if that one's
   chain passes through every WAL file the damaged one names; a missing link (a
   checkpoint's WAL file, or a file a later one continues, is gone) is a
   :class:`CorruptionError` naming the missing file at once, never a shorter history
   (see ``_datadir``). If no checkpoint works, :class:`CorruptionError` names every file and offset that
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

import errno
import os
import sys
import threading
import time

import msgspec

from shmstore import _layout as L
from shmstore._errors import (
    CorruptionError,
    DurabilityUnavailableError,
    EncryptionKeyError,
    IncompatibleStoreError,
    SchemaMismatchError,
    ShmStoreError,
    StorageError,
)
from shmstore._segment import Segment

from ._atrest import KEY_ENV, KEY_FILE_ENV, Codec, flags_for, key_check, load_key, verify_key
from ._checkpoint import ckpt_name, peek_header, take_snapshot, write_checkpoint
from ._datadir import MANIFEST, DataDir, Manifest, wal_chain
from .._config import ServerConfig
from .._engine import Engine
from .._metrics import DurabilityMetrics
from ._rebuild import rebuild, verified_end
from ._tablefile import table_images, tables_path, write_tables_file
from ._wal import WalWriter, new_id

#: Epochs skipped after a rebuild from disk: more than any number of ops a coordinator
#: can have applied and shown to readers without making them durable.
EPOCH_GAP = 1 << 40

CKPT_RETRY_MIN = 0.1  # seconds before a failed periodic checkpoint is tried again ...
CKPT_RETRY_MAX = 30.0  # ... doubling up to this


def _oserror(e: OSError) -> str:
    """An OSError in a log line: its errno and the file's base name (not the path)."""
    name = os.path.basename(e.filename) if getattr(e, "filename", None) else ""
    return f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror or e}" + (f": {name}" if name else "")


class DurableJournal:
    """The Journal of a store served with ``path=``: WAL, checkpoints, recovery.

    Coordinator thread only, except that a periodic checkpoint's file is written by a
    helper thread from a private snapshot while the coordinator keeps serving.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.name = config.name
        self.dir = DataDir(os.fspath(config.path))
        self.sync = config.sync
        # validated by the settings table (coordinator/_config.py), defaults included
        self.sync_interval = config.sync_interval
        self.checkpoint_ops = config.checkpoint_ops
        self.checkpoint_interval = config.checkpoint_interval
        self.checkpoint_bytes = config.checkpoint_bytes
        self.keep = config.checkpoint_keep
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
        self.metrics = DurabilityMetrics()
        #: why the WAL cannot be written right now (None: it can)
        self.failed: str | None = None
        self.compression = self.encryption = "none"
        self.key: bytes | None = None
        self.codec: Codec | None = None
        #: a failing periodic checkpoint backs off: the current delay, the next attempt
        self.ckpt_delay = 0.0
        self.ckpt_retry_at = 0.0

    # -- start -------------------------------------------------------------------------

    def prepare(self) -> Manifest | None:
        """Open and lock the directory; check its manifest against the parameters.

        Returns:
            The manifest, or None for a new directory.

        Raises:
            StorageError: the directory cannot be created, locked or written
                (read-only file system, permissions, disk full).
        """
        return self._io("open", self._prepare)

    def _io(self, what: str, fn, *args: object) -> object:
        """Run a start-up step; an OSError becomes a StorageError naming the directory."""
        try:
            return fn(*args)
        except OSError as e:
            if isinstance(e, ShmStoreError):
                raise
            hint = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
                    errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(e.errno, e.strerror)
            raise StorageError(
                f"store {self.name!r}: cannot {what} data directory {self.dir.path!r}: {hint} "
                f"({e.filename or e}). A durable store needs a writable directory"
            ) from None

    def _prepare(self) -> Manifest | None:
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
            self._setup_codec(None)
            return None
        if m.name != self.name:
            raise IncompatibleStoreError(
                f"data directory {self.dir.path!r} belongs to store {m.name!r}, not {self.name!r}; "
                f"give each store its own directory"
            )
        fields = ("capacity", "key_size", "value_size", "memory", "growth")
        want = tuple(getattr(cfg, f, None) for f in fields)
        have = (m.capacity, m.key_size, m.value_size, m.memory, m.growth)
        if any(w is not None and w != h for w, h in zip(want, have)):
            sizes = ", ".join(f"{f}={h}" for f, h in zip(fields, have))
            raise IncompatibleStoreError(
                f"data directory {self.dir.path!r} holds store {m.name!r} with {sizes}; serve it "
                f"with those sizes (or none)"
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
        self._setup_codec(m)
        return m

    def _setup_codec(self, m: Manifest | None) -> None:
        """Settle compression and encryption: the config's, else the directory's."""
        cfg = self._config
        comp = getattr(cfg, "compression", None) or (m.compression if m else "none")
        have = m.encryption if m else "none"
        enc = getattr(cfg, "encryption", None) or have
        where = f"data directory {self.dir.path!r}"
        if m is not None and enc != have and (self.dir.checkpoints() or self.dir.wal_files()):
            raise IncompatibleStoreError(
                f"{where} is {'encrypted (' + have + ')' if have != 'none' else 'not encrypted'}; it "
                f"cannot be served with encryption={enc!r}. Serve it as it is, or back it up and "
                f"restore the backup into a new directory"
            )
        key = None
        if enc != "none":
            key = load_key(getattr(cfg, "key_file", None))
            if key is None:
                raise EncryptionKeyError(
                    f"{where} is encrypted (AES-256-GCM) and no key was given: set ${KEY_ENV} or "
                    f"${KEY_FILE_ENV}, or pass key_file="
                )
            if m is not None and m.key_check:
                verify_key(key, m.key_check, where)
        self.compression, self.encryption, self.key = comp, enc, key
        flags = flags_for(comp, enc)
        self.codec = Codec(flags, key) if flags else None
        if m is not None and (m.compression, m.encryption) != (comp, enc):
            m = msgspec.structs.replace(m, compression=comp, encryption=enc,
                                        key_check=key_check(key) if key else "")
            self.dir.write_manifest(m)
            self.manifest = m

    def restore(self, seg: Segment) -> dict:
        """Rebuild a new, empty segment from the directory (no readers see it yet).

        Raises:
            CorruptionError: no checkpoint with a complete chain could be loaded.
            StorageError: the directory cannot be written.
        """
        self.restored = self._io("recover from", rebuild, seg, self.dir, self.manifest, self.key, self.sync)
        return self.restored

    def open(self, seg: Segment, engine: Engine) -> None:
        """Called after the server adopted (and repaired) or restored the segment.

        Raises:
            StorageError: the directory cannot be written.
        """
        self._io("write", self._open, seg, engine)

    def _open(self, seg: Segment, engine: Engine) -> None:
        self.metrics.bind(seg.q)
        self.seg = seg
        self.engine = engine
        q = seg.q
        lay = seg.layout
        m = self.manifest
        if m is not None:
            if lay != m.layout or q[L.H_SCHEMA_FP] != m.schema_fp:
                raise IncompatibleStoreError(
                    f"store {self.name!r}: its segment has capacity={lay.capacity}, key_size="
                    f"{lay.key_size}, value_size={lay.value_size}, memory={lay.memory}, growth="
                    f"{lay.growth} (or another value_type) but data directory {self.dir.path!r} holds "
                    f"capacity={m.capacity}, key_size={m.key_size}, value_size={m.value_size}, memory="
                    f"{m.memory}, growth={m.growth}; destroy the segment to recover from the directory"
                )
        if self.restored is not None and self.restored["mode"] == "rebuild":
            self._open_restored(seg, engine)
        else:
            self._open_adopted(seg, engine)
        self._opened = True

    def _new_manifest(self, seg: Segment) -> None:
        lay = seg.layout
        old = self.manifest
        check = old.key_check if old is not None and old.encryption == self.encryption else ""
        self.manifest = Manifest.of(self.name, lay, seg.q[L.H_SCHEMA_FP], segment_instance=seg.instance,
                                    compression=self.compression, encryption=self.encryption,
                                    key_check=check or (key_check(self.key) if self.key else ""))
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
        end, last_id = verified_end(ckpts, wals, self.key)
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

    # -- the Journal protocol -------------------------------------------------------

    def append(self, epoch_before: int, payload: bytes) -> None:
        self.ops_since += 1
        w = self.wal
        if w is not None:
            w.add(epoch_before, payload)

    def check_writable(self) -> None:
        """Refuse a write while the disk cannot take the WAL (before it is applied).

        Raises:
            StorageError: a WAL write or fsync failed and has not succeeded since.
        """
        if self.failed is not None:
            raise StorageError(
                f"store {self.name!r} refuses writes: its data directory {self.dir.path!r} cannot "
                f"be written ({self.failed}). Nothing was applied. Free space or make the file "
                f"system writable; writes resume by themselves within 0.1 s"
            )

    def _disk_failed(self, e: OSError) -> None:
        first = self.failed is None
        self.failed = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror or e}"
        if first:
            print(f"shmstore coordinator: store {self.name!r}: writing the WAL in {self.dir.path!r} "
                  f"failed ({self.failed}); refusing writes until it succeeds", file=sys.stderr)

    def commit(self) -> None:
        """Write (and per the sync mode fsync) the group appended since the last call.

        Raises:
            StorageError: the write or fsync failed (disk full, read-only file system,
                I/O error). The group stays pending in memory and is written again at
                every tick until it succeeds; until then :meth:`check_writable` refuses
                new writes.
        """
        w = self.wal
        if w is None:
            return
        try:
            wrote = w.flush()
            if self.sync == "always" or (self.failed is not None and self.sync == "periodic"):
                w.sync()
            elif self.sync == "periodic" and wrote:
                now = time.monotonic()
                if now - self.last_sync >= self.sync_interval:
                    w.sync()
                    self.last_sync = now
        except OSError as e:
            self._disk_failed(e)
            raise StorageError(
                f"store {self.name!r}: this write was NOT acknowledged: the WAL in {self.dir.path!r} "
                f"could not be written ({self.failed}). It is applied in memory (readers may see "
                f"it) and is made durable once the disk takes writes again; the store refuses "
                f"writes until then"
            ) from None
        if self.failed is not None:
            print(f"shmstore coordinator: store {self.name!r}: the WAL is writable again; "
                  f"accepting writes", file=sys.stderr)
            self.failed = None

    def tick(self) -> None:
        if not self._opened:
            return
        now = time.monotonic()
        w = self.wal
        if self.failed is not None:
            try:
                self.commit()  # retry the group the disk refused
            except StorageError:
                return
        if w is not None and self.sync == "periodic" and w.synced < w.size and now - self.last_sync >= self.sync_interval:
            try:
                w.sync()
            except OSError as e:
                self._disk_failed(e)
                return
            self.last_sync = now
        if self._bg is not None:
            if self._bg.is_alive():
                return
            self._finish_background()
        due = self.ops_since >= self.checkpoint_ops or (
            self.ops_since and now - self.last_ckpt_time >= self.checkpoint_interval)
        if not due and w is not None and w.size >= self.checkpoint_bytes:
            due = True
        if due and now >= self.ckpt_retry_at:
            try:
                self._start_checkpoint(background=True)
            except OSError as e:
                # The WAL still holds everything: nothing is lost; try again later.
                self._checkpoint_failed(f"starting a checkpoint failed ({_oserror(e)})")

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
        self.check_writable()
        try:
            self._start_checkpoint(background=False, base=base)
        except OSError as e:
            raise StorageError(
                f"store {self.name!r}: a checkpoint in {self.dir.path!r} could not be written "
                f"({e.strerror or e}); the WAL still holds everything"
            ) from None
        return self.last_ckpt_epoch

    def _new_wal(self, prev: int) -> WalWriter:
        m = self.manifest
        w = WalWriter.create(self.dir.path, start=self.engine.epoch, prev=prev, layout_fp=m.layout_fp,
                             schema_fp=m.schema_fp, metrics=self.metrics, codec=self.codec)
        self.last_sync = time.monotonic()
        return w

    def _start_checkpoint(self, *, background: bool, base: bool = False) -> None:
        """Snapshot now (consistent: between ops), start the next WAL file, write."""
        epoch = self.engine.epoch
        old = self.wal
        if old is not None:
            old.flush()
            old.sync()  # Invariant: a file is durable in full before its successor exists
        wal_id = 0
        if self.sync != "never":
            # The next WAL file first: if the disk cannot take a new file, nothing was
            # copied (the snapshot is a copy of the whole slot region).
            self.wal = self._new_wal(prev=0 if base or old is None else old.header.id)
            wal_id = self.wal.header.id
            if old is not None:
                old.close()
        elif old is not None:
            old.close()
            self.wal = None
        snap = take_snapshot(self.seg, epoch)
        ck_id = new_id()
        self.ops_since = 0
        self.last_ckpt_time = time.monotonic()
        args = (snap, ck_id, wal_id, base, table_images(self.engine))
        if background:
            self._bg_result = None
            self._bg = threading.Thread(target=self._write, args=args, name="shmstore-checkpoint", daemon=True)
            self._bg.start()
        else:
            self._write(*args)
            self._bg = None
            self._finish(self._bg_result, background=False)

    def _write(self, snap: object, ck_id: int, wal_id: int, base: bool, tables: list | None = None) -> None:
        # Runs in the helper thread: it touches no header word (see ``.._metrics``).
        lat: list[int] = []
        t0 = time.perf_counter_ns()
        try:
            if tables:  # written before the checkpoint it belongs to (``_tablefile``)
                write_tables_file(tables_path(os.path.join(self.dir.path, ckpt_name(snap.epoch, ck_id))),
                                  tables, self.codec)
            path = write_checkpoint(self.dir.path, snap, ckpt_id=ck_id, wal_id=wal_id, fsync_ns=lat,
                                    codec=self.codec)
            self._bg_result = (snap.epoch, path, base, None, time.perf_counter_ns() - t0, lat)
        except OSError as e:
            self._bg_result = (snap.epoch, None, base, e, 0, lat)

    def _finish_background(self) -> None:
        self._bg.join()
        self._bg = None
        self._finish(self._bg_result)

    def _finish(self, result: tuple, *, background: bool = True) -> None:
        epoch, path, base, err, ns, lat = result
        self.metrics.fsyncs(lat)
        if err is not None:
            # The WAL still holds everything since the last checkpoint: nothing is lost.
            msg = f"store {self.name!r}: checkpoint at epoch {epoch} in {self.dir.path!r} failed: {err}"
            if not background:
                raise DurabilityUnavailableError(msg) from err
            self._checkpoint_failed(f"checkpoint at epoch {epoch} failed ({_oserror(err)})")
            return
        self.ckpt_delay = 0.0
        self.ckpt_retry_at = 0.0
        self.last_ckpt_epoch = epoch
        self.metrics.checkpoint_done(ns, [])
        if self.seg is not None:
            self.seg.q[L.H_LAST_CHECKPOINT_EPOCH] = epoch
        self._retain(base)

    def _checkpoint_failed(self, what: str) -> None:
        """Schedule the next attempt of a failed periodic checkpoint, backing off.

        The delay doubles from ``CKPT_RETRY_MIN`` to ``CKPT_RETRY_MAX`` (0.1 s -> 30 s)
        and is reset by a checkpoint that succeeds: a disk that stays full costs one
        snapshot of the segment and one log line per step, not one per 0.1 s tick. The
        WAL still holds everything, so nothing is lost meanwhile.
        """
        self.ckpt_delay = min(CKPT_RETRY_MAX, max(CKPT_RETRY_MIN, self.ckpt_delay * 2))
        self.ckpt_retry_at = time.monotonic() + self.ckpt_delay
        self.last_ckpt_time = time.monotonic()
        print(f"shmstore coordinator: store {self.name!r}: {what} in its data directory; the WAL "
              f"still holds everything; next attempt in {self.ckpt_delay:g} s", file=sys.stderr)

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
                chain = wal_chain(h.id, h.epoch, h.wal_id, wals, path)
            except CorruptionError:
                continue
            if base and i > 0:
                continue  # a base checkpoint starts a new history: older chains are moot
            needed.update(w.path for w in chain)
        for _, path in drop:
            os.unlink(path)
            if os.path.exists(tables_path(path)):
                os.unlink(tables_path(path))
        for w in wals:
            if w.path not in needed:
                os.unlink(w.path)
