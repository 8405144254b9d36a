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
import json
import os
import signal
import sys
import time
from typing import Any, Callable, NoReturn, TextIO

import msgspec

import shmstore
from shmstore._cli_data import register as register_data_commands
import shmstore._layout
from shmstore._cli_ops import _dur, _hist_quantile, _size, add_ops_commands, client_table
from shmstore._errors import ShmStoreError, StoreNotFoundError
from shmstore._version import __version__

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT

PROG = "shmstore"
MAX_DEMO_WORKERS = 256  # each takes a client block (~130 KiB of /dev/shm) of the demo store

#: ANSI: cursor home, then clear the screen (``stats --watch`` redraws in place).
CLEAR = "\x1b[H\x1b[2J"

#: Store.stats() fields that describe the calling handle, not the store: the CLI's own
#: handle does no reads, so ``stats`` leaves them out.
HANDLE_FIELDS = ("reads", "read_retries", "writes", "timeouts", "write_errors", "write_latency_avg",
                 "write_latency_max")
#: rate fields of StoreStats: None on a handle's first stats() call, left out of JSON then
RATE_FIELDS = ("interval", "ops_per_s", "groups_per_s", "requests_per_s", "reads_per_s", "writes_per_s",
               "read_retries_per_s")

_MISSING = object()


class UsageError(Exception):
    """Bad input found after parsing (a JSON value that does not parse): exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: ``shmstore: error: <message>`` and exit 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}{hint}\n")


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# -- values in and out ---------------------------------------------------------------


def parse_json_value(text: str) -> Any:
    """A value given on the command line, as JSON.

    Raises:
        UsageError: not JSON; the message says how to pass a string.
    """
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        quoted = json.dumps(text)
        raise UsageError(
            f"JSON_VALUE {text!r:.60} is not valid JSON ({e.msg} at char {e.pos}); "
            f"a string must be quoted, e.g. '{quoted:.40}'"
        ) from None


def _no_constant(name: str) -> NoReturn:
    # Python's json takes NaN and Infinity; JSON does not, and they would print as null.
    raise UsageError(f"JSON_VALUE: {name} is not JSON (JSON has no NaN or Infinity)")


def _enc_hook(obj: Any) -> Any:
    return repr(obj)  # msgpack extension types and the like: shown, not lost


def to_json(value: Any) -> str:
    """One line of JSON for a stored value (msgpack bytes become base64 strings)."""
    return msgspec.json.encode(value, enc_hook=_enc_hook).decode()


def _key_text(kb: bytes) -> str:
    return kb.decode("utf-8", errors="backslashreplace")


# -- formatting ----------------------------------------------------------------------


def human(n: float) -> str:
    """1234 -> '1.23k', 4_560_000 -> '4.56M': rates in a narrow column."""
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}" if n >= 10 or n == int(n) else f"{n:.1f}"


def _stats_dict(stats: shmstore.StoreStats) -> dict[str, Any]:
    d = msgspec.to_builtins(stats)
    for f in HANDLE_FIELDS:
        d.pop(f, None)
    for f in RATE_FIELDS:
        if d.get(f) is None:
            d.pop(f, None)
    return d


def render_stats(stats: shmstore.StoreStats, rates: dict[str, float] | None = None, *,
                 with_rates: bool = False) -> str:
    """A readable table of :meth:`Store.stats`; with rates (per second) if asked,
    shown as '-' until ``rates`` are known (the first redraw)."""
    s = stats
    avg = s.frames / s.groups if s.groups else 0.0
    full = 100.0 * s.records / s.capacity if s.capacity else 0.0
    coord = f"running, pid {s.coordinator_pid}" if s.coordinator_pid else "not running (reads only)"
    if s.coordinator_pid and s.coordinator_rss is not None:
        cpu = "" if s.coordinator_cpu_percent is None else f", {s.coordinator_cpu_percent:.0f}% CPU"
        coord += f", up {s.coordinator_uptime:,.0f} s, RSS {_size(s.coordinator_rss)}{cpu}"
    p50, p99 = _hist_quantile(s.group_hist, 0.5), _hist_quantile(s.group_hist, 0.99)
    rows = [
        ("store", s.name),
        ("coordinator", coord),
        ("records", f"{s.records:,} of {s.capacity:,} ({full:.1f}% full)"),
        ("key / value size", f"{s.key_size:,} / {s.value_size:,} bytes"),
        ("epoch", f"{s.epoch:,}"),
        ("ops applied", f"{s.ops:,}"),
        ("  by kind", f"put {s.puts:,}, delete {s.deletes:,}, cas {s.compare_and_sets:,}, "
                      f"incr {s.incrs:,}, batch {s.batches:,}"),
        ("groups", f"{s.groups:,} (avg {avg:.2f} requests, max {s.max_group:,})"),
        ("  group size", "-" if p50 is None else f"p50 <= {p50:,}, p99 <= {p99:,} requests"),
        ("queue depth", f"{_size(s.queue_bytes)} last group, {_size(s.queue_bytes_max)} max"),
        ("requests", f"{s.frames:,}"),
        ("errors", f"{s.errors:,}"),
        ("fallback reads", f"{s.fallback_reads:,}"),
        ("coordinator runs", f"{s.coordinator_runs:,}"),
        ("clients", f"{len(s.clients):,} live ({s.clients_reclaimed:,} reclaimed)"),
        ("client reads", f"{s.total_reads:,} ({s.total_read_retries:,} retried)"),
        ("client writes", f"{s.total_writes:,} ({s.total_timeouts:,} timed out, "
                          f"{s.total_write_errors:,} refused); latency avg "
                          f"{_dur(s.total_write_latency_avg)}, max {_dur(s.total_write_latency_max)}"),
    ]
    if s.fsyncs or s.wal_bytes or s.checkpoints:
        rows += [
            ("fsyncs", f"{s.fsyncs:,}: min {_dur(s.fsync_min)}, avg {_dur(s.fsync_avg)}, "
                       f"p99 <= {_dur(s.fsync_p99)}, max {_dur(s.fsync_max)}"),
            ("WAL written", _size(s.wal_bytes)),
            ("checkpoints", f"{s.checkpoints:,} (last at epoch {s.last_checkpoint_epoch:,}, "
                            f"took {_dur(s.checkpoint_last)})"),
        ]
    if with_rates or rates is not None:
        rows += [(label, "-" if rates is None or rates.get(f) is None else human(rates[f]))
                 for label, f in (("ops/s", "ops"), ("groups/s", "groups"), ("requests/s", "frames"),
                                  ("reads/s", "reads"), ("writes/s", "writes"))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows) + client_table(s.clients)


# -- commands ------------------------------------------------------------------------


def _connect(args: argparse.Namespace) -> shmstore.Store:
    try:
        return shmstore.connect(args.name, timeout=args.timeout)
    except StoreNotFoundError:
        raise StoreNotFoundError(
            f"no store named {args.name!r} on this host; start one with `{PROG} serve {args.name}`"
        ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from shmstore._errors import InvalidLayoutError  # noqa: PLC0415
    from shmstore.coordinator import CoordinatorServer  # noqa: PLC0415
    from shmstore.coordinator._config import from_args  # noqa: PLC0415

    try:
        config = from_args(args)  # the settings table's one check, messages in --flags
    except InvalidLayoutError as e:
        raise UsageError(str(e)) from None

    def ready() -> None:
        lay = server.seg.layout
        print(f"{PROG}: serving store {args.name!r} (coordinator pid {os.getpid()}; capacity "
              f"{lay.capacity:,}, key_size {lay.key_size}, value_size {lay.value_size}); "
              f"Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True)

    server = CoordinatorServer(config, ready=ready)
    code = server.run()  # SIGTERM/SIGINT: drain, then return 0
    print(f"{PROG}: stopped; store {args.name!r} stays readable until "
          f"`{PROG} destroy {args.name}`", file=sys.stderr, flush=True)
    return code


def cmd_get(args: argparse.Namespace) -> int:
    with _connect(args) as store:
        value = store.get(args.key, _MISSING)
    if value is _MISSING:
        _fail(f"no key {args.key!r} in store {args.name!r}")
        return EXIT_ERROR
    print(to_json(value))
    return EXIT_OK


def cmd_put(args: argparse.Namespace) -> int:
    value = parse_json_value(args.value)
    with _connect(args) as store:
        version = store.put(args.key, value)
    print(version)
    return EXIT_OK


def cmd_del(args: argparse.Namespace) -> int:
    with _connect(args) as store:
        existed = store.delete(args.key)
    if not existed:
        _fail(f"no key {args.key!r} in store {args.name!r}")
        return EXIT_ERROR
    return EXIT_OK


def cmd_incr(args: argparse.Namespace) -> int:
    with _connect(args) as store:
        print(store.incr(args.key, args.delta))
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    prefix = args.prefix.encode()
    with _connect(args) as store:
        keys = sorted(kb for kb in store.keys() if kb.startswith(prefix))
        if args.limit is not None:
            keys = keys[: args.limit]
        out = sys.stdout
        for kb in keys:
            value = store.get(kb, _MISSING)
            if value is not _MISSING:  # deleted since the key scan
                out.write(f"{_key_text(kb)}\t{to_json(value)}\n")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _connect(args) as store:
        if args.prometheus:
            sys.stdout.write(shmstore.prometheus_text(store))
            return EXIT_OK
        if not args.watch:
            stats = store.stats()
            if args.json:
                print(msgspec.json.encode(_stats_dict(stats)).decode())
            else:
                print(render_stats(stats))
            return EXIT_OK
        return _watch(store, args.interval, args.json, sys.stdout)


def _watch(store: shmstore.Store, interval: float, as_json: bool, out: TextIO) -> int:
    """Redraw the stats every ``interval`` seconds until Ctrl-C (which exits 0)."""
    tty = out.isatty()
    try:
        while True:
            stats = store.stats()  # rates: since the previous redraw (this handle's last call)
            rates = None
            if stats.interval is not None:
                rates = {"ops": stats.ops_per_s, "groups": stats.groups_per_s,
                         "frames": stats.requests_per_s, "reads": stats.reads_per_s,
                         "writes": stats.writes_per_s}
            if as_json:
                d = _stats_dict(stats)
                out.write(msgspec.json.encode(d).decode() + "\n")
            else:
                stamp = time.strftime("%H:%M:%S")
                body = render_stats(stats, rates, with_rates=True)
                head = f"{PROG} stats {store.name} - every {interval:g} s at {stamp}; Ctrl-C to stop"
                out.write((CLEAR if tty else "\n") + head + "\n\n" + body + "\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if not as_json:
            out.write("\n")  # the shell prompt starts on a line of its own
        return EXIT_OK


def cmd_destroy(args: argparse.Namespace) -> int:
    try:
        found = shmstore.destroy(args.name)
    except shmstore.CoordinatorRunningError:
        pid = None
        try:
            with shmstore.connect(args.name, timeout=0.5) as store:
                pid = store.stats().coordinator_pid
        except ShmStoreError:
            pass
        who = f" (pid {pid})" if pid else ""
        _fail(f"store {args.name!r} is still served by a coordinator{who}; stop it first "
              f"(Ctrl-C or SIGTERM to `{PROG} serve`, or Coordinator.stop())")
        return EXIT_ERROR
    if not found:
        _fail(f"no store named {args.name!r} on this host")
        return EXIT_ERROR
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from shmstore._demo import run_demo  # noqa: PLC0415  (multiprocessing only when needed)

    return run_demo(workers=args.workers, seconds=args.seconds, keys=args.keys)


# -- the parser ----------------------------------------------------------------------


def _positive_int(text: str, top: int | None = None) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1 or (top is not None and n > top):
        raise argparse.ArgumentTypeError(
            f"{text!r} must be at least 1" + (f" and at most {top}" if top is not None else ""))
    return n


def _demo_workers(text: str) -> int:
    return _positive_int(text, MAX_DEMO_WORKERS)


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return x


def _delta(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -(2**63) <= n < 2**64:  # what msgpack (and so incr) can carry
        raise argparse.ArgumentTypeError(f"{text!r} is outside the 64-bit range")
    return n


def build_parser() -> argparse.ArgumentParser:
    from shmstore.coordinator._config import add_arguments as add_serve_settings  # noqa: PLC0415

    parser = _Parser(
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
            p.add_argument("--timeout", type=_positive_float, default=5.0, metavar="S",
                           help="seconds to wait for the coordinator (default: 5)")
        return p

    p = add("serve", cmd_serve, "run a coordinator for store NAME in the foreground",
            "shmstore serve app --capacity 100000 --value-size 2048\n"
            "(Ctrl-C or SIGTERM stops it; the store stays readable until `shmstore destroy app`)")
    add_serve_settings(p)  # every setting of shmstore.serve() that has a flag (docs/settings.md)

    p = add("get", cmd_get, "print the value of KEY as JSON (exit 1 if it is missing)",
            "shmstore get app user:42", timeout=True)
    p.add_argument("key", metavar="KEY")

    p = add("put", cmd_put, "write KEY = JSON_VALUE and print the record's new version",
            "shmstore put app user:42 '{\"name\": \"Ada\", \"visits\": 1}'\n"
            "shmstore put app greeting '\"hello\"'     # a JSON string needs its quotes",
            timeout=True)
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="JSON_VALUE", help="the value, as JSON")

    p = add("del", cmd_del, "delete KEY (exit 1 if it is missing)",
            "shmstore del app user:42", timeout=True)
    p.add_argument("key", metavar="KEY")

    p = add("scan", cmd_scan, "print records as 'KEY<tab>JSON' lines, sorted by key",
            "shmstore scan app --prefix user: --limit 10", timeout=True)
    p.add_argument("--prefix", default="", metavar="P", help="only keys starting with P")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="print at most N records (the first N keys in order)")

    p = add("incr", cmd_incr, "add DELTA (default 1) to the integer at KEY; print the new value",
            "shmstore incr app hits        # a missing key counts from 0\n"
            "shmstore incr app stock:7 -3", timeout=True)
    p.add_argument("key", metavar="KEY")
    p.add_argument("delta", metavar="DELTA", type=_delta, nargs="?", default=1)

    p = add("stats", cmd_stats, "show the store's counters (ops, groups, records, coordinator)",
            "shmstore stats app\n"
            "shmstore stats app --json | jq .ops\n"
            "shmstore stats app --watch --interval 0.5     # with ops/s; Ctrl-C to stop\n"
            "shmstore stats app --prometheus > /var/lib/node_exporter/shmstore.prom",
            timeout=True)
    p.add_argument("--json", action="store_true", help="one JSON object (per redraw)")
    p.add_argument("--prometheus", action="store_true",
                   help="the Prometheus text exposition (metric names shmstore_*), once")
    p.add_argument("--watch", action="store_true", help="redraw until Ctrl-C, with per-second rates")
    p.add_argument("--interval", type=_positive_float, default=None, metavar="S",
                   help="seconds between redraws with --watch (default: 1)")

    add("destroy", cmd_destroy, "remove store NAME (its coordinator must be stopped first)",
        "shmstore destroy app")

    add_ops_commands(add)

    p = add("demo", cmd_demo,
            "run a coordinator and a pool of worker processes sharing a cache and counters, "
            "with live stats and a consistency check at the end",
            "shmstore demo                       # 4 workers, 5 seconds\n"
            "shmstore demo --workers 8 --seconds 20 --keys 5000", store=False)
    p.add_argument("--workers", type=_demo_workers, default=4, metavar="N",
                   help=f"worker processes, 1 to {MAX_DEMO_WORKERS} (default: 4)")
    p.add_argument("--seconds", type=_positive_float, default=5.0, metavar="S",
                   help="how long the workers run (default: 5)")
    p.add_argument("--keys", type=_positive_int, default=1000, metavar="K",
                   help="product records in the shared cache (default: 1000)")
    register_data_commands(add)  # checkpoint, backup, restore, check (shmstore._cli_data)
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
        _fail(str(e))
        return EXIT_USAGE
    except ShmStoreError as e:
        _fail(" ".join(str(e).split()) or type(e).__name__)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`shmstore scan app | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR

