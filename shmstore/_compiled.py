"""Which core runs: the compiled one (``shmstore._native``) or pure Python.

The compiled core is the default: ``pip install`` builds it, and a failed build fails
the install. ``SHMSTORE_NO_EXTENSIONS=1`` (the convention of multidict, yarl and
aiohttp), set at install time, builds nothing; set when a process starts, it makes that
process use the pure-Python core even if the extension is there. The pure-Python core
is the reference and the fallback: it runs only on x86-64, whose total store order
stands in for the barriers Python cannot issue (``_layout.check_platform``).

A process that was not asked for pure Python and cannot import the extension fails
loudly here, naming the two fixes: a store that silently read through the slow core
would be a surprise, and on aarch64 an unsafe one.

``native`` is the extension module or None; modules look it up at the time they bind
their readers (``shmstore._segment``), so a test can run a store on either core in one
process (``tests/conftest.py``'s ``core`` parameter).
"""

from __future__ import annotations

import os
import platform
from types import ModuleType

ENV = "SHMSTORE_NO_EXTENSIONS"


def pure_requested() -> bool:
    """Whether the environment asks for the pure-Python core."""
    return os.environ.get(ENV, "") not in ("", "0")


def _load() -> ModuleType | None:
    if pure_requested():
        return None
    try:
        from . import _native  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            f"shmstore's compiled core (shmstore._native) is missing or does not load: {e}. "
            f"Reinstall shmstore where a C compiler and Python's headers are present "
            f"(pip install -e . in a checkout), or set {ENV}=1 to use the pure-Python core "
            f"(x86-64 only)."
        ) from e
    return _native


#: the extension module, or None when the pure-Python core runs
native: ModuleType | None = _load()


def _no_fence() -> None:
    """No fence needed: see :data:`acquire`."""


# The protocol steps that run in Python and numpy (snapshots, change-feed scans, table
# rows, handover segments) place these between their loads (acquire) and their stores
# (release), where the C code has its fences. On x86-64 the CPU keeps loads in order
# with loads and stores with stores (total store order), and the interpreter issues
# each load and store in program order, so they are no-ops there (a call of a C
# function would cost ~30 ns for nothing); elsewhere (aarch64, admitted only with the
# compiled core) they are the extension's C11 fences.
_TSO = platform.machine().lower() in ("x86_64", "amd64")
#: loads before it complete before loads after it (an acquire fence)
acquire = native.fence_acquire if native is not None and not _TSO else _no_fence
#: stores after it happen after everything before it (a release fence)
release = native.fence_release if native is not None and not _TSO else _no_fence
