"""The write path of a :class:`shmstore.Store`: :class:`WritesMixin` and :class:`Batch`.

Design
------
Every write is one msgpack frame ``[op, wait, *args]`` sent through the process's
write channel (``shmstore._channel``), opened lazily on the first write and reopened
after a fork or a coordinator restart. :meth:`WritesMixin._request` publishes the
frame and, unless ``wait=False``, waits until the coordinator's ``DONE`` counter
passes its ticket, then reads the reply. One request is in flight per handle: callers
hold the handle's ``_wlock``. A frame the coordinator never consumed (it died first)
is sent again to its successor; pipelined writes (``wait=False``) that died with it
are reported, never silently resent. The concurrency, fork and durability contract
is stated on :class:`shmstore.Store`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import msgspec

from . import _channel as C
from . import _layout as L
from . import _stats
from ._errors import (
    CoordinatorUnavailableError,
    StoreTimeoutError,
    TooManyClientsError,
    ValueEncodingError,
    from_wire,
)
from ._segment import Segment, coordinator_alive
from ._ttl import expiry_ns

if TYPE_CHECKING:
    from ._store import Store

_frame = msgspec.msgpack.Encoder().encode


class WritesMixin:
    """Writes through the coordinator: ``put``, ``delete``, ``compare_and_set``,
    ``incr``, ``flush`` and ``batch``; mixed into :class:`shmstore.Store`."""

    def _channel(self, seg: Segment, deadline: float) -> C.ClientChannel:
        """This process's write channel, (re)opened as needed; caller holds _wlock."""
        ch = self._chan
        if ch is not None and ch.alive():
            stale = time.time_ns() - seg.q[L.H_HEARTBEAT] > 2_000_000_000
            if not stale or coordinator_alive(seg):
                return ch
        if ch is not None:
            self._drop_channel()
        while True:
            if seg.q[L.H_COORD_INCARNATION] and coordinator_alive(seg):
                try:
                    self._chan = C.ClientChannel(self.name, seg.q, spin_us=self._spin_us,
                                                 timeout=max(0.1, deadline - time.monotonic()))
                    return self._chan
                except CoordinatorUnavailableError:
                    pass  # it went away during the handshake: wait for the next one
                except TooManyClientsError:
                    # A dead client's block comes back within a coordinator tick.
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                raise CoordinatorUnavailableError(
                    f"store {self.name!r}: no coordinator is running (waited "
                    f"{self.timeout} s). Reads still work; start one with "
                    f"shmstore.serve({self.name!r}) or `shmstore serve {self.name}`."
                )
            time.sleep(0.01)

    def _request(self, frame: list, what: str, *, wait: bool = True, timeout: float | None = None) -> Any:
        seg = self._live_segment()
        payload = _frame(frame)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._wlock:
            if self._pid != os.getpid():  # forked without the at-fork hook (vfork-ish)
                self._after_fork()
            t0 = time.perf_counter_ns()
            try:
                while True:
                    ch = self._channel(seg, deadline)
                    ticket = ch.publish(payload, deadline)
                    self._last_ticket = ticket
                    self._writes += 1
                    if not wait:
                        _stats.publish(self, pid_checked=True)
                        return None
                    try:
                        ch.wait_done(ticket, deadline, what)
                        break
                    except C.NotConsumed:
                        if self._unflushed_lost(ch, ticket - 1):
                            raise
                        # The coordinator died before reading it: wait for the next one.
                        self._drop_channel()
            except StoreTimeoutError:
                self._timeouts += 1
                _stats.publish(self, pid_checked=True)
                raise
            t, status, result = ch.reply()
            if t != ticket:
                raise CoordinatorUnavailableError(f"reply for {what} lost (got ticket {t}, want {ticket})")
            _stats.note_write(self, time.perf_counter_ns() - t0, status != C.ST_OK)
            _stats.publish(self, pid_checked=True)
        if status != C.ST_OK:
            raise from_wire(result[0], result[1])
        return result

    def put(self, key: str | bytes, value: Any, *, ttl: float | None = None, wait: bool = True,
            timeout: float | None = None) -> int | None:
        """Write a record. Returns its new version, or None with ``wait=False``.

        With ``wait=False`` the op is queued and the call returns at once (it blocks
        only while the queue is full); :meth:`flush` waits for it and raises its error.

        ``ttl``: seconds until the record expires (reads as missing; the coordinator
        reclaims it). Without it the record has no expiry, even if the one it replaces
        had (``incr`` keeps an expiry); see ``shmstore/_ttl.py``.
        """
        seg = self._live_segment()
        kb = self._key(key, seg)
        return self._request([C.OP_PUT, int(wait), kb, self._value(value, seg), expiry_ns(ttl)], "put",
                             wait=wait, timeout=timeout)

    def __setitem__(self, key: str | bytes, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: str | bytes, *, wait: bool = True, timeout: float | None = None) -> bool | None:
        """Remove a record. Returns whether it existed (None with ``wait=False``)."""
        seg = self._live_segment()
        return self._request([C.OP_DELETE, int(wait), self._key(key, seg)], "delete",
                             wait=wait, timeout=timeout)

    def __delitem__(self, key: str | bytes) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def compare_and_set(self, key: str | bytes, value: Any, *, version: int, ttl: float | None = None,
                        timeout: float | None = None) -> int:
        """Write only if the record's version is ``version`` (0: it must not exist,
        or has expired). ``ttl`` as in :meth:`put`.

        Returns:
            The new version.

        Raises:
            VersionConflictError: the version differs; nothing was written.
        """
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        seg = self._live_segment()
        return self._request([C.OP_CAS, 1, self._key(key, seg), self._value(value, seg), version,
                              expiry_ns(ttl)],
                             "compare_and_set", timeout=timeout)

    def incr(self, key: str | bytes, delta: int = 1, *, timeout: float | None = None) -> int:
        """Add ``delta`` to an integer record atomically; a missing key counts from 0.

        Returns:
            The new value.
        """
        if not isinstance(delta, int) or isinstance(delta, bool):
            raise ValueEncodingError(f"incr needs an int delta, got {type(delta).__name__}")
        if not -(1 << 63) <= delta < (1 << 64):
            raise ValueEncodingError(f"incr delta {delta} is outside the 64-bit range msgpack stores")
        seg = self._live_segment()
        if not self._writable_schema:
            self._value(0, seg)  # raises the schema error
        if self._value_type is not None:
            try:
                msgspec.convert(0, self._value_type)
            except msgspec.ValidationError:
                raise ValueEncodingError(
                    f"incr stores integers, which value_type {self._value_type!r} does not accept"
                ) from None
        return self._request([C.OP_INCR, 1, self._key(key, seg), delta], "incr", timeout=timeout)

    def _unflushed_lost(self, ch: C.ClientChannel, last: int) -> bool:
        """True (and raise) if queued writes before ``last`` died with the coordinator."""
        done = ch.chan.q[ch.w + C.C_DONE]
        if done < last:
            self._drop_channel()
            raise CoordinatorUnavailableError(
                f"store {self.name!r}: the coordinator stopped before applying "
                f"{last - done} queued write(s) of this handle; they were not applied"
            )
        return False

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every write this handle queued is applied.

        Raises:
            ShmStoreError: the first error any queued write met since the last flush.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._wlock:
            ch = self._chan
            if ch is None or self._last_ticket == 0:
                return
            try:
                ch.wait_done(self._last_ticket, deadline, "queued writes")
            except C.NotConsumed:
                self._unflushed_lost(ch, self._last_ticket)
            err = ch.take_error()
        if err is not None:
            _, type_name, message = err
            raise from_wire(type_name, message)

    def batch(self, *, wait: bool = True) -> Batch:
        """Collect puts and deletes, applied atomically when the ``with`` block exits.

        Readers see all of the batch or none of it through :meth:`get_many`.
        """
        return Batch(self, wait)


class Batch:
    """Puts and deletes applied atomically on exit of its ``with`` block.

    Nothing is sent if the block raises. Sizes are checked as ops are added.
    """

    def __init__(self, store: Store, wait: bool) -> None:
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
