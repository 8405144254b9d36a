"""A Flask-Caching backend on a shmstore store: one cache shared by every process of the host.

Configure it the way Flask-Caching documents third-party backends (an import path)::

    app.config.update(
        CACHE_TYPE="shmstore.flask.ShmStoreCache",
        CACHE_SHMSTORE_NAME="myapp-cache",      # the store (default: from CACHE_KEY_PREFIX)
        CACHE_KEY_PREFIX="myapp:",              # apps with other prefixes share one store
        CACHE_DEFAULT_TIMEOUT=300,              # seconds; 0: no expiry
        CACHE_OPTIONS={"memory": 256 << 20},    # serve() settings, used if this starts it
    )
    cache = flask_caching.Cache(app)

The backend connects on first use in each process, starting a coordinator if none runs
(``shmstore.open``; ``CACHE_OPTIONS`` go to ``serve()``, plus ``timeout`` and
``read_cache`` to the connection), or uses the one the Gunicorn hooks started. Values
go through ``shmstore._objcodec``: msgpack for what it round-trips, pickle for other
objects; see docs/flask.md for why pickle here does not widen who can run code.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import threading
from typing import Any

try:
    from flask_caching.backends.base import BaseCache
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(
        "shmstore.flask needs Flask-Caching: pip install 'shmstore[flask]'") from e

import shmstore
from shmstore import _frameworks
from shmstore._errors import (
    InvalidArgumentError,
    InvalidLayoutError,
    StoreFullError,
    ValueTooLargeError,
    VersionConflictError,
)
from shmstore._frameworks import HASH_TAIL, fit_key, split_options
from shmstore._layout import check_name
from shmstore._objcodec import dumps, loads
from shmstore._ttl import MAX_TTL

__all__ = ["ShmStoreCache"]

log = logging.getLogger("shmstore.flask")

#: serve() settings used when this backend starts the coordinator and CACHE_OPTIONS
#: leaves them out (as shmstore.django's): a memory budget with LRU eviction, keys up to
#: 256 bytes, the largest record kept within one 1 MiB page.
DEFAULT_OPTIONS = _frameworks.DEFAULT_OPTIONS  # (shared with shmstore.django)
_CLEAR_CHUNK = 512

_MISSING = object()


class ShmStoreCache(BaseCache):
    """Flask-Caching's cache API on a shared-memory store.

    Concurrency: reads (``get``, ``get_many``, ``has``) take no lock and never wait for
    the coordinator; writes are applied by it one at a time, so ``add`` (a
    compare-and-set on "absent"), ``inc`` and ``dec`` are atomic across processes.
    ``set_many`` and ``delete_many`` are each one atomic batch.

    Fork: nothing is opened until a process's first cache call, and a handle inherited
    across ``fork()`` keeps working in the child (its first write opens a channel of its
    own), so Gunicorn's ``preload_app`` is fine.

    Durability: the store's (memory-only unless ``CACHE_OPTIONS`` gives ``path``).

    Args:
        name: the store name.
        key_prefix: put in front of every key; ``clear()`` deletes only keys with it
            (all keys of the store if it is empty).
        default_timeout: seconds a ``set`` without ``timeout`` lives (0: no expiry).
        ignore_delete_many_errors: Flask-Caching's; ``delete_many`` never fails here.
        options: ``serve()`` settings (memory, eviction, path, ...) used if this
            process starts the coordinator, and the connection's ``timeout`` and
            ``read_cache``.

    Raises:
        InvalidNameError: a bad store name.
        InvalidArgumentError, InvalidLayoutError: a bad timeout, prefix or option.
    """

    def __init__(self, name: str, key_prefix: str = "", default_timeout: Any = 300,
                 ignore_delete_many_errors: bool = False, **options: Any) -> None:
        self._default = _seconds(default_timeout, "CACHE_DEFAULT_TIMEOUT")
        super().__init__(default_timeout=0, ignore_delete_many_errors=ignore_delete_many_errors)
        self.default_timeout = self._default
        self.name = check_name(name)
        if not isinstance(key_prefix, str):
            raise InvalidArgumentError(f"CACHE_KEY_PREFIX must be a str, got {type(key_prefix).__name__}")
        self.key_prefix = key_prefix
        serve, self._connect = split_options(self.name, options, "CACHE_OPTIONS")
        self._serve = serve
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._store: shmstore.Store | None = None
        self._key_size = 0

    @classmethod
    def factory(cls, app: Any, config: dict[str, Any], args: list[Any],
                kwargs: dict[str, Any]) -> ShmStoreCache:
        """Flask-Caching's hook: ``CACHE_SHMSTORE_NAME`` (else the ``CACHE_KEY_PREFIX``
        without its trailing separators) names the store; ``kwargs`` are
        ``default_timeout``, ``ignore_delete_many_errors`` and ``CACHE_OPTIONS``."""
        if args:
            raise InvalidArgumentError(
                f"ShmStoreCache takes no CACHE_ARGS (got {args!r:.80}); name the store "
                f"with CACHE_SHMSTORE_NAME")
        prefix = config.get("CACHE_KEY_PREFIX") or ""
        name = config.get("CACHE_SHMSTORE_NAME")
        if name is None:
            name = prefix.rstrip(":_-./") if isinstance(prefix, str) else prefix
            if not name:
                raise InvalidArgumentError(
                    "ShmStoreCache needs a store name: set CACHE_SHMSTORE_NAME (or a "
                    "CACHE_KEY_PREFIX it can be taken from)")
        return cls(name, key_prefix=prefix, **kwargs)

    # -- the store ---------------------------------------------------------------

    @property
    def store(self) -> shmstore.Store:
        """This process's handle (opened, and the store served if need be, on first use)."""
        s = self._store
        if s is None or s.closed:
            if self._lock_pid != os.getpid():  # forked: a parent's thread may have held it
                self._lock, self._lock_pid = threading.Lock(), os.getpid()
            with self._lock:
                s = self._store
                if s is None or s.closed:
                    s = shmstore.open(self.name, **self._connect, **self._serve)
                    key_size = s.stats().key_size
                    if len(self.key_prefix.encode("utf-8", "surrogatepass")) > key_size - HASH_TAIL:
                        s.close()
                        raise InvalidLayoutError(
                            f"CACHE_KEY_PREFIX {self.key_prefix!r:.60} leaves no room for keys in "
                            f"store {self.name!r} (key_size={key_size}); use a shorter prefix")
                    self._key_size = key_size
                    self._store = s
        return s

    def close(self) -> None:
        """Close this process's handle (idempotent); the next call opens it again."""
        with self._lock:
            s, self._store = self._store, None
        if s is not None:
            s.close()

    def _key(self, key: Any) -> str:
        if not isinstance(key, str):
            raise InvalidArgumentError(f"cache keys are str, got {type(key).__name__} {key!r:.40}")
        if self._store is None:
            self.store  # noqa: B018 - opening the handle learns the key_size
        full = self.key_prefix + key
        return fit_key(full, self._key_size)

    def _ttl(self, timeout: Any) -> float | None:
        """A Flask-Caching timeout as a ttl: None for "no expiry", -1 for "expired now"."""
        seconds = self._default if timeout is None else _seconds(timeout, "timeout")
        if seconds == 0:
            return None
        return -1 if seconds < 0 else seconds

    # -- reads -------------------------------------------------------------------

    def get(self, key: str) -> Any:
        value = self.store.get(self._key(key), _MISSING)
        return None if value is _MISSING else loads(value)

    def get_many(self, *keys: str) -> list[Any]:
        store = self.store
        return [loads(v) for v in store.get_many([self._key(k) for k in keys])]

    def has(self, key: str) -> bool:
        return self._key(key) in self.store

    # -- writes ------------------------------------------------------------------

    def set(self, key: str, value: Any, timeout: Any = None) -> bool:
        k, ttl = self._key(key), self._ttl(timeout)
        if ttl == -1:
            self.store.delete(k)
            return True
        try:
            self.store.put(k, dumps(value), ttl=ttl)
        except (ValueTooLargeError, StoreFullError) as e:
            log.warning("shmstore.flask: %r not cached: %s", key, e)
            return False
        return True

    def add(self, key: str, value: Any, timeout: Any = None) -> bool:
        k, ttl = self._key(key), self._ttl(timeout)
        if ttl == -1:
            return k not in self.store
        try:
            self.store.compare_and_set(k, dumps(value), version=0, ttl=ttl)
        except VersionConflictError:
            return False
        except (ValueTooLargeError, StoreFullError) as e:
            log.warning("shmstore.flask: %r not added: %s", key, e)
            return False
        return True

    def set_many(self, mapping: dict[str, Any], timeout: Any = None) -> list[Any]:
        ttl = self._ttl(timeout)
        store = self.store
        done = []
        try:
            with store.batch() as b:
                for key, value in mapping.items():
                    k = self._key(key)
                    if ttl == -1:
                        b.delete(k)
                    else:
                        try:
                            b.put(k, dumps(value), ttl=ttl)
                        except ValueTooLargeError as e:
                            log.warning("shmstore.flask: %r not cached: %s", key, e)
                            continue
                    done.append(key)
        except StoreFullError as e:
            log.warning("shmstore.flask: set_many of %d keys refused: %s", len(mapping), e)
            return []
        return done

    def delete(self, key: str) -> bool:
        return bool(self.store.delete(self._key(key)))

    def delete_many(self, *keys: str) -> list[Any]:
        if keys:
            with self.store.batch() as b:
                for key in keys:
                    b.delete(self._key(key))
        return list(keys)  # every key is absent now: deleted, or never there

    def inc(self, key: str, delta: int = 1) -> int:
        return self.store.incr(self._key(key), delta)

    def dec(self, key: str, delta: int = 1) -> int:
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise InvalidArgumentError(f"dec needs an int delta, got {type(delta).__name__}")
        return self.store.incr(self._key(key), -delta)

    def clear(self) -> bool:
        """Delete every key with this cache's prefix (every key of the store if the
        prefix is empty). Not atomic: a key written meanwhile may stay."""
        store = self.store
        prefix = self.key_prefix.encode("utf-8", "surrogatepass")
        chunk: list[bytes] = []
        for kb in store.keys():
            if kb.startswith(prefix) and not kb.startswith(b"\xff"):
                chunk.append(kb)
                if len(chunk) == _CLEAR_CHUNK:
                    _delete_all(store, chunk)
                    chunk = []
        _delete_all(store, chunk)
        return True


def _delete_all(store: shmstore.Store, keys: list[bytes]) -> None:
    if keys:
        with store.batch() as b:
            for kb in keys:
                b.delete(kb)


def _seconds(timeout: Any, what: str) -> float:
    """A Flask-Caching timeout in seconds: an int, a float or a timedelta."""
    if isinstance(timeout, _dt.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(
            f"{what} must be a number of seconds or a timedelta, got {type(timeout).__name__} "
            f"{timeout!r:.40}")
    if math.isnan(timeout) or abs(timeout) > MAX_TTL:
        raise InvalidArgumentError(
            f"{what} must be a finite number of seconds (0: no expiry) of at most "
            f"{MAX_TTL:.0f} (100 years), got {timeout!r:.40}")
    return timeout


