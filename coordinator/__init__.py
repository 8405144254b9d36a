"""The coordinator subsystem: the one process that writes a store.

Installed as ``shmstore.coordinator``. Run one in the foreground with
``python -m shmstore.coordinator`` or ``shmstore serve NAME``; start one from Python
with :func:`shmstore.serve`.

The names below load on first use, so importing the settings
(``shmstore.coordinator._config``, what ``serve()`` needs) does not load the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shmstore._lazy import lazy_exports

if TYPE_CHECKING:
    from ._config import ServerConfig
    from ._engine import Engine
    from ._server import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, CoordinatorServer, main_serve

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REFUSED",
    "CoordinatorServer",
    "Engine",
    "ServerConfig",
    "main_serve",
]

_HOME = {"EXIT_ERROR": "._server", "EXIT_OK": "._server", "EXIT_REFUSED": "._server",
         "CoordinatorServer": "._server", "Engine": "._engine", "ServerConfig": "._config",
         "main_serve": "._server"}


__getattr__, __dir__ = lazy_exports(__name__, _HOME, __all__)
