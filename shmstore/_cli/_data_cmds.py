"""The data subcommands of the ``shmstore`` command line: checkpoint, backup, restore,
check, load.

``_main.build_parser`` calls :func:`register` with its ``add`` helper. Errors
follow the CLI's rules: one line ``shmstore: error: ...`` on stderr, exit 1 for a store
error (and for ``check`` finding damage), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import msgspec

import shmstore
from shmstore._errors import InvalidArgumentError, ShmStoreError

from ._common import UsageError, connect, positive_int

#: records written per batch by ``load`` (each batch is one request, applied atomically)
LOAD_BATCH = 256
#: ... and at most this many bytes of keys and JSON per batch (the request must fit a ring)
LOAD_BATCH_BYTES = 64 * 1024


def cmd_checkpoint(args: argparse.Namespace) -> int:
    with connect(args) as store:
        epoch = store.checkpoint()
    print(epoch)
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    with connect(args) as store:
        epoch = store.backup(args.dest)
    print(f"store {args.name!r}: backup at epoch {epoch} written to {os.path.abspath(args.dest)}", file=sys.stderr)
    print(epoch)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    epoch = shmstore.restore(args.src, args.dest, name=args.store_name, key_file=args.key_file)
    print(f"restored {os.path.abspath(args.src)} (checkpoint at epoch {epoch}) into "
          f"{os.path.abspath(args.dest)}; serve it with `shmstore serve NAME --path "
          f"{os.path.abspath(args.dest)}` once no segment of that name exists", file=sys.stderr)
    print(epoch)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.name is None and args.path is None:
        raise UsageError("check needs a store NAME, --path DIR, or both")
    report = shmstore.check(args.name, args.path, key_file=args.key_file)
    if args.json:
        d = msgspec.structs.asdict(report)
        d["ok"] = report.ok
        d["problems"] = [msgspec.structs.asdict(p) for p in report.problems]
        print(msgspec.json.encode(d).decode())
    else:
        print(report)
    return 0 if report.ok else 1


def parse_line(raw: bytes, where: str) -> tuple[bytes, object]:
    """One ``KEY<tab>JSON`` line of ``shmstore scan``'s output: the key's bytes, the value.

    Raises:
        InvalidArgumentError: no tab, an empty key, or a value that is not JSON;
            ``where`` (``FILE:LINE``) starts the message.
    """
    key, tab, text = raw.rstrip(b"\r\n").partition(b"\t")
    if not tab:
        raise InvalidArgumentError(f"{where}: not a 'KEY<tab>JSON' line (no tab); load reads what "
                                   f"`shmstore scan NAME` prints")
    if not key:
        raise InvalidArgumentError(f"{where}: the key is empty")
    try:
        return key, msgspec.json.decode(text)
    except msgspec.DecodeError as e:
        raise InvalidArgumentError(f"{where}: the value is not JSON ({e})") from None


def cmd_load(args: argparse.Namespace) -> int:
    """Write every record of FILE (``shmstore scan`` output) into store NAME, in batches.

    Each line is checked before anything is sent, so a malformed file writes nothing;
    a record the store refuses (a key or value too long, a full store) stops the load
    with the error and the line it came from: the batches before it are written.
    """
    path = args.file
    records: list[tuple[int, bytes, object, int]] = []
    with (sys.stdin.buffer if path == "-" else open(path, "rb")) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            key, value = parse_line(raw, f"{path}:{lineno}")
            records.append((lineno, key, value, len(raw)))
    written = 0
    with connect(args) as store:
        i = 0
        while i < len(records):
            j = i
            size = 0
            while j < len(records) and j - i < args.batch and (j == i or size + records[j][3] <= LOAD_BATCH_BYTES):
                size += records[j][3]
                j += 1
            b = store.batch()
            for lineno, key, value, _ in records[i:j]:
                try:
                    b.put(key, value)
                except ShmStoreError as e:  # checked as it is added: this record's line
                    raise type(e)(f"{path}:{lineno}: {e.message}") from e
            try:
                with b:
                    pass  # sent on leaving the block, applied atomically
            except ShmStoreError as e:
                raise type(e)(f"{path}: lines {records[i][0]}..{records[j - 1][0]} (written: the "
                              f"{written} records before them): {e.message}") from e
            written += j - i
            i = j
    print(f"store {args.name!r}: loaded {written} records from {path}", file=sys.stderr)
    print(written)
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the subcommands through ``_main.build_parser``'s ``add`` helper."""
    add("checkpoint", cmd_checkpoint, "make the coordinator of durable store NAME write a checkpoint now; "
        "print its epoch", "shmstore checkpoint app", timeout=True)

    p = add("backup", cmd_backup, "write a consistent copy of store NAME into DEST (a new or empty "
            "directory); print its epoch",
            "shmstore backup app /var/backups/app-2026-01-31\n"
            "shmstore restore /var/backups/app-2026-01-31 /var/lib/app-restored", timeout=True)
    p.add_argument("dest", metavar="DEST", help="a new or empty directory")

    p = add("restore", cmd_restore, "check backup SRC and copy it into DEST (a new or empty directory), "
            "ready for `shmstore serve NAME --path DEST`",
            "shmstore restore /var/backups/app-2026-01-31 /var/lib/app\n"
            "shmstore destroy app && shmstore serve app --path /var/lib/app", store=False)
    p.add_argument("src", metavar="SRC", help="a backup, or the data directory of a stopped store")
    p.add_argument("dest", metavar="DEST", help="a new or empty directory")
    p.add_argument("--name", dest="store_name", metavar="NAME", default=None,
                   help="serve the copy under this store name (default: the backup's)")
    p.add_argument("--key-file", metavar="FILE", default=None,
                   help="the key of an encrypted backup (default: $SHMSTORE_KEY_FILE or $SHMSTORE_KEY)")

    p = add("check", cmd_check, "verify a data directory (checksums, WAL chain) and/or the live segment "
            "of store NAME (index against slots, counts); exit 1 if anything is wrong",
            "shmstore check app                   # the live segment\n"
            "shmstore check --path /var/lib/app   # a data directory or backup\n"
            "shmstore check app --path /var/lib/app --json", store=False)
    p.add_argument("name", metavar="NAME", nargs="?", default=None, help="a store whose segment to check")
    p.add_argument("--path", metavar="DIR", default=None, help="a data directory or backup to check")
    p.add_argument("--key-file", metavar="FILE", default=None,
                   help="the key of an encrypted directory (default: $SHMSTORE_KEY_FILE or $SHMSTORE_KEY)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

    p = add("load", cmd_load, "write the records of FILE ('KEY<tab>JSON' lines, what `shmstore scan` "
            "prints) into store NAME, in batches; print how many",
            "shmstore scan app > app.records         # with the release that wrote the store\n"
            "shmstore load app app.records           # with this one, into a new store", timeout=True)
    p.add_argument("file", metavar="FILE", help="the records ('-': standard input)")
    p.add_argument("--batch", type=positive_int, default=LOAD_BATCH, metavar="N",
                   help=f"records per batch (default: {LOAD_BATCH})")
