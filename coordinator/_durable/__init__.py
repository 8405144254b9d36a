"""Durability: the data directory of a store served with ``path=``.

One module per role, as gunicorn groups its dirty arbiter's in ``gunicorn/dirty/``:

=================  ===================================================================
``_journal``       :class:`DurableJournal`, the server's journal (``.._journal``) for a
                   durable store: WAL, checkpoints, the order of recovery at start
``_wal``           the write-ahead log's file format, writer and scanner
``_checkpoint``    checkpoint files: a consistent copy of the segment's records
``_datadir``       the directory's files: listing, manifest, lock, WAL chains, replay
``_rebuild``       rebuilding a new segment from a checkpoint and its WAL chain
``_atrest``        compression and encryption of the files (the codec, the key)
``_backup``        ``store.backup()`` (in the coordinator) and ``shmstore.restore()``
``_check``         ``shmstore.check()``: verify a directory and a live segment
``_formats``       the refusal of files of an older format, with the way to migrate
=================  ===================================================================

The loop imports only :class:`DurableJournal`, and only when a store is served with a
data directory. The library reaches ``_check`` and ``_backup`` through the doors
``shmstore.coordinator._check`` and ``shmstore.coordinator._backup``, when called.
"""

from ._datadir import Manifest
from ._journal import EPOCH_GAP, DurableJournal

__all__ = ["EPOCH_GAP", "DurableJournal", "Manifest"]
