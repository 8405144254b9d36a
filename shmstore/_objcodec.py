"""Values of the framework caches (Django, Flask-Caching, memoize): msgpack, else pickle.

Frameworks hand a cache arbitrary Python objects (Django's own backends pickle all of
them). The store itself only holds msgpack (``shmstore._codec``), and stays pickle-free.
This module sits between the two, and only the framework backends use it:

- :func:`dumps` returns the object itself when msgspec's msgpack round-trips it to an
  *equal object of the same type*: None, bool, int (64-bit range), float, str, bytes,
  and lists and dicts (str keys) made only of those. Checked by exact type, so a
  subclass (Django's ``SafeString``, an ``IntEnum``, an ``OrderedDict``) is not plain.
  A plain shmstore client reads such a value as it was written, and can write one the
  backend reads.
- Anything else (tuple, set, datetime, Decimal, a model instance, a huge int, a list
  holding any of these) becomes ``msgspec.msgpack.Ext(PICKLE_EXT, pickle.dumps(obj))``.
  A datetime is pickled rather than sent as msgpack's timestamp because the timestamp
  keeps neither a naive datetime nor a tzinfo other than UTC.

:func:`loads` inverts :func:`dumps`. Unpickling runs code chosen by whoever wrote the
value: it is safe only because every writer of a store runs as the same user (its
segment and data files are 0600), who could run that code anyway. See docs/django.md.
"""

from __future__ import annotations

import pickle
from typing import Any

import msgspec

__all__ = ["PICKLE_EXT", "dumps", "loads"]

#: The msgpack extension type code of a pickled value (0-127 are the application's).
PICKLE_EXT = 80

_Ext = msgspec.msgpack.Ext
_SCALARS = frozenset({type(None), bool, float, str, bytes})
_I64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1


def _plain(obj: Any) -> bool:
    """Whether msgpack round-trips ``obj`` to an equal object of the same type."""
    t = obj.__class__
    if t in _SCALARS:
        return True
    if t is int:
        return _I64_MIN <= obj <= _U64_MAX
    if t is list:
        return all(map(_plain, obj))
    if t is dict:
        return all(k.__class__ is str and _plain(v) for k, v in obj.items())
    return False


def dumps(obj: Any) -> Any:
    """What ``store.put`` takes for ``obj``: itself if plain (see the module), else its
    pickle wrapped in ``Ext(PICKLE_EXT, ...)``.

    Raises:
        pickle.PicklingError (or whatever the object's ``__reduce__`` raises): ``obj``
            is not plain and cannot be pickled.
    """
    try:
        if _plain(obj):
            return obj
    except RecursionError:  # nested too deep, or holds itself: pickle copes with cycles
        pass
    return _Ext(PICKLE_EXT, pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


def loads(value: Any) -> Any:
    """The object :func:`dumps` was given, from what ``store.get`` returned.

    A plain value comes back as it is; so does an ``Ext`` of another code (written by
    some other client, not by :func:`dumps`).
    """
    if value.__class__ is _Ext and value.code == PICKLE_EXT:
        return pickle.loads(value.data)  # noqa: S301 - the store's writers are this user (0600)
    return value
