"""The operations subcommands of ``shmstore``: cleanup, stress, bench, demo.

``_main.build_parser`` calls :func:`register` with its ``add`` helper. Each command's
program lives in ``shmstore._tools`` and is imported only when the command runs, but
for stress: its options are the stress tool's own, so the parser needs its module.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import shmstore
import shmstore._layout
from shmstore._tools._stress import add_arguments as add_stress_arguments
from shmstore._tools._stress import run_from_args as run_stress

from ._common import EXIT_ERROR, EXIT_OK, fail, positive_float, positive_int

MAX_DEMO_WORKERS = 256  # each takes a client block (~130 KiB of /dev/shm) of the demo store


def cmd_cleanup(args: argparse.Namespace) -> int:
    from shmstore._tools._cleanup import examine, remove  # noqa: PLC0415

    for n in args.names:
        shmstore._layout.check_name(n)
    found = examine(args.prefix, args.names or None)
    removable = [x for x in found if x.removable]
    for x in found:
        if not x.removable:
            if args.verbose:
                print(f"kept {x.name}: {x.reason}")
            continue
        what = ", ".join(x.entries) if args.verbose else f"{len(x.entries)} object(s) in /dev/shm"
        if args.dry_run:
            print(f"would remove {x.name}: {x.reason} ({what})")
            continue
        try:
            left = remove(x)
        except shmstore.CoordinatorRunningError:
            print(f"skipped {x.name}: a coordinator started serving it meanwhile")
            continue
        print(f"removed {x.name}: {x.reason} ({what})")
        if left:
            fail(f"could not remove {', '.join(left)}")
            return EXIT_ERROR
    kept = len(found) - len(removable)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removable)} store(s); kept {kept}" + ("" if args.verbose or not kept else
                                                               " (--verbose says why)"),
          file=sys.stderr)
    return EXIT_OK


def cmd_stress(args: argparse.Namespace) -> int:
    return run_stress(args)


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from shmstore._tools._bench import main as bench_main  # noqa: PLC0415
    except ImportError as e:
        if e.name not in ("shmstore._tools._bench", None) and not str(e).endswith("'main'"):
            raise
        # scripts/bench.py runs this same module, so it is no way out: the install is broken.
        fail("the benchmark runner (shmstore._tools._bench) is missing from this shmstore "
             "install; reinstall shmstore")
        return EXIT_ERROR
    argv = list(args.bench_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return int(bench_main(argv) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    from shmstore._tools._demo import run_demo  # noqa: PLC0415  (multiprocessing only when needed)

    return run_demo(workers=args.workers, seconds=args.seconds, keys=args.keys)


def _demo_workers(text: str) -> int:
    return positive_int(text, MAX_DEMO_WORKERS)


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the subcommands through ``_main.build_parser``'s ``add`` helper."""
    p = add("cleanup", cmd_cleanup,
            "remove stores left in /dev/shm by dead coordinators (never one that a live "
            "coordinator serves or a live process maps; see shmstore/_tools/_cleanup.py)",
            "shmstore cleanup --dry-run          # list what would go, and why\n"
            "shmstore cleanup                    # remove it\n"
            "shmstore cleanup --prefix demo- -v  # only stores named demo-*, say why others stay",
            store=False)
    p.add_argument("names", metavar="NAME", nargs="*", help="only these stores (default: all)")
    p.add_argument("--prefix", default="", metavar="P", help="only stores whose name starts with P")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="also list the stores kept, and why")

    p = add("stress", cmd_stress,
            "hammer a fresh store with reader and writer processes that check every record, "
            "optionally killing the coordinator and clients; report violations (exit 1)",
            "shmstore stress --seconds 30 --readers 4 --writers 2\n"
            "shmstore stress --sync always --kill-coordinator 2 --kill-clients 1 --seconds 60",
            store=False)
    add_stress_arguments(p)

    p = add("bench", cmd_bench,
            "run the benchmarks (shmstore._tools._bench); arguments after 'bench' go to it",
            "shmstore bench --quick              # options after 'bench' are the runner's\n"
            "shmstore bench -- --help            # the runner's own help", store=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="arguments for the benchmark runner (-h/--help right after 'bench' is this "
                        "help; 'bench -- --help' the runner's)")

    p = add("demo", cmd_demo,
            "run a coordinator and a pool of worker processes sharing a cache and counters, "
            "with live stats and a consistency check at the end",
            "shmstore demo                       # 4 workers, 5 seconds\n"
            "shmstore demo --workers 8 --seconds 20 --keys 5000", store=False)
    p.add_argument("--workers", type=_demo_workers, default=4, metavar="N",
                   help=f"worker processes, 1 to {MAX_DEMO_WORKERS} (default: 4)")
    p.add_argument("--seconds", type=positive_float, default=5.0, metavar="S",
                   help="how long the workers run (default: 5)")
    p.add_argument("--keys", type=positive_int, default=1000, metavar="K",
                   help="product records in the shared cache (default: 1000)")
