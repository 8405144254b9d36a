"""Change feeds: ``store.changes(since)`` and ``store.watch()``.

Design
------
Every slot's seqlock stamp is ``2E+2`` for the epoch E that last wrote or freed it,
and a freed slot keeps its key. So the keys changed after epoch ``since`` are the keys
of the slots whose stamp exceeds ``2*since + 2``: the slots are enumerated from a copy
of the page table (``Segment.slot_refs``), one numpy pass over their stamps finds the
changed ones, a second copies their key bytes, a third re-reads their stamps and their
pages' entries to validate the copy (a slot that moved meanwhile is read again under
its seqlock; a slot whose page was reassigned to another class is dropped: the page
move erased those changes and raised the horizon, below). Deletions are
in it (the freed slot keeps the key), and so are expirations (the coordinator reclaims
an expired record with a delete, at its own epoch: until then the record's slot has
not changed, so a feed reports an expiry once the coordinator has reclaimed it, within
about a tick).

A freed slot can be reused for another key, and a page can be reassigned to
another class (its records evicted, its slots rewritten), which would erase the record
of a deletion. The coordinator reuses free slots oldest-freed first and raises the header
word ``H_FEED_HORIZON`` to the erased epoch before it writes the slot (see
``coordinator/_freering.py``). :meth:`FeedMixin.changes` checks ``since`` against the
horizon before and after its scan and raises :class:`FeedTruncatedError` instead of
ever returning an incomplete list.

Watching: the coordinator posts a per-client semaphore after every loop iteration in
which the epoch moved (``coordinator/_watch.py``); :meth:`FeedMixin.watch` sleeps on
it and calls :meth:`changes` when woken. It also wakes every second on its own (to
notice a restarted coordinator), which costs nothing measurable.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Iterator

import posix_ipc

from . import _layout as L
from ._compiled import acquire as fence
from ._check_args import check_timeout, key_bytes
from ._errors import CoordinatorUnavailableError, FeedTruncatedError, InvalidCursorError
from ._lazy import LazyModule

# Mixed into every Store, so imported by every reader: numpy and the write channel
# come in with the first changes() or watch() (see shmstore._lazy).
if TYPE_CHECKING:
    import numpy as np

    from . import _channel as C
    from ._writes import _Writer
else:
    np = LazyModule("numpy")
    C = LazyModule("shmstore._channel")

#: longest single sleep of a watcher; it re-checks the coordinator in between
WATCH_SLICE = 1.0


class FeedMixin:
    """``Store.changes`` and ``Store.watch``; mixed into :class:`shmstore.Store`."""

    def changes(self, since: int, *, prefix: str | bytes | None = None) -> tuple[list[bytes], int]:
        """The keys whose record changed after epoch ``since``, and the epoch to
        continue from.

        Lock-free (a few numpy passes over the slot stamps), like any read. A change
        is a put, update, delete, incr, or the coordinator's reclaim of an expired
        record. Keys only, each once (an update touches two slots of one key), sorted,
        as bytes: read the values you need with ``get``/``get_many``.

        Typical loop::

            cursor = store.epoch
            ...
            keys, cursor = store.changes(cursor)

        Every key whose record changed after ``since`` and up to the returned epoch is
        in the list; a key changed after the returned epoch may be too (it will be
        listed again by the next call).

        Args:
            since: an epoch, from ``store.epoch`` or a previous call.
            prefix: only keys starting with it.

        Returns:
            ``(keys, epoch)``.

        Raises:
            FeedTruncatedError: some change after ``since`` may no longer be known
                (its slot was reused: the store is busy and nearly full, or the caller
                fell far behind), or ``since`` is ahead of the store (a cursor from a
                destroyed and recreated store). Re-read what you need in full, then
                continue from ``store.epoch``.
            InvalidCursorError: ``since`` is not an int >= 0.
        """
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise InvalidCursorError(f"since must be an epoch (an int >= 0, e.g. store.epoch), got {since!r}")
        pb = self._prefix(prefix)
        seg = self._live_segment()
        q = seg.q
        epoch = q[L.H_EPOCH]
        fence()  # the epoch before the stamps it bounds (acquire)
        if since > epoch:
            raise FeedTruncatedError(
                f"store {self.name!r}: since={since} is ahead of the store's epoch {epoch}; "
                f"the cursor belongs to an earlier incarnation of the store. Re-read in "
                f"full and continue from store.epoch"
            )
        self._check_horizon(q, since)
        keys: set[bytes] = set()
        if since < epoch and seg.core is not None:  # the scan in C (no numpy)
            keys = set(seg.core.changed_keys(2 * since + 2))
        elif since < epoch:
            pt = seg.page_table().copy()  # the slots' geometry this scan reads them by
            refs, _ = seg.slot_refs(pt)
            words = np.ndarray((len(seg.mm) // 8,), dtype=np.uint64, buffer=seg.mm)
            stamps = words[seg.slot0 + seg.slot_words * refs]
            cand = refs[stamps > np.uint64(2 * since + 2)]
            if len(cand):
                keys = self._keys_of(seg, words, cand, pt)
            del words
        # A slot reused during the scan raised the horizon before it was written.
        fence()
        self._check_horizon(q, since)
        if pb:
            keys = {k for k in keys if k.startswith(pb)}
        return sorted(keys), epoch

    def _prefix(self, prefix: str | bytes | None) -> bytes:
        if prefix is None:
            return b""
        return key_bytes(prefix, "prefix")  # InvalidKeyError: not str/bytes, no UTF-8 bytes

    def _check_horizon(self, q: memoryview, since: int) -> None:
        horizon = q[L.H_FEED_HORIZON]
        if since < horizon:
            raise FeedTruncatedError(
                f"store {self.name!r}: changes after epoch {since} are no longer all known "
                f"(slots that recorded changes up to epoch {horizon} were reused). Re-read "
                f"what you need in full (drop local caches), then continue from store.epoch"
            )

    @staticmethod
    def _keys_of(seg: object, words: np.ndarray, cand: np.ndarray, pt: np.ndarray) -> set[bytes]:
        """Keys of slots ``cand`` (refs under page table ``pt``), each read validated by
        its stamp and its page's entry."""
        ksz = seg.key_size
        kw = (ksz + 7) // 8
        base = 8 * seg.slot0 + L.SLOT_HEADER
        count = min(seg.nslots, (len(seg.mm) - base - 8 * kw) // L.SLOT_UNIT + 1)
        body = np.ndarray((count, 8 * kw), dtype=np.uint8, buffer=seg.mm, offset=base,
                          strides=(L.SLOT_UNIT, 1))
        live = seg.page_table()
        pages = cand >> seg.ref_shift
        seqw = seg.slot0 + seg.slot_words * cand
        inside = cand < count  # a key area past the mapping: read one by one below
        s1 = words[seqw]
        fence()  # the stamps before the keys
        meta = words[seqw + L.S_META]
        kbytes = body[np.where(inside, cand, 0)]
        fence()  # the keys before the stamps and the page entries again
        s2 = words[seqw]
        moved = live[pages] != pt[pages]
        del body, live
        # Invariant: a copied key is used only if its slot's stamp was even and did
        # not move across the copy, and its page was not reassigned meanwhile. A slot
        # of a reassigned page held changes the page move erased (the coordinator raised
        # the feed horizon for them, which the caller checks after the scan).
        ok = (s1 == s2) & ((s1 & np.uint64(1)) == 0) & ~moved & inside
        page_end = (pages + 1) << (seg.ref_shift + 4)  # bytes from the first page
        room = np.maximum(page_end - ((cand << 4) + L.SLOT_HEADER), 0)
        klen = np.minimum(np.minimum(meta & np.uint64(0xFFFF), np.uint64(ksz)).astype(np.int64), room)[ok]
        rows = np.ascontiguousarray(kbytes[ok][:, :ksz])
        # Bytes objects in one call: numpy's S dtype drops trailing NULs, so the keys
        # whose length then differs from the slot's are cut from the row exactly.
        fixed = rows.view(f"S{ksz}").ravel()
        got = fixed.tolist()
        short = np.flatnonzero(np.char.str_len(fixed) != klen) if len(fixed) else ()
        for i in short:
            got[i] = rows[i, : klen[i]].tobytes()
        keys = set(got)
        keys.discard(b"")
        for slot in cand[~ok & ~moved].tolist():
            r = seg.read_slot(slot)  # a slot being written: wait for it (microseconds)
            if r is not None and r[4]:
                keys.add(r[4])
        return keys

    def watch(self, prefix: str | bytes | None = None, timeout: float | None = None, *,
              since: int | None = None, min_interval: float = 0.01) -> Iterator[tuple[list[bytes], int]]:
        """Block until records change; yield ``(keys, epoch)`` for each batch of changes.

        The coordinator wakes the waiting process through a semaphore after each group
        of writes; the watcher then lists the changes with :meth:`changes` (so
        ``keys`` and ``epoch`` mean what they mean there). Nothing is polled in a loop:
        an idle watcher sleeps on the semaphore (waking once a second to notice a
        restarted coordinator). Several threads may watch through one handle.

        Args:
            prefix: only changes to keys starting with it (others do not end a wait).
            timeout: seconds to wait for the next change; when that passes with no
                change the iterator ends. None: wait forever.
            since: the epoch to start after (default: ``store.epoch`` now, so only
                changes from now on).
            min_interval: seconds between two scans of the store: changes arriving
                faster are listed together. Each scan reads every slot's stamp
                (about 1 ms per 100,000 slots), so this bounds what a watcher costs
                under a stream of writes (to keys outside its prefix, too).

        Raises:
            FeedTruncatedError: as in :meth:`changes`: the watcher fell too far behind
                to list every change. Re-read in full and watch again.
            InvalidArgumentError, InvalidKeyError, InvalidCursorError: a bad
                ``timeout`` (NaN, negative, not a number; ``inf`` is taken as None),
                ``prefix``, ``since`` or ``min_interval``, raised by this call, before
                the first ``next()``.
        """
        timeout = check_watch_args(self, prefix, timeout, since, min_interval)
        return self._watch(prefix, timeout, since, min_interval)

    def _watch(self, prefix: str | bytes | None, timeout: float | None, since: int | None,
               min_interval: float) -> Iterator[tuple[list[bytes], int]]:
        w = _Watcher(self, prefix, since, min_interval)
        while True:
            item = w.step(timeout)
            if item is None:
                return
            yield item

    def _watch_hub(self) -> _Hub:
        hub = self.__dict__.get("_hub")
        if hub is None or hub.pid != os.getpid():
            hub = self.__dict__["_hub"] = _Hub(self._writer)
        return hub


def check_watch_args(store: FeedMixin, prefix: object, timeout: object, since: object,
                     min_interval: object) -> float | None:
    """``watch``/``awatch``'s arguments, checked in the caller; returns the timeout
    (None: for ever)."""
    timeout = None if timeout is None else check_timeout(timeout, forever=True)
    store._prefix(prefix)
    _check_min_interval(min_interval)
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise InvalidCursorError(f"since must be an epoch (an int >= 0, e.g. store.epoch), got {since!r}")
    return timeout


def _check_min_interval(min_interval: object) -> None:
    if isinstance(min_interval, bool) or not isinstance(min_interval, (int, float)) or not (
            0 <= min_interval <= 60):
        raise InvalidCursorError(f"min_interval must be 0 to 60 seconds, got {min_interval!r}")


class _Watcher:
    """One watch: its cursor and prefix; ``step`` waits for and returns one batch."""

    def __init__(self, store: FeedMixin, prefix: str | bytes | None, since: int | None,
                 min_interval: float = 0.01) -> None:
        self.store = store
        self.prefix = prefix
        store._prefix(prefix)  # validate now
        _check_min_interval(min_interval)
        self.min_interval = float(min_interval)
        self.last_scan = 0.0
        self.since = store.epoch if since is None else since

    def step(self, timeout: float | None) -> tuple[list[bytes], int] | None:
        """The next batch of changes, or None after ``timeout`` seconds without one."""
        store = self.store
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pause = self.last_scan + self.min_interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # scans back to back: let changes gather
            self.last_scan = time.monotonic()
            keys, epoch = store.changes(self.since, prefix=self.prefix)
            self.since = epoch
            if keys:
                return keys, epoch
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            store._watch_hub().wait(store, epoch, WATCH_SLICE if left is None else min(left, WATCH_SLICE))


class _Hub:
    """A handle's watch wake-ups in this process: one thread sleeps on the semaphore,
    the others on a Condition it notifies when it wakes."""

    def __init__(self, writer: _Writer) -> None:
        self.writer = writer  # the handle's write session: the watch registers on its channel
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.leader = False
        # Invariant: only the leader touches these. The semaphore is closed only when
        # replaced (a new write channel), by the leader: never while a thread waits on
        # it, which sem_close does not allow.
        self.sem: posix_ipc.Semaphore | None = None
        self.sem_ch: object = None

    def wait(self, store: FeedMixin, epoch: int, timeout: float) -> None:
        """Sleep until the coordinator posts, the epoch moves past ``epoch``, or
        ``timeout`` passes."""
        with self.cond:
            if self.leader:
                self.cond.wait(timeout)
                return
            self.leader = True
        try:
            if store.epoch != epoch:
                return  # changed since the caller looked
            end = time.monotonic() + timeout
            sem = self._semaphore(store, timeout)
            if sem is None:
                # No coordinator (nothing changes until one returns): sleep the slice out.
                time.sleep(max(0.0, end - time.monotonic()))
                return
            try:
                sem.acquire(timeout)
            except posix_ipc.BusyError:
                pass
            except posix_ipc.SignalError:
                pass  # EINTR: a wake-up like any other; the signal's handler runs next
        finally:
            with self.cond:
                self.leader = False
                self.cond.notify_all()

    def _semaphore(self, store: FeedMixin, timeout: float) -> posix_ipc.Semaphore | None:
        """This process's watch semaphore, registering with the coordinator if needed."""
        seg = store._live_segment()
        deadline = time.monotonic() + max(timeout, 0.1)
        try:
            writer = self.writer
            with writer.lock:
                ch = writer.channel(seg, deadline)
                if self.sem is not None and self.sem_ch is ch:
                    return self.sem
                if self.sem is not None:
                    self.sem.close()  # the old channel's: nobody waits on it (we lead)
                    self.sem = self.sem_ch = None
                q = ch.chan.q
                token = int.from_bytes(os.urandom(8), "little") | 1
                q[ch.w + C.C_WATCH] = token
                ch.bell.release()
                while q[ch.w + C.C_WATCH_ACK] != token:
                    if time.monotonic() > deadline or not ch.alive():
                        return None
                    time.sleep(0.001)
                self.sem = posix_ipc.Semaphore(L.watch_sem_name(writer.name, ch.client))
                self.sem_ch = ch
                return self.sem
        except (CoordinatorUnavailableError, posix_ipc.ExistentialError):
            return None
