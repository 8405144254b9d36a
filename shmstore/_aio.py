"""asyncio variants of the write calls: ``aput``, ``aincr``, ``adelete``,
``acompare_and_set``, ``abatch`` and ``awatch``.

Design
------
A write waits for the coordinator's reply on a POSIX semaphore, which an event loop
cannot await. So each handle runs its async writes in ONE worker thread of its own
(started on the first async call, named ``shmstore-aio``, idle until used): the coroutine
hands the blocking call to that thread with ``loop.run_in_executor`` and awaits the
future; the event loop keeps running other tasks meanwhile, even while the coordinator
is stopped or slow. One thread per handle keeps the async writes of a handle in the
order they were awaited (the write channel is one request at a time per handle anyway)
and costs two thread wake-ups per call: ``scripts/feature_costs.py`` measured an
``aput`` at ~4x a sync ``put`` round trip on a loaded 2-core host. For throughput,
gather many (they queue on the thread) or use ``put(wait=False)`` + ``flush()``. ``awatch`` sleeps in the loop's default
executor, one bounded slice (<= 1 s) at a time, so a cancelled ``awatch`` leaves no
thread blocked for long.

Reads (``get``, ``get_many``, ``changes``, ...) stay synchronous: they never wait on
anything. The thread is shut down by ``close()``; a forked child starts its own.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from ._check_args import check_timeout, check_version
from ._errors import StoreClosedError
from ._feed import WATCH_SLICE, _Watcher, check_watch_args
from ._lazy import LazyModule

# Mixed into every Store, so imported by every reader: asyncio (~9 MiB with ssl) is
# imported by the caller's event loop before any of these calls can run, and the
# write path with the first write (see shmstore._lazy).
if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from ._writes import Batch
else:
    asyncio = LazyModule("asyncio")


class AsyncMixin:
    """Async write calls; mixed into :class:`shmstore.Store`.

    A pure method surface: it calls the Store's public methods (``put``, ``incr``,
    ``delete``, ``compare_and_set``, ``batch``, ``watch``'s :class:`_Watcher`) from its
    own worker thread, and keeps only that thread (``_aio``, ``_aio_pid``) as state.
    """

    def _aio_pool(self) -> ThreadPoolExecutor:
        pool = self.__dict__.get("_aio")
        if pool is None or self.__dict__.get("_aio_pid") != os.getpid():
            if self.closed:  # a closed handle raises here, not in the thread
                raise StoreClosedError(f"store handle {self.name!r} is closed; connect again")
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

            pool = self.__dict__["_aio"] = ThreadPoolExecutor(1, thread_name_prefix="shmstore-aio")
            self.__dict__["_aio_pid"] = os.getpid()
        return pool

    def _aio_close(self) -> None:
        pool = self.__dict__.pop("_aio", None)
        if pool is not None and self.__dict__.get("_aio_pid") == os.getpid():
            pool.shutdown(wait=True)

    async def _arun(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._aio_pool(), functools.partial(fn, *args, **kwargs))

    async def aput(self, key: str | bytes, value: Any, *, ttl: float | None = None,
                   timeout: float | None = None) -> int:
        """``await``-able :meth:`Store.put`; never blocks the event loop."""
        _check(timeout)
        return await self._arun(self.put, key, value, ttl=ttl, timeout=timeout)

    async def aincr(self, key: str | bytes, delta: int = 1, *, timeout: float | None = None) -> int:
        """``await``-able :meth:`Store.incr`."""
        _check(timeout)
        return await self._arun(self.incr, key, delta, timeout=timeout)

    async def adelete(self, key: str | bytes, *, timeout: float | None = None) -> bool:
        """``await``-able :meth:`Store.delete`."""
        _check(timeout)
        return await self._arun(self.delete, key, timeout=timeout)

    async def acompare_and_set(self, key: str | bytes, value: Any, *, version: int,
                               ttl: float | None = None, timeout: float | None = None) -> int:
        """``await``-able :meth:`Store.compare_and_set`."""
        _check(timeout)
        check_version(version)
        return await self._arun(self.compare_and_set, key, value, version=version, ttl=ttl,
                                timeout=timeout)

    def abatch(self) -> AsyncBatch:
        """An async context manager collecting puts and deletes, applied atomically
        when the ``async with`` block exits (its ``results`` are then set)::

            async with store.abatch() as b:
                b.put("a", 1, ttl=60)
                b.delete("b")
        """
        return AsyncBatch(self.batch(), self._arun)

    def awatch(self, prefix: str | bytes | None = None, timeout: float | None = None, *,
               since: int | None = None, min_interval: float = 0.01
               ) -> AsyncIterator[tuple[list[bytes], int]]:
        """Async iterator over ``(keys, epoch)`` batches of changes; see :meth:`Store.watch`
        (same arguments; ``timeout`` ends the iteration after that long without a change).
        Bad arguments raise here, as in ``watch``."""
        timeout = check_watch_args(self, prefix, timeout, since, min_interval)
        return self._awatch(prefix, timeout, since, min_interval)

    async def _awatch(self, prefix: str | bytes | None, timeout: float | None, since: int | None,
                      min_interval: float) -> AsyncIterator[tuple[list[bytes], int]]:
        loop = asyncio.get_running_loop()
        w = _Watcher(self, prefix, since, min_interval)
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            item = await loop.run_in_executor(None, w.step, WATCH_SLICE if left is None else min(left, WATCH_SLICE))
            if item is not None:
                yield item
                if deadline is not None:
                    deadline = loop.time() + timeout


def _check(timeout: object) -> None:
    """A bad timeout raises in the coroutine, before the call is queued on the thread
    (the call checks everything else there, and again)."""
    if timeout is not None:
        check_timeout(timeout)


class AsyncBatch:
    """What :meth:`AsyncMixin.abatch` returns: ``put``/``delete`` as on a Batch."""

    def __init__(self, batch: Batch, run: Callable[..., Any]) -> None:
        self._batch = batch
        self._run = run  # the handle's AsyncMixin._arun
        self.put = batch.put
        self.delete = batch.delete
        self.results: list | None = None

    def __len__(self) -> int:
        return len(self._batch)

    async def __aenter__(self) -> AsyncBatch:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        b = self._batch
        if exc_type is not None or not len(b):
            return
        await self._run(b.__exit__, None, None, None)  # sends it, in the handle's thread
        self.results = b.results
