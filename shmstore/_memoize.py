"""``@store.cached(ttl=..., key=...)``: memoize a function across every process of the host.

Design
------
A call looks its key up with a lock-free ``get`` (a hit costs a dictionary lookup).
On a miss, the process *claims* the key: ``compare_and_set(lock, [pid, start_ms,
deadline_ns], version=0, ttl=lease)`` on a lock record of its own key (``lock_key``).
Exactly one process wins the claim; it reads the key once more (an owner that
finished between its miss and its claim deleted the lock it just re-created: then it
gives the claim back and returns that value), computes, then writes the value (with
``ttl``) and deletes the lock in ONE batch, so a reader that sees the lock gone sees
the value.
The others wait: they poll the value and the lock with lock-free reads, backing off
from 0.2 ms to 5 ms (a check costs about a microsecond; unlike ``watch`` it scans no
slot stamps and cannot fall behind a feed horizon). A waiter stops waiting when

- the value appears: it returns it;
- the lock is gone without a value (the owner raised): it claims the key itself;
- the owner died (pid and start time, ``_liveness``): it takes the lock over with a
  compare-and-set on the lock's version, then computes;
- the lease passed (the owner is alive but stuck): the lock record has expired (its
  ``ttl`` is the lease), so a claim succeeds;
- ``timeout`` passed: it computes without a claim and writes the value too.

Invariant: the lock of a key is deleted only in the batch that writes the key's value,
or, after the owner's function raised, by the owner while the lock still carries the
version it wrote.

Values pass through ``shmstore._objcodec`` (msgpack when it round-trips, else pickle),
as in the framework backends: the store's writers are this user's processes only.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import fractions
import functools
import hashlib
import inspect
import logging
import os
import string
import time
import uuid
from typing import Any, Callable

from . import _objcodec
from ._errors import InvalidArgumentError, InvalidKeyError, InvalidTTLError, VersionConflictError
from ._ttl import MAX_TTL

__all__ = ["cached"]

log = logging.getLogger("shmstore.cached")

#: seconds a claim holds by default before another process may take the key over
DEFAULT_LEASE = 30.0
#: the polling back-off of a waiter, in seconds
POLL_MIN, POLL_MAX = 0.0002, 0.005
#: seconds between two liveness checks of the owner by a waiter
LIVENESS_EVERY = 0.1

_MISSING = object()


# -- arguments -----------------------------------------------------------------------


def _check_seconds(value: Any, what: str, *, ttl: bool = False) -> float:
    error = InvalidTTLError if ttl else InvalidArgumentError
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what} must be a number of seconds, got {type(value).__name__} {value!r:.40}")
    if not 0 < value <= MAX_TTL:  # False for NaN
        raise error(f"{what} must be a finite number of seconds > 0 and at most {MAX_TTL:.0f} "
                    f"(100 years), got {value!r:.40}")
    return value


def _format_fields(fmt: str, sig: inspect.Signature | None) -> None:
    """Check a ``key=`` format against the function's parameters, at decoration."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
    except ValueError as e:
        raise InvalidArgumentError(f"key={fmt!r:.80} is not a valid format: {e}") from None
    if sig is None:
        return
    params = sig.parameters
    positional = [p for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var = any(p.kind is p.VAR_POSITIONAL for p in params.values())
    for field in fields:
        head = field.split(".", 1)[0].split("[", 1)[0]
        if head == "":
            raise InvalidArgumentError(
                f"key={fmt!r:.80}: use numbered ({{0}}) or named ({{user_id}}) fields, not {{}}")
        if head.isdigit():
            if int(head) >= len(positional) and not has_var:
                raise InvalidArgumentError(
                    f"key={fmt!r:.80}: field {{{head}}} is past the function's "
                    f"{len(positional)} positional parameters")
        elif head not in params:
            raise InvalidArgumentError(
                f"key={fmt!r:.80}: field {{{head}}} names no parameter of the function "
                f"({', '.join(params) or 'none'})")


# -- the default key -----------------------------------------------------------------

_REPR_TYPES = (_dt.datetime, _dt.date, _dt.time, _dt.timedelta, decimal.Decimal, uuid.UUID,
               fractions.Fraction, complex, range, slice)


def _canon(obj: Any, out: list[bytes]) -> None:
    """Append a canonical, process-independent encoding of ``obj`` (no ``hash()``:
    str hashes are salted per process)."""
    t = obj.__class__
    if obj is None or t is bool:
        out.append(b"N" if obj is None else (b"T" if obj else b"F"))
        return
    if isinstance(obj, enum.Enum):
        out.append(f"E{t.__module__}.{t.__qualname__}.{obj.name};".encode())
        return
    if t not in (int, float, str, bytes, tuple, list, dict) and isinstance(
            obj, (int, float, str, bytes, tuple, list, dict)):
        out.append(f"@{t.__module__}.{t.__qualname__};".encode())  # a subclass: its name too
    if isinstance(obj, int):
        out.append(b"i%d;" % obj)
    elif isinstance(obj, float):
        out.append(b"f" + float.hex(obj).encode() + b";")
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        out.append(b"s%d:" % len(data) + data)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        out.append(b"b%d:" % len(data) + data)
    elif isinstance(obj, (tuple, list)):
        out.append(b"(%d:" % len(obj) if isinstance(obj, tuple) else b"[%d:" % len(obj))
        for item in obj:
            _canon(item, out)
    elif isinstance(obj, dict):
        items = sorted(_encoded(k) + _encoded(v) for k, v in obj.items())
        out.append(b"{%d:" % len(items))
        out.extend(items)
    elif isinstance(obj, (set, frozenset)):
        items = sorted(_encoded(x) for x in obj)
        out.append(b"<%d:" % len(items))
        out.extend(items)
    elif isinstance(obj, _REPR_TYPES):
        out.append(f"r{t.__module__}.{t.__qualname__}:{obj!r};".encode("utf-8", "surrogatepass"))
    else:
        raise InvalidArgumentError(
            f"cannot derive a key from an argument of type {t.__module__}.{t.__qualname__} "
            f"(its repr or hash differs between processes); give the decorator key= (a "
            f"format such as 'user:{{user_id}}', or a callable (args, kwargs) -> str)")


def _encoded(obj: Any) -> bytes:
    out: list[bytes] = []
    _canon(obj, out)
    return b"".join(out)


def function_name(fn: Callable) -> str:
    """``module.qualname`` of ``fn`` (plus its first line for a lambda: two lambdas of
    one scope share a qualname)."""
    name = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', repr(fn))}"
    if "<lambda>" in name:
        code = getattr(fn, "__code__", None)
        name += f"@{getattr(code, 'co_firstlineno', 0)}"
    return name


def default_key(name: str, bound: inspect.BoundArguments | tuple, key_size: int) -> bytes:
    """``c:<tail of the name>:<32 hex digits>``: the digest covers the whole name and
    the arguments (bound to the signature, defaults applied, so ``f(1)``, ``f(x=1)``
    and ``f(1, y=<default>)`` are one key); the readable name is cut to fit the
    store's ``key_size``."""
    if isinstance(bound, inspect.BoundArguments):
        args: Any = list(bound.arguments.items())
    else:
        args = bound
    h = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16)
    h.update(b"\0" + _encoded(args))
    digest = h.hexdigest().encode()
    room = key_size - len(digest) - 3
    if room <= 0:
        return digest[:key_size]
    readable = name.rsplit(".", 1)[-1] if "." in name else name
    tail = readable.encode("utf-8", "surrogatepass")[-room:]
    return b"c:" + tail + b":" + digest


def lock_key(key: bytes, key_size: int) -> bytes:
    """The lock record of ``key``: ``\\xffL`` + 16 bytes of its digest (0xFF starts no
    UTF-8 text, so no str key can be a lock key)."""
    digest = hashlib.blake2b(key, digest_size=16, person=b"shmstore-lock").digest()
    return (b"\xffL" + digest)[:max(key_size, 1)]


# -- the decorator -------------------------------------------------------------------


def cached(store: Any, ttl: Any = None, key: Any = None, *, lease: float = DEFAULT_LEASE,
           timeout: float | None = None) -> Callable:
    """See :meth:`shmstore.Store.cached`."""
    if callable(ttl) and key is None and not isinstance(ttl, (int, float)):
        return cached(store)(ttl)  # @store.cached without parentheses
    if ttl is not None:
        _check_seconds(ttl, "ttl", ttl=True)
    _check_seconds(lease, "lease")
    wait = lease if timeout is None else _check_timeout(timeout)
    if key is not None and not isinstance(key, str) and not callable(key):
        raise InvalidArgumentError(
            f"key must be a format string ('user:{{user_id}}'), a callable (args, kwargs) -> str, "
            f"or None for the default, got {type(key).__name__} {key!r:.40}")
    key_size = store._live_segment().key_size

    def decorate(fn: Callable) -> Callable:
        if not callable(fn):
            raise InvalidArgumentError(f"store.cached decorates a function, got {type(fn).__name__}")
        try:
            sig: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None
        if isinstance(key, str):
            _format_fields(key, sig)
        name = function_name(fn)

        def bind(args: tuple, kwargs: dict) -> Any:
            if sig is None:
                return (list(args), sorted(kwargs.items()))
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{name}(): {e}") from None
            bound.apply_defaults()
            return bound

        def key_of(args: tuple, kwargs: dict) -> bytes | str:
            if key is None:
                return default_key(name, bind(args, kwargs), key_size)
            if isinstance(key, str):
                b = bind(args, kwargs)
                if isinstance(b, inspect.BoundArguments):
                    return key.format(*b.args, **{**b.arguments, **b.kwargs})
                return key.format(*args, **kwargs)
            k = key(args, kwargs)
            if not isinstance(k, (str, bytes)):
                raise InvalidKeyError(f"the key callable of {name} returned {type(k).__name__} "
                                      f"{k!r:.40}; it must return str or bytes")
            return k

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                return await _acall(store, fn, key_of(args, kwargs), args, kwargs, ttl, lease, wait, key_size)

            wrapper: Any = awrapper
        else:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return _call(store, fn, key_of(args, kwargs), args, kwargs, ttl, lease, wait, key_size)

        def cache_key(*args: Any, **kwargs: Any) -> bytes | str:
            """The record key a call with these arguments uses."""
            return key_of(args, kwargs)

        def forget(*args: Any, **kwargs: Any) -> bool:
            """Delete the cached value of a call with these arguments; True if there was one."""
            return bool(store.delete(key_of(args, kwargs)))

        wrapper.cache_key = cache_key
        wrapper.forget = forget
        return wrapper

    return decorate


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 <= timeout <= MAX_TTL):
        raise InvalidArgumentError(
            f"timeout must be a finite number of seconds >= 0 (how long a miss waits for "
            f"another process computing the same key), got {timeout!r:.40}")
    return timeout


_ME: list = [0, 0]


def _me() -> tuple[int, int]:
    """This process's pid and start time (ms), as ``_liveness`` checks them; looked up
    once per process (psutil), again after a fork."""
    pid = os.getpid()
    if _ME[0] != pid:
        from ._liveness import process_start_ms  # noqa: PLC0415  (psutil, on a first miss only)

        _ME[:] = [pid, process_start_ms(pid) or 0]
    return pid, _ME[1]


class _Claim:
    """One process's attempt at a key: claim, wait, and what to do next."""

    def __init__(self, store: Any, k: bytes | str, lease: float, key_size: int) -> None:
        self.store = store
        self.key = k
        kb = k.encode("utf-8", "surrogatepass") if isinstance(k, str) else bytes(k)
        self.lock = lock_key(kb, key_size)
        self.lease = lease
        self.version = 0  # the lock version this process wrote, once it owns the key

    def claim(self, version: int = 0) -> bool:
        pid, start_ms = _me()
        mark = [pid, start_ms, time.time_ns() + int(self.lease * 1e9)]
        try:
            self.version = self.store.compare_and_set(self.lock, mark, version=version, ttl=self.lease)
        except VersionConflictError:
            return False
        return True

    def owner_dead(self) -> int:
        """The lock's version if its owner process is gone (0: it lives, or no lock)."""
        from ._liveness import pid_alive  # noqa: PLC0415

        s = self.store
        v = s.version(self.lock)
        mark = s.get(self.lock)
        if v is None or mark is None or s.version(self.lock) != v:
            return 0
        try:
            pid, start_ms, _ = mark
        except (TypeError, ValueError):
            return 0
        return 0 if pid_alive(pid, start_ms) else v

    def release(self) -> None:
        """After the function raised: drop the claim if it is still ours."""
        if self.store.version(self.lock) == self.version:
            self.store.delete(self.lock)


def _publish(store: Any, claim: _Claim | None, k: Any, value: Any, ttl: Any) -> None:
    try:
        encoded = _objcodec.dumps(value)
    except Exception:  # noqa: BLE001 - an unpicklable result is returned, not cached
        log.warning("store.cached: the result for key %r cannot be encoded; not cached", k,
                    exc_info=True)
        if claim is not None:
            claim.release()
        return
    from ._errors import StoreFullError, ValueTooLargeError  # noqa: PLC0415

    try:
        with store.batch() as b:
            b.put(k, encoded, ttl=ttl)
            if claim is not None:
                b.delete(claim.lock)
    except (ValueTooLargeError, StoreFullError) as e:
        log.warning("store.cached: the result for key %r is not cached: %s", k, e)
        if claim is not None:
            claim.release()


def _call(store: Any, fn: Callable, k: Any, args: tuple, kwargs: dict, ttl: Any, lease: float,
          wait: float, key_size: int) -> Any:
    value = store.get(k, _MISSING)
    if value is not _MISSING:
        return _objcodec.loads(value)
    claim = _Claim(store, k, lease, key_size)
    deadline = time.monotonic() + wait
    owned = claim.claim()
    pause, next_check = POLL_MIN, time.monotonic() + LIVENESS_EVERY
    while True:
        if owned:
            # The value may have been written between our miss and our claim (its owner
            # then deleted the lock we just re-created): give the claim back, use it.
            value = store.get(k, _MISSING)
            if value is _MISSING:
                break
            claim.release()
            return _objcodec.loads(value)
        value = store.get(k, _MISSING)
        if value is not _MISSING:
            return _objcodec.loads(value)
        now = time.monotonic()
        if store.get(claim.lock, _MISSING) is _MISSING:
            owned = claim.claim()  # released without a value, or the lease expired
            continue
        if now >= next_check:
            next_check = now + LIVENESS_EVERY
            dead = claim.owner_dead()
            if dead:
                owned = claim.claim(dead)
                continue
        if now >= deadline:
            claim = None  # compute without a claim
            break
        time.sleep(pause)
        pause = min(pause * 2, POLL_MAX)
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    _publish(store, claim, k, result, ttl)
    return result


async def _acall(store: Any, fn: Callable, k: Any, args: tuple, kwargs: dict, ttl: Any,
                 lease: float, wait: float, key_size: int) -> Any:
    import asyncio  # noqa: PLC0415

    value = store.get(k, _MISSING)
    if value is not _MISSING:
        return _objcodec.loads(value)
    claim = _Claim(store, k, lease, key_size)
    run = store._arun  # the handle's write thread: claims and writes never block the loop
    deadline = time.monotonic() + wait
    owned = await run(claim.claim)
    pause, next_check = POLL_MIN, time.monotonic() + LIVENESS_EVERY
    while True:
        if owned:  # as in _call: a value written meanwhile wins over our claim
            value = store.get(k, _MISSING)
            if value is _MISSING:
                break
            await run(claim.release)
            return _objcodec.loads(value)
        value = store.get(k, _MISSING)
        if value is not _MISSING:
            return _objcodec.loads(value)
        now = time.monotonic()
        if store.get(claim.lock, _MISSING) is _MISSING:
            owned = await run(claim.claim)
            continue
        if now >= next_check:
            next_check = now + LIVENESS_EVERY
            dead = claim.owner_dead()
            if dead:
                owned = await run(claim.claim, dead)
                continue
        if now >= deadline:
            claim = None
            break
        await asyncio.sleep(pause)
        pause = min(pause * 2, POLL_MAX)
    try:
        result = await fn(*args, **kwargs)
    except BaseException:
        if claim is not None:
            await run(claim.release)
        raise
    await run(_publish, store, claim, k, result, ttl)
    return result
