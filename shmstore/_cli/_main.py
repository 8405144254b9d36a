"""The ``shmstore`` command line: ``shmstore --help`` lists the subcommands.

Installed as the ``shmstore`` console script and run by ``python -m shmstore``. Every
subcommand has ``--help`` with an example. Errors print one line,
``shmstore: error: <message>``, on stderr and exit with:

======================  ==========================================================
``EXIT_OK`` (0)          done
``EXIT_ERROR`` (1)       a :class:`ShmStoreError` (no such store, no coordinator,
                         a value too large, ...) or a missing key
``EXIT_USAGE`` (2)       bad arguments (an unknown option, a value that is not JSON)
``EXIT_INTERRUPTED``     Ctrl-C (130), except where Ctrl-C is the normal way to stop
                         (``serve``, ``stats --watch``: 0)
======================  ==========================================================

Values cross the command line as JSON: ``put`` parses its argument as JSON (quote
strings: ``'"text"'``), ``get`` and ``scan`` print values as JSON (bytes as base64).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from shmstore._errors import ShmStoreError
from shmstore._version import __version__

from . import _data_cmds, _ops_cmds, _store_cmds
from ._common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, PROG, Parser, UsageError, fail, positive_float


def build_parser() -> argparse.ArgumentParser:
    """The command table: every subcommand, its options and its example."""
    parser = Parser(
        prog=PROG,
        description="A record store shared by many processes through POSIX shared memory.",
        epilog="Start with `shmstore demo`, or `shmstore serve NAME` in one terminal and "
               "`shmstore put NAME KEY JSON` / `shmstore get NAME KEY` in another.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, example: str,
            *, store: bool = True, timeout: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=fmt,
                           epilog="example:\n  " + example.replace("\n", "\n  "))
        p.set_defaults(func=func)
        if store:
            p.add_argument("name", metavar="NAME", help="the store name")
        if timeout:
            p.add_argument("--timeout", type=positive_float, default=5.0, metavar="S",
                           help="seconds to wait for the coordinator (default: 5)")
        return p

    _store_cmds.register(add)  # serve, get, put, del, scan, incr, stats, destroy
    _ops_cmds.register(add)  # cleanup, stress, bench, demo
    _data_cmds.register(add)  # checkpoint, backup, restore, check, load
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``shmstore`` command line; returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"], ["--"]):
        argv = ["bench", "--", *argv[1:]]  # every option after `bench` is the runner's
    args = parser.parse_args(argv)
    if args.command == "stats":
        if args.interval is not None and not args.watch:
            parser.error("--interval needs --watch")
        if args.prometheus and (args.watch or args.json):
            parser.error("--prometheus prints once, as text: not with --watch or --json")
        args.interval = args.interval or 1.0
    try:
        return args.func(args)
    except UsageError as e:
        fail(str(e))
        return EXIT_USAGE
    except ShmStoreError as e:
        fail(" ".join(str(e).split()) or type(e).__name__)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`shmstore scan app | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR

