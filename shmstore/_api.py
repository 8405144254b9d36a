"""Starting, attaching to and removing stores: serve, connect, open, destroy."""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import msgspec
import posix_ipc

from . import _layout as L
from ._errors import (
    CoordinatorRunningError,
    CoordinatorUnavailableError,
    DurabilityUnavailableError,  # noqa: F401  (shmstore exports it from here)
    StoreNotFoundError,
    from_wire,
)
from ._check_args import check_read_cache, check_spin_us, check_timeout
from ._lazy import LazyModule
from ._segment import coordinator_alive
from ._shm import open_segment, unlink_quietly
from ._store import DEFAULT_READ_CACHE, Store

# Only serve() starts a process: a reader does not import subprocess (see shmstore._lazy).
if TYPE_CHECKING:
    import subprocess
else:
    subprocess = LazyModule("subprocess")


class Coordinator:
    """A handle on a coordinator process started by :func:`serve`.

    The process serves the store until :meth:`stop`, until the process that started it
    exits (it watches its parent), or until it gets SIGTERM/SIGINT. Leaving a ``with``
    block stops it. Stopping a coordinator leaves the segment readable; writers get
    :class:`CoordinatorUnavailableError` until another coordinator serves the store.
    """

    def __init__(self, name: str, proc: subprocess.Popen) -> None:
        self.name = name
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """Stop gracefully (SIGTERM: drain, sync, exit); SIGKILL after ``timeout``.

        Returns:
            The process's exit code. Idempotent.
        """
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL the coordinator (for crash tests) and reap it."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<shmstore.Coordinator {self.name!r} pid={self.pid} {'running' if self.alive() else 'stopped'}>"


def serve(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    memory: int | None = None,
    capacity: int | None = None,
    key_size: int | None = None,
    value_size: int | None = None,
    growth: float | None = None,
    eviction: str | None = None,
    value_type: Any = None,
    max_clients: int = 256,
    ring_size: int = 256 * 1024,
    reply_size: int = 1024 * 1024,
    spin_us: float = 50.0,
    sync: str | None = None,
    sync_interval: float = 0.1,
    checkpoint_ops: int = 200_000,
    checkpoint_interval: float = 300.0,
    checkpoint_bytes: int = 256 << 20,
    checkpoint_keep: int = 2,
    compression: str | None = None,
    encryption: str | None = None,
    key_file: str | os.PathLike | None = None,
    upstream: str | None = None,
    upstream_name: str | None = None,
    upstream_timeout: float = 2.0,
    upstream_stream_max: int = 100_000,
    detach: bool = False,
    timeout: float = 10.0,
) -> Coordinator:
    """Start a coordinator process for store ``name`` and wait until it serves.

    If the store's segment exists (its previous coordinator stopped or died), the new
    coordinator adopts it, repairing anything a death mid-write left; sizes left as
    None then mean "the existing segment's" (defaults for a new store: capacity
    100_000, key_size 64, value_size 1024).

    Two kinds of store (both hold records in fixed-size slots under the same lock-free
    read protocol):

    - ``memory=BYTES``: a budget. Record memory is cut into pages (1 MiB, or the next
      power of two that holds the largest record) handed to size classes as records of
      each size need them: slots of 64 bytes and up, each class about ``growth`` (1.25)
      times the one below, up to ``value_size`` (default 1 MiB - 128 bytes, so the largest record fills one 1 MiB page). A record takes the
      smallest slot that holds its header (32 bytes), its key (padded to 8 bytes) and
      its value. ``capacity`` then bounds the records and sizes the index (default
      ``memory // 128``). The segment is the budget plus the header, page table and
      index (``8 x`` the next power of two above ``4/3 x capacity`` bytes).
    - no ``memory``: ``capacity`` slots of ``key_size + value_size`` bytes, as before.

    ``eviction``: None (a full store refuses the write with StoreFullError, nothing
    written), ``"lru"`` (approximate LRU within the size class that needs room; readers
    mark what they read in a small shared access map) or ``"volatile-ttl"`` (records
    with an expiry, soonest first). Evictions are logged ops with their own epochs and
    show up in ``changes()``; ``stats()["memory"]`` shows each class's pages, records
    and fragmentation.

    Durability: with ``path=`` the store is durable. The directory (created if missing,
    mode 0700, files 0600) holds a manifest of the store's parameters, checkpoints and
    the write-ahead log. A coordinator that finds the segment (its predecessor died or
    stopped) adopts it and brings the directory in line with it; one that finds no
    segment (after a reboot, or ``destroy()``) rebuilds it from the newest good
    checkpoint plus the WAL. What a crash can lose, per ``sync``:

    ==========  ==================================  ==================================
    sync        SIGKILL of the coordinator          power loss / OS crash
    ==========  ==================================  ==================================
    "always"    nothing acknowledged                nothing acknowledged: each group
                                                    of writes is fsynced before any
                                                    of them is acknowledged
    "periodic"  nothing acknowledged: each group    up to ``sync_interval`` seconds of
                is written to the OS before its     acknowledged writes
                replies                             
    "never"     nothing while the segment lives;    everything since the last
                if it is gone too (destroy(),       checkpoint
                reboot) everything since the last
                checkpoint
    ==========  ==================================  ==================================

    Readers may see a write before its writer's acknowledgement, so before it is
    durable: after a power loss such a write can be gone. A torn tail of the WAL is cut
    off at recovery; damage before it, or to a checkpoint, is reported as
    :class:`CorruptionError` unless an older checkpoint and a complete WAL recover the
    same state.

    At-rest protection (both off by default, both for checkpoints and WAL files):
    ``compression="zstd"`` (extra ``shmstore[zstd]``) and ``encryption="aes-256-gcm"``
    (extra ``shmstore[crypto]``). The key, 32 bytes, is read from ``key_file`` (32 raw
    bytes or 64 hex digits), else from the file named by ``$SHMSTORE_KEY_FILE``, else
    from ``$SHMSTORE_KEY`` (64 hex digits); it is never written anywhere. The manifest
    records both settings (and a check value of the key, not the key): a directory
    written encrypted opens only with its key (:class:`EncryptionKeyError` otherwise),
    and encryption cannot be switched on or off for a directory holding data (back it
    up and restore instead). Compression can change at any start: each file says how it
    is stored. Left as None, both keep the directory's setting.

    Disk trouble: if a group of writes cannot be written or fsynced (disk full,
    read-only file system, I/O error), none of its writes is acknowledged: each gets
    :class:`StorageError`. They were already applied to the segment, so readers may
    see them, and they are kept in memory and made durable as soon as the disk takes
    them again. Until then the coordinator refuses every write with
    :class:`StorageError` (reads go on); it retries the disk every 0.1 s. A data
    directory on a read-only file system is refused at start with ``StorageError``.
    A periodic checkpoint that fails is retried with a back-off (0.1 s doubling to 30 s).

    A missing link in the data directory's chain (a checkpoint naming a WAL file that is
    gone, a WAL file continuing a missing one) is a :class:`CorruptionError` naming the
    missing file: an older checkpoint is used only in place of a *damaged* newer one,
    and only when the WAL covering the gap is all there.

    The data directory is trusted only so far: start-up removes only the store's own
    temporaries (``MANIFEST.tmp``, ``ckpt-*.tmp``, ``wal-*.tmp``), never other files.
    A directory with group or other permission bits is made 0700 when it is yours and
    holds nothing but the store's files (say, just made under a 022 umask: nothing in
    it was exposed); otherwise the start is refused with :class:`StorageError`, since
    others may have read or planted files in it. ``path=""`` is refused.

    Shared memory: the sizes (data segment, write channel, redo area, at their full
    size, since /dev/shm objects are sparse and running out later is a SIGBUS) are
    checked against /dev/shm's free space before anything is created. A start that
    fails leaves nothing of a new store in /dev/shm, and a coordinator that dies while
    starting is reported at once with its exit status and last stderr line (its stderr
    is relayed to this process's while it starts).

    The settings are declared once, in ``shmstore.coordinator._config`` (the table
    behind docs/settings.md and ``shmstore serve``'s flags); a test holds this signature
    to it. They are checked here, in the calling process, before any process starts.

    Args:
        name: the store name, 1-64 characters of ``[A-Za-z0-9_.-]``.
        path: a data directory of its own for a durable store; None: memory only.
        memory: a budget of record memory in bytes (size classes; see above); None: a
            single-class store of ``capacity`` x ``value_size``.
        capacity: the most records the store holds.
        key_size: the longest key, in bytes.
        value_size: the largest msgpack-encoded value, in bytes.
        growth: with ``memory``: the factor between size classes (1.05 to 4).
        eviction: None, ``"lru"`` or ``"volatile-ttl"`` (see above).
        value_type: a msgspec Struct or type; values are validated on write and decoded
            to it. Its schema fingerprint is fixed in the segment.
        sync: ``"always"`` (the default with ``path=``), ``"periodic"`` or ``"never"``
            (the only mode, and the default, of a memory-only store); see above.
        sync_interval: ``"periodic"``: the longest, in seconds, an acknowledged write
            waits for its fsync (checked at every group and every 0.1 s tick, so an
            idle store syncs within ``max(sync_interval, 0.1)``).
        checkpoint_ops: a checkpoint after this many writes ...
        checkpoint_interval: ... or this many seconds after the last one, if anything
            was written since. Checkpoints are also taken by ``store.checkpoint()``, at
            a clean stop, and at start when the segment is ahead of the directory.
        checkpoint_bytes: ... or once the current WAL file holds this many bytes.
        checkpoint_keep: checkpoints kept; a damaged newest one falls back to an older
            one plus the WAL.
        compression: ``"zstd"`` or ``"none"``; None: the directory's (new: none).
        encryption: ``"aes-256-gcm"`` or ``"none"``; None: the directory's (new: none).
        key_file: the file holding the encryption key (see above).
        upstream: a Redis URL (``redis://host:6379/0``, ``rediss://``, ``unix://``): the
            store becomes a replica of the dataset ``upstream_name`` that Redis orders
            (every write is one atomic step in Redis; the replica applies Redis's change
            stream; see docs/replicas.md). None: a store of its own.
        upstream_name: the dataset's name in Redis; default: the store's name.
        upstream_timeout: seconds a replica's write waits for Redis
            (:class:`UpstreamTimeoutError` after it; :class:`UpstreamUnavailableError`
            at once when Redis refuses the connection).
        upstream_stream_max: entries Redis's change stream keeps; a replica further
            behind resyncs from the records.
        max_clients: processes that can write at once (each claims a client block).
        ring_size: bytes of each client's request queue (bounds the largest batch).
        reply_size: bytes of each client's reply area (bounds a get_many fallback).
        spin_us: microseconds the coordinator spins on its doorbell before it blocks.
        detach: keep serving after this process exits (default: stop with it).
        timeout: seconds to wait for the coordinator to come up.

    Raises:
        InvalidNameError: ``name`` is not a valid store name.
        InvalidLayoutError: a setting is of the wrong type (a bool, a string, 1.5 where
            an integer goes), NaN, infinite or out of range, or settings that do not go
            together (``sync="always"`` without ``path``). Raised before a process starts.
        TypeError: a keyword that is not a setting.
        CoordinatorRunningError: a coordinator already serves the store.
        IncompatibleStoreError: the existing segment, or the data directory, has other
            sizes or value_type, or they hold different stores.
        CorruptionError: the data directory is damaged beyond what recovery may repair.
        EncryptionKeyError: the directory is encrypted and the key is missing or wrong.
        StorageError: the data directory cannot be written (read-only file system), or
            it is open to other users and holds files that are not the store's.
        InvalidLayoutError: also when the store does not fit /dev/shm's free space.
        CoordinatorUnavailableError: the coordinator died while starting (its exit
            status and last log line are in the message) or did not come up in time.
    """
    settings = dict(locals())  # the first statement: exactly serve()'s arguments
    L.check_platform()
    from shmstore.coordinator._config import from_serve  # noqa: PLC0415  (the settings seam)

    return _start(from_serve(**settings), timeout)


def _start(config: Any, timeout: float) -> Coordinator:
    """Run ``python -m shmstore.coordinator`` with a checked config; wait until it serves.

    Until it serves, the coordinator's stderr is a pipe read here: every byte is relayed
    to this process's stderr at once, and the last lines are kept, so a coordinator that
    dies at start (a traceback, SIGBUS, SIGKILL) is reported at once with its exit status
    and its last log line. Once serving it writes to this process's stderr directly.
    """
    name = config.name
    detach = config.parent_pid == 0
    r, w = os.pipe()
    try:
        own_err = os.dup(2)
    except OSError:
        own_err = -1  # no stderr to hand on: the coordinator keeps the pipe's
    er, ew = os.pipe() if own_err >= 0 else (-1, -1)
    env = None
    if config.upstream is not None:
        # A Redis URL may hold a password: it goes through the environment (readable by
        # this user only), not the command line (readable by everyone in ps).
        env = dict(os.environ, SHMSTORE_UPSTREAM_URL=config.upstream)
        config = msgspec.structs.replace(config, upstream="env:SHMSTORE_UPSTREAM_URL")
    try:
        args = [sys.executable, "-m", "shmstore.coordinator", "--config", msgspec.json.encode(config).decode(),
                "--ready-fd", str(w)]
        if own_err >= 0:
            args += ["--stderr-fd", str(own_err)]
        proc = subprocess.Popen(
            args, pass_fds=(w,) if own_err < 0 else (w, own_err), stdin=subprocess.DEVNULL,
            stderr=ew if ew >= 0 else None, close_fds=True, start_new_session=detach, env=env,
        )
    finally:
        os.close(w)
        for fd in (own_err, ew):
            if fd >= 0:
                os.close(fd)
    tail: list[bytes] = []
    try:
        line = _read_line(r, timeout, er, tail)
        if er >= 0 and line is not None:
            _drain(er, tail, 5.0)  # EOF once it serves (stderr switched) or has exited
    finally:
        os.close(r)
        if er >= 0:
            os.close(er)
    if line is not None and line.startswith("ok"):
        return Coordinator(name, proc)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    last = _last_line(tail)
    if line is None:
        raise CoordinatorUnavailableError(
            f"the coordinator for {name!r} did not come up within {timeout} s"
            + (f"; its last words: {last}" if last else "")
        )
    if line.startswith("error "):
        type_name, _, message = line[6:].partition(": ")
        raise from_wire(type_name, message.strip())
    rc = proc.returncode
    if rc < 0:
        try:
            status = f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            status = f"killed by signal {-rc}"
        if rc == -signal.SIGBUS:
            status += f" (shared memory ran out: see {L.SHM_DIR}'s free space)"
    else:
        status = f"exit code {rc}"
    raise CoordinatorUnavailableError(
        f"the coordinator for {name!r} exited ({status}) before it served: "
        + (last or "it wrote nothing to stderr")
    )


def _relay(chunk: bytes, tail: list[bytes]) -> None:
    """Pass a coordinator's stderr bytes on to ours; keep the last few KiB."""
    try:
        os.write(2, chunk)
    except OSError:
        pass  # our stderr is gone: the bytes are still kept for the error message
    tail.append(chunk)
    while len(tail) > 1 and sum(map(len, tail)) > 8192:
        del tail[0]


def _last_line(tail: list[bytes]) -> str:
    lines = [x.strip() for x in b"".join(tail).decode(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else ""


def _drain(fd: int, tail: list[bytes], bound: float) -> None:
    """Relay ``fd`` until EOF (or ``bound`` seconds, a guard against a stuck writer)."""
    deadline = time.monotonic() + bound
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        _relay(chunk, tail)


def _read_line(fd: int, timeout: float, err_fd: int = -1, tail: list[bytes] | None = None) -> str | None:
    """The first line written to ``fd``; what came before EOF; None at the timeout.

    Meanwhile what arrives on ``err_fd`` (the coordinator's stderr) is relayed to ours
    and its last bytes kept in ``tail``.
    """
    deadline = time.monotonic() + timeout
    buf = b""
    fds = [fd] + ([err_fd] if err_fd >= 0 else [])
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select(fds, [], [], left)
        if not ready:
            return None
        if err_fd in ready:
            chunk = os.read(err_fd, 65536)
            if chunk:
                _relay(chunk, tail if tail is not None else [])
            else:
                fds.remove(err_fd)
        if fd in ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace")


def connect(name: str, *, value_type: Any = None, timeout: float = 5.0, spin_us: float = 50.0,
            read_cache: int = DEFAULT_READ_CACHE) -> Store:
    """Attach to an existing store. Reads work at once, even while no coordinator runs.

    Cheap enough to call per request: all handles of a process share its one mapping
    and client block (see :class:`Store`), so while another handle of the process is
    open a ``connect()`` costs tens of microseconds and no file descriptor. A handle
    dropped without ``close()`` gives its share back when it is collected.

    Args:
        name: the store name.
        value_type: the type the store was served with, to decode to and validate
            against; None decodes plain msgpack (and makes a typed store read-only).
        timeout: seconds a write waits for the coordinator (and its queue) before it
            raises, and for a segment that is still being created.
        spin_us: microseconds a write spins for its reply before sleeping.
        read_cache: how many records (and misses) ``get`` keeps in this process, to
            answer again after checking three words of the segment (0: none). A hit
            is exactly as current as a fresh read (see :meth:`Store.get`).

    Raises:
        StoreNotFoundError: no such store.
        SchemaMismatchError: ``value_type`` is not the store's.
        InvalidArgumentError: ``timeout`` or ``spin_us`` is not a finite number in
            range (NaN, negative, infinite, a bool, a string); raised before anything
            is opened.
    """
    check_timeout(timeout)
    check_spin_us(spin_us)
    return Store(name, value_type=value_type, timeout=timeout, spin_us=spin_us, read_cache=read_cache)


def open(  # noqa: A001 - the public name is part of the API
    name: str,
    *,
    path: str | os.PathLike | None = None,
    value_type: Any = None,
    timeout: float = 5.0,
    read_cache: int = DEFAULT_READ_CACHE,
    **serve_kwargs: Any,
) -> Store:
    """Connect to a store, first starting a coordinator for it if none runs.

    The coordinator started here lives until this process exits or ``store.coordinator
    .stop()``; if another process started one first, this connects to that one.
    ``read_cache`` is :func:`connect`'s; ``serve_kwargs`` are :func:`serve`'s
    (capacity, key_size, value_size, ...).
    """
    from shmstore.coordinator._config import from_serve  # noqa: PLC0415  (the settings seam)

    # Checked whether or not a coordinator runs already: a bad setting is never ignored.
    check_timeout(timeout)
    check_read_cache(read_cache)
    serve_timeout = max(timeout, 10.0)
    config = from_serve(name, path=path, value_type=value_type, timeout=serve_timeout, **serve_kwargs)
    coord = None
    try:
        seg = open_segment(name, timeout=timeout)
        running = coordinator_alive(seg)
        seg.close()
    except StoreNotFoundError:
        running = False
    if not running:
        try:
            L.check_platform()
            coord = _start(config, serve_timeout)
        except CoordinatorRunningError:
            pass  # another process won the race; use its coordinator
    store = connect(name, value_type=value_type, timeout=timeout, read_cache=read_cache)
    store.coordinator = coord
    return store


def destroy(name: str) -> bool:
    """Remove a store's segment and IPC objects. Handles still open notice and fail.

    Any object under the store's names goes, whatever its size or state: the segment is
    marked destroyed through its header page alone (a damaged or 128 PiB sparse object
    cannot be mapped whole), then everything is unlinked by name.

    Returns:
        True if anything of the store existed.

    Raises:
        CoordinatorRunningError: a coordinator still serves it; stop that first.
    """
    L.check_name(name)
    try:
        lock = posix_ipc.SharedMemory(L.lock_name(name))
    except posix_ipc.ExistentialError:
        lock = None
    if lock is not None:
        try:
            fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close_fd()
            raise CoordinatorRunningError(
                f"store {name!r} is still served by a coordinator; stop it before destroy()"
            ) from None
    try:
        found = lock is not None
        # Invariant: marked before unlinking, so every mapping sees it is stale.
        max_clients = _mark_destroyed(name)
        found |= unlink_quietly(posix_ipc.SharedMemory, L.data_name(name))
        found |= unlink_quietly(posix_ipc.SharedMemory, L.redo_name(name))
        found |= unlink_quietly(posix_ipc.SharedMemory, L.access_name(name))
        found |= unlink_quietly(posix_ipc.SharedMemory, L.channel_name(name))
        found |= _unlink_prefixed(name, ("table", "handover"))
        found |= unlink_quietly(posix_ipc.Semaphore, L.bell_name(name))
        for i in range(max(max_clients, _reply_sems_on_disk(name))):
            found |= unlink_quietly(posix_ipc.Semaphore, L.reply_sem_name(name, i))
            found |= unlink_quietly(posix_ipc.Semaphore, L.watch_sem_name(name, i))
        unlink_quietly(posix_ipc.SharedMemory, L.lock_name(name))
        return found
    finally:
        if lock is not None:
            lock.close_fd()


def _mark_destroyed(name: str) -> int:
    """Mark store ``name``'s segment destroyed, mapping its header page only (any
    size works: a damaged or 128 PiB object cannot be mapped whole). Returns the
    header's max_clients (0 if there is no readable header)."""
    try:
        shm = posix_ipc.SharedMemory(L.data_name(name))
    except posix_ipc.ExistentialError:
        return 0
    try:
        if os.fstat(shm.fd).st_size < L.HEADER_SIZE:
            return 0  # never finished: nothing maps a header that is not there
        mm = mmap.mmap(shm.fd, L.HEADER_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        return 0  # unmappable: unlinked by name all the same
    finally:
        shm.close_fd()
    try:
        q = memoryview(mm).cast("Q")
        try:
            if q[L.H_MAGIC] != L.MAGIC or q[L.H_FORMAT] != L.FORMAT_VERSION:
                return 0  # not a header this shmstore wrote (or not finished)
            q[L.H_STATE] = L.STATE_DESTROYED
            return min(int(q[L.H_MAX_CLIENTS]), 1 << 16)
        finally:
            q.release()
    finally:
        mm.close()


def _unlink_prefixed(name: str, kinds: tuple[str, ...]) -> bool:
    """Unlink store ``name``'s segments in /dev/shm of the ``kinds`` (see
    :func:`_layout.entry_kind`) whose names only a listing knows: tables, handovers."""
    found = False
    for entry in L.store_entries(name):
        _, suffix, sem = L.parse_entry(entry)
        if not sem and L.entry_kind(suffix) in kinds:
            found |= unlink_quietly(posix_ipc.SharedMemory, "/" + entry)
    return found


def _reply_sems_on_disk(name: str) -> int:
    """1 + the highest reply semaphore number of the store present in /dev/shm."""
    top = 0
    for entry in L.store_entries(name):
        _, suffix, sem = L.parse_entry(entry)
        if sem and L.entry_kind(suffix) == "reply":
            top = max(top, int(suffix[2:]) + 1)
    return top
