"""shmstore: a record store shared by many processes on one host.

Readers in any process read records straight out of a POSIX shared-memory segment
without taking a lock; one coordinator process applies every write. See README.md.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._compiled import native as _native_core
from ._lazy import lazy_exports as _lazy_exports
from ._api import Coordinator, DurabilityUnavailableError, connect, destroy, open, serve
from ._errors import (
    CoordinatorRunningError,
    CoordinatorUnavailableError,
    CorruptionError,
    EncryptionKeyError,
    FeedTruncatedError,
    IncompatibleStoreError,
    InvalidArgumentError,
    InvalidCursorError,
    InvalidKeyError,
    InvalidLayoutError,
    InvalidNameError,
    InvalidRowsError,
    InvalidTTLError,
    KeyTooLongError,
    ProtocolError,
    ReplicaUnsupportedError,
    RequestTooLargeError,
    RowOutOfRangeError,
    SchemaMismatchError,
    ShmStoreError,
    StorageError,
    StoreClosedError,
    StoreFullError,
    StoreNotFoundError,
    StoreTimeoutError,
    TableDtypeError,
    TableNotFoundError,
    TooManyClientsError,
    UnsupportedPlatformError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    ValueEncodingError,
    ValueTooLargeError,
    VersionConflictError,
)
from ._store import Store
from ._version import __version__

#: True when the compiled core (``shmstore._native``) runs; False under
#: ``SHMSTORE_NO_EXTENSIONS=1`` (the pure-Python core, x86-64 only).
NATIVE: bool = _native_core is not None

if _TYPE_CHECKING:
    from ._data import CheckProblem, CheckReport, check, restore
    from ._prometheus import PROMETHEUS_CONTENT_TYPE, metrics_app, prometheus_text
    from ._snapshot import Snapshot
    from ._stats import ClientStats, StoreStats
    from ._table import Table
    from ._writes import Batch

#: Re-exports loaded on first use: those whose modules import numpy, so that a process
#: that only reads never imports it, and the tools a reader does not use (see
#: shmstore._lazy and tests/test_lean.py).
_LAZY = {
    "Batch": "._writes",
    "CheckProblem": "._data",
    "CheckReport": "._data",
    "ClientStats": "._stats",
    "PROMETHEUS_CONTENT_TYPE": "._prometheus",
    "Snapshot": "._snapshot",
    "StoreStats": "._stats",
    "Table": "._table",
    "check": "._data",
    "metrics_app": "._prometheus",
    "prometheus_text": "._prometheus",
    "restore": "._data",
}


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)

__all__ = [
    "Batch",
    "CheckProblem",
    "CheckReport",
    "ClientStats",
    "Coordinator",
    "CoordinatorRunningError",
    "CoordinatorUnavailableError",
    "CorruptionError",
    "DurabilityUnavailableError",
    "EncryptionKeyError",
    "FeedTruncatedError",
    "IncompatibleStoreError",
    "InvalidArgumentError",
    "InvalidCursorError",
    "InvalidKeyError",
    "InvalidLayoutError",
    "InvalidNameError",
    "InvalidRowsError",
    "InvalidTTLError",
    "KeyTooLongError",
    "NATIVE",
    "PROMETHEUS_CONTENT_TYPE",
    "ProtocolError",
    "ReplicaUnsupportedError",
    "RequestTooLargeError",
    "RowOutOfRangeError",
    "SchemaMismatchError",
    "ShmStoreError",
    "Snapshot",
    "StorageError",
    "Store",
    "StoreClosedError",
    "StoreFullError",
    "StoreNotFoundError",
    "StoreStats",
    "StoreTimeoutError",
    "Table",
    "TableDtypeError",
    "TableNotFoundError",
    "TooManyClientsError",
    "UnsupportedPlatformError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "ValueEncodingError",
    "ValueTooLargeError",
    "VersionConflictError",
    "__version__",
    "check",
    "connect",
    "destroy",
    "metrics_app",
    "open",
    "prometheus_text",
    "restore",
    "serve",
]
