"""multiprocessing integration: a coordinator in the parent, every pool worker a client.

::

    import multiprocessing
    from shmstore.workers import pool

    def task(i):
        s = pool.store()              # this worker's handle, connected once
        s.put(f"result:{i}", i * i)
        return s.incr("done")

    if __name__ == "__main__":
        with pool.shared("jobs", capacity=100_000) as store:
            ctx = multiprocessing.get_context("spawn")   # or "fork", "forkserver"
            with ctx.Pool(4, initializer=pool.init_worker, initargs=("jobs",)) as p:
                p.map(task, range(1000))
            print(store.get("done"))   # 1000

:func:`store` is a thin convenience: ``shmstore.connect("jobs")`` in a task works too
(every handle of a worker shares the worker's one mapping and client block).

Process model: :func:`shared` starts the store's coordinator in the parent (or uses
the one already running), so it lives until the ``with`` block ends or the parent
exits. :func:`init_worker` runs in each pool worker and attaches it: under ``spawn``
and ``forkserver`` it connects; under ``fork`` it reuses the handle the parent opened,
which keeps reading through the inherited mapping and opens the worker's own write
channel on its first write. Tasks call :func:`store`. Only the store's *name* crosses
the process boundary (as an ``initargs`` string); records are never pickled.

A worker that dies (SIGKILL, OOM killer) holds no lock anyone waits for: the
coordinator reclaims its client block within its 100 ms tick, and a write it had in
flight was applied whole or not at all. The pool itself may not survive it:
``ProcessPoolExecutor`` raises ``BrokenProcessPool`` and ``multiprocessing.Pool``
never returns that task's result, but the store stays consistent and every other
process keeps writing.

Works the same with ``concurrent.futures.ProcessPoolExecutor(mp_context=ctx,
initializer=pool.init_worker, initargs=("jobs",))``.
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import threading
from typing import Any, Iterator

import shmstore
from shmstore import Store

from ._handles import cached_handle
from shmstore._errors import StoreNotFoundError

__all__ = ["init_worker", "shared", "store"]

# Per-process state; a forked worker inherits the parent's and reuses its handles.
_lock = threading.Lock()
_handles: dict[str, Store] = {}  # store name -> this process's handle
_default: list[str] = []  # the store init_worker() attached this worker to


def _reset_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


@contextlib.contextmanager
def shared(name: str, *, destroy: bool = False, value_type: Any = None, timeout: float = 5.0,
           **serve_kwargs: Any) -> Iterator[Store]:
    """Serve store ``name`` from this process for the ``with`` block; yield a handle.

    Starts a coordinator unless one already serves the store (then it uses that one
    and leaves it running). On exit the handle is closed (its queued writes flushed)
    and the coordinator started here is stopped; the store stays readable until
    :func:`shmstore.destroy`, or ``destroy=True``.

    Start the pool inside the block and let it finish (``pool.close(); pool.join()``
    or ``with Pool(...)`` after the results are in) before the block ends: a worker
    still writing after that gets :class:`shmstore.CoordinatorUnavailableError`.

    Args:
        name: the store name.
        destroy: on exit, also remove the store (only if the coordinator was started
            here; another process's store is left alone).
        value_type: as for :func:`shmstore.serve`; give workers the same one.
        timeout: the handle's write timeout (:func:`shmstore.connect`).
        **serve_kwargs: :func:`shmstore.serve`'s (``capacity``, ``key_size``,
            ``value_size``, ``max_clients``, ...), used only if a coordinator is started.

    Yields:
        This process's handle; :func:`store` returns it too, here and in forked workers.
    """
    handle = shmstore.open(name, value_type=value_type, timeout=timeout, **serve_kwargs)
    coord = handle.coordinator
    with _lock:
        previous = _handles.get(name)
        _handles[name] = handle
    try:
        yield handle
    finally:
        with _lock:
            if _handles.get(name) is handle:
                if previous is not None and not previous.closed:
                    _handles[name] = previous
                else:
                    del _handles[name]
        try:
            handle.close()
        finally:
            if coord is not None:
                coord.stop()
                if destroy:
                    shmstore.destroy(name)


def init_worker(name: str, value_type: Any = None, timeout: float = 5.0) -> None:
    """Pool initializer: attach this worker to store ``name``.

    Pass it as ``initializer=init_worker, initargs=(name,)`` to
    ``multiprocessing.Pool`` or ``concurrent.futures.ProcessPoolExecutor``. A worker
    forked from a process that holds a handle on the store reuses that handle;
    otherwise it connects. The handle is closed (flushed) when the worker exits
    normally.

    Args:
        name: the store name.
        value_type: the store's ``value_type``, if it has one.
        timeout: the handle's write timeout.
    """
    store(name, value_type=value_type, timeout=timeout)
    _default[:] = [name]
    # Pool workers leave through os._exit: run as a multiprocessing finalizer instead
    # of atexit. (A worker killed by Pool.terminate() flushes nothing.)
    multiprocessing.util.Finalize(None, _close_handles, exitpriority=10)


def store(name: str | None = None, **connect_kwargs: Any) -> Store:
    """This process's handle on a store, connected on first use and cached.

    Cheap and idempotent: call it in every task. Thread-safe.

    Args:
        name: the store; None means the one :func:`init_worker` attached this worker
            to (or, in the parent, the one :func:`shared` serves).
        **connect_kwargs: passed to :func:`shmstore.connect` on the first call.

    Raises:
        StoreNotFoundError: no such store, or no name given and none set up here.
    """
    if name is None:
        if _default:
            name = _default[0]
        elif len(_handles) == 1:
            (name,) = _handles
        else:
            raise StoreNotFoundError(
                "shmstore.workers.pool.store() needs a store name: this process was not "
                "started with initializer=init_worker, initargs=(name,)"
            )
    return cached_handle(_handles, _lock, name, connect_kwargs)


def _close_handles() -> None:
    with _lock:
        handles = list(_handles.values())
        _handles.clear()
    for handle in handles:
        handle.close()
