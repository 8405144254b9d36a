"""The per-process handle cache both integrations share.

A thin convenience over :func:`shmstore.connect`: every handle of a process shares the
process's one attachment to the store (mapping and client block), so this cache saves
only the few microseconds a ``connect()`` costs and keeps the attachment open for the
process's life (its block claimed once, in ``post_fork``/``init_worker``). Calling
``shmstore.connect()`` per request instead is fine.
"""

from __future__ import annotations

import threading
from typing import Any

import shmstore
from shmstore import Store


def cached_handle(handles: dict[str, Store], lock: threading.Lock, name: str,
                  connect_kwargs: dict[str, Any]) -> Store:
    """This process's open handle on ``name``, connecting on first use.

    Lock-free when the handle exists (a dict lookup per request); the lock only
    serializes the first connect of concurrent threads.
    """
    handle = handles.get(name)
    if handle is not None and not handle.closed:
        return handle
    with lock:
        handle = handles.get(name)
        if handle is None or handle.closed:
            handle = handles[name] = shmstore.connect(name, **connect_kwargs)
        return handle
