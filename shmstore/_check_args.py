"""Checks of the public calls' arguments, raised in the calling process.

Every public call checks what it is given before anything is sent to the coordinator
or read from the segment, and a bad argument is a typed :class:`ShmStoreError` that
also is the stdlib class callers already catch (``ValueError``/``TypeError``):

- keys (:func:`key_bytes`): ``str`` (its UTF-8 bytes) or bytes-like. A ``str`` that has
  no UTF-8 bytes (a lone surrogate, which is what a non-UTF-8 byte from the shell or a
  file name becomes under ``surrogateescape``) is an :class:`InvalidKeyError`, not a raw
  ``UnicodeEncodeError``: pass such a key as bytes (``os.fsencode(key)``).
- timeouts (:func:`check_timeout`): a finite number of seconds from 0 to
  ``MAX_TIMEOUT``; NaN, infinities, negatives, bools and strings are
  :class:`InvalidArgumentError`. (NaN made every deadline unreachable: a wait for ever.)
- versions (:func:`check_version`): an int from 0 to 2**64 - 1, not a bool.
- the ``wait=`` flag (:func:`check_flag`) and ``get_many``'s key container
  (:func:`key_list`).

Fast paths call these only when the caller passed the argument (``timeout=None`` costs
nothing) and do the common case with one class test.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from ._errors import InvalidArgumentError, InvalidKeyError, InvalidLayoutError

#: the longest timeout accepted, in seconds: 100 years (as ``_ttl.MAX_TTL``)
MAX_TIMEOUT = 100 * 365.25 * 86400
#: versions are u64 epochs
MAX_VERSION = (1 << 64) - 1


def key_bytes(key: object, what: str = "key") -> bytes:
    """The bytes of a key (or key prefix): a ``str``'s UTF-8 bytes, or bytes-like.

    Raises:
        InvalidKeyError: not str or bytes-like, or a str with no UTF-8 encoding.
    """
    if isinstance(key, str):
        try:
            return key.encode()
        except UnicodeEncodeError as e:
            raise InvalidKeyError(
                f"{what} {key!r:.80} is not valid text: {e.reason} at position {e.start} "
                f"(a non-UTF-8 byte from the shell or a file name becomes such a character); "
                f"pass the {what} as bytes, e.g. os.fsencode({what})"
            ) from None
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise InvalidKeyError(f"{what}s are str or bytes, not {type(key).__name__}")


def key_list(keys: object) -> list:
    """``get_many``'s keys as a list.

    Raises:
        InvalidKeyError: ``keys`` is not an iterable of keys (None, a number), or is
            a single str/bytes (which would be read as one key per character).
    """
    if isinstance(keys, (str, bytes, bytearray, memoryview)):
        raise InvalidKeyError(
            f"get_many takes an iterable of keys, not one {type(keys).__name__} key; "
            f"use get_many([key]) or get(key)"
        )
    try:
        return list(keys)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidKeyError(
            f"get_many takes an iterable of keys (a list of str or bytes), not {type(keys).__name__}"
        ) from None


def check_timeout(timeout: Any, what: str = "timeout", *, forever: bool = False) -> float | None:
    """A timeout in seconds, checked.

    Args:
        timeout: the value given.
        what: its name, for the message.
        forever: the call waits for ever on None; then ``inf`` means the same (None).

    Returns:
        ``timeout`` as given (a float or int), or None for ``inf`` when ``forever``.

    Raises:
        InvalidArgumentError: not a real number (a bool, a string, None where a number
            is needed), NaN, negative, infinite (unless ``forever``) or above
            ``MAX_TIMEOUT``.
    """
    cls = timeout.__class__
    if cls is float or cls is int:
        if 0 <= timeout <= MAX_TIMEOUT:  # False for NaN
            return timeout
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        try:
            x = float(timeout)
        except (OverflowError, ValueError):
            x = math.inf
        if 0 <= x <= MAX_TIMEOUT:
            return x
        timeout = x if math.isinf(x) else timeout
    else:
        raise InvalidArgumentError(
            f"{what} must be a number of seconds, got {type(timeout).__name__} {timeout!r:.40}"
        )
    if forever and timeout == math.inf:
        return None
    never = " (None waits for ever)" if forever else ""
    raise InvalidArgumentError(
        f"{what} must be a finite number of seconds from 0 to {MAX_TIMEOUT:.0f} (100 years)"
        f"{never}, got {timeout!r:.40}"
    )


def check_version(version: Any) -> int:
    """A compare-and-set version: an int from 0 (must not exist) to 2**64 - 1.

    Raises:
        InvalidArgumentError: a bool, not an int (``'1'``, ``1.0``, None), or out of range.
    """
    if version.__class__ is int and 0 <= version <= MAX_VERSION:
        return version
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidArgumentError(
            f"version must be an int (a record's version from store.version(key), or 0 for "
            f"'must not exist'), got {type(version).__name__} {version!r:.40}"
        )
    if 0 <= version <= MAX_VERSION:
        return int(version)
    raise InvalidArgumentError(
        f"version must be from 0 to 2**64 - 1 (a record's version from store.version(key), "
        f"or 0 for 'must not exist'), got {version!r:.40}"
    )


def check_flag(flag: Any, what: str) -> int:
    """A boolean flag (``wait=``) as 0 or 1; ints 0 and 1 are taken too.

    Raises:
        InvalidArgumentError: anything else (None, a string, 2).
    """
    if flag is True:  # the common cases first: two identity tests on the write path
        return 1
    if flag is False:
        return 0
    if isinstance(flag, int) and flag in (0, 1):
        return int(flag)
    raise InvalidArgumentError(f"{what} must be True or False, got {type(flag).__name__} {flag!r:.40}")


def check_read_cache(read_cache: Any) -> int:
    """``connect(read_cache=)``: records kept per handle, an int >= 0.

    Raises:
        InvalidLayoutError: anything else (what ``Store`` raises for it too).
    """
    if not isinstance(read_cache, int) or isinstance(read_cache, bool) or read_cache < 0:
        raise InvalidLayoutError(
            f"read_cache must be an integer >= 0 (records kept per handle; 0 turns the "
            f"cache off), got {read_cache!r}")
    return read_cache


def check_spin_us(spin_us: Any) -> float:
    """``connect(spin_us=)``: microseconds from 0 to 1,000,000.

    Raises:
        InvalidArgumentError: not a finite number in that range.
    """
    if (isinstance(spin_us, bool) or not isinstance(spin_us, numbers.Real)
            or not 0 <= spin_us <= 1_000_000):
        raise InvalidArgumentError(
            f"spin_us must be a number of microseconds from 0 to 1,000,000, got {spin_us!r:.40}"
        )
    return spin_us
