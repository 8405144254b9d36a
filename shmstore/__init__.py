"""shmstore: a record store shared by many processes on one host.

Readers in any process read records straight out of a POSIX shared-memory segment
without taking a lock; one coordinator process applies every write. See README.md.
"""

from ._api import Coordinator, DurabilityUnavailableError, connect, destroy, open, serve
from ._errors import (
    CoordinatorRunningError,
    CoordinatorUnavailableError,
    CorruptionError,
    IncompatibleStoreError,
    InvalidKeyError,
    InvalidLayoutError,
    InvalidNameError,
    KeyTooLongError,
    ProtocolError,
    RequestTooLargeError,
    SchemaMismatchError,
    ShmStoreError,
    StoreClosedError,
    StoreFullError,
    StoreNotFoundError,
    StoreTimeoutError,
    TooManyClientsError,
    UnsupportedPlatformError,
    ValueEncodingError,
    ValueTooLargeError,
    VersionConflictError,
)
from ._prometheus import PROMETHEUS_CONTENT_TYPE, metrics_app, prometheus_text
from ._stats import ClientStats
from ._store import Batch, Store, StoreStats
from ._version import __version__

__all__ = [
    "Batch",
    "ClientStats",
    "Coordinator",
    "CoordinatorRunningError",
    "CoordinatorUnavailableError",
    "CorruptionError",
    "DurabilityUnavailableError",
    "IncompatibleStoreError",
    "InvalidKeyError",
    "InvalidLayoutError",
    "InvalidNameError",
    "KeyTooLongError",
    "PROMETHEUS_CONTENT_TYPE",
    "ProtocolError",
    "RequestTooLargeError",
    "SchemaMismatchError",
    "ShmStoreError",
    "Store",
    "StoreClosedError",
    "StoreFullError",
    "StoreNotFoundError",
    "StoreStats",
    "StoreTimeoutError",
    "TooManyClientsError",
    "UnsupportedPlatformError",
    "ValueEncodingError",
    "ValueTooLargeError",
    "VersionConflictError",
    "__version__",
    "connect",
    "destroy",
    "metrics_app",
    "open",
    "prometheus_text",
    "serve",
]
