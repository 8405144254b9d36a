"""Starting a coordinator run: what it takes of a store before serving it.

Design
------
:class:`Startup` does steps 1 and 2 of the coordinator's start (``_server``): the
store's lock and its data segment, with the checks that come before either. The
server does the rest (repair, rebuild, channel, header) and holds the object until it
closes, to drop the lock.

- :meth:`Startup.check_space_first`, :meth:`Startup.check_space`: refuse sizes that
  /dev/shm cannot hold, before creating anything.
- :meth:`Startup.take_lock`: ``flock`` on ``/shmstore.NAME@lock``, or
  :class:`CoordinatorRunningError` naming the coordinator that holds it.
- :meth:`Startup.open_segment`: adopt the existing data segment (checking its sizes and
  schema against the settings) or create a new one (``created``).
- :meth:`Startup.undo`: after a failed start, remove what this start made.
- :meth:`Startup.release`: drop the lock.

Coordinator thread only.
"""

from __future__ import annotations

import fcntl
import os

import posix_ipc

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import (
    CoordinatorRunningError,
    IncompatibleStoreError,
    InvalidLayoutError,
    SchemaMismatchError,
    ShmStoreError,
)
from shmstore._segment import Segment
from shmstore._shm import create_segment, open_segment, unlink_quietly

from ._config import ServerConfig, new_layout
from ._table import unlink_tables


class Startup:
    """The lock and the data segment one coordinator run takes (its thread only).

    Construction changes nothing. ``config`` is the validated settings.
    """

    def __init__(self, name: str, config: ServerConfig) -> None:
        self.name = name
        self.config = config
        self.channel_layout = C.ChannelLayout(max_clients=config.max_clients, ring_size=config.ring_size,
                                              reply_size=config.reply_size)
        self.lock_fd = -1
        #: the data segment was made by this start (not adopted)
        self.created = False

    def _segment_exists(self) -> bool:
        try:
            posix_ipc.SharedMemory(L.data_name(self.name), read_only=True).close_fd()
        except posix_ipc.ExistentialError:
            return False
        return True

    def check_space_first(self) -> None:
        """Before the lock: when no segment exists and the sizes are known, refuse sizes
        /dev/shm cannot hold at once, having made nothing at all (see :meth:`check_space`)."""
        cfg = self.config
        if not self._segment_exists() and (cfg.path is None or None not in (cfg.capacity, cfg.key_size, cfg.value_size)):
            # Sizes known before the lock: refuse at once, having made nothing at all
            # (with a data directory and sizes left to its manifest: in open_segment).
            self.check_space(new_layout(cfg))

    def take_lock(self) -> None:
        shm = posix_ipc.SharedMemory(L.lock_name(self.name), posix_ipc.O_CREAT, mode=0o600, size=0)
        fd = shm.fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = "unknown"
            try:
                seg = open_segment(self.name, timeout=0.5)
                pid = seg.q[L.H_COORD_PID] or "starting"
                seg.close()
            except ShmStoreError:
                pass
            raise CoordinatorRunningError(
                f"store {self.name!r} is already served by a coordinator (pid {pid}); "
                f"connect to it with shmstore.connect({self.name!r}) or stop it first"
            ) from None
        self.lock_fd = fd

    def open_segment(self, manifest: object | None) -> Segment:
        """Adopt the store's data segment, or create one; ``manifest``: a durable store's
        data directory's (sizes and schema for a new segment), or None."""
        cfg = self.config
        try:
            seg = open_segment(self.name, writable=True, timeout=0.2)
        except ShmStoreError as e:
            if type(e).__name__ == "StoreNotFoundError":
                seg = None
            elif type(e).__name__ == "StoreTimeoutError":
                # A creator died before finishing the header: nothing was ever published.
                unlink_quietly(posix_ipc.SharedMemory, L.data_name(self.name))
                seg = None
            else:
                raise
        if seg is not None:
            lay = seg.layout
            names = ("capacity", "key_size", "value_size", "memory", "growth")
            have = (lay.capacity, lay.key_size, lay.value_size, lay.memory, lay.growth)
            if any(getattr(cfg, n) is not None and getattr(cfg, n) != h for n, h in zip(names, have)):
                seg.close()
                sizes = ", ".join(f"{n}={h}" for n, h in zip(names, have) if n != "growth" or lay.memory)
                raise IncompatibleStoreError(
                    f"store {self.name!r} exists with {sizes}; serve it with those sizes (or "
                    f"none), or destroy it first with shmstore.destroy({self.name!r})"
                )
            if cfg.schema_given and seg.q[L.H_SCHEMA_FP] != cfg.schema_fp:
                seg.close()
                raise SchemaMismatchError(
                    f"store {self.name!r} was created with another value_type (schema "
                    f"fingerprint differs); serve it with the same value_type or destroy it"
                )
            return seg
        layout = new_layout(cfg, manifest)
        schema_fp = manifest.schema_fp if manifest and not cfg.schema_given else cfg.schema_fp
        self.check_space(layout)
        self.created = True
        return create_segment(self.name, layout, schema_fp)

    def check_space(self, layout: L.Layout | None) -> None:
        """Refuse sizes that /dev/shm cannot hold, before creating anything.

        Counted: the data segment (``layout``; None when an existing one is adopted),
        the write channel and the redo area, at their full sizes. A POSIX shared memory
        object is sparse, so an oversized one is created without complaint and the
        coordinator dies of SIGBUS the first time a page does not fit, after it filled
        /dev/shm for every process on the host; hence the full sizes, not what is used
        at first.

        Raises:
            InvalidLayoutError: the sizes exceed /dev/shm's free space; the message gives
                the numbers and what to change.
        """
        cfg = self.config
        parts = []
        if layout is not None:
            parts.append(("data segment", layout.size))
        parts.append(("write channel", self.channel_layout.size))
        parts.append(("redo area", L.align(cfg.ring_size + 16, L.PAGE)))
        need = sum(n for _, n in parts)
        try:
            st = os.statvfs(L.SHM_DIR)
        except OSError:
            return  # no such directory to measure (not Linux): the creation itself decides
        free = st.f_bavail * st.f_frsize
        if need > free:
            mib = 1 << 20
            detail = ", ".join(f"{what} {n / mib:,.1f} MiB" for what, n in parts)
            raise InvalidLayoutError(
                f"store {self.name!r} needs {need / mib:,.1f} MiB of shared memory ({detail}) but "
                f"{L.SHM_DIR} has {free / mib:,.1f} MiB free of {st.f_blocks * st.f_frsize / mib:,.1f} MiB; "
                f"nothing was created. Serve it with a smaller capacity or value_size (or fewer "
                f"max_clients / a smaller ring_size), or give {L.SHM_DIR} more room (e.g. "
                f"mount -o remount,size=... {L.SHM_DIR}, or docker run --shm-size)"
            )

    def undo(self) -> None:
        """After a failed start: remove what this start made, so no half-made store is
        left (a later connect() gets StoreNotFoundError at once, not a wait for a
        segment "still being created"). A segment that existed before is kept (it is
        still readable), and so are its lock and redo area. Called holding the lock: the
        lock's name is unlinked before the lock is dropped, so no other coordinator can
        have made a new one meanwhile. The caller closes a segment this start created
        first."""
        if self.created:
            unlink_quietly(posix_ipc.SharedMemory, L.data_name(self.name))
            unlink_quietly(posix_ipc.SharedMemory, L.access_name(self.name))
            unlink_tables(self.name)
        if self.lock_fd < 0:
            return  # not ours to clean: we never held the store's lock
        try:
            posix_ipc.SharedMemory(L.data_name(self.name), read_only=True).close_fd()
            return  # a segment is there (adopted, or we failed before looking at it)
        except posix_ipc.ExistentialError:
            pass
        unlink_quietly(posix_ipc.SharedMemory, L.redo_name(self.name))
        unlink_quietly(posix_ipc.SharedMemory, L.lock_name(self.name))

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # drops the flock
            self.lock_fd = -1
