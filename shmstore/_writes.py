"""The write path of a :class:`shmstore.Store`: its write session :class:`_Writer`, and
:class:`Batch`.

Design
------
Every write is one msgpack frame ``[op, wait, *args]`` that the Store has validated and
hands to its :class:`_Writer`, the process's write session for the store, shared by
every handle of the process (it lives in the process's ``_attach.Attachment``): the
write channel (``shmstore._channel``), opened lazily on the first write and reopened
after a fork or a coordinator restart, the write lock, and the ticket of the last
request. :meth:`_Writer.request` publishes the frame and, unless ``wait=False``, waits
until the coordinator's ``DONE`` counter passes its ticket, then reads the reply. One
request of the process is in flight at a time: it holds the session's ``lock``. So
frames enter the one ring, and are applied, in the order they were sent - per handle
and across the process's handles - also for pipelined writes (``wait=False``). A
frame the coordinator never consumed (it died first) is sent again to its successor;
pipelined writes that died with it are reported, never silently resent. The
concurrency, fork and durability contract is stated on :class:`shmstore.Store`.

``flush()`` is per handle for waiting and per process for errors: it waits until the
last write *this handle* queued is applied (each handle keeps its last channel and
ticket), and raises the first error a pipelined write of *any* handle of the process
met since the last flush of any of them - the coordinator keeps one unacknowledged
error per client block, and the block is the process's.

The session counts its requests in the process's counters (and in the calling
handle's, when given; see ``shmstore._stats``) and publishes the process's after each
waited request, after every ``PUBLISH_EVERY``-th pipelined one and at ``flush()``; it
knows nothing else of the Store.

Where a write's client time went (``scripts/write_profile.py``, py-spy, pipelined puts,
before this module's fast paths): ~15 us of CPU per ``put(wait=False)``, of which the
doorbell post ~25% (a futex wake of a sleeping coordinator, now once per coordinator
sleep: ``shmstore._channel``, Wake-ups), ``os.getpid()`` for the fork check ~12% (a
system call: glibc does not cache it; now a page the kernel wipes in a forked child,
``MADV_WIPEONFORK``), publishing the counters ~15% (now every ``PUBLISH_EVERY``-th
pipelined write), the frame's Python stores ~8% (now ``_cwrite.ring_publish``), the
rest Store.put's checks and encoding.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time
from typing import Any, Protocol

import msgspec

from . import _channel as C
from . import _layout as L
from ._errors import (
    CoordinatorUnavailableError,
    ShmStoreError,
    StoreTimeoutError,
    TooManyClientsError,
    from_wire,
)
from ._segment import Segment, coordinator_alive
from ._stats import _Counters
from ._ttl import expiry_ns

_frame = msgspec.msgpack.Encoder().encode

#: pipelined writes between two publishes of the process's counters (flush publishes)
PUBLISH_EVERY = 32


def _fork_mark() -> mmap.mmap:
    """One private page reading 1 in this process and 0 in a forked child: the kernel
    wipes it at fork (``MADV_WIPEONFORK``, Linux 4.14). Where that is not available it
    reads 0, and the caller asks ``os.getpid()`` every time."""
    m = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Python 3.11's mmap does not name it; Linux's value is 18 (an older kernel: EINVAL).
    wipe = getattr(mmap, "MADV_WIPEONFORK", 18 if sys.platform.startswith("linux") else None)
    if wipe is not None:
        try:
            m.madvise(wipe)
            m[0] = 1
        except OSError:
            pass  # an older kernel: stays 0, the pid is checked
    return m


class _Writer:
    """One process's write session for a store: channel, write lock, last ticket.

    Thread-safe: every use of the channel holds ``lock``. After a fork,
    :meth:`after_fork` gives the child a session of its own (no channel yet, a new lock,
    zeroed counters); nothing of the parent's channel is used or released.
    """

    def __init__(self, name: str, spin_us: float, counters: _Counters) -> None:
        self.name = name
        self.spin_us = spin_us
        self.counters = counters
        self.lock = threading.Lock()
        # Invariant: chan, last_ticket and the counters' write fields change only under
        # lock, in the process ``pid``.
        self.chan: C.ClientChannel | None = None
        self.pid = os.getpid()
        self._mark = _fork_mark()
        self.last_ticket = 0

    def after_fork(self) -> None:
        """In a forked child: forget the parent's channel, start a new client."""
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self._mark = _fork_mark()
        if self.chan is not None:
            self.chan.drop_after_fork()
            self.chan = None
        self.last_ticket = 0
        self.counters.reset()  # a new process is a new client: its counts start at 0

    def forked(self) -> bool:
        """This process is a fork of the one that made the session (no system call
        while the fork mark reads 1: see :func:`_fork_mark`)."""
        return self._mark[0] != 1 and self.pid != os.getpid()

    def _count_write(self, mine: _Counters | None) -> None:
        self.counters.writes += 1
        if mine is not None:
            mine.writes += 1

    def drop_channel(self) -> None:
        if self.chan is not None:
            self.chan.close()
            self.chan = None

    def channel(self, seg: Segment, deadline: float, waited: float = 0.0) -> C.ClientChannel:
        """This process's write channel, (re)opened as needed; caller holds ``lock``.

        ``waited``: the timeout to name in the error when no coordinator comes.
        """
        ch = self.chan
        if ch is not None and ch.alive():
            stale = time.time_ns() - seg.q[L.H_HEARTBEAT] > 2_000_000_000
            if not stale or coordinator_alive(seg):
                return ch
        if ch is not None:
            self.drop_channel()
        while True:
            if seg.q[L.H_COORD_INCARNATION] and coordinator_alive(seg):
                try:
                    self.chan = C.ClientChannel(self.name, seg.q, spin_us=self.spin_us,
                                                timeout=max(0.1, deadline - time.monotonic()))
                    return self.chan
                except CoordinatorUnavailableError:
                    pass  # it went away during the handshake: wait for the next one
                except TooManyClientsError:
                    # A dead client's block comes back within a coordinator tick.
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                raise CoordinatorUnavailableError(
                    f"store {self.name!r}: no coordinator is running (waited "
                    f"{waited} s). Reads still work; start one with "
                    f"shmstore.serve({self.name!r}) or `shmstore serve {self.name}`."
                )
            time.sleep(0.01)

    def claim(self, seg: Segment, timeout: float) -> bool:
        """Open a channel if none is alive, unless another thread holds the lock.

        True if the session has a live channel afterwards (for a reader process's
        counters, see ``shmstore._stats``).
        """
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.chan is None or not self.chan.alive():
                self.channel(seg, time.monotonic() + timeout, timeout)
        except ShmStoreError:
            return False
        finally:
            self.lock.release()
        return True

    def request(self, seg: Segment, frame: list, what: str, wait: bool, timeout: float,
                mine: _Counters | None = None) -> Any:
        """Send one frame and, with ``wait``, return the coordinator's reply.

        ``mine``: the sending handle's counters (counted too, and told the ticket).

        Raises:
            ShmStoreError: the error the coordinator replied with (rebuilt), or
                :class:`CoordinatorUnavailableError` / :class:`StoreTimeoutError`.
        """
        payload = _frame(frame)
        deadline = time.monotonic() + timeout
        counters = self.counters
        with self.lock:
            if self.forked():  # forked without the at-fork hook (vfork-ish)
                self.after_fork()
            t0 = time.perf_counter_ns()
            try:
                while True:
                    ch = self.channel(seg, deadline, timeout)
                    ticket = ch.publish(payload, deadline)
                    self.last_ticket = ticket
                    self._count_write(mine)
                    if mine is not None:
                        mine.last_chan, mine.last_ticket = ch, ticket
                        mine.push(counters)  # its reads so far: the publish below shows them
                    if not wait:
                        if not ticket % PUBLISH_EVERY:
                            counters.publish(ch)
                        return None
                    try:
                        ch.wait_done(ticket, deadline, what)
                        break
                    except C.NotConsumed:
                        if self._unflushed_lost(ch, ticket - 1):
                            raise
                        # The coordinator died before reading it: wait for the next one.
                        self.drop_channel()
            except StoreTimeoutError:
                counters.timeouts += 1
                if mine is not None:
                    mine.timeouts += 1
                counters.publish(self.chan)
                raise
            t, status, result = ch.reply()
            if t != ticket:
                raise CoordinatorUnavailableError(f"reply for {what} lost (got ticket {t}, want {ticket})")
            ns = time.perf_counter_ns() - t0
            counters.note_write(ns, status != C.ST_OK)
            if mine is not None:
                mine.note_write(ns, status != C.ST_OK)
            counters.publish(ch)
        if status != C.ST_OK:
            raise from_wire(result[0], result[1])
        return result

    def _unflushed_lost(self, ch: C.ClientChannel, last: int) -> bool:
        """True (and raise) if queued writes before ``last`` died with the coordinator."""
        done = ch.chan.q[ch.w + C.C_DONE]
        if done < last:
            self.drop_channel()
            raise CoordinatorUnavailableError(
                f"store {self.name!r}: the coordinator stopped before applying "
                f"{last - done} queued write(s) of this handle; they were not applied"
            )
        return False

    def flush(self, timeout: float, mine: _Counters | None = None) -> None:
        """Wait until every write the handle of ``mine`` (None: this session) queued is
        applied; raise the first error a pipelined write of this process met since the
        last flush (see the module docstring)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            ch = self.chan
            if ch is None or self.forked():
                return
            last = self.last_ticket
            if mine is not None:
                # A ticket of an older channel: that channel is gone, and so is what it
                # could report (its loss was raised when it was dropped).
                last = mine.last_ticket if mine.last_chan is ch else 0
            if last:
                try:
                    ch.wait_done(last, deadline, "queued writes")
                except C.NotConsumed:
                    self._unflushed_lost(ch, last)
            self.counters.publish(ch)
            err = ch.take_error()
        if err is not None:
            _, type_name, message = err
            raise from_wire(type_name, message)

    def close(self, timeout: float) -> None:
        """Flush what is queued, publish the counters and release the channel (in the
        process that opened it; a forked child's copy holds nothing to release)."""
        if self.chan is None or self.forked():
            return
        try:
            self.flush(timeout)
        except ShmStoreError:
            pass  # the coordinator is gone: nothing left to flush to
        self.counters.publish(self.chan)  # the coordinator retires these when it reclaims the block
        self.drop_channel()


class _Client(Protocol):
    """What a :class:`Batch` needs of its :class:`shmstore.Store` (a module above this
    one): the live mapping, key and value validation, and the request."""

    def _live_segment(self) -> Segment: ...

    def _key(self, key: object, seg: Segment) -> bytes: ...

    def _value(self, value: object, seg: Segment) -> bytes: ...

    def _request(self, frame: list, what: str, *, wait: bool = True,
                 timeout: float | None = None) -> Any: ...


class Batch:
    """Puts and deletes applied atomically on exit of its ``with`` block.

    Nothing is sent if the block raises. Sizes are checked as ops are added.
    """

    def __init__(self, store: _Client, wait: bool) -> None:
        self._store = store
        self._wait = wait
        self._ops: list[list] = []
        self.results: list | None = None

    def put(self, key: str | bytes, value: Any, *, ttl: float | None = None) -> None:
        seg = self._store._live_segment()
        self._ops.append([C.OP_PUT, self._store._key(key, seg), self._store._value(value, seg),
                          expiry_ns(ttl)])

    def delete(self, key: str | bytes) -> None:
        seg = self._store._live_segment()
        self._ops.append([C.OP_DELETE, self._store._key(key, seg)])

    def __len__(self) -> int:
        return len(self._ops)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None or not self._ops:
            return
        self.results = self._store._request([C.OP_BATCH, int(self._wait), self._ops], "batch",
                                            wait=self._wait)
