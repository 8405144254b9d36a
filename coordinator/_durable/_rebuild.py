"""Rebuilding a segment from a data directory: the newest checkpoint whose WAL chain
is complete, plus replay of that chain (see ``_journal`` for the order of recovery).

:func:`rebuild` is given what it reads (the directory, its manifest, the key, the sync
mode) and returns its report; the :class:`DurableJournal` keeps the report.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import msgspec

from shmstore import _layout as L
from shmstore._errors import CorruptionError, ShmStoreError
from shmstore._segment import Segment

from ._checkpoint import LoadedCheckpoint, load_checkpoint, peek_header, restore_into
from ._tablefile import restore_tables
from ._datadir import DataDir, Manifest, WalInfo, missing_link, wal_chain, zero_segment
from .. import _ops as O
from .._engine import Engine
from .._expiry import replay_expire
from .._table import replay as table_replay
from ._wal import WalScan, fsync_dir, scan_wal, truncate_torn


def rebuild(seg: Segment, data_dir: DataDir, manifest: Manifest | None, key: bytes | None, sync: str) -> dict:
    """Rebuild the new, empty ``seg`` from ``data_dir`` (see ``DurableJournal.restore``).

    Args:
        seg: the segment just created, not yet readable.
        data_dir: the store's data directory, locked.
        manifest: its manifest (None: a new directory, nothing to rebuild).
        key: the encryption key, if the directory is encrypted.
        sync: the sync mode ("never" may recover from an older checkpoint, losing epochs).

    Returns:
        The report: ``mode`` ("new" or "rebuild"), the checkpoint used, the records
        replayed, a torn tail cut, the checkpoints that failed or were damaged.

    The cyclic garbage collector is paused meanwhile: replay makes no reference cycles,
    and with a million scanned records alive its passes cost a third of the replay
    (measured by ``scripts/durability_bench.py``).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _rebuild(seg, data_dir, manifest, key, sync)
    finally:
        if enabled:
            gc.enable()


def _rebuild(seg: Segment, data_dir: DataDir, m: Manifest | None, key: bytes | None, sync: str) -> dict:
    t0 = time.monotonic()
    report = {"mode": "rebuild", "checkpoint": None, "records": 0, "torn": None, "failed": [], "damaged": []}
    ckpts = data_dir.checkpoints()
    wals = data_dir.wal_files()
    if m is None or (not ckpts and not wals):
        report["mode"] = "new"
        return report
    name = m.name  # the store's: prepare() refused a directory of another store
    if not ckpts:
        raise CorruptionError(f"data directory {data_dir.path!r} has WAL files but no checkpoint to start from")
    newest = ckpts[0][0]
    scans: dict[str, WalScan | CorruptionError] = {}
    errors: list[str] = []
    # WAL files named by newer checkpoints that failed: a fallback's chain must pass
    # through each, or it would recover a shorter history (see ``_datadir``).
    required: dict[int, str] = {}
    for epoch, path in ckpts:
        try:
            head = peek_header(path)
        except (CorruptionError, OSError):
            head = None  # a damaged header: load_checkpoint below says where
        if head is not None:
            gone = missing_link(path, head.wal_id, head.epoch, wals)
            if gone is not None:
                raise gone  # no fallback can recover what that file held
        try:
            try:
                ck = load_checkpoint(path, m.layout, m.schema_fp, key=key)
            except CorruptionError:
                report["damaged"].append(path)
                raise
            chain = wal_chain(ck.id, ck.epoch, ck.wal_id, wals, path)
            ids = {w.file_id for w in chain}
            for wal_id, newer in required.items():
                if wal_id not in ids:
                    raise CorruptionError(
                        f"checkpoint {path}: its WAL chain does not pass through the file (id "
                        f"{wal_id:016x}) that the newer checkpoint {newer} names; recovering from it "
                        f"would lose what that file holds"
                    )
            scanned = []
            for i, w in enumerate(chain):
                s = scans.get(w.path)
                if s is None:
                    try:
                        s = scan_wal(w.path, layout_fp=m.layout_fp, schema_fp=m.schema_fp, key=key)
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
            end = replay(seg, ck, scanned, key)
            if end < newest and sync != "never":
                raise CorruptionError(
                    f"checkpoint {path}: its WAL chain ends at epoch {end}, before the newest "
                    f"checkpoint's {newest}; recovering from it would lose acknowledged writes"
                )
        except CorruptionError as e:
            errors.append(e.message)
            report["failed"].append(path)
            zero_segment(seg)
            if head is not None and head.wal_id:
                required[head.wal_id] = path
            continue
        if report["failed"] and end < newest:
            print(f"shmstore coordinator: store {name!r}: sync='never' recovery from {path} "
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
            print(f"shmstore coordinator: store {name!r}: cut the torn tail of {s.path} at "
                  f"offset {s.end} ({s.size - s.end} bytes never made durable)", file=sys.stderr)
        for bad in report["damaged"]:
            os.replace(bad, bad + ".corrupt")
            print(f"shmstore coordinator: store {name!r}: {bad} is damaged, renamed to *.corrupt; "
                  f"recovered from {path}", file=sys.stderr)
        if report["damaged"]:
            fsync_dir(data_dir.path)
        report["seconds"] = time.monotonic() - t0
        print(f"shmstore coordinator: store {name!r}: rebuilt {seg.q[L.H_COUNT]} records from "
              f"{os.path.basename(path)} + {report['records']} WAL records in "
              f"{report['seconds']:.2f} s", file=sys.stderr)
        return report
    raise CorruptionError(
        f"store {name!r}: no checkpoint in {data_dir.path!r} could be recovered with a "
        f"complete WAL; nothing was served. " + " | ".join(errors)
    )


def replay(seg: Segment, ck: LoadedCheckpoint, chain: list[WalScan], key: bytes | None = None) -> int:
    """Lay the checkpoint into ``seg`` and replay the chain after it; returns the epoch."""
    restore_into(seg, ck)
    engine = Engine(seg)
    restore_tables(engine, ck.path, key)  # the checkpoint's tables, if it has any
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
                op = O.decode_logged(payload)
            except msgspec.DecodeError as e:
                raise CorruptionError(
                    f"WAL file {s.path}: the record at offset {off} is not a logged op "
                    f"({str(e)[:200]}); its checksum passed, so it was written so (a faulty "
                    f"build or a forged record)"
                ) from None
            try:
                replay_record(engine, op)
            except (ShmStoreError, ValueError, TypeError, IndexError, OverflowError) as e:
                # Raw errors too: the segment being rebuilt is thrown away on failure.
                raise CorruptionError(
                    f"WAL file {s.path}: replaying the record at offset {off} failed "
                    f"({type(e).__name__}: {e}); the log does not fit the checkpoint"
                ) from None
    engine.publish()
    return engine.epoch


def verified_end(ckpts: list, wals: list[WalInfo], key: bytes | None) -> tuple[int | None, int]:
    """The epoch the directory's history reaches, following the newest checkpoint's
    chain with every checksum checked (its slots are not read), or None."""
    if not ckpts:
        return None, 0
    try:
        epoch, path = ckpts[0]
        h = peek_header(path)
        chain = wal_chain(h.id, h.epoch, h.wal_id, wals, path)
        end, last_id = h.epoch, h.id
        for i, w in enumerate(chain):
            s = scan_wal(w.path, layout_fp=h.layout_fp, schema_fp=h.schema_fp, key=key)
            if s.torn:
                return None, 0
            end = max(end, s.header.start)
            last_id = s.header.id
            if s.records:
                off, eb, payload = s.records[-1]
                end = eb + O.epochs_of(O.decode_logged(payload))
        return end, last_id
    except (CorruptionError, OSError, msgspec.DecodeError):
        return None, 0


def replay_record(engine: Engine, op: O.Logged) -> None:
    """Apply one logged op (decoded by ``_ops.decode_logged``) again. The op succeeded
    the first time; from the same state with the same epoch it does again, or the log
    diverged (raises a ShmStoreError, CorruptionError when nothing else says why).

    Every field is checked before the engine stores anything, as for a client's op.
    ``Evict`` and ``MovePage`` (logged by the coordinator when it makes room) replay
    through ``Engine.evict`` and ``Engine.move_page``, each at the next epoch as live.
    """
    t = type(op)
    if t is O.Put:
        engine.put(engine.check_key(op.key), engine.check_value(op.value), op.expiry)
    elif t is O.Delete:
        if not engine.delete(engine.check_key(op.key)):
            raise CorruptionError("a logged delete found no record")
    elif t is O.Cas:
        engine.cas(engine.check_key(op.key), engine.check_value(op.value), op.version, op.expiry)
    elif t is O.Incr:
        engine.incr(engine.check_key(op.key), op.delta)
    elif t is O.Batch:
        engine.batch(op.ops)
    elif t is O.Expire:
        replay_expire(engine, op)
    elif t is O.Evict:
        for kb in [engine.check_key(kb) for kb in op.keys]:
            if not engine.evict(kb):
                raise CorruptionError("a logged eviction found no record")
        engine.publish()
    elif t is O.MovePage:
        n = len(engine.seg.classes)
        if not (op.src < n and op.dst < n and op.src != op.dst):
            raise CorruptionError(f"a logged page move names classes {op.src} -> {op.dst}; the store has {n}")
        engine.move_page(op.src, op.dst)
    elif not table_replay(engine, op):  # tables: coordinator/_table.py
        raise CorruptionError(f"unknown op {t.__name__} in the log")
