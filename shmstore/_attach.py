"""One attachment per process and store: what every handle of a process shares.

Design
------
A :class:`shmstore.Store` is a light handle. What costs a file descriptor, a mapping
or a client block lives in this process's one :class:`Attachment` to the store, kept
in a process-wide registry (store name -> attachment):

- the data segment's mapping (``_segment.Segment``; its fd is closed once mapped),
  and, for a store that evicts by LRU, its access segment's (read-write, see
  ``Segment.open_access``): inherited across fork like the data mapping, unmapped with it;
- the write session (``_writes._Writer``): the write channel, i.e. this process's
  client block, opened on the first write; its lock serializes the requests of every
  handle of the process, so frames enter the one ring in the order they were sent.
  The session itself is made on first use (:attr:`Attachment.writer`): a process that
  only reads never imports the write path (see ``shmstore._lazy``);
- the process's counters (``_counters._Counters``), which the client block publishes;
- the worker thread of the async calls (``_aio``), one per attachment.

So a second ``connect()`` costs a registry lookup plus the handle's own state (its
decoders, its read cache and ``get`` closure): microseconds, no fd, no mapping, no
client block. Per handle stay: ``value_type``, ``timeout``, the read cache, the
handle's counters (what ``stats()`` reports as "this handle") and its last queued
ticket (what its ``flush()`` waits for).

Reference counting: each handle holds one reference, released by its ``close()`` or,
for a handle dropped without ``close()``, by a ``weakref.finalize`` callback (never
``__del__``, whose order at exit and in cycles is not defined). The last release
closes the write session (flushing what is queued; the coordinator reclaims the block
when its OFD lock drops) and unmaps the segment, so fds, mappings and /dev/shm return
to what they were before the first ``connect()``.

A finalizer may run inside the garbage collector, in whatever thread allocated at that
moment - possibly one holding the registry lock. So a release only *tries* the lock;
if it is taken, the release is queued and done by the lock's holder before it lets go
(``_unlock``). Nothing else waits on the registry lock for long: opening a segment
happens outside it.

Fork: the at-fork hook (child side) gives every attachment a new write session (no
channel: the child's first write claims a block of its own; nothing of the parent's is
used or released) and drops the async thread, which did not survive the fork; the
mappings are inherited and keep serving reads. A destroyed segment (``destroy()`` and
a new ``serve()``) is replaced in the attachment by the first handle that notices
(:meth:`Attachment.current`); the old mapping is unmapped when the attachment goes.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import TYPE_CHECKING, Any

from . import _layout as L
from ._errors import StoreNotFoundError
from ._counters import _Counters
from ._segment import Segment
from ._shm import open_segment

if TYPE_CHECKING:  # made on first use: see Attachment.writer and aio_pool
    from concurrent.futures import ThreadPoolExecutor

    from ._writes import _Writer


class Attachment:
    """This process's mapping, write session, counters and async thread for one store.

    Thread-safe: ``refs`` changes under the registry lock, the segment under ``lock``,
    the write session under its own lock.
    """

    def __init__(self, name: str, seg: Segment, spin_us: float, timeout: float) -> None:
        self.name = name
        self.seg = seg
        self.timeout = timeout  # the first handle's: how long close() flushes
        self.counters = _Counters(name)  # the process's: what its client block shows
        self.counters.attach(seg, None)
        self.spin_us = spin_us
        #: the write session, None until the first use of :attr:`writer`
        self._writer: _Writer | None = None
        self._writer_lock = threading.Lock()  # not ``lock``: watch_hub() holds that one
        #: the process that made this attachment (or, after a fork, the child)
        self.pid = os.getpid()
        self.lock = threading.Lock()
        # Invariant: refs is the number of open handles holding this attachment; it is
        # in the registry while refs > 0.
        self.refs = 0
        self.old: list[Segment] = []  # destroyed mappings a handle may still read
        #: id(segment) -> its get_many probe (``_readers.make_readers``), built once
        self.probes: dict[int, Any] = {}
        self.aio: ThreadPoolExecutor | None = None
        self.hub: Any = None  # the watch wake-ups (``_feed._Hub``), made on first watch

    @property
    def writer(self) -> _Writer:
        """The write session, made on the first use: the first write, a watch, a
        snapshot, ``stats()``, or a reader's claim of a client block (``_counters``)."""
        w = self._writer
        if w is None:
            from ._writes import _Writer  # noqa: PLC0415  (numpy and all: see shmstore._lazy)

            with self._writer_lock:
                w = self._writer
                if w is None:
                    w = self._writer = _Writer(self.name, self.spin_us, self.counters)
        return w

    @property
    def has_writer(self) -> bool:
        """Whether the write session was made (else this process never wrote)."""
        return self._writer is not None

    @property
    def owner_pid(self) -> int:
        """The process whose mapping and client block these are."""
        w = self._writer
        return self.pid if w is None else w.pid

    def current(self, timeout: float) -> Segment:
        """The live segment, attaching to a successor if this one was destroyed.

        Raises:
            StoreNotFoundError: it was destroyed and nothing serves the name again.
        """
        with self.lock:
            seg = self.seg
            if seg.q[L.H_STATE] != L.STATE_DESTROYED:
                return seg
            try:
                new = open_segment(self.name, timeout=timeout)
            except StoreNotFoundError:
                raise StoreNotFoundError(
                    f"store {self.name!r} was destroyed; serve it again before reading"
                ) from None
            new.open_access()
            self.old.append(seg)  # other handles' get closures may still hold its views
            self.seg = new
            self.counters.attach(new, None)
            if self._writer is not None:
                self._writer.drop_channel()
            return new

    def aio_pool(self) -> ThreadPoolExecutor:
        """The async calls' worker thread (one per attachment, made on first use)."""
        with self.lock:
            if self.aio is None:
                from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 (1 MiB)

                self.aio = ThreadPoolExecutor(1, thread_name_prefix="shmstore-aio")
            return self.aio

    def watch_hub(self) -> Any:
        """The process's watch wake-ups for this store (``_feed._Hub``)."""
        from ._feed import _Hub  # noqa: PLC0415  (_feed is a mixin of the Store above us)

        with self.lock:
            if self.hub is None or self.hub.pid != os.getpid():
                self.hub = _Hub(self.writer)
            return self.hub

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self._writer_lock = threading.Lock()
        self.aio = None  # the parent's thread is not ours
        self.hub = None  # nor its watch registration
        self.pid = os.getpid()
        if self._writer is not None:
            self._writer.after_fork()  # zeroes the counters: a new process is a new client
        else:
            self.counters.reset()

    def close(self) -> None:
        """The last handle went: flush, give the client block back, unmap."""
        if self.aio is not None:
            # No work is queued (a queued call holds its handle). This may run on that
            # very thread (its last handle dropped there), which cannot wait for itself.
            on_it = threading.current_thread().name.startswith("shmstore-aio")
            self.aio.shutdown(wait=not on_it)
            self.aio = None
        hub, self.hub = self.hub, None
        if hub is not None and hub.sem is not None and hub.pid == os.getpid():
            hub.sem.close()  # nobody waits on it: a watcher holds a handle
        if self._writer is not None:
            self._writer.close(self.timeout)
        self.counters.attach(None, None)
        self.probes.clear()  # its numpy views of the mappings go before the mappings
        for seg in [*self.old, self.seg]:
            seg.close()
        self.old = []


# -- the registry ------------------------------------------------------------------------

# Invariant: _attachments and every Attachment.refs change only under _lock.
_lock = threading.Lock()
_attachments: dict[str, Attachment] = {}
_pending: collections.deque[tuple[Attachment, _Counters | None]] = collections.deque()


def _unlock() -> list[Attachment]:
    """Do the releases queued while the lock was held, then let go; returns the
    attachments to close (outside the lock)."""
    closing = []
    while _pending:
        att, counters = _pending.popleft()
        if _drop(att, counters):
            closing.append(att)
    _lock.release()
    return closing


def _drop(att: Attachment, counters: _Counters | None) -> bool:
    """One reference less (caller holds ``_lock``); True if it was the last."""
    if counters is not None:
        counters.push(att.counters)
    att.refs -= 1
    if att.refs > 0:
        return False
    if _attachments.get(att.name) is att:
        del _attachments[att.name]
    return True


def acquire(name: str, *, timeout: float, spin_us: float) -> Attachment:
    """This process's attachment to store ``name``, made if needed; one reference more.

    Raises:
        StoreNotFoundError, IncompatibleStoreError, StoreTimeoutError: as
            ``_shm.open_segment``.
    """
    _lock.acquire()
    try:
        att = _attachments.get(name)
        if att is not None:
            att.refs += 1
            return att
    finally:
        closing = _unlock()
    _close_all(closing)
    seg = open_segment(name, timeout=timeout)  # outside the lock: it may wait
    seg.open_access()  # LRU stores: the access bytes readers touch (None otherwise)
    _lock.acquire()
    try:
        att = _attachments.get(name)
        if att is None:
            att = _attachments[name] = Attachment(name, seg, spin_us, timeout)
            seg = None
        att.refs += 1
    finally:
        closing = _unlock()
    if seg is not None:
        seg.close()  # another thread attached first: use its mapping
    _close_all(closing)
    return att


def release(att: Attachment, counters: _Counters | None = None) -> None:
    """One reference less (a handle closed or was collected): the last one closes the
    attachment. Safe in a finalizer: if the registry lock is held, even by this thread,
    the release is queued for its holder."""
    if not _lock.acquire(blocking=False):
        _pending.append((att, counters))
        if not _lock.acquire(blocking=False):
            return  # the holder will do it (``_unlock`` runs before every release)
    else:
        _pending.append((att, counters))
    _close_all(_unlock())


def _close_all(atts: list[Attachment]) -> None:
    for att in atts:
        if att.owner_pid == os.getpid():
            att.close()
        else:  # a forked child's copy: nothing of the parent's to release
            for seg in [*att.old, att.seg]:
                seg.close()


def attached() -> dict[str, int]:
    """Store name -> open handles, of this process (for tests and ``shmstore`` tools)."""
    with _lock:
        return {name: att.refs for name, att in _attachments.items()}


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    for att in list(_attachments.values()):
        att.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
