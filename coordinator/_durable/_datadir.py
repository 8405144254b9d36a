"""The files of a data directory: listing, the manifest, the lock, WAL chains.

Design
------
A data directory (mode 0700, files 0600) holds::

    MANIFEST                         the store's parameters (one line of msgspec JSON,
                                     then ``crc32:<hex>`` of it), written once per new
                                     segment: name, the whole Layout (capacity, key_size,
                                     value_size, memory, growth), schema and layout
                                     fingerprints, the instance id of the segment the
                                     directory follows, at-rest settings
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

A missing link is never a shorter history (:func:`missing_link`): a checkpoint whose
header names a WAL file that is not there, or a WAL file whose ``prev`` names a file
that is not there while a checkpoint's chain needs it, is a :class:`CorruptionError`
naming the missing file, from recovery and from ``check()``. An older checkpoint is a
fallback only for a *damaged* newer one, and only if its chain passes through every
WAL file the newer checkpoints name (the WAL covering the gap is there). Epochs may
jump between two linked files (a rebuild skips ``EPOCH_GAP``); links are by id, so a
jump is never mistaken for a gap in the files. A checkpoint that is missing while an
older one's chain covers everything after it loses nothing and is not an error.

Used by the journal (``_journal``), backups (``_backup``) and ``shmstore.check``.
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
import zlib
from dataclasses import dataclass

import msgspec
import numpy as np

from shmstore import _layout as L
from shmstore._errors import CoordinatorRunningError, CorruptionError, IncompatibleStoreError, StorageError
from shmstore._segment import Segment

from ._formats import old_format_error
from ._wal import WalHeader, fsync_dir, parse_name, wal_name

MANIFEST = "MANIFEST"
LOCK = "LOCK"
#: 1: segment format 3 (fixed-size slots); 2: segment format 4 (size classes, pages)
MANIFEST_FORMAT = 2


class Manifest(msgspec.Struct, kw_only=True):
    """The store parameters a data directory was written with."""

    format: int = MANIFEST_FORMAT
    name: str
    capacity: int
    key_size: int
    value_size: int
    #: the page budget (0: a single-class store) and the class growth factor
    memory: int = 0
    growth: float = L.GROWTH
    schema_fp: int
    layout_fp: int
    #: the H_INSTANCE of the segment whose history this directory records
    segment_instance: int = 0
    #: how new checkpoints and WAL files are stored ("none" | "zstd"); each file's
    #: header says how that file is stored (see ``_atrest``)
    compression: str = "none"
    #: "none" | "aes-256-gcm"; if encrypted, ``key_check`` tells the right key (never the key)
    encryption: str = "none"
    key_check: str = ""

    @property
    def layout(self) -> L.Layout:
        return L.Layout(capacity=self.capacity, key_size=self.key_size, value_size=self.value_size,
                        memory=self.memory, growth=self.growth)

    @classmethod
    def of(cls, name: str, layout: L.Layout, schema_fp: int, **kw: object) -> Manifest:
        """The manifest of a store of ``layout`` (the other fields as keywords)."""
        return cls(name=name, capacity=layout.capacity, key_size=layout.key_size,
                   value_size=layout.value_size, memory=layout.memory, growth=layout.growth,
                   schema_fp=schema_fp, layout_fp=layout.fingerprint, **kw)


@dataclass
class WalInfo:
    """A WAL file as listed: its name's start epoch and id, its header if readable."""

    path: str
    start: int
    file_id: int
    header: WalHeader | None
    #: CorruptionError, or IncompatibleStoreError for a WAL file of another format
    error: CorruptionError | IncompatibleStoreError | None = None


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
        else:
            self.check_mode()  # before anything is written into it
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
        body, sep, tail = raw.partition(b"\n")
        if tail.strip():
            # "crc32:<8 hex digits>" over the JSON line (manifests written before it
            # existed have none and are read as they are).
            want = tail.strip()
            if not want.startswith(b"crc32:") or want[6:] != b"%08x" % zlib.crc32(body):
                raise CorruptionError(f"manifest {p}: checksum mismatch (bytes 0..{len(body)})")
        try:
            m = msgspec.json.decode(body, type=Manifest)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            # A flipped bit can make invalid UTF-8, which msgspec reports as such.
            raise CorruptionError(f"manifest {p}: unreadable ({e})") from None
        if m.format != MANIFEST_FORMAT:  # before the fields whose meaning the format fixes
            raise old_format_error(f"data directory {self.path!r}: its manifest {p}", m.format, MANIFEST_FORMAT)
        if m.compression not in ("none", "zstd") or m.encryption not in ("none", "aes-256-gcm"):
            raise CorruptionError(
                f"manifest {p}: unknown compression {m.compression!r} or encryption {m.encryption!r} "
                f"(damaged, or written by a newer shmstore)"
            )
        return m

    def write_manifest(self, m: Manifest) -> None:
        p = self.file(MANIFEST)
        tmp = p + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                body = msgspec.json.encode(m)
                os.write(fd, body + b"\ncrc32:%08x\n" % zlib.crc32(body))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)  # a full disk leaves no half-written MANIFEST.tmp behind
            except FileNotFoundError:
                pass
            raise
        fsync_dir(self.path)

    def check_mode(self) -> None:
        """Enforce mode 0700 on the directory (DESIGN section 4).

        A directory with group or other permission bits is made 0700 if it is ours
        (owned by this user) and holds nothing but the store's own files (typically a
        directory just made with ``mkdir`` under a 022 umask): nothing in it can have
        been exposed yet that the store did not write. Otherwise the start is refused:
        other users may have read or planted files in it, and the user's own files in it
        are not ours to re-permission.

        Raises:
            StorageError: the directory is group/other accessible and holds other files,
                or belongs to another user.
        """
        st = os.stat(self.path)
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o077:
            return
        foreign = sorted(n for n in os.listdir(self.path) if not is_own_file(n))
        if st.st_uid == os.geteuid() and not foreign:
            os.chmod(self.path, 0o700)
            print(f"shmstore coordinator: data directory {self.path!r} had mode {mode:o}; made it 0700",
                  file=sys.stderr)
            return
        why = (f"it belongs to uid {st.st_uid}" if st.st_uid != os.geteuid()
               else f"it holds files that are not the store's ({', '.join(foreign[:3])}"
                    f"{' ...' if len(foreign) > 3 else ''})")
        raise StorageError(
            f"data directory {self.path!r} has mode {mode:o}: other users may read or change its "
            f"files, and {why}, so it is not made 0700 for you. Give the store a directory of its "
            f"own (chmod 700 {self.path!r} if that is what you want)"
        )

    def remove_temporaries(self) -> None:
        """Remove what an interrupted write of the store left: ``<store file>.tmp`` only
        (``MANIFEST.tmp``, ``ckpt-*.ckpt.tmp``, ``ckpt-*.tables.tmp``, ``wal-*.wal.tmp``);
        any other file in the directory is left alone."""
        for n in os.listdir(self.path):
            if n.endswith(".tmp") and is_own_file(n[:-4]):
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

    def wal_files(self) -> list[WalInfo]:
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
            except (CorruptionError, IncompatibleStoreError) as e:
                hdr, err = None, e
            out.append(WalInfo(p, start, int(n[-20:-4], 16), hdr if err is None else None, err))
        return out


def is_own_file(name: str) -> bool:
    """Whether ``name`` (in a data directory) is one of the store's files, or the
    temporary (``.tmp``) or set-aside (``.corrupt``) copy of one."""
    for suffix in (".tmp", ".corrupt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name in (MANIFEST, LOCK):
        return True
    return (parse_name(name, "ckpt-", ".ckpt") is not None or parse_name(name, "ckpt-", ".tables") is not None
            or parse_name(name, "wal-", ".wal") is not None)


def missing_link(ck_path: str, wal_id: int, ck_epoch: int, wals: list[WalInfo]) -> CorruptionError | None:
    """The error for a checkpoint whose named WAL file (``wal_id``) is missing, or None.

    A checkpoint's WAL file starts at the checkpoint's epoch, so its name is known.
    """
    if not wal_id or any(w.file_id == wal_id for w in wals):
        return None
    gone = os.path.join(os.path.dirname(ck_path), wal_name(ck_epoch, wal_id))
    return CorruptionError(
        f"checkpoint {ck_path}: the WAL file that follows it, {gone} (id {wal_id:016x}), is missing; "
        f"the writes logged after this checkpoint cannot be recovered, and an older checkpoint "
        f"would silently lose them. Restore the file (or the directory from a backup)"
    )


def wal_chain(ck_id: int, ck_epoch: int, wal_id: int, wals: list[WalInfo], path: str) -> list[WalInfo]:
    """The WAL files that follow a checkpoint, in order, if the chain is complete."""
    by_id = {w.file_id: w for w in wals}
    by_prev: dict[int, list[WalInfo]] = {}
    for w in wals:
        if w.header is not None:
            by_prev.setdefault(w.header.prev, []).append(w)
    if wal_id:
        cur = by_id.get(wal_id)
        if cur is None:
            raise missing_link(path, wal_id, ck_epoch, wals)
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
        ids = {w.file_id for w in wals}
        for w in stray:
            prev = w.header.prev if w.header is not None else 0
            if prev and prev not in ids and prev != ck_id:
                last = chain[-1].path if chain else path
                raise CorruptionError(
                    f"WAL file {w.path}: it continues the file with id {prev:016x} (wal-*-{prev:016x}.wal), "
                    f"which is missing "
                    f"(the chain from checkpoint {path} ends at {last}); the writes logged in the "
                    f"missing file cannot be recovered"
                )
        raise CorruptionError(
            f"checkpoint {path}: WAL file {stray[0].path} is newer but not in its chain; the "
            f"history after this checkpoint is incomplete"
        )
    return chain


def zero_segment(seg: Segment) -> None:
    """Undo a failed restore attempt: the segment back to what ``create_segment`` made
    (every page table entry as at creation, zero pages and index, zero counters)."""
    from ._checkpoint import written_pages  # noqa: PLC0415

    lay = seg.layout
    pt = seg.page_table()
    # The pages a restore wrote lie in the assigned ones; the rest were never written
    # (zeroing them would make a memory store's whole budget resident).
    top = written_pages(seg, pt) * lay.page_size
    for start, n in ((lay.pages_offset, top), (lay.index_offset, lay.size - lay.index_offset)):
        arr = np.ndarray((n,), dtype=np.uint8, buffer=seg.mm, offset=start)
        arr[:] = 0
        del arr
    pt[:] = 0 if lay.memory else 1  # a single-class store's pages are its class's from the start
    del pt
    q = seg.q
    for w in (L.H_EPOCH, L.H_COUNT, L.H_LAST_DELETE_EPOCH, L.H_INDEX_GEN, L.H_BATCH_SEQ, L.H_LAST_CHECKPOINT_EPOCH):
        q[w] = 0
    for c in range(len(lay.classes)):
        q[L.class_word(c, L.C_RECORDS)] = 0
        q[L.class_word(c, L.C_ASKED)] = 0
        q[L.class_word(c, L.C_PAGES)] = 0 if lay.memory else lay.npages
    q[L.H_FREE_PAGES] = lay.npages if lay.memory else 0
