"""Gunicorn integration: one coordinator per server, every worker a client.

In ``gunicorn.conf.py``::

    from shmstore.workers.gunicorn import hooks
    globals().update(hooks("app", capacity=100_000))

and in the application, wherever a request needs the store::

    from shmstore.workers.gunicorn import store
    store().incr("hits")          # cached per process: cheap to call per request

``store()`` is a thin convenience: ``shmstore.connect("app")`` per request works too
(every handle of a worker shares the worker's one mapping and client block).

Process model
-------------
- **Master** (gunicorn's arbiter). ``on_starting`` starts the store's coordinator with
  :func:`shmstore.serve`, so the coordinator is a child of the master and watches it.
  The master itself holds a read-only handle (it never claims a client block) and
  uses it to check, before each worker it forks (``pre_fork``), after each worker it
  reaps (``child_exit``) and on ``HUP`` (``on_reload``), that a coordinator still
  serves the store, starting a new one if it died (the new one adopts the segment and
  repairs what the death left). If another process already serves the store (a
  standalone ``shmstore serve``), the master uses that coordinator and never stops it.
- **Coordinator**: applies every write of every worker. It lives until ``on_exit``
  stops it (gracefully: it drains what is queued) after the workers are gone; if the
  master dies without ``on_exit`` (SIGKILL), the coordinator notices within its 100 ms
  tick and stops by itself.
- **Workers** attach in ``post_fork``: :func:`store` maps the segment (with
  ``preload_app`` the handle the master opened is inherited and reused, which the fork
  safety of :class:`shmstore.Store` allows) and claims the worker's client block
  at once, so the first request pays no handshake. Reads never touch the coordinator.
- **A worker exits** normally (``max_requests``, ``--reload``, ``HUP``, ``TERM``):
  ``worker_exit`` closes its handle, which first flushes writes it queued with
  ``wait=False``. **A worker dies** (SIGKILL, OOM killer, segfault): it runs no hook,
  but the kernel drops the lock on its client block and the coordinator reclaims the
  block on its next tick; the master's ``child_exit`` then counts and logs the exit
  and makes sure a coordinator still runs. A write the dead worker had in flight was
  applied whole or not at all; pipelined writes it never flushed are lost.
- **The master exits**: ``on_exit`` (after gunicorn stopped the workers) stops the
  coordinator, unless ``detach=True`` was given or the coordinator is another
  process's. The segment stays: readable, and adopted by the next start, until
  :func:`shmstore.destroy` or ``shmstore destroy NAME``.
- **Re-exec** (``USR2``): the new master finds the old master's coordinator running,
  stops it (graceful: writes in flight are applied or re-sent) and starts its own, so
  the store's coordinator always belongs to the newest master; the old master's
  workers switch to it on their next write and the old master's exit leaves it alone.

Hooks returned by :func:`hooks`: ``on_starting``, ``on_reload``, ``pre_fork``,
``post_fork``, ``child_exit``, ``worker_exit``, ``on_exit``. Combine them with hooks
of your own with :func:`chain`.

Gunicorn is imported only when :func:`hooks` is called; :func:`store` and
:func:`chain` work without it.
"""

from __future__ import annotations

import inspect
import os
import signal
import threading
import time
from typing import Any, Callable

import shmstore
from shmstore import Store

from ._handles import cached_handle
from shmstore._channel import OP_PING
from shmstore._errors import CoordinatorRunningError, ShmStoreError, StoreNotFoundError
from shmstore._layout import check_name

__all__ = ["chain", "hooks", "store"]

#: Seconds the new master of a re-exec waits for the old master's coordinator to stop.
TAKEOVER_TIMEOUT = 10.0
#: Attempts to start a coordinator while a stopping one still holds the store's lock.
SERVE_TRIES = 20

Hook = Callable[..., Any]

# Per-process state. Workers inherit the master's at fork; each keeps its own after.
_lock = threading.Lock()
_handles: dict[str, Store] = {}  # store name -> this process's handle
_configured: list[str] = []  # names given to hooks() in this process tree, in order
_masters: dict[str, _Master] = {}  # store name -> master-side state (master only)


def _reset_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def store(name: str | None = None, **connect_kwargs: Any) -> Store:
    """This process's handle on a store, connected on first use and cached.

    Cheap and idempotent: after the first call it is one dict lookup, so call it in
    every request rather than keeping a module-level handle. Thread-safe (gthread
    workers). A handle inherited across fork is reused: it keeps reading through the
    inherited mapping and opens its own write channel on its first write.

    Don't call it at import time of a ``preload_app`` application: the master imports
    the app before ``on_starting`` has started the store.

    Args:
        name: the store; None means the one given to :func:`hooks` in gunicorn.conf.py.
        **connect_kwargs: passed to :func:`shmstore.connect` on the first call
            (``value_type``, ``timeout``, ``spin_us``); ignored after that.

    Raises:
        StoreNotFoundError: no such store, or no name given and :func:`hooks` was not
            called (or was called for several stores) in this process tree.
    """
    if name is None:
        if len(_configured) != 1:
            raise StoreNotFoundError(
                "shmstore.workers.gunicorn.store() needs a store name: "
                + ("hooks() was not called in this process (is it in gunicorn.conf.py?)"
                   if not _configured else f"hooks() was called for several stores {_configured}")
            )
        name = _configured[0]
    return cached_handle(_handles, _lock, name, connect_kwargs)


def _attach(handle: Store) -> None:
    """Claim this process's client block now rather than on its first write."""
    # A ping is the one request that writes nothing; Store has no public name for it.
    handle._request([OP_PING, 1], "ping")


def hooks(name: str, **serve_kwargs: Any) -> dict[str, Hook]:
    """Gunicorn server hooks that run store ``name`` for the server's lifetime.

    Use in ``gunicorn.conf.py`` as ``globals().update(hooks("app", capacity=100_000))``
    (see the module docstring for what each hook does and in which process). The
    returned functions have the arities gunicorn checks; combine one with a hook of
    your own with :func:`chain`.

    Args:
        name: the store name.
        **serve_kwargs: :func:`shmstore.serve`'s keyword arguments (``capacity``,
            ``key_size``, ``value_size``, ``value_type``, ``max_clients``, ...);
            ``value_type`` is also given to each worker's :func:`store`. Leave
            ``max_clients`` (default 64) above the number of workers plus any other
            writing process.

    Returns:
        ``{"on_starting": ..., "on_reload": ..., "pre_fork": ..., "post_fork": ...,
        "child_exit": ..., "worker_exit": ..., "on_exit": ...}``.

    Raises:
        ImportError: gunicorn is not installed (``pip install 'shmstore[gunicorn]'``).
        TypeError: an argument :func:`shmstore.serve` does not take.
    """
    try:
        import gunicorn  # noqa: F401, PLC0415  (the integration's only third-party need)
    except ImportError as e:
        raise ImportError(
            "shmstore.workers.gunicorn.hooks() needs gunicorn; install it with "
            "pip install 'shmstore[gunicorn]'"
        ) from e
    inspect.signature(shmstore.serve).bind(name, **serve_kwargs)  # TypeError now, not at start
    check_name(name)
    if name not in _configured:
        _configured.append(name)
    connect_kwargs = {"value_type": serve_kwargs["value_type"]} if "value_type" in serve_kwargs else {}

    def master() -> _Master:
        # Created on first use, so a config re-read on HUP keeps the running state.
        m = _masters.get(name)
        if m is None:
            m = _masters[name] = _Master(name)
        m.serve_kwargs = serve_kwargs
        m.connect_kwargs = connect_kwargs
        return m

    def on_starting(server: Any) -> None:
        master().start(server.log, reexec_parent=getattr(server, "master_pid", 0))

    def on_reload(server: Any) -> None:
        master().ensure(server.log)

    def pre_fork(server: Any, worker: Any) -> None:
        master().ensure(server.log)

    def post_fork(server: Any, worker: Any) -> None:
        handle = store(name, **connect_kwargs)
        try:
            _attach(handle)
        except ShmStoreError as e:
            # Not fatal: reads work, and the first write attaches (or raises) itself.
            server.log.warning("shmstore %r: worker %s could not attach yet (%s); it will on its "
                               "first write", name, os.getpid(), e)

    def child_exit(server: Any, worker: Any) -> None:
        m = master()
        m.worker_exits += 1
        server.log.debug("shmstore %r: worker %s exited (%d so far); the coordinator reclaims "
                         "the client block it held", name, worker.pid, m.worker_exits)
        m.ensure(server.log)

    def worker_exit(server: Any, worker: Any) -> None:
        # Gunicorn also calls this in the master for a worker it could not signal.
        if os.getpid() == worker.pid:
            handle = _handles.pop(name, None)
            if handle is not None:
                handle.close()

    def on_exit(server: Any) -> None:
        master().stop(server.log)

    return {
        "on_starting": on_starting,
        "on_reload": on_reload,
        "pre_fork": pre_fork,
        "post_fork": post_fork,
        "child_exit": child_exit,
        "worker_exit": worker_exit,
        "on_exit": on_exit,
    }


class _Master:
    """What the master knows about one store: the coordinator it started, if any.

    Lives only in the master (workers inherit a copy and never use it).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.serve_kwargs: dict[str, Any] = {}
        self.connect_kwargs: dict[str, Any] = {}
        #: the coordinator this master started (and stops on exit), or None
        self.coordinator: shmstore.Coordinator | None = None
        #: the pid of a coordinator started elsewhere that this master uses, or None
        self.following: int | None = None
        self.worker_exits = 0

    def serving_pid(self) -> int | None:
        """The pid of the live coordinator of the store, or None (pid + start time)."""
        try:
            return store(self.name, **self.connect_kwargs).stats().coordinator_pid
        except StoreNotFoundError:
            return None

    def start(self, log: Any, *, reexec_parent: int = 0) -> None:
        """``on_starting``: serve the store; after a re-exec, take over the old master's
        coordinator. Errors (a store of another layout, ...) stop gunicorn from starting.
        """
        pid = self.serving_pid()
        if pid is not None and reexec_parent and _parent_of(pid) == reexec_parent:
            log.info("shmstore %r: taking over coordinator pid %s from the old master %s",
                     self.name, pid, reexec_parent)
            _stop_pid(pid)
        self.ensure(log, quiet=False)

    def ensure(self, log: Any, *, quiet: bool = True) -> None:
        """Make sure a coordinator serves the store; start one if none does."""
        pid = self.serving_pid()
        if pid is not None and self.coordinator is not None and pid == self.coordinator.pid:
            return
        if pid is not None:
            if pid != self.following:
                self.following = pid
                log.info("shmstore %r: using coordinator pid %s, which this master did not "
                         "start and will not stop", self.name, pid)
            return
        if self.coordinator is not None:
            log.warning("shmstore %r: coordinator pid %s stopped serving; starting a new one",
                        self.name, self.coordinator.pid)
            self.coordinator.stop()  # reap it; it no longer holds the store's lock
            self.coordinator = None
        for _ in range(SERVE_TRIES):
            try:
                self.coordinator = shmstore.serve(self.name, **self.serve_kwargs)
                break
            except CoordinatorRunningError:
                # Another process won the race (use its coordinator), or a dying one
                # still holds the lock for a moment.
                pid = self.serving_pid()
                if pid is not None:
                    self.ensure(log)
                    return
                time.sleep(0.1)
            except ShmStoreError:
                if not quiet:
                    raise
                log.exception("shmstore %r: could not start a coordinator", self.name)
                return
        else:
            log.error("shmstore %r: could not start a coordinator: another one holds the "
                      "store's lock without serving it", self.name)
            return
        self.following = None
        log.info("shmstore %r: coordinator started (pid %s)", self.name, self.coordinator.pid)

    def stop(self, log: Any) -> None:
        """``on_exit``: stop the coordinator this master started; close the handle."""
        coord = self.coordinator
        self.coordinator = None
        handle = _handles.pop(self.name, None)
        if handle is not None:
            handle.close()
        if coord is None:
            return
        if self.serve_kwargs.get("detach"):
            log.info("shmstore %r: coordinator pid %s keeps running (detach=True)",
                     self.name, coord.pid)
            return
        code = coord.stop()
        log.info("shmstore %r: coordinator pid %s stopped (exit code %s)", self.name, coord.pid, code)


def _parent_of(pid: int) -> int:
    import psutil  # noqa: PLC0415

    try:
        return psutil.Process(pid).ppid()
    except psutil.NoSuchProcess:
        return 0


def _stop_pid(pid: int) -> None:
    """SIGTERM a coordinator that is not our child and wait until it is gone."""
    import psutil  # noqa: PLC0415

    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(TAKEOVER_TIMEOUT)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        proc.kill()
    # Not our child: psutil's wait() returns once it is gone or a zombie; a zombie
    # already dropped the store's lock.
    deadline = time.monotonic() + TAKEOVER_TIMEOUT
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.01)


# -- chaining ------------------------------------------------------------------------


def chain(*fns: Hook | None) -> Hook:
    """One hook that calls ``fns`` in order, with the arity gunicorn checks.

    Gunicorn refuses a hook whose number of positional parameters is not the one it
    expects, so ``lambda *a: ...`` would not do. ``None`` entries are skipped.
    Example, in gunicorn.conf.py::

        shm = hooks("app")
        globals().update(shm)

        def post_fork(server, worker):
            server.log.info("worker %s up", worker.pid)

        post_fork = chain(shm["post_fork"], post_fork)

    Returns:
        A function taking as many positional arguments as ``fns[0]``, returning what
        the last function returns.

    Raises:
        TypeError: no function given, or they take different numbers of arguments.
    """
    todo = [f for f in fns if f is not None]
    if not todo:
        raise TypeError("chain() needs at least one function")
    arities = {_arity(f) for f in todo}
    if len(arities) != 1:
        raise TypeError(f"chain(): the hooks take different numbers of arguments {sorted(arities)}")
    (arity,) = arities

    def call(*args: Any) -> Any:
        result = None
        for f in todo:
            result = f(*args)
        return result

    try:
        wrap = _WRAPPERS[arity]
    except KeyError:
        raise TypeError(f"chain(): hooks take 0 to {max(_WRAPPERS)} arguments, not {arity}") from None
    hook = wrap(call)
    hook.__name__ = hook.__qualname__ = getattr(todo[0], "__name__", "hook")
    hook.__doc__ = "Calls " + ", ".join(getattr(f, "__qualname__", repr(f)) for f in todo) + "."
    return hook


def _arity(f: Hook) -> int:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in inspect.signature(f).parameters.values())


_WRAPPERS: dict[int, Callable[[Hook], Hook]] = {
    0: lambda call: lambda: call(),
    1: lambda call: lambda a: call(a),
    2: lambda call: lambda a, b: call(a, b),
    3: lambda call: lambda a, b, c: call(a, b, c),
    4: lambda call: lambda a, b, c, d: call(a, b, c, d),
}
