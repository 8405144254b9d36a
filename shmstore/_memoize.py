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


def _c_str(obj: str, out: list[bytes]) -> None:
    data = obj.encode("utf-8", "surrogatepass")
    out.append(b"s%d:" % len(data) + data)


def _c_bytes(obj: Any, out: list[bytes]) -> None:
    data = bytes(obj)
    out.append(b"b%d:" % len(data) + data)


def _c_seq(obj: Any, out: list[bytes]) -> None:
    out.append(b"(%d:" % len(obj) if isinstance(obj, tuple) else b"[%d:" % len(obj))
    for item in obj:
        _canon(item, out)


def _c_dict(obj: dict, out: list[bytes]) -> None:
    items = sorted(_encoded(k) + _encoded(v) for k, v in obj.items())
    out.append(b"{%d:" % len(items))
    out.extend(items)


def _c_set(obj: Any, out: list[bytes]) -> None:
    items = sorted(_encoded(x) for x in obj)
    out.append((b">%d:" if isinstance(obj, frozenset) else b"<%d:") % len(items))
    out.extend(items)


#: canonical encoders by exact type (the common case: one dict lookup)
_EXACT: dict[type, Callable[[Any, list], None]] = {
    type(None): lambda o, out: out.append(b"N"),
    bool: lambda o, out: out.append(b"T" if o else b"F"),
    int: lambda o, out: out.append(b"i%d;" % o),
    float: lambda o, out: out.append(b"f" + float.hex(o).encode() + b";"),
    str: _c_str,
    bytes: _c_bytes,
    bytearray: _c_bytes,
    tuple: _c_seq,
    list: _c_seq,
    dict: _c_dict,
    set: _c_set,
    frozenset: _c_set,
}


def _canon(obj: Any, out: list[bytes]) -> None:
    """Append a canonical, process-independent encoding of ``obj`` (no ``hash()``:
    str hashes are salted per process)."""
    t = obj.__class__
    enc = _EXACT.get(t)
    if enc is not None:
        enc(obj, out)
        return
    if isinstance(obj, enum.Enum):
        out.append(f"E{t.__module__}.{t.__qualname__}.{obj.name};".encode())
        return
    for base in (int, float, str, bytes, tuple, list, dict, set, frozenset):
        if isinstance(obj, base):  # a subclass: its name, then its value as the base's
            out.append(f"@{t.__module__}.{t.__qualname__};".encode())
            _EXACT[base](obj, out)
            return
    if isinstance(obj, memoryview):
        _c_bytes(obj, out)
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


def default_key(name: str, arguments: dict, key_size: int) -> bytes:
    """``c:<tail of the name>:<32 hex digits>``: the digest covers the whole name and
    the arguments (bound to the signature, defaults applied, so ``f(1)``, ``f(x=1)``
    and ``f(1, y=<default>)`` are one key), encoded canonically; the readable name is
    cut to fit the store's ``key_size``."""
    return key_maker(name, key_size)(arguments)


def key_maker(name: str, key_size: int) -> Callable[[dict], bytes]:
    """:func:`default_key` for one function, with what does not depend on the
    arguments worked out once."""
    seed = name.encode("utf-8", "surrogatepass") + b"\0"
    room = key_size - 32 - 3
    if room > 0:
        readable = name.rsplit(".", 1)[-1]
        head = b"c:" + readable.encode("utf-8", "surrogatepass")[-room:] + b":"
    else:
        head = b""
    params: dict[str, bytes] = {}
    blake2b = hashlib.blake2b

    def make(arguments: dict) -> bytes:
        out = [seed]
        for param, value in arguments.items():
            enc = params.get(param)
            if enc is None:
                part: list[bytes] = []
                _c_str(param, part)
                enc = params[param] = part[0]
            out.append(enc)
            _canon(value, out)
        digest = blake2b(b"".join(out), digest_size=16).hexdigest().encode()
        return head + digest if head else digest[:key_size]

    return make


def make_binder(fn: Callable) -> Callable[[tuple, dict], tuple[list, dict]]:
    """``bind(args, kwargs) -> (positional values, {parameter: value})`` for ``fn``, in
    parameter order with defaults applied; a call that does not fit the signature
    raises its TypeError. Plain signatures (positional-or-keyword parameters only) are
    bound without ``inspect`` (~10x faster)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: args as given
        return lambda args, kwargs: (list(args), {**{str(i): a for i, a in enumerate(args)},
                                                  **dict(sorted(kwargs.items()))})
    params = list(sig.parameters.values())

    def slow(args: tuple, kwargs: dict) -> tuple[list, dict]:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.args), {**bound.arguments, **bound.kwargs}

    if not all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params):
        return slow
    names = [p.name for p in params]
    known = frozenset(names)
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    n = len(names)

    def fast(args: tuple, kwargs: dict) -> tuple[list, dict]:
        if not kwargs and len(args) == n:
            return list(args), dict(zip(names, args))
        got = dict(zip(names, args))
        if len(args) > n or any(k in got or k not in known for k in kwargs):
            return slow(args, kwargs)  # raises the TypeError
        got.update(kwargs)
        arguments = {}
        for name in names:
            if name in got:
                arguments[name] = got[name]
            elif name in defaults:
                arguments[name] = defaults[name]
            else:
                return slow(args, kwargs)  # a missing argument: raises the TypeError
        return list(arguments.values()), arguments

    return fast


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
        binder = make_binder(fn)
        make_key = key_maker(name, key_size)

        def bind(args: tuple, kwargs: dict) -> tuple[list, dict]:
            try:
                return binder(args, kwargs)
            except TypeError as e:
                raise TypeError(f"{name}(): {e}") from None

        def key_of(args: tuple, kwargs: dict) -> bytes | str:
            if key is None:
                return make_key(bind(args, kwargs)[1])
            if isinstance(key, str):
                positional, arguments = bind(args, kwargs)
                return key.format(*positional, **arguments)
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
