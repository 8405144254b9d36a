"""The client handle users hold: :class:`Store`.

The Store holds the public methods; its keys and values are checked, encoded and
decoded by its ``_codec.RecordCodec``. A handle is light: what costs a file
descriptor, a mapping or a client block is this process's one attachment to the store
(``_attach.Attachment``), shared by every handle the process opens on it and
reference-counted: the mapping (``_segment.Segment``), the write session
(``_writes._Writer``: channel, write lock, tickets) and the process's counters. The
handle keeps its own fast ``get`` closure with its read cache
(``_readers.make_readers``), its codec and its counters (``_counters._Counters``). A
write goes ``Store.put`` → ``_Writer.request`` → ``_channel.ClientChannel``. Change
feeds (``_feed``) and the async calls (``_aio``) are mixed in.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from . import _attach
from . import _layout as L
from ._errors import ShmStoreError, StoreClosedError, ValueEncodingError
from ._aio import AsyncMixin
from ._check_args import check_flag, check_read_cache, check_spin_us, check_timeout, check_version, key_list
from ._codec import RecordCodec
from ._counters import _Counters
from ._feed import FeedMixin
from ._lazy import LazyModule
from ._readers import make_readers
from ._segment import Segment
from ._ttl import expiry_ns, now_ns

# A process that only reads imports none of these (see ``shmstore._lazy``): the write
# path, numpy (key scans), snapshots, tables and stats come in with their first use.
if TYPE_CHECKING:
    import numpy as np

    from . import _channel as C
    from ._snapshot import Snapshot
    from ._stats import StoreStats
    from ._table import Table
    from ._writes import Batch, _Writer
else:
    np = LazyModule("numpy")
    C = LazyModule("shmstore._channel")

__all__ = ["Store"]

#: get_many() validates optimistically this many times before asking the coordinator.
OPTIMISTIC_TRIES = 8
#: Records each handle's ``get`` keeps by default (``connect(read_cache=)``).
DEFAULT_READ_CACHE = 16384

_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _publish(counters: _Counters, att: _attach.Attachment) -> None:
    """A handle's publish moment (see ``shmstore._stats``)."""
    counters.push(att.counters)
    att.counters.publish_or_claim(att.writer)


def _slow_get(ref: weakref.ref) -> Any:
    def get(key: str | bytes, default: Any = None) -> Any:
        store = ref()
        if store is None:
            raise StoreClosedError("store handle is gone")
        return Store.get(store, key, default)

    return get


class Store(FeedMixin, AsyncMixin):
    """A handle on a shared store: lock-free reads, writes through the coordinator.

    Handles are cheap: every handle a process opens on a store shares the process's one
    mapping and write channel (its client block), so ``connect()`` per request, per
    thread or per task is fine: after the first, it costs tens of microseconds and no
    file descriptor. A handle dropped without ``close()`` gives back what it alone held
    when it is collected; the last handle of a store gives back the mapping and the
    client block.

    Concurrency: reads take no lock of any kind and never block the coordinator; they
    return a value that was published at some instant during the call, never a torn
    one. Writes from all threads and handles of one process are serialized on the
    process's write lock (one request of the process in flight); ordering per handle
    is kept, also for pipelined writes (``wait=False``). :meth:`flush` waits for this
    handle's queued writes and reports the first error of any pipelined write of the
    process (see ``shmstore._writes``). Closing one handle never affects another.

    Fork: a handle inherited across ``fork()`` keeps reading through the inherited
    mapping; the child's first write opens a write channel of its own. Nothing of the
    parent's channel is used or released by the child.

    Durability: a write returns once the coordinator has applied it and made it as
    durable as the store's ``sync`` mode promises (memory-only stores: applied and
    visible to every reader). A write that fails with
    :class:`CoordinatorUnavailableError` *after* it was sent may or may not have been
    applied; the message says so.

    Keys are ``str`` (its UTF-8 bytes) or ``bytes``; values are anything msgspec
    encodes as msgpack, or instances of ``value_type`` when given.
    """

    def __init__(self, name: str, *, value_type: Any = None, timeout: float = 5.0,
                 spin_us: float = 50.0, read_cache: int = DEFAULT_READ_CACHE) -> None:
        self.name = L.check_name(name)
        check_timeout(timeout)  # checked before anything is opened
        check_spin_us(spin_us)
        self.timeout = timeout
        self._spin_us = spin_us
        self._read_cache = check_read_cache(read_cache)
        #: keys and values: checked, encoded and decoded by the codec, whose checks and
        #: decoder the handle calls as its own
        codec = self._codec = RecordCodec(self.name, value_type)
        self._key, self._value, self._decode = codec.key, codec.value, codec.decode
        #: this process's attachment: mapping, write session, process counters
        att = self._att = _attach.acquire(self.name, timeout=timeout, spin_us=spin_us)
        try:
            self._seg: Segment | None = att.current(timeout)
            codec.check_schema(self._seg)
        except BaseException:
            _attach.release(att)
            raise
        #: per-handle counters; the process's are the attachment's
        self._counters = _Counters(self.name)
        self._bind_fast_get()
        # Dropped without close(): give the reference back when collected.
        self._finalizer = weakref.finalize(self, _attach.release, att, self._counters)
        #: the Coordinator that shmstore.open() started for this handle, if it did
        self.coordinator = None
        _STORES.add(self)

    # -- attach / fork / close -------------------------------------------------------

    @property
    def _writer(self) -> _Writer:
        """This process's write session (channel, write lock, tickets), made by the
        attachment on the first use: a handle that only reads never makes one."""
        return self._att.writer

    def _live_segment(self) -> Segment:
        seg = self._seg
        if seg is None:
            raise StoreClosedError(f"store handle {self.name!r} is closed; connect again")
        if seg.q[L.H_STATE] == L.STATE_DESTROYED:
            return self._reattach()
        return seg

    def _reattach(self) -> Segment:
        """The segment was destroyed: attach to its successor, if there is one (the
        process's attachment does it once for all its handles)."""
        seg = self._att.current(self.timeout)
        if seg is not self._seg:
            self._codec.check_schema(seg)
            self._seg = seg
            self._bind_fast_get()  # the counters keep the old mapping's counts in the totals
        return seg

    def _after_fork(self) -> None:
        # The attachment's at-fork hook gave the child a new write session; this
        # handle's counts start at 0 too: a new process is a new client.
        self._counters.reset()

    def close(self) -> None:
        """Release the handle. Idempotent. Pending pipelined writes are flushed first.

        Other handles of the process are not affected; the last one to go gives back
        the process's mapping and client block.
        """
        if self._seg is None:
            return
        try:
            if self._att.has_writer:  # nothing was written: nothing to flush
                self._writer.flush(self.timeout, self._counters)
        except ShmStoreError:
            pass  # the coordinator is gone, or an async write failed: nothing to wait for
        self.__dict__.pop("get", None)  # the fast path holds views of the mapping
        self.__dict__.pop("_readers", None)
        self._counters.attach(None, None)
        self._seg = None
        _STORES.discard(self)
        self._finalizer()  # pushes the counters, releases the attachment

    def _aio_pool(self) -> Any:
        """The async calls' worker thread: the attachment's, shared by its handles."""
        if self._seg is None:
            raise StoreClosedError(f"store handle {self.name!r} is closed; connect again")
        return self._att.aio_pool()

    def _aio_close(self) -> None:
        pass  # the thread is the attachment's; it ends with the attachment

    def _watch_hub(self) -> Any:
        """The watch wake-ups: the attachment's, since the client block they register
        on is the process's (one watch semaphore per block)."""
        return self._att.watch_hub()

    @property
    def closed(self) -> bool:
        return self._seg is None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._seg is None else f"{len(self)} records"
        return f"<shmstore.Store {self.name!r} {state}>"

    # -- writes (through the coordinator: shmstore/_writes.py) -----------------------------

    def _request(self, frame: list, what: str, *, wait: bool = True, timeout: float | None = None) -> Any:
        """Send one validated frame through the write session (see ``_writes``)."""
        return self._writer.request(self._live_segment(), frame, what, wait,
                                    self.timeout if timeout is None else check_timeout(timeout), self._counters)

    def put(self, key: str | bytes, value: Any, *, ttl: float | None = None, wait: bool = True,
            timeout: float | None = None) -> int | None:
        """Write a record. Returns its new version, or None with ``wait=False``.

        With ``wait=False`` the op is queued and the call returns at once (it blocks
        only while the queue is full); :meth:`flush` waits for it and raises its error.

        ``ttl``: seconds until the record expires (reads as missing; the coordinator
        reclaims it). Without it the record has no expiry, even if the one it replaces
        had (``incr`` keeps an expiry); see ``shmstore/_ttl.py``.
        """
        if timeout is None:
            timeout = self.timeout
        else:
            check_timeout(timeout)
        seg = self._live_segment()
        kb = self._key(key, seg)
        return self._writer.request(seg, [C.OP_PUT, check_flag(wait, "wait"), kb,
                                          self._value(value, seg), expiry_ns(ttl)],
                                    "put", wait, timeout, self._counters)

    def __setitem__(self, key: str | bytes, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: str | bytes, *, wait: bool = True, timeout: float | None = None) -> bool | None:
        """Remove a record. Returns whether it existed (None with ``wait=False``)."""
        if timeout is None:
            timeout = self.timeout
        else:
            check_timeout(timeout)
        seg = self._live_segment()
        return self._writer.request(seg, [C.OP_DELETE, check_flag(wait, "wait"),
                                          self._key(key, seg)], "delete", wait, timeout, self._counters)

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
        check_version(version)
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        seg = self._live_segment()
        return self._writer.request(seg, [C.OP_CAS, 1, self._key(key, seg), self._value(value, seg), version,
                                          expiry_ns(ttl)],
                                    "compare_and_set", True, timeout, self._counters)

    def incr(self, key: str | bytes, delta: int = 1, *, timeout: float | None = None) -> int:
        """Add ``delta`` to an integer record atomically; a missing key counts from 0.

        Returns:
            The new value.
        """
        if not isinstance(delta, int) or isinstance(delta, bool):
            raise ValueEncodingError(f"incr needs an int delta, got {type(delta).__name__}")
        if not -(1 << 63) <= delta < (1 << 64):
            raise ValueEncodingError(f"incr delta {delta} is outside the 64-bit range msgpack stores")
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        seg = self._live_segment()
        self._codec.check_counter(seg)
        return self._writer.request(seg, [C.OP_INCR, 1, self._key(key, seg), delta], "incr", True, timeout, self._counters)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every write this handle queued is applied.

        Raises:
            ShmStoreError: the first error any queued write met since the last flush.
        """
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        if self._att.has_writer:  # else this process never wrote: nothing to wait for
            self._writer.flush(timeout, self._counters)

    def batch(self, *, wait: bool = True) -> Batch:
        """Collect puts and deletes, applied atomically when the ``with`` block exits.

        Readers see all of the batch or none of it through :meth:`get_many`.
        """
        from ._writes import Batch  # noqa: PLC0415  (the write path: see shmstore._lazy)

        return Batch(self, bool(check_flag(wait, "wait")))

    def cached(self, ttl: float | None = None, key: Any = None, *, lease: float = 30.0,
               timeout: float | None = None) -> Any:
        """Decorator: memoize a function across every process of the host.

        ``ttl``: seconds a result lives (None: until evicted or deleted). ``key``: a
        format of the arguments (``"user:{user_id}"``), a callable ``(args, kwargs) ->
        str``, or None for one derived from the function's qualified name and its
        arguments. Concurrent misses of one key compute once: one process claims the
        key for ``lease`` seconds, the others wait for its value up to ``timeout``
        (default: ``lease``), then compute themselves. How: ``shmstore/_memoize.py``.

        Raises:
            InvalidTTLError, InvalidArgumentError: a bad ``ttl``, ``lease``, ``timeout``
                or ``key``, raised by this call.
        """
        from ._memoize import cached  # noqa: PLC0415  (only for processes that memoize)

        return cached(self, ttl, key, lease=lease, timeout=timeout)

    # -- reads (lock-free) ---------------------------------------------------------------

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is missing. Never blocks writers.

        Each handle replaces this method with a fast closure bound to its mapping
        (``_readers.make_readers``); this is the general path it falls back to.

        The fast ``get`` keeps up to ``read_cache`` records (``connect(read_cache=)``,
        default 16384) it has read, and answers from them only while a fresh read
        would return the same at that moment (checked on every call: three loads of
        shared memory). Immutable values (str, bytes, int, float, bool, None) are
        returned as cached; others are decoded anew on each hit, so callers may
        change what they get. How the cache stays exact: ``_readers.make_readers``.
        """
        seg = self._live_segment()
        r = seg.lookup(self._key(key, seg))
        if r is None:
            return default
        return self._decode(r[3])

    def _bind_fast_get(self) -> None:
        # every 4096th get pushes this handle's counts to the process's and publishes
        # them, claiming a client block if need be
        publish = functools.partial(_publish, self._counters, self._att)
        # The closure reaches the handle only weakly: no cycle, so a dropped handle is
        # freed (and its reference released) at once, not at the next collection.
        readers = make_readers(self._seg, self._decode, _slow_get(weakref.ref(self)), publish,
                               self._read_cache, self._att.probes, self._codec.decode_list,
                               self._seg.access)
        self.get, self._readers = readers.get, readers
        self._counters.attach(self._seg, readers)

    def __getitem__(self, key: str | bytes) -> Any:
        seg = self._live_segment()
        r = seg.lookup(self._key(key, seg))
        self._counters.reads += 1
        if r is None:
            raise KeyError(key)
        return self._decode(r[3])

    def __contains__(self, key: object) -> bool:
        seg = self._live_segment()
        return seg.lookup(self._key(key, seg)) is not None

    def version(self, key: str | bytes) -> int | None:
        """The record's version (the epoch that last wrote it), or None if missing."""
        seg = self._live_segment()
        r = seg.lookup(self._key(key, seg))
        return None if r is None else r[2]

    def ttl(self, key: str | bytes) -> float | None:
        """Seconds until the record expires, or None if it has no expiry.

        Lock-free, like ``get``: the expiry word of a live slot is never rewritten
        (copy-on-write), so it is read after the lookup and checked against the slot's
        seqlock stamp (see ``shmstore/_ttl.py``).

        Raises:
            KeyError: the record is missing or has expired (as ``store[key]`` does).
        """
        seg = self._live_segment()
        r = seg.lookup(self._key(key, seg))
        if r is None:
            raise KeyError(key)
        expiry = r[4]  # read with the record, under its seqlock
        if not expiry:
            return None
        left = (expiry - now_ns()) / 1e9
        if left <= 0:
            raise KeyError(key)
        return left

    def __len__(self) -> int:
        return self._live_segment().q[L.H_COUNT]

    @property
    def epoch(self) -> int:
        """The store's commit epoch: every op up to it is applied."""
        return self._live_segment().q[L.H_EPOCH]

    def get_many(self, keys: Iterable[str | bytes], default: Any = None) -> list:
        """Values of several keys as of one epoch: never half of a batch.

        Reads optimistically without locks: it notes the commit epoch E, reads every
        key, and accepts the result only if no record it found was written after E
        and, if any key was missing, no key was deleted after E. After
        ``OPTIMISTIC_TRIES`` failed tries (writers keep changing these keys) it asks
        the coordinator, whose answer is consistent because it applies writes one at a
        time, so the call always ends.
        """
        if keys.__class__ is not list:
            keys = key_list(keys)  # InvalidKeyError: not an iterable of keys
        seg = self._live_segment()
        readers = self._readers
        if readers.native:
            return self._get_many_native(readers, keys, seg, default)
        kbs, lens, words = self._codec.many_keys(keys, seg)
        q = seg.q
        for _ in range(OPTIMISTIC_TRIES):
            e1 = q[L.H_EPOCH]
            fast, blob, found, top = readers.probe_many(kbs, lens, words)
            # Accept only if no record read was written after E (its seq would exceed
            # 2E+2) and, when a key was missing, no key was deleted after E.
            missing = len(fast) + len(found) < len(kbs)
            if top <= 2 * e1 + 2 and (not missing or q[L.H_LAST_DELETE_EPOCH] <= e1):
                self._counters.reads += len(kbs)
                return self._codec.decode_probed(len(kbs), fast, blob, found, default)
            self._counters.read_retries += 1
        if words is not None:
            kbs = [k if k.__class__ is bytes else k.encode() for k in kbs]
        found, _ = self._request([C.OP_GET_MANY, 1, kbs], "get_many")
        self._counters.reads += len(kbs)
        return self._codec.decode_values([None if r is None else r[1] for r in found], default)

    def _get_many_native(self, readers: Any, keys: list, seg: Segment, default: Any) -> list:
        """get_many through the compiled core: each try reads the whole batch in one
        call (``shmstore/_csrc/reader.c``), with the same epoch check as above."""
        for _ in range(OPTIMISTIC_TRIES):
            values = readers.get_many(keys, default)
            if values is NotImplemented:
                # A key the compiled path leaves to this one (not exact str or bytes, or
                # of a bad length): checked here, which raises the typed error for a bad
                # key, then read again as bytes.
                kbs = self._codec.many_keys(keys, seg)[0]
                keys = [k.encode() if isinstance(k, str) else bytes(k) for k in kbs]
                values = readers.get_many(keys, default)
            if values is not None and values is not NotImplemented:
                return values
            self._counters.read_retries += 1
        kbs = [k if k.__class__ is bytes else k.encode() for k in keys]
        found, _ = self._request([C.OP_GET_MANY, 1, kbs], "get_many")
        self._counters.reads += len(kbs)
        return self._codec.decode_values([None if r is None else r[1] for r in found], default)

    def _scan_keys(self) -> Iterator[bytes]:
        """Keys of live-looking slots, read under their seqlocks (may repeat)."""
        seg = self._live_segment()
        refs, _ = seg.slot_refs()  # from a copy of the page table
        meta = seg.headers(refs)[:, L.S_META]
        not_free = ((meta >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) == 0
        has_key = (meta & np.uint64(0xFFFF)) != 0
        live = refs[not_free & has_key]
        del meta
        for slot in live.tolist():
            # An odd slot holds no published record; a slot of a page reassigned since
            # the page table was copied reads as None (its records were evicted).
            r = seg.read_slot(slot, wait=False)
            if r is not None and r[4] and not r[3] & L.FLAG_FREE:
                yield r[4]

    def keys(self) -> Iterator[bytes]:
        """Iterate the keys (as bytes) of the records, each once, each validated.

        Not a snapshot: a record written during the scan may or may not appear.
        """
        for kb, _ in self._iter_records():
            yield kb

    def items(self) -> Iterator[tuple[bytes, Any]]:
        """Iterate ``(key bytes, value)`` pairs, each key once, each value validated."""
        for kb, vb in self._iter_records():
            yield kb, self._decode(vb)

    def _iter_records(self) -> Iterator[tuple[bytes, bytes]]:
        seen: set[bytes] = set()
        seg = self._live_segment()
        for kb in self._scan_keys():
            if kb in seen:
                continue
            r = seg.lookup(kb)  # the index's record, not a slot being replaced
            if r is not None:
                seen.add(kb)
                yield kb, r[3]

    __iter__ = keys

    # -- snapshots and tables (shmstore/_snapshot.py, shmstore/_table.py) ---------------

    def snapshot(self, *, timeout: float | None = None) -> Snapshot:
        """A consistent, private copy of the whole store as of one epoch.

        ``with store.snapshot() as snap: snap.get(...); snap.get_many(...)`` sees one
        epoch across every key and every call. It copies the index and the live
        records (lock-free, validated; after a few tries spoiled by writers, the
        coordinator makes the copy), so it always ends and never shows an inconsistent
        view; it costs O(store size) time and memory. See ``shmstore._snapshot``.
        """
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        seg = self._live_segment()
        from ._snapshot import take  # noqa: PLC0415  (numpy: see shmstore._lazy)

        return take(seg, self._decode, self._counters, self._writer, timeout)

    def table(self, name: str, dtype: Any = None, rows: int | None = None, *,
              timeout: float | None = None) -> Table:
        """A numpy table of this store: ``rows`` records of a structured ``dtype``.

        Opens the table ``name``, creating it (zero-filled) through the coordinator if
        it does not exist and ``dtype`` and ``rows`` are given. See :class:`Table`.

        Raises:
            TableNotFoundError: no such table, and no dtype/rows to create it.
            IncompatibleStoreError: it exists with another dtype or number of rows.
            TableDtypeError: ``dtype`` cannot be stored (object fields).
        """
        if timeout is not None:
            check_timeout(timeout)
        from ._table import open_table  # noqa: PLC0415  (numpy: see shmstore._lazy)

        return open_table(self, name, dtype, rows, timeout)

    # -- stats -----------------------------------------------------------------------

    def stats(self) -> StoreStats:
        """A snapshot of the store's counters: the coordinator's, every live client's,
        this handle's, and rates since this handle's previous call (see
        :class:`StoreStats` and ``shmstore._stats``)."""
        from ._stats import collect  # noqa: PLC0415  (numpy: see shmstore._lazy)

        return collect(self._live_segment(), self._counters, self._writer)

    # -- durability ------------------------------------------------------------------

    def checkpoint(self, *, timeout: float | None = None) -> int:
        """Make the coordinator write a checkpoint now and wait until it is durable.

        A durable store (served with ``path=``) then recovers without replaying the
        WAL written before it. Other writes wait until it is written (the automatic
        checkpoints, by contrast, are written by a background thread).

        Args:
            timeout: seconds to wait (default: the handle's timeout, at least 60 s).

        Returns:
            The checkpoint's epoch: every write up to it is in the checkpoint.

        Raises:
            DurabilityUnavailableError: the store is memory-only, or the checkpoint
                could not be written (the message says why; the WAL still holds
                everything).
        """
        timeout = max(self.timeout, 60.0) if timeout is None else check_timeout(timeout)
        return self._request([C.OP_CHECKPOINT, 1], "checkpoint", timeout=timeout)

    def backup(self, dest: str | os.PathLike, *, timeout: float | None = None) -> int:
        """Write a consistent copy of the store into ``dest``; returns its epoch.

        ``dest`` must be a new or empty directory. It becomes a complete data directory
        (mode 0700, files 0600: a manifest and one checkpoint, fsynced) that
        ``shmstore.serve(name, path=dest)`` recovers when no segment of that name
        exists, and that ``shmstore.restore`` copies. It works for memory-only stores
        too: that is how such a store is saved. The coordinator copies the records
        between two writes (writes wait only for that copy), writes the files in the
        background while serving other clients, and replies once they are durable.
        Nothing appears under ``dest`` until the backup is complete (it is written to
        a temporary directory next to it and renamed). An encrypted or compressed
        store's backup is stored the same way, with the same key.

        Args:
            dest: the directory to create (missing parents are created).
            timeout: seconds to wait (default: the handle's timeout, at least 300 s).

        Returns:
            The epoch the backup holds: every write up to it, none after.

        Raises:
            StorageError: ``dest`` exists and is not an empty directory, or cannot be
                written (nothing is left there).
        """
        from shmstore.coordinator._backup import check_dest  # noqa: PLC0415

        timeout = max(self.timeout, 300.0) if timeout is None else check_timeout(timeout)
        dest = os.path.abspath(os.fspath(dest))
        check_dest(dest)  # fail fast; the coordinator checks again
        return self._request([C.OP_BACKUP, 1, dest], "backup", timeout=timeout)


