"""Data-directory tools that run without a coordinator: :func:`check` and :func:`restore`.

(``store.backup()`` makes backups through the coordinator; see ``Store.backup``.) The
work is done by ``shmstore.coordinator._check`` and ``_backup``, imported when called;
the report's types are in ``_checkreport``.
"""

from __future__ import annotations

import os

from ._checkreport import CheckProblem, CheckReport

__all__ = ["CheckProblem", "CheckReport", "check", "restore"]


def check(name: str | None = None, path: str | os.PathLike | None = None, *,
          key_file: str | os.PathLike | None = None) -> CheckReport:
    """Verify a data directory and/or the live segment of a store. Read-only.

    Data directory (``path``): the manifest; every checkpoint in full (every chunk
    checksum, and its records against the store's layout); every WAL record's
    checksum; that the WAL chain after the newest good checkpoint is complete. An
    encrypted directory needs its key for the contents (``key_file``, or
    ``$SHMSTORE_KEY_FILE`` / ``$SHMSTORE_KEY``); without it only the stored bytes'
    checksums are verified, and a note says so.

    Segment (``name``): every index bucket points to a live, even-stamped slot whose
    key hashes to that bucket and is reachable from the key's home bucket; no two
    buckets share a slot; the header's record count equals the buckets; no slot is
    left odd; free flags agree with the index. On a store being written, it copies a
    stable view first (retrying while writes land).

    Args:
        name: a store whose segment to check.
        path: a data directory (or backup) to check.
        key_file: the encryption key's file, for an encrypted directory.

    Returns:
        A :class:`CheckReport`; ``report.ok`` is False if anything is wrong, and each
        problem names the file and offset (or the segment bucket / slot).

    Raises:
        StoreNotFoundError: ``name`` has no segment.
        ValueError: neither ``name`` nor ``path`` was given.
        EncryptionKeyError: a key was given and it is not the directory's.
    """
    if name is None and path is None:
        raise ValueError("check() needs name= (a live segment), path= (a data directory), or both")
    from shmstore.coordinator._check import check_path, check_segment  # noqa: PLC0415

    report = CheckReport()
    if path is not None:
        report = check_path(os.path.abspath(os.fspath(path)), key_file=key_file, report=report)
    if name is not None:
        check_segment(name, report)
    return report


def restore(src: str | os.PathLike, dest: str | os.PathLike, *, name: str | None = None,
            key_file: str | os.PathLike | None = None) -> int:
    """Copy a backup (or the data directory of a stopped store) into a new data directory.

    Every file of ``src`` is verified first (as :func:`check` does); then the files
    are copied into a temporary directory next to ``dest`` (mode 0700, files 0600),
    fsynced, and renamed to ``dest``, so ``dest`` never holds half a copy. Serve it with
    ``shmstore.serve(name, path=dest)`` once no segment of that name exists
    (``shmstore.destroy(name)`` first): the copy is bound to no segment, and serving it
    next to a live one is refused rather than mixed.

    Args:
        src: a directory written by ``store.backup()``, or a stopped store's data directory.
        dest: a new or empty directory.
        name: serve the copy under this store name (default: the source's).
        key_file: the key of an encrypted source (or ``$SHMSTORE_KEY_FILE`` / ``$SHMSTORE_KEY``).

    Returns:
        The epoch of the newest checkpoint in the copy.

    Raises:
        StorageError: ``dest`` is not a new or empty directory, or cannot be written.
        CorruptionError: ``src`` fails its check (nothing is written).
        CoordinatorRunningError: ``src`` is in use by a running coordinator.
        EncryptionKeyError: ``src`` is encrypted and the key is missing or wrong.
    """
    from shmstore.coordinator._backup import restore_dir  # noqa: PLC0415

    return restore_dir(os.fspath(src), os.fspath(dest), name=name,
                       key_file=None if key_file is None else os.fspath(key_file))
