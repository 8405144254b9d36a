"""The client handle users hold: :class:`Store`.

The write path (``put``, ``delete``, ``flush``, ``batch``, ...) is mixed in from ``_writes``,
as change feeds (``_feed``), ``ttl`` (``_ttl``) and the async calls (``_aio``) are.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import msgspec
import numpy as np

from . import _channel as C
from . import _layout as L
from ._errors import (
    InvalidKeyError,
    InvalidLayoutError,
    KeyTooLongError,
    SchemaMismatchError,
    ShmStoreError,
    StoreClosedError,
    StoreNotFoundError,
    ValueEncodingError,
    ValueTooLargeError,
)
from ._aio import AsyncMixin
from ._feed import FeedMixin
from ._many import MIN_KEYS, array_header, key_words
from ._segment import Segment, make_readers, open_segment
from ._ttl import TTLMixin
from ._writes import Batch, WritesMixin

from . import _stats
from ._stats import StoreStats

if TYPE_CHECKING:
    from ._snapshot import Snapshot
    from ._table import Table

# What shmstore/__init__.py imports from here (Batch lives in _writes, StoreStats in _stats).
__all__ = ["Batch", "Store", "StoreStats"]

#: get_many() validates optimistically this many times before asking the coordinator.
OPTIMISTIC_TRIES = 8
#: Records each handle's ``get`` keeps by default (``connect(read_cache=)``).
DEFAULT_READ_CACHE = 16384

_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Store(WritesMixin, FeedMixin, TTLMixin, AsyncMixin):
    """A handle on a shared store: lock-free reads, writes through the coordinator.

    Concurrency: reads take no lock of any kind and never block the coordinator; they
    return a value that was published at some instant during the call, never a torn
    one. Writes from several threads of one process are serialized on a process-local
    lock (one request in flight per handle); ordering per handle is kept, also for
    pipelined writes (``wait=False``).

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
        self.timeout = timeout
        self._spin_us = spin_us
        if not isinstance(read_cache, int) or isinstance(read_cache, bool) or read_cache < 0:
            raise InvalidLayoutError(
                f"read_cache must be an integer >= 0 (records kept per handle; 0 turns the "
                f"cache off), got {read_cache!r}")
        self._read_cache = read_cache
        self._value_type = value_type
        self._schema_fp = L.schema_fingerprint(value_type)
        self._seg: Segment | None = open_segment(name, timeout=timeout)
        self._check_schema(self._seg)
        self._decode = (msgspec.msgpack.Decoder(value_type) if value_type is not None
                        else msgspec.msgpack.Decoder()).decode
        self._decode_list = (msgspec.msgpack.Decoder(list[value_type]) if value_type is not None
                             else msgspec.msgpack.Decoder(list)).decode
        self._encode = msgspec.msgpack.Encoder().encode
        self._bind_fast_get()
        self._wlock = threading.Lock()
        self._chan: C.ClientChannel | None = None
        self._pid = os.getpid()
        self._last_ticket = 0
        _stats.init_counters(self)  # per-handle counters, published to the client block
        #: the Coordinator that shmstore.open() started for this handle, if it did
        self.coordinator = None
        _STORES.add(self)

    # -- attach / fork / close -------------------------------------------------------

    def _check_schema(self, seg: Segment) -> None:
        have = seg.q[L.H_SCHEMA_FP]
        self._writable_schema = have == self._schema_fp
        if self._value_type is not None and have != self._schema_fp:
            seg.close()
            raise SchemaMismatchError(
                f"store {self.name!r} holds values of another type than "
                f"{getattr(self._value_type, '__name__', self._value_type)!r} (schema "
                f"fingerprints differ); connect with the value_type it was served with"
            )

    def _live_segment(self) -> Segment:
        seg = self._seg
        if seg is None:
            raise StoreClosedError(f"store handle {self.name!r} is closed; connect again")
        if seg.q[L.H_STATE] == L.STATE_DESTROYED:
            return self._reattach()
        return seg

    def _reattach(self) -> Segment:
        """The segment was destroyed: attach to its successor, if there is one."""
        old = self._seg
        try:
            seg = open_segment(self.name, timeout=self.timeout)
        except StoreNotFoundError:
            raise StoreNotFoundError(
                f"store {self.name!r} was destroyed; serve it again before reading"
            ) from None
        self._check_schema(seg)
        if old is not None:  # keep the old mapping's counts in the handle's totals
            self._read_retries += old.retries - self._retries_base
            self._reads += self.get.reads() - self._get_base
            self._cache_hits += self.get.cache_hits() - self._hits_base
        self._seg = seg
        self._bind_fast_get()
        self._retries_base = self._get_base = self._hits_base = 0
        self._drop_channel()
        if old is not None:
            old.close()
        return seg

    def _after_fork(self) -> None:
        self.__dict__.pop("_aio", None)  # the parent's async-write thread is not ours
        self._wlock = threading.Lock()
        self._pid = os.getpid()
        if self._chan is not None:
            self._chan.drop_after_fork()
            self._chan = None
        self._last_ticket = 0
        _stats.init_counters(self)  # a new process is a new client: its counts start at 0

    def _drop_channel(self) -> None:
        if self._chan is not None:
            self._chan.close()
            self._chan = None

    def close(self) -> None:
        """Release the handle. Idempotent. Pending pipelined writes are flushed first."""
        if self._seg is None:
            return
        self._aio_close()
        if self._chan is not None and self._pid == os.getpid():
            try:
                self.flush()
            except ShmStoreError:
                pass  # the coordinator is gone: nothing left to flush to
            _stats.publish(self)  # the coordinator retires these when it reclaims the block
            self._drop_channel()
        self.__dict__.pop("get", None)  # the fast path holds views of the mapping
        self._seg.close()
        self._seg = None
        _STORES.discard(self)

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

    # -- keys and values -------------------------------------------------------------

    def _key(self, key: object, seg: Segment) -> bytes:
        if key.__class__ is str:
            kb = key.encode()  # type: ignore[union-attr]
        elif isinstance(key, (bytes, bytearray, memoryview)):
            kb = bytes(key)
        elif isinstance(key, str):
            kb = key.encode()
        else:
            raise InvalidKeyError(f"keys are str or bytes, not {type(key).__name__}")
        if len(kb) > seg.key_size:
            raise KeyTooLongError(
                f"key {key!r:.80} is {len(kb)} bytes; store {self.name!r} has key_size="
                f"{seg.key_size}. Use shorter keys or recreate the store with a larger key_size."
            )
        if not kb:
            raise InvalidKeyError("the empty key is not allowed")
        return kb

    def _value(self, value: object, seg: Segment) -> bytes:
        if not self._writable_schema:
            raise SchemaMismatchError(
                f"store {self.name!r} is typed; connect with its value_type to write to it"
            )
        try:
            vb = self._encode(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueEncodingError(f"cannot encode a {type(value).__name__} as msgpack: {e}") from e
        if self._value_type is not None:
            try:
                self._decode(vb)
            except msgspec.ValidationError as e:
                raise ValueEncodingError(
                    f"value does not match value_type {getattr(self._value_type, '__name__', self._value_type)}: {e}"
                ) from e
        if len(vb) > seg.value_size:
            raise ValueTooLargeError(
                f"value encodes to {len(vb)} bytes; store {self.name!r} has value_size="
                f"{seg.value_size}. Store less per key or recreate the store with a larger value_size."
            )
        return vb

    # -- reads (lock-free) ---------------------------------------------------------------

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is missing. Never blocks writers.

        Each handle replaces this method with a fast closure bound to its mapping
        (``_segment.make_readers``); this is the general path it falls back to.

        The fast ``get`` keeps up to ``read_cache`` records (``connect(read_cache=)``,
        default 16384) it has read. A cached record is answered again only after
        checking, on every call, that the store is live, that the index bucket that
        found it still points to its slot, and that the slot still carries the seq it
        was read under: three loads of shared memory instead of a hash, a probe and a
        copy. Since a slot the index points to is never rewritten and every write
        takes a new seq, a hit returns exactly what a fresh read would return at that
        moment. A miss is kept too, as the empty bucket that ended the walk and the
        index generation: the key's insert fills that bucket, and every move or
        removal of buckets bumps the generation, so a kept miss holds exactly while
        both are unchanged. Immutable values (str, bytes, int, float, bool, None) are
        returned as cached; others are decoded anew on each hit, so callers may
        change what they get. When the cache is full, nothing is added until 8x
        ``read_cache`` further uncached reads have passed; then it starts over.
        """
        seg = self._live_segment()
        r = seg.lookup(self._key(key, seg))
        if r is None:
            return default
        return self._decode(r[3])

    def _bind_fast_get(self) -> None:
        self.get, self._probe_many = make_readers(self._seg, self._decode, Store.get.__get__(self),
                                                  self._publish_counters, self._read_cache)

    def _publish_counters(self) -> None:
        _stats.publish_or_claim(self)

    def __getitem__(self, key: str | bytes) -> Any:
        seg = self._live_segment()
        r = seg.lookup(self._key(key, seg))
        self._reads += 1
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
        seg = self._live_segment()
        ksz = seg.key_size
        if keys.__class__ is not list:
            keys = list(keys)
        kw = key_words(keys, ksz) if len(keys) >= MIN_KEYS else None
        if kw is not None:
            words, lens = kw
            kbs = keys  # str or bytes: the probe encodes the few it needs
        else:
            words = None
            kbs = [k.encode() if k.__class__ is str else self._key(k, seg) for k in keys]
            lens = np.fromiter(map(len, kbs), np.int64, len(kbs))
            if len(kbs) and (lens.min() < 1 or lens.max() > ksz):
                self._key(kbs[int(np.flatnonzero((lens < 1) | (lens > ksz))[0])], seg)  # raises
        q = seg.q
        for _ in range(OPTIMISTIC_TRIES):
            e1 = q[L.H_EPOCH]
            fast, blob, found, top = self._probe_many(kbs, lens, words)
            # Accept only if no record read was written after E (its seq would exceed
            # 2E+2) and, when a key was missing, no key was deleted after E.
            missing = len(fast) + len(found) < len(kbs)
            if top <= 2 * e1 + 2 and (not missing or q[L.H_LAST_DELETE_EPOCH] <= e1):
                self._reads += len(kbs)
                if len(fast) == len(kbs):  # all found by numpy, in key order
                    return self._decode_list(blob)
                out = [default] * len(kbs)
                if len(fast):
                    for i, v in zip(fast.tolist(), self._decode_list(blob)):
                        out[i] = v
                for i, raw in found.items():
                    out[i] = self._decode(raw)
                return out
            self._read_retries += 1
        if words is not None:
            kbs = [k if k.__class__ is bytes else k.encode() for k in kbs]
        found, _ = self._request([C.OP_GET_MANY, 1, kbs], "get_many")
        self._reads += len(kbs)
        return self._decode_values([None if r is None else r[1] for r in found], default)

    def _decode_values(self, raw: list, default: Any) -> list:
        out = [default] * len(raw)
        present = [i for i, v in enumerate(raw) if v is not None]
        if present:
            decoded = self._decode_list(array_header(len(present)) + b"".join(raw[i] for i in present))
            for i, v in zip(present, decoded):
                out[i] = v
        return out

    def _scan_keys(self) -> Iterator[bytes]:
        """Keys of live-looking slots, read under their seqlocks (may repeat)."""
        import numpy as np

        seg = self._live_segment()
        words = seg.slot_words_view()
        meta = words[:, L.S_META]
        not_free = ((meta >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) == 0
        has_key = (meta & np.uint64(0xFFFF)) != 0
        live = np.flatnonzero(not_free & has_key)
        del words, meta
        for slot in live.tolist():
            r = seg.read_slot(slot, wait=False)  # an odd slot holds no published record
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
        from ._snapshot import take

        return take(self, timeout)

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
        from ._table import open_table

        return open_table(self, name, dtype, rows, timeout)

    # -- stats -----------------------------------------------------------------------

    def stats(self) -> StoreStats:
        """A snapshot of the store's counters: the coordinator's, every live client's,
        this handle's, and rates since this handle's previous call (see
        :class:`StoreStats` and ``shmstore._stats``)."""
        return _stats.collect(self)

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
        if timeout is None:
            timeout = max(self.timeout, 60.0)
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

        dest = os.path.abspath(os.fspath(dest))
        check_dest(dest)  # fail fast; the coordinator checks again
        if timeout is None:
            timeout = max(self.timeout, 300.0)
        return self._request([C.OP_BACKUP, 1, dest], "backup", timeout=timeout)


