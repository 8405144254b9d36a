"""Modules imported on first use: what keeps a reader process lean.

A process that only reads (``connect()`` and ``get()``) needs the segment mapping, the
seqlock read and msgspec's decoder - nothing more. numpy alone costs ~14 MiB of private
memory per process, asyncio (with ssl) ~9 MiB, the write path pulls both, so the
modules that a reader imports name what only other features use through
:class:`LazyModule`, or import it inside the function that needs it;
``tests/test_lean.py`` checks that a reader does not import them, and ``shmstore
bench``'s ``memory.*_reader`` rows measure what a reader costs.

For type checkers the real module is imported under ``TYPE_CHECKING``::

    if TYPE_CHECKING:
        import numpy as np
    else:
        np = LazyModule("numpy")
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable


class LazyModule:
    """Stands for module ``name`` and imports it on the first attribute lookup.

    Each attribute looked up is then kept on the instance, so the next lookup of it is
    a plain instance attribute (no ``__getattr__`` call). Thread-safe: the import system
    serializes the import; two threads may both store the same attribute.
    """

    def __init__(self, name: str) -> None:
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__dict__["_lazy_name"]), attr)
        self.__dict__[attr] = value
        return value

    def __repr__(self) -> str:
        return f"<LazyModule {self.__dict__['_lazy_name']!r}>"


def lazy_exports(package: str, homes: dict[str, str],
                 listed: Iterable[str] = ()) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for names that load on first use.

    Args:
        package: the package's ``__name__``.
        homes: name -> the module (relative to ``package``) that defines it.
        listed: more names for ``dir()`` (the package's ``__all__``).

    The ``__getattr__`` keeps what it loaded in the package's globals, so each name
    costs one import, once.
    """
    namespace = importlib.import_module(package).__dict__
    names = set(homes) | set(listed)

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | names)

    return __getattr__, __dir__
