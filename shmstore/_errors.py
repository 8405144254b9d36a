"""The exception hierarchy.

Every error shmstore raises derives from :class:`ShmStoreError`. Subclasses are split by
what the caller can do about them, and also inherit the stdlib class callers already
catch (``KeyError``, ``ValueError``, ``TimeoutError``), the way filelock's ``Timeout``
is a ``TimeoutError``.

Errors cross the coordinator protocol as ``(type name, message)`` and are rebuilt by
:func:`from_wire` from a registry filled in automatically for every subclass, so a new
error needs no hand-kept list. Every exception pickles (it crosses Pool boundaries):
``__reduce__`` rebuilds it from its message alone.
"""

from __future__ import annotations

_REGISTRY: dict[str, type[ShmStoreError]] = {}


class ShmStoreError(Exception):
    """Base class of every error raised by shmstore."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.message,))


_REGISTRY["ShmStoreError"] = ShmStoreError


class InvalidNameError(ShmStoreError, ValueError):
    """A store name is empty, too long or has characters outside ``[A-Za-z0-9_.-]``."""


class InvalidLayoutError(ShmStoreError, ValueError):
    """capacity, key_size, value_size or another store parameter is out of range."""


class KeyTooLongError(ShmStoreError, ValueError):
    """A key is longer than the store's ``key_size``."""


class InvalidKeyError(ShmStoreError, TypeError, ValueError):
    """A key is not ``str`` or ``bytes``, is empty, or is a ``str`` with no UTF-8
    encoding (a lone surrogate: pass such a key as bytes, ``os.fsencode(key)``)."""


class ValueTooLargeError(ShmStoreError, ValueError):
    """An encoded value is larger than the store's ``value_size``."""


class ValueEncodingError(ShmStoreError, TypeError):
    """A value cannot be encoded, or does not match the store's ``value_type``."""


class StoreFullError(ShmStoreError):
    """Every slot holds a record; nothing new fits until something is deleted."""


class StoreNotFoundError(ShmStoreError, FileNotFoundError):
    """No store of that name exists on this host."""


class IncompatibleStoreError(ShmStoreError):
    """A segment or data directory was made with another layout, format or schema."""


class SchemaMismatchError(IncompatibleStoreError):
    """The ``value_type`` given does not match the one the store was created with."""


class VersionConflictError(ShmStoreError):
    """A compare-and-set found another version than the one it was given."""


class CoordinatorUnavailableError(ShmStoreError):
    """No live coordinator serves the store, so writes cannot be applied."""


class CoordinatorRunningError(ShmStoreError):
    """A coordinator already serves the store; a second one is refused."""


class TooManyClientsError(ShmStoreError):
    """Every client block of the store's write channel is taken."""


class ProtocolError(ShmStoreError):
    """The coordinator could not decode a request (a client of another version?)."""


class StoreTimeoutError(ShmStoreError, TimeoutError):
    """A blocking call (a full queue, a slow reply) did not finish within its timeout."""


class RequestTooLargeError(ShmStoreError, ValueError):
    """One request (usually a batch) is larger than the client's queue can ever hold."""


class CorruptionError(ShmStoreError):
    """Stored bytes fail a check (checksum, layout, index); never returned as data."""


class StoreClosedError(ShmStoreError):
    """The handle was closed; open a new one with ``shmstore.connect``."""


class UnsupportedPlatformError(ShmStoreError, OSError):
    """This CPU architecture or OS cannot run the lock-free read protocol safely."""


class InvalidArgumentError(ShmStoreError, ValueError, TypeError):
    """An argument of a public call has the wrong type or is out of range: a timeout
    that is NaN, infinite, negative, a bool or a string; a compare-and-set version
    that is not an int from 0 to 2**64 - 1. Raised in the calling process, before
    anything is sent; the message names the argument and what it accepts. Both a
    ``ValueError`` and a ``TypeError``, whichever the caller catches."""


class InvalidTTLError(ShmStoreError, ValueError):
    """A ``ttl=`` is not a positive, finite number of seconds (at most 100 years)."""


class FeedTruncatedError(ShmStoreError, LookupError):
    """``changes(since=E)`` cannot list every change after ``E``: a slot that recorded
    one was reused since (or the store was rebuilt from disk or recreated). Read what
    you need in full (drop a local cache), then continue from ``store.epoch``."""


class InvalidCursorError(ShmStoreError, ValueError):
    """A change-feed cursor (``since=``) is not an epoch (an int >= 0), or a watch's
    ``min_interval=`` is not 0 to 60 seconds."""


class StorageError(ShmStoreError, OSError):
    """A data directory, backup or restore target cannot be written or used: it is
    read-only, full, not empty, not writable, or the file system failed."""


class EncryptionKeyError(ShmStoreError, ValueError):
    """An encrypted data directory or backup was opened without its key, or with
    another key; or a key is malformed."""


class DurabilityUnavailableError(ShmStoreError, NotImplementedError):
    """Durability was asked for and cannot be given: ``checkpoint()`` of a memory-only
    store, or a checkpoint the data directory could not take (disk full, I/O error)."""


# -- snapshots and tables --------------------------------------------------------------


class TableNotFoundError(ShmStoreError, KeyError):
    """No table of that name exists in the store; create it with ``store.table(name,
    dtype=..., rows=...)``."""


class TableDtypeError(ShmStoreError, TypeError):
    """Values written to a table do not have the table's numpy dtype, or a dtype cannot
    be stored (object fields)."""


class RowOutOfRangeError(ShmStoreError, IndexError):
    """A row number is negative or not below the table's number of rows."""


class InvalidRowsError(ShmStoreError, ValueError):
    """Rows and values do not match (lengths differ, a row repeats, not integers)."""


# -- replicas (serve(..., upstream="redis://...")) ---------------------------------------


class UpstreamError(ShmStoreError):
    """Base of the errors of a replica store and its upstream (the Redis primary that
    orders every write, see docs/replicas.md)."""


class UpstreamUnavailableError(UpstreamError, ConnectionError):
    """The replica's upstream cannot be reached (refused, reset, not resolvable): the
    write was not applied anywhere. Reads go on from the replica; retry later."""


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    """The upstream did not answer within ``upstream_timeout``: the write may or may not
    have been applied. If it was, every replica applies it (exactly once); read the key
    to find out before retrying a non-idempotent write (incr)."""


class ReplicaUnsupportedError(UpstreamError, NotImplementedError):
    """The operation is not available on a replica store (tables, eviction, a local
    data directory): its data is the upstream's, and only what the upstream orders is
    replicated."""


def from_wire(type_name: str, message: str) -> ShmStoreError:
    """Turn an error that crossed the coordinator protocol back into an exception.

    Args:
        type_name: the class name the coordinator sent.
        message: its message.

    Returns:
        An instance of the registered class, or of :class:`ShmStoreError` for a name
        this version does not know (a newer coordinator), with the name kept in front.
    """
    cls = _REGISTRY.get(type_name)
    if cls is None:
        return ShmStoreError(f"{type_name}: {message}")
    return cls(message)
