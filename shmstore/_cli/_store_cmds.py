"""The store subcommands of ``shmstore``: serve, get, put, del, incr, scan, stats, destroy.

``_main.build_parser`` calls :func:`register` with its ``add`` helper.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, TextIO

import msgspec

import shmstore
from shmstore._errors import ShmStoreError
from shmstore._tools._format import duration, group_quantile, human, size

from ._common import (
    EXIT_ERROR,
    EXIT_OK,
    MISSING,
    PROG,
    UsageError,
    arg_key,
    connect,
    delta,
    fail,
    key_text,
    parse_json_value,
    positive_float,
    positive_int,
    to_json,
)

#: ANSI: cursor home, then clear the screen (``stats --watch`` redraws in place).
CLEAR = "\x1b[H\x1b[2J"

#: Store.stats() fields that describe the calling handle, not the store: the CLI's own
#: handle does no reads, so ``stats`` leaves them out.
HANDLE_FIELDS = ("reads", "read_retries", "writes", "timeouts", "write_errors", "write_latency_avg",
                 "write_latency_max")
#: rate fields of StoreStats: None on a handle's first stats() call, left out of JSON then
RATE_FIELDS = ("interval", "ops_per_s", "groups_per_s", "requests_per_s", "reads_per_s", "writes_per_s",
               "read_retries_per_s")


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
        coord += f", up {s.coordinator_uptime:,.0f} s, RSS {size(s.coordinator_rss)}{cpu}"
    p50, p99 = group_quantile(s.group_hist, 0.5), group_quantile(s.group_hist, 0.99)
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
        ("queue depth", f"{size(s.queue_bytes)} last group, {size(s.queue_bytes_max)} max"),
        ("requests", f"{s.frames:,}"),
        ("errors", f"{s.errors:,}"),
        ("fallback reads", f"{s.fallback_reads:,}"),
        ("coordinator runs", f"{s.coordinator_runs:,}"),
        ("clients", f"{len(s.clients):,} live ({s.clients_reclaimed:,} reclaimed)"),
        ("client reads", f"{s.total_reads:,} ({s.total_read_retries:,} retried)"),
        ("client writes", f"{s.total_writes:,} ({s.total_timeouts:,} timed out, "
                          f"{s.total_write_errors:,} refused); latency avg "
                          f"{duration(s.total_write_latency_avg)}, max {duration(s.total_write_latency_max)}"),
    ]
    if s.memory:
        rows += [
            ("memory", f"{size(s.memory_used)} of {size(s.memory)} in pages of {size(s.page_size)} "
                       f"({s.free_pages:,} of {s.pages:,} pages free); segment {size(s.segment_bytes)}"),
            ("eviction", f"{s.eviction or 'none'}: {s.evictions:,} evicted, {s.page_moves:,} pages moved"),
            ("fragmentation", f"{100 * s.fragmentation:.1f}% of slot bytes unused by their records"),
        ]
        rows += [(f"  {c.slot_size:,} B slots", f"{c.pages:,} pages, {c.records:,} of {c.slots:,} slots used, "
                  f"{100 * c.fragmentation:.0f}% unused") for c in s.classes if c.pages]
    elif s.evictions or s.eviction:
        rows.append(("eviction", f"{s.eviction or 'none'}: {s.evictions:,} evicted"))
    if s.upstream_state is not None:
        rows += [
            ("upstream", f"{s.upstream_state}: {s.upstream_lag_entries:,} versions behind, lag "
                         f"{duration(s.upstream_lag)} (max {duration(s.upstream_lag_max)})"),
            ("  stream", f"{s.upstream_applied:,} entries applied, {s.upstream_resyncs:,} resyncs"),
            ("  round trips", f"{s.upstream_roundtrips:,} ({s.upstream_failures:,} failed)"),
        ]
    if s.fsyncs or s.wal_bytes or s.checkpoints:
        rows += [
            ("fsyncs", f"{s.fsyncs:,}: min {duration(s.fsync_min)}, avg {duration(s.fsync_avg)}, "
                       f"p99 <= {duration(s.fsync_p99)}, max {duration(s.fsync_max)}"),
            ("WAL written", size(s.wal_bytes)),
            ("checkpoints", f"{s.checkpoints:,} (last at epoch {s.last_checkpoint_epoch:,}, "
                            f"took {duration(s.checkpoint_last)})"),
        ]
    if with_rates or rates is not None:
        rows += [(label, "-" if rates is None or rates.get(f) is None else human(rates[f]))
                 for label, f in (("ops/s", "ops"), ("groups/s", "groups"), ("requests/s", "frames"),
                                  ("reads/s", "reads"), ("writes/s", "writes"))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows) + client_table(s.clients)


def replica_of(config: object) -> str:
    """``"; a replica of dataset D at URL"`` (its password not shown), or ``""``."""
    from shmstore.coordinator._config import shown_url  # noqa: PLC0415

    url = getattr(config, "upstream", None)
    if url is None:
        return ""
    return f"; a replica of dataset {config.upstream_name or config.name!r} at {shown_url(url)}"


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
        budget = f"memory {lay.memory:,}, " if lay.memory else ""
        print(f"{PROG}: serving store {args.name!r} (coordinator pid {os.getpid()}; {budget}capacity "
              f"{lay.capacity:,}, key_size {lay.key_size}, value_size {lay.value_size}"
              f"{replica_of(config)}); Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True)

    server = CoordinatorServer(config, ready=ready)
    code = server.run()  # SIGTERM/SIGINT: drain, then return 0
    print(f"{PROG}: stopped; store {args.name!r} stays readable until "
          f"`{PROG} destroy {args.name}`", file=sys.stderr, flush=True)
    return code


def cmd_get(args: argparse.Namespace) -> int:
    with connect(args) as store:
        value = store.get(args.key, MISSING)
    if value is MISSING:
        fail(f"no key {key_text(args.key)!r} in store {args.name!r}")
        return EXIT_ERROR
    print(to_json(value))
    return EXIT_OK


def cmd_put(args: argparse.Namespace) -> int:
    value = parse_json_value(args.value)
    with connect(args) as store:
        version = store.put(args.key, value)
    print(version)
    return EXIT_OK


def cmd_del(args: argparse.Namespace) -> int:
    with connect(args) as store:
        existed = store.delete(args.key)
    if not existed:
        fail(f"no key {key_text(args.key)!r} in store {args.name!r}")
        return EXIT_ERROR
    return EXIT_OK


def cmd_incr(args: argparse.Namespace) -> int:
    with connect(args) as store:
        print(store.incr(args.key, args.delta))
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    prefix = args.prefix  # bytes: see arg_key
    with connect(args) as store:
        keys = sorted(kb for kb in store.keys() if kb.startswith(prefix))
        if args.limit is not None:
            keys = keys[: args.limit]
        out = sys.stdout
        for kb in keys:
            value = store.get(kb, MISSING)
            if value is not MISSING:  # deleted since the key scan
                out.write(f"{key_text(kb)}\t{to_json(value)}\n")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with connect(args) as store:
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
        fail(f"store {args.name!r} is still served by a coordinator{who}; stop it first "
             f"(Ctrl-C or SIGTERM to `{PROG} serve`, or Coordinator.stop())")
        return EXIT_ERROR
    if not found:
        fail(f"no store named {args.name!r} on this host")
        return EXIT_ERROR
    return EXIT_OK


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
                     f"{duration(c.write_latency_avg):>10} {duration(c.write_latency_max):>10}")
    if len(clients) > SHOW_CLIENTS:
        lines.append(f"  ... and {len(clients) - SHOW_CLIENTS} more")
    return "\n".join(lines)


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the subcommands through ``_main.build_parser``'s ``add`` helper."""
    from shmstore.coordinator._config import add_arguments as add_serve_settings  # noqa: PLC0415

    p = add("serve", cmd_serve, "run a coordinator for store NAME in the foreground",
            "shmstore serve app --capacity 100000 --value-size 2048\n"
            "(Ctrl-C or SIGTERM stops it; the store stays readable until `shmstore destroy app`)")
    add_serve_settings(p)  # every setting of shmstore.serve() that has a flag (docs/settings.md)

    p = add("get", cmd_get, "print the value of KEY as JSON (exit 1 if it is missing)",
            "shmstore get app user:42", timeout=True)
    p.add_argument("key", metavar="KEY", type=arg_key)

    p = add("put", cmd_put, "write KEY = JSON_VALUE and print the record's new version",
            "shmstore put app user:42 '{\"name\": \"Ada\", \"visits\": 1}'\n"
            "shmstore put app greeting '\"hello\"'     # a JSON string needs its quotes",
            timeout=True)
    p.add_argument("key", metavar="KEY", type=arg_key)
    p.add_argument("value", metavar="JSON_VALUE", help="the value, as JSON")

    p = add("del", cmd_del, "delete KEY (exit 1 if it is missing)",
            "shmstore del app user:42", timeout=True)
    p.add_argument("key", metavar="KEY", type=arg_key)

    p = add("scan", cmd_scan, "print records as 'KEY<tab>JSON' lines, sorted by key",
            "shmstore scan app --prefix user: --limit 10", timeout=True)
    p.add_argument("--prefix", default=b"", type=arg_key, metavar="P", help="only keys starting with P")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="print at most N records (the first N keys in order)")

    p = add("incr", cmd_incr, "add DELTA (default 1) to the integer at KEY; print the new value",
            "shmstore incr app hits        # a missing key counts from 0\n"
            "shmstore incr app stock:7 -3", timeout=True)
    p.add_argument("key", metavar="KEY", type=arg_key)
    p.add_argument("delta", metavar="DELTA", type=delta, nargs="?", default=1)

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
    p.add_argument("--interval", type=positive_float, default=None, metavar="S",
                   help="seconds between redraws with --watch (default: 1)")

    add("destroy", cmd_destroy, "remove store NAME (its coordinator must be stopped first)",
        "shmstore destroy app")
