"""shmstore's benchmark against py-lmdb, Redis, multiprocessing.Manager and floors.

``shmstore bench`` and ``scripts/bench.py`` run :func:`main`. Every system runs in
this process tree on the same data; each figure is the median of repeated timed runs
with a warm-up excluded (see ``_main.parse_args`` for the options, ``_specs`` for the
measures and the issue's targets). The peers are optional: py-lmdb and redis-py are
imported only when used, and their rows are reported as skipped, with the reason,
when missing.

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
