"""Backups (``store.backup(dest)``) and restores (``shmstore.restore(src, dest)``).

Design
------
A backup is a complete data directory holding a manifest and ONE checkpoint (no
WAL): ``serve(name, path=dest)`` recovers it directly when no segment of that name
exists. It is made in three steps so writes are stalled only for the copy:

1. The coordinator, between two ops (``OP_BACKUP`` in ``Applier.apply``),
   checks ``dest``, creates the temporary directory ``.<dest name>.tmp-<random>`` next
   to it (mode 0700), and copies the live records out of the segment
   (:func:`take_snapshot`, the same copy a checkpoint takes). That copy is consistent:
   it is the state at one epoch.
2. A helper thread writes the checkpoint and the manifest into the temporary
   directory (files 0600, each fsynced, the directory fsynced), then renames it to
   ``dest`` and fsyncs the parent. Until that rename nothing under ``dest`` looks like
   a backup; a failure removes the temporary directory.
3. The coordinator keeps serving other clients meanwhile; the client that asked waits
   (its reply is *deferred*, ``_replies.Deferred``) and gets the backup's epoch once the
   files are durable, or the error.

The backup's manifest names no segment (``segment_instance = 0``): serving it next to
a live segment of the same store is refused (destroy the segment first), so a backup is
never silently mixed with newer state. Its files are stored as the store's own
(compressed / encrypted with the same key); a memory-only store's backup is plain.

A restore checks every file of the source (as ``shmstore.check`` does), then copies
it the same way: into a temporary directory, fsynced, renamed to ``dest``.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading

import msgspec

from shmstore import _layout as L
from shmstore._errors import (
    CoordinatorRunningError,
    CorruptionError,
    EncryptionKeyError,
    IncompatibleStoreError,
    StorageError,
)
from shmstore._segment import Segment

from ._atrest import KEY_ENV, KEY_FILE_ENV, load_key
from ._checkpoint import take_snapshot, write_checkpoint
from ._datadir import LOCK, MANIFEST, DataDir, Manifest
from .._engine import Engine
from .._journal import Journal
from .._replies import Deferred
from ._tablefile import table_images, tables_path, write_tables_file
from ._wal import fsync_dir, new_id, parse_name



def check_dest(dest: str) -> None:
    """Refuse a destination that is not a new or empty directory.

    Raises:
        StorageError: ``dest`` is a file, or a directory that holds anything.
    """
    if not os.path.isabs(dest):
        raise StorageError(f"backup destination {dest!r} must be an absolute path")
    try:
        entries = os.listdir(dest)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise StorageError(f"destination {dest!r} exists and is not a directory; give a new or empty directory") from None
    except OSError as e:
        raise StorageError(f"destination {dest!r} cannot be read: {e.strerror}") from None
    if entries:
        raise StorageError(
            f"destination {dest!r} is not empty ({len(entries)} entries); give a new or empty "
            f"directory - nothing was written"
        )


def make_temp_dir(dest: str) -> str:
    """The temporary directory next to ``dest`` (parents created, mode 0700)."""
    parent = os.path.dirname(dest.rstrip("/")) or "/"
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(dest.rstrip('/'))}.tmp-{os.urandom(4).hex()}")
        os.mkdir(tmp, 0o700)
        os.chmod(tmp, 0o700)  # whatever the umask
    except OSError as e:
        raise StorageError(f"cannot write a backup next to {dest!r}: {e.strerror or e}") from None
    return tmp


def publish_dir(tmp: str, dest: str) -> None:
    """Rename the finished temporary directory to ``dest`` (a missing or empty
    directory), durably."""
    fsync_dir(tmp)
    try:
        os.rename(tmp, dest)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise StorageError(f"destination {dest!r} was filled meanwhile; nothing was written there") from None
        raise
    fsync_dir(os.path.dirname(dest.rstrip("/")) or "/")


def remove_quietly(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def start_backup(op: list, seg: Segment, engine: Engine, journal: Journal) -> Deferred:
    """``OP_BACKUP``: copy the segment now (coordinator thread); write it in a thread.

    Args:
        op: the request, ``[OP_BACKUP, wait, dest]``.
        seg: the store's segment.
        engine: its writer (the epoch, the tables).
        journal: the server's journal; a durable store's backup is stored as its own
            files are (compressed / encrypted with the same key), a memory-only
            store's plain.

    Raises:
        StorageError: ``dest`` is not a new or empty directory, or cannot be written.
    """
    dest = op[2]
    if not isinstance(dest, str):
        raise StorageError("backup needs a destination path (str)")
    check_dest(dest)
    codec = getattr(journal, "codec", None)
    old = getattr(journal, "manifest", None)
    lay = seg.layout
    manifest = Manifest.of(
        seg.name, lay, seg.q[L.H_SCHEMA_FP], segment_instance=0,
        compression=getattr(journal, "compression", "none"), encryption=getattr(journal, "encryption", "none"),
        key_check=old.key_check if old is not None and getattr(journal, "key", None) else "",
    )
    tmp = make_temp_dir(dest)
    try:
        snap = take_snapshot(seg, engine.epoch)
        tables = table_images(engine)
    except BaseException:
        remove_quietly(tmp)
        raise
    d = Deferred()

    def write() -> None:
        try:
            ck_path = write_checkpoint(tmp, snap, ckpt_id=new_id(), wal_id=0, codec=codec)
            if tables:  # the store's numpy tables go along (``_tablefile``)
                write_tables_file(tables_path(ck_path), tables, codec)
            DataDir(tmp).write_manifest(manifest)
            publish_dir(tmp, dest)
            d.result = snap.epoch
        except StorageError as e:
            d.error = e
        except OSError as e:
            d.error = StorageError(f"backup to {dest!r} failed: {e.strerror or e}; nothing was left there")
        finally:
            if d.result is None:
                remove_quietly(tmp)

    d.thread = threading.Thread(target=write, name="shmstore-backup", daemon=True)
    d.thread.start()
    return d


def restore_dir(src: str, dest: str, *, name: str | None = None, key_file: str | None = None) -> int:
    """Check the data directory or backup ``src`` and copy it into the new ``dest``.

    Returns:
        The epoch of the newest checkpoint in the copy.
    """
    from ._check import check_path  # noqa: PLC0415

    src = os.path.abspath(src)
    dest = os.path.abspath(dest)
    check_dest(dest)
    if not os.path.isdir(src):
        raise StorageError(f"restore source {src!r} is not a directory")
    lock = os.path.join(src, LOCK)
    if os.path.exists(lock):
        import fcntl  # noqa: PLC0415

        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CoordinatorRunningError(
                f"{src!r} is the data directory of a running coordinator; copy it with "
                f"store.backup() (or `shmstore backup`) instead"
            ) from None
        finally:
            os.close(fd)
    try:
        m = DataDir(src).read_manifest()
    except (CorruptionError, IncompatibleStoreError):
        m = None  # the check below names the problem
    if m is not None and m.encryption != "none" and load_key(key_file) is None:
        raise EncryptionKeyError(
            f"{src!r} is encrypted: restoring it checks every record, which needs its key "
            f"(key_file=, ${KEY_FILE_ENV} or ${KEY_ENV})"
        )
    report = check_path(src, key_file=key_file)
    if report.problems:
        raise CorruptionError(
            f"{src!r} fails its check, so it was not restored: "
            + "; ".join(str(p) for p in report.problems[:5])
        )
    if report.newest_checkpoint is None:
        raise CorruptionError(f"{src!r} holds no checkpoint; it is not a backup or data directory")
    names = [n for n in os.listdir(src)
             if n == MANIFEST or parse_name(n, "ckpt-", ".ckpt") is not None or parse_name(n, "wal-", ".wal") is not None
             or (n.endswith(".tables") and parse_name(n[: -len(".tables")] + ".ckpt", "ckpt-", ".ckpt") is not None)]
    tmp = make_temp_dir(dest)
    try:
        for n in names:
            _copy_file(os.path.join(src, n), os.path.join(tmp, n))
        # The copy follows no segment: serving it next to a live one is refused.
        d = DataDir(tmp)
        m = d.read_manifest()
        d.write_manifest(msgspec.structs.replace(m, name=L.check_name(name or m.name), segment_instance=0))
        publish_dir(tmp, dest)
    except OSError as e:
        remove_quietly(tmp)
        raise StorageError(f"restore into {dest!r} failed: {e.strerror or e}; nothing was left there") from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return report.newest_checkpoint


def _copy_file(src: str, dst: str) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(src, "rb") as f:
            while True:
                buf = f.read(1 << 22)
                if not buf:
                    break
                mv = memoryview(buf)
                while mv:
                    mv = mv[os.write(fd, mv):]
        os.fsync(fd)
    finally:
        os.close(fd)
