"""The coordinator subsystem: the one process that writes a store.

Installed as ``shmstore.coordinator``. Run one in the foreground with
``python -m shmstore.coordinator`` or ``shmstore serve NAME``; start one from Python
with :func:`shmstore.serve`.

The names below load on first use, so importing the settings
(``shmstore.coordinator._config``, what ``serve()`` needs) does not load the loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
