"""A Django cache backend on a shmstore store: :class:`ShmStoreCache`.

Settings (docs/django.md)::

    CACHES = {
        "default": {
            "BACKEND": "shmstore.django.ShmStoreCache",
            "LOCATION": "myapp-cache",         # the store name
            "TIMEOUT": 300,                    # Django's default timeout
            "OPTIONS": {"memory": 256 << 20},  # serve() settings, used if this starts it
        }
    }

Every process (each Gunicorn worker) connects on its first cache call, not at import,
so a preloading master forks no handle; if no coordinator serves the store, the first
process to need one starts it (``shmstore.open``), detached by default so that it
outlives that worker. Aliases naming the same LOCATION share one store whatever their
KEY_PREFIX and VERSION, as aliases share one Redis; ``clear()`` empties the store.

Values go through ``shmstore._objcodec``: plain data as msgpack (readable by any
shmstore client), other objects pickled; see that module for why pickle is confined to
the framework backends.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Iterable
from typing import Any

try:
    from django.core.cache.backends.base import (
        DEFAULT_TIMEOUT,
        MEMCACHE_MAX_KEY_LENGTH,
        BaseCache,
        memcached_error_chars_re,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shmstore.django needs Django: pip install 'shmstore[django]' (or Django>=4.2)"
    ) from e

import shmstore
from shmstore import _frameworks
from shmstore._frameworks import fit_key, split_options
from shmstore._layout import check_name
from shmstore._objcodec import dumps, loads
from shmstore._ttl import MAX_TTL

__all__ = ["ShmStoreCache"]

#: serve() settings the backend uses when it starts the coordinator and OPTIONS leaves
#: them out: a memory budget with LRU eviction (a cache, not a database) and keys up to
#: 250 bytes (memcached's limit, which Django's key warnings are about) plus the
#: ":version:" prefix, kept from making the largest record need more than a 1 MiB page.
DEFAULT_OPTIONS = _frameworks.DEFAULT_OPTIONS  # (shared with shmstore.flask)

_MISSING = object()

#: what Django's memcache_key_warnings looks for (its own constants)
_MEMCACHED_MAX_KEY = MEMCACHE_MAX_KEY_LENGTH
_MEMCACHED_BAD_CHAR = memcached_error_chars_re.search
_CLEAR_CHUNK = 512

# One handle per (process, store): shared by aliases and threads (Django makes a
# backend instance per thread and alias; handles are thread-safe). Keyed by pid, so a
# forked child connects on its own first call; handles it inherited stay referenced
# (never closed in the child: they belong to the parent).
_handles: dict[str, tuple[int, shmstore.Store, int]] = {}
_inherited: list[shmstore.Store] = []
#: the coordinators this process started, per store (they are detached unless OPTIONS
#: says otherwise; kept so that a test or an operator can stop them)
started: dict[str, list[shmstore.Coordinator]] = {}
_handles_lock = threading.Lock()

#: bumped in every forked child: a backend instance compares it with the one it saw
#: when it took its handle (cheaper than os.getpid(), a system call, on every call)
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation, _handles_lock
    _fork_generation += 1
    _handles_lock = threading.Lock()  # a thread of the parent may have held it


os.register_at_fork(after_in_child=_after_fork_in_child)


def _open(name: str, serve_options: dict, connect_options: dict) -> tuple[shmstore.Store, int]:
    pid = os.getpid()
    with _handles_lock:
        have = _handles.get(name)
        if have is not None and have[0] == pid and not have[1].closed:
            return have[1], have[2]
        if have is not None and have[0] != pid:
            _inherited.append(have[1])
        store = shmstore.open(name, **connect_options, **serve_options)
        if store.coordinator is not None:
            started.setdefault(name, []).append(store.coordinator)
        key_size = store.stats().key_size
        _handles[name] = (pid, store, key_size)
        return store, key_size


def _restart(name: str, serve_options: dict, connect_options: dict) -> None:
    """Start a coordinator for ``name`` if none runs (it adopts the segment: the records
    stay). Handles already open go on with it."""
    with _handles_lock:
        store = shmstore.open(name, **connect_options, **serve_options)
        if store.coordinator is not None:
            started.setdefault(name, []).append(store.coordinator)
        _inherited.append(store)  # not closed: the instances' handles are the old one


class ShmStoreCache(BaseCache):
    """Django's cache API on a shared-memory store every process of the host shares.

    Concurrency: reads (get, get_many, has_key) take no lock and never wait for the
    coordinator; writes go through it, one at a time, so ``add``, ``incr``/``decr`` and
    ``touch`` are atomic across processes (compare-and-set on the record's version).

    Fork: nothing is opened until the first cache call of a process; a forked child
    opens its own handle (Gunicorn's ``preload_app`` is safe).

    Durability: as the store's (memory-only unless OPTIONS gives ``path``).
    """

    def __init__(self, location: str, params: dict) -> None:
        super().__init__(params)
        self._name = check_name(location)  # InvalidNameError
        options = dict(params.get("OPTIONS") or {})
        # Upper-case options are Django's (MAX_ENTRIES, CULL_FREQUENCY: read by
        # BaseCache; the store's memory budget and eviction replace culling).
        options = {k: v for k, v in options.items() if not k.isupper()}
        serve_options, self._connect_options = split_options(self._name, options, "OPTIONS")
        self._serve_options = serve_options
        #: the handle, its store's key_size, and the fork generation they belong to
        self._handle: shmstore.Store | None = None
        self._key_size = 0
        self._generation = -1

    # -- the store ---------------------------------------------------------------

    @property
    def store(self) -> shmstore.Store:
        """This process's handle on the store (opened, and the store served, on first use)."""
        if self._generation != _fork_generation:
            generation = _fork_generation
            self._handle, self._key_size = _open(self._name, self._serve_options, self._connect_options)
            self._generation = generation
        return self._handle  # type: ignore[return-value]

    def _key(self, key: Any, version: int | None) -> str:
        """The store key of a Django key: Django's ``make_key`` (prefix, version), checked
        by ``validate_key`` (warnings), hashed if longer than the store's key_size."""
        return self._store_key(self.make_and_validate_key(key, version=version))

    def validate_key(self, key: str) -> None:
        """Django's key warnings (CacheKeyWarning), with its messages: its own check runs
        only for a key it would warn about, so a good key costs no generator."""
        if len(key) > _MEMCACHED_MAX_KEY or _MEMCACHED_BAD_CHAR(key):
            super().validate_key(key)

    def _store_key(self, key: str) -> str:
        if self._generation != _fork_generation:
            self.store  # noqa: B018 - opens the handle, which knows the key_size
        return fit_key(key, self._key_size)

    def _ttl(self, timeout: Any) -> float | None:
        """Seconds to keep a record: None forever, 0 not at all (Django: 0 or less)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return None
        if timeout <= 0:
            return 0
        return min(float(timeout), MAX_TTL)

    # -- reads ---------------------------------------------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        value = self.store.get(self._key(key, version), _MISSING)
        return default if value is _MISSING else loads(value)

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._key(key, version) in self.store

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict:
        wanted = {self._key(k, version): k for k in keys}
        if not wanted:
            return {}
        values = self.store.get_many(list(wanted), _MISSING)
        return {k: loads(v) for k, v in zip(wanted.values(), values) if v is not _MISSING}

    # Reads never wait on anything: the async forms call them directly, not in a thread.
    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self.get(key, default, version)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        return self.has_key(key, version)

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict:
        return self.get_many(keys, version)

    # Writes wait for the coordinator: the async forms run the sync call in the handle's
    # own write thread (see shmstore._aio), not in the thread Django keeps for the
    # sync code of the request (the ORM).
    async def _in_write_thread(self, fn: Any, *args: Any) -> Any:
        pool = self.store._aio_pool()
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    async def aset(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        return await self._in_write_thread(self.set, key, value, timeout, version)

    async def aadd(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return await self._in_write_thread(self.add, key, value, timeout, version)

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return await self._in_write_thread(self.touch, key, timeout, version)

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        return await self._in_write_thread(self.delete, key, version)

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return await self._in_write_thread(self.incr, key, delta, version)

    async def aset_many(self, data: dict, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> list:
        return await self._in_write_thread(self.set_many, data, timeout, version)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        return await self._in_write_thread(self.delete_many, keys, version)

    async def aclear(self) -> None:
        return await self._in_write_thread(self.clear)

    # -- writes ------------------------------------------------------------------------

    def _write(self, fn: Any, *args: Any, repeat: bool = True) -> Any:
        """``fn(*args)``; if no coordinator answers (it died, or was stopped), start one
        and, for a write that may be repeated, write again. ``add`` and ``incr`` are
        not repeated (``repeat=False``): a write that failed after it was sent may have
        been applied, and repeating would add twice or report a failed add."""
        try:
            return fn(*args)
        except shmstore.CoordinatorUnavailableError:
            _restart(self._name, self._serve_options, self._connect_options)
            if not repeat:
                raise
            return fn(*args)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        k = self._key(key, version)
        v = dumps(value)  # before anything is written: an unpicklable value raises here
        ttl = self._ttl(timeout)
        if ttl == 0:
            self._write(self.store.delete, k)
        else:
            self._write(functools.partial(self.store.put, ttl=ttl), k, v)

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        k = self._key(key, version)
        v = dumps(value)
        ttl = self._ttl(timeout)
        store = self.store
        if ttl == 0:  # as RedisCache: True if it was absent, and nothing is kept
            return k not in store
        try:
            self._write(functools.partial(store.compare_and_set, version=0, ttl=ttl), k, v, repeat=False)
        except shmstore.VersionConflictError:
            return False
        return True

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self._write(self._touch, self._key(key, version), self._ttl(timeout))

    def _touch(self, k: str, ttl: float | None) -> bool:
        store = self.store
        if ttl == 0:
            return bool(store.delete(k))
        while True:
            ver = store.version(k)
            if ver is None:
                return False
            raw = store.get(k, _MISSING)
            if raw is _MISSING:
                return False
            try:  # the same value, rewritten only if nobody wrote it since ``ver``
                store.compare_and_set(k, raw, version=ver, ttl=ttl)
            except shmstore.VersionConflictError:
                continue
            return True

    def delete(self, key: Any, version: int | None = None) -> bool:
        return bool(self._write(self.store.delete, self._key(key, version)))

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Add ``delta`` atomically (across processes), keeping the record's expiry.

        A compare-and-set loop, not ``store.incr``: ``store.incr`` counts a missing key
        from 0, so "check it exists, then incr" would recreate (without its expiry) a
        key deleted or expired between the two calls. Here the write only lands if the
        record is still the version that was read.

        Raises:
            ValueError: the key is missing.
            TypeError: the value does not support ``+ delta``.
        """
        return self._write(self._incr, key, self._key(key, version), delta, repeat=False)

    def _incr(self, key: Any, k: str, delta: Any) -> Any:
        store = self.store
        while True:
            ver = store.version(k)
            raw = _MISSING if ver is None else store.get(k, _MISSING)
            if raw is _MISSING:
                raise ValueError(f"Key '{key}' not found")
            new = loads(raw) + delta
            try:
                ttl = store.ttl(k)
            except KeyError:
                raise ValueError(f"Key '{key}' not found") from None
            try:
                store.compare_and_set(k, dumps(new), version=ver, ttl=ttl)
            except shmstore.VersionConflictError:
                continue
            return new

    def set_many(self, data: dict, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> list:
        items = [(self._key(k, version), dumps(v)) for k, v in data.items()]
        ttl = self._ttl(timeout)
        if not items:
            return []
        if ttl == 0:
            self._write(self._delete_keys, [k for k, _ in items])
        else:
            self._write(self._put_many, items, ttl)
        return []

    def _put_many(self, items: list, ttl: float | None) -> None:
        store = self.store
        try:
            with store.batch() as b:  # all of them at once, as one write
                for k, v in items:
                    b.put(k, v, ttl=ttl)
        except shmstore.RequestTooLargeError:  # more than one request holds: one by one
            for k, v in items:
                store.put(k, v, ttl=ttl)

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        self._write(self._delete_keys, [self._key(k, version) for k in keys])

    def _delete_keys(self, keys: list) -> None:
        store = self.store
        for i in range(0, len(keys), _CLEAR_CHUNK):
            with store.batch() as b:
                for k in keys[i:i + _CLEAR_CHUNK]:
                    b.delete(k)

    def clear(self) -> None:
        """Delete every record of the store: those of every alias sharing it (like
        RedisCache's FLUSHDB), and any other client's."""
        self._write(lambda: self._delete_keys(list(self.store.keys())))

    def close(self, **kwargs: Any) -> None:
        """Nothing to do: Django calls this after every request, and the process's
        handle is kept for the next (it holds no socket)."""
