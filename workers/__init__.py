"""Integrations with process managers (installed as ``shmstore.workers``).

One coordinator in the parent process for the lifetime of the server or pool, every
worker a client that reads the segment directly and writes through the coordinator:

- :mod:`shmstore.workers.gunicorn`: ``hooks(name, **serve_kwargs)`` for
  ``gunicorn.conf.py`` (``globals().update(hooks("app"))``), ``store()`` for the app,
  ``chain()`` to combine hooks. Needs ``pip install 'shmstore[gunicorn]'``.
- :mod:`shmstore.workers.pool`: ``shared(name)`` in the parent, ``init_worker`` as the
  initializer of ``multiprocessing.Pool`` or ``ProcessPoolExecutor`` (fork, spawn,
  forkserver), ``store()`` in tasks.
- :mod:`shmstore.workers.example_app`: a WSGI app whose workers share a counter and a
  cache.

The submodules are imported on demand; importing this package imports nothing else.
See docs/integrations.md.
"""
