"""shmstore's benchmark against py-lmdb, Redis, diskcache, memcached,
multiprocessing.Manager and floors.

``shmstore bench`` and ``scripts/bench.py`` run :func:`main`. Every system runs in
this process tree on the same data; each figure is the median of repeated timed runs
with a warm-up excluded (see ``_main.parse_args`` for the options, ``_specs`` for the
measures and the issue's targets). The peers are optional: py-lmdb, redis-py,
diskcache and pymemcache are imported only when used; the Redis and memcached servers
are private ones the run starts on unix sockets in its temp dir and stops at the end.
A peer that is missing or does not start has its rows reported as skipped, with the
reason.

The ``memory`` measure's ``*_reader`` rows are what a process that only reads costs:
the private memory (USS) of a ``python -c`` that imports a system's client, connects
and reads 1,000 keys, beyond that of a bare interpreter (``memory.bare_reader``), both
taken from outside the process.

Modules: ``_specs`` (what is measured), ``_core`` (timing, rows, child processes),
``_reads`` (in-process loops), ``_procs`` (multi-process measures), ``_suite`` (data
sets, setup, order), ``_report`` (Markdown, JSON, chart), ``_peers`` (peer servers
and the child processes), ``_main`` (the command line).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (``shmstore bench ARGS``); returns the exit code."""
    from ._main import main as run  # noqa: PLC0415 (the child processes skip these imports)

    return run(argv)
