"""The operations commands of ``shmstore``: ``cleanup``, ``stress``, ``bench``, and the
formatting helpers of ``stats`` (the rest of the command line is ``_cli``)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import shmstore
import shmstore._layout

EXIT_OK = 0
EXIT_ERROR = 1


def _fail(message: str) -> None:
    print(f"shmstore: error: {message}", file=sys.stderr)


def _dur(x: float | None) -> str:
    """Seconds as a short duration: '-', '850 ns', '12.3 us', '4.56 ms', '1.20 s'."""
    if x is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x * 1e9:.0f} ns"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _hist_quantile(hist: list[int], q: float) -> int | None:
    """The largest group size of the log2 bucket holding quantile ``q``."""
    from shmstore._stats import hist_quantile  # noqa: PLC0415

    x = hist_quantile(hist, q, 1.0)
    return None if x is None else int(x) - 1


def cmd_cleanup(args: argparse.Namespace) -> int:
    from shmstore._cleanup import examine, remove  # noqa: PLC0415

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
            _fail(f"could not remove {', '.join(left)}")
            return EXIT_ERROR
    kept = len(found) - len(removable)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removable)} store(s); kept {kept}" + ("" if args.verbose or not kept else
                                                               " (--verbose says why)"),
          file=sys.stderr)
    return EXIT_OK


def cmd_stress(args: argparse.Namespace) -> int:
    from shmstore._stress import run_from_args  # noqa: PLC0415

    return run_from_args(args)


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from shmstore._bench import main as bench_main  # noqa: PLC0415
    except ImportError as e:
        if e.name not in ("shmstore._bench", None) and not str(e).endswith("'main'"):
            raise
        _fail("the benchmark runner (shmstore._bench) is not part of this shmstore build; "
              "run scripts/bench.py from a source checkout")
        return EXIT_ERROR
    argv = list(args.bench_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return int(bench_main(argv) or 0)


#: live clients listed under ``shmstore stats`` (the count is always shown)
SHOW_CLIENTS = 10


def client_table(clients: list) -> str:
    """The live clients as a small table (empty string if there are none)."""
    if not clients:
        return ""
    lines = ["", "", "       pid       age      reads cache hits  retries     writes  timeouts  write avg"
                     "  write max"]
    for c in sorted(clients, key=lambda c: c.pid)[:SHOW_CLIENTS]:
        lines.append(f"  {c.pid:>8} {c.age:>8.0f}s {c.reads:>10,} {c.read_cache_hits:>10,} "
                     f"{c.read_retries:>8,} {c.writes:>10,} {c.timeouts:>9,} "
                     f"{_dur(c.write_latency_avg):>10} {_dur(c.write_latency_max):>10}")
    if len(clients) > SHOW_CLIENTS:
        lines.append(f"  ... and {len(clients) - SHOW_CLIENTS} more")
    return "\n".join(lines)


def add_ops_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``cleanup``, ``stress`` and ``bench`` with ``_cli.build_parser``'s ``add``."""
    p = add("cleanup", cmd_cleanup,
            "remove stores left in /dev/shm by dead coordinators (never one that a live "
            "coordinator serves or a live process maps; see shmstore/_cleanup.py)",
            "shmstore cleanup --dry-run          # list what would go, and why\n"
            "shmstore cleanup                    # remove it\n"
            "shmstore cleanup --prefix demo- -v  # only stores named demo-*, say why others stay",
            store=False)
    p.add_argument("names", metavar="NAME", nargs="*", help="only these stores (default: all)")
    p.add_argument("--prefix", default="", metavar="P", help="only stores whose name starts with P")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="also list the stores kept, and why")

    from shmstore._stress import add_arguments as add_stress_arguments  # noqa: PLC0415

    p = add("stress", cmd_stress,
            "hammer a fresh store with reader and writer processes that check every record, "
            "optionally killing the coordinator and clients; report violations (exit 1)",
            "shmstore stress --seconds 30 --readers 4 --writers 2\n"
            "shmstore stress --sync always --kill-coordinator 2 --kill-clients 1 --seconds 60",
            store=False)
    add_stress_arguments(p)

    p = add("bench", cmd_bench,
            "run the benchmarks (shmstore._bench); arguments after 'bench' go to it",
            "shmstore bench --quick              # options after 'bench' are the runner's\n"
            "shmstore bench -- --help            # the runner's own help", store=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="arguments for the benchmark runner (-h/--help right after 'bench' is this "
                        "help; 'bench -- --help' the runner's)")
