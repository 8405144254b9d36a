"""A replica's local checkpoint: only to restart fast after its segment is gone.

Design
------
A replica's data is the upstream's (docs/replicas.md): nothing acknowledged depends on
this host's disk. But a replica whose segment is gone (a reboot, ``destroy()``) would
have to read every record from Redis again. Served with ``path=``, it keeps in that
directory (mode 0700, locked like a durable store's):

- ``replica.ckpt``: the store's records, in the checkpoint format of durable stores
  (``_durable/_checkpoint``: checksummed, fully checked when loaded), written to a
  temporary file and renamed over the previous one;
- ``replica.cursor``: one line ``<dataset> <epoch>-<nonce> <layout fingerprint>``, the
  id of the last stream entry the checkpoint holds, written the same way after it.

Taken every ``checkpoint_interval`` seconds when something changed, and at a clean stop.
When a new segment is made and both files agree (same dataset, same epoch, same layout),
the records are laid into it and the cursor is the checkpoint's: the replica then only
reads the stream entries after it (or resyncs, if the stream no longer holds them; the
resync rewrites only what differs). A checkpoint that is damaged, of another layout or
dataset, or without a matching cursor is ignored with a line on stderr: the replica
resyncs from Redis's records as if there were none. No WAL: what the checkpoint misses
is in the upstream.
"""

from __future__ import annotations

import os
import re
import sys

from shmstore import _layout as L
from shmstore._errors import ShmStoreError

CKPT = "replica.ckpt"
CURSOR = "replica.cursor"
_LINE = re.compile(r"([A-Za-z0-9_.:-]{1,128}) (\d{1,20})-(\d{1,20}) (\d{1,20})")


def _say(name: str, what: str) -> None:
    print(f"shmstore coordinator: store {name!r} (replica): {what}", file=sys.stderr, flush=True)


def load(seg: object, path: str, dataset: str, name: str) -> int | None:
    """Lay the directory's checkpoint into a new, empty segment if it fits; returns the
    cursor's nonce (the cursor is then ``"<H_EPOCH>-<nonce>"``), or None if nothing was
    laid."""
    from ._durable._checkpoint import load_checkpoint, restore_into  # noqa: PLC0415

    ck_path = os.path.join(path, CKPT)
    try:
        with open(os.path.join(path, CURSOR), encoding="ascii") as f:
            line = f.read(400).strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        _say(name, f"{os.path.join(path, CURSOR)} is unreadable ({e}); resyncing from the upstream")
        return None
    m = _LINE.fullmatch(line)
    if m is None or m.group(1) != dataset or int(m.group(4)) != seg.q[L.H_LAYOUT_FP]:
        _say(name, f"{os.path.join(path, CURSOR)} is of another dataset or layout, or damaged; "
                   f"resyncing from the upstream")
        return None
    epoch, nonce = int(m.group(2)), int(m.group(3))
    try:
        ck = load_checkpoint(ck_path, seg.layout, seg.q[L.H_SCHEMA_FP])
    except FileNotFoundError:
        return None
    except (ShmStoreError, OSError) as e:
        _say(name, f"its checkpoint cannot be used ({type(e).__name__}: {e}); resyncing from the upstream")
        return None
    if ck.epoch != epoch:
        _say(name, f"its checkpoint (epoch {ck.epoch}) and cursor (epoch {epoch}) disagree; "
                   f"resyncing from the upstream")
        return None
    restore_into(seg, ck)
    seg.q[L.H_UP_NONCE] = nonce
    return nonce


def snapshot(seg: object, epoch: int) -> object:
    """The records as of now (the coordinator's thread, between ops)."""
    from ._durable._checkpoint import take_snapshot  # noqa: PLC0415

    return take_snapshot(seg, epoch)


def write(path: str, dataset: str, snap: object, nonce: int) -> None:
    """Write the checkpoint of ``snap``, then the cursor naming it (each to a temporary
    file, fsynced, renamed). Any thread. Raises OSError."""
    from ._durable._checkpoint import write_checkpoint  # noqa: PLC0415
    from ._durable._wal import fsync_dir  # noqa: PLC0415

    write_checkpoint(path, snap, ckpt_id=1, wal_id=0, name=CKPT)
    tmp = os.path.join(path, CURSOR + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{dataset} {snap.epoch}-{nonce} {snap.layout_fp}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(path, CURSOR))
    fsync_dir(path)
