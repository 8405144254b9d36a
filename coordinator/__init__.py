"""The coordinator subsystem: the one process that writes a store.

Installed as ``shmstore.coordinator``. Run one in the foreground with
``python -m shmstore.coordinator`` or ``shmstore serve NAME``; start one from Python
with :func:`shmstore.serve`.
"""

from ._engine import Engine
from ._server import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    CoordinatorServer,
    ServerConfig,
    main_serve,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REFUSED",
    "CoordinatorServer",
    "Engine",
    "ServerConfig",
    "main_serve",
]
