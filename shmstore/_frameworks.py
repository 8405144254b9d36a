"""What the framework cache backends (``shmstore.django``, ``shmstore.flask``) share:
their store options and how a key longer than the store's key_size is stored.

Options: a backend's OPTIONS (Django) or CACHE_OPTIONS (Flask-Caching) are ``serve()``
settings, used when the backend's process starts the store's coordinator, plus the two
settings of the connection (``timeout``, ``read_cache``). Left out, a backend serves a
64 MiB memory store with LRU eviction, keys up to 256 bytes and the largest value whose
record fills one 1 MiB page; ``memory=None`` asks for a fixed-slot store instead
(``capacity`` x ``value_size``, serve()'s defaults for what is not given).

Long keys: frameworks make keys longer than a store's key_size (prefixes, versions,
long user keys). Such a key is stored as its first ``key_size - 33`` bytes, ``#`` and 32
hex digits of its BLAKE2b-128 digest: it keeps its prefix (a prefix scan still finds
it), and two keys collide only if their digests do.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ._check_args import check_read_cache, check_timeout
from ._errors import InvalidArgumentError

#: serve() settings a backend uses for what its options leave out
DEFAULT_OPTIONS: dict[str, Any] = {
    "memory": 64 << 20,
    "eviction": "lru",
    "key_size": 256,
    "value_size": (1 << 20) - 128 - 256,  # the largest record in a 1 MiB page: see value_size_for
    "detach": True,
}
#: options that are the connection's, not serve()'s
CONNECT_OPTIONS = ("timeout", "read_cache")
#: a hashed key's tail: "#" and 32 hex digits
HASH_TAIL = 33


def value_size_for(key_size: int) -> int:
    """The largest value whose record (32-byte header, key padded to 8, value) fills one
    1 MiB page with keys of ``key_size`` bytes."""
    return (1 << 20) - 128 - (key_size + 7) // 8 * 8


def split_options(name: str, options: dict[str, Any], what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(serve() settings, connection settings)`` of a backend's options, checked (a bad
    option fails when the backend is made, not at its first use).

    Args:
        name: the store name.
        options: the backend's options (not changed).
        what: how they are called in the framework's settings, for messages.

    Raises:
        InvalidArgumentError: ``value_type`` (a backend stores any Python object).
        InvalidLayoutError, InvalidTimeoutError, ...: as serve() and connect() would.
    """
    options = dict(options)
    if "value_type" in options:
        raise InvalidArgumentError(f"ShmStoreCache stores any Python object; {what} cannot set value_type")
    connect = {k: options.pop(k) for k in CONNECT_OPTIONS if k in options}
    serve = {**DEFAULT_OPTIONS, **options}
    if serve["memory"] is None:  # asked for: a fixed-slot store, capacity x value_size
        if "value_size" not in options:
            serve.pop("value_size")  # the store's default for that kind
        if "key_size" not in options:
            serve.pop("key_size")
    elif "key_size" in options and "value_size" not in options:
        ks = options["key_size"]
        if isinstance(ks, int) and not isinstance(ks, bool) and 0 < ks <= 4096:
            serve["value_size"] = value_size_for(ks)
        else:
            serve.pop("value_size")  # from_serve below says what is wrong
    if "timeout" in connect:
        check_timeout(connect["timeout"])
    if "read_cache" in connect:
        check_read_cache(connect["read_cache"])
    from shmstore.coordinator._config import from_serve  # noqa: PLC0415  (the settings seam)

    from_serve(name, **serve)
    return serve, connect


def fit_key(key: str, key_size: int) -> str:
    """``key`` as stored in a store of ``key_size``-byte keys (see the module docstring)."""
    if len(key) * 4 <= key_size:  # UTF-8 takes at most 4 bytes a character
        return key
    kb = key.encode("utf-8", "surrogatepass")
    if len(kb) <= key_size:
        return key
    digest = hashlib.blake2b(kb, digest_size=16).hexdigest()
    head = kb[: max(0, key_size - HASH_TAIL)].decode("utf-8", "ignore")
    return f"{head}#{digest}"
