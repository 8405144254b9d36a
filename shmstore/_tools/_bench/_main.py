"""``shmstore bench`` / ``scripts/bench.py``: argument parsing and the run."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import Any

from ._suite import Bench
from ._core import Config, log
from ._report import chart, machine_info, markdown, warn_load
from ._specs import GROUPS, SPECS

DEFAULT_OUT = "bench-results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="shmstore bench",
        description="Benchmark shmstore against py-lmdb, Redis (redis-py over a unix socket), "
                    "diskcache (SQLite), memcached (pymemcache over a unix socket), "
                    "multiprocessing.Manager().dict() and floors (dict, socketpair ping-pong, "
                    "numpy copy), all in this process tree on the same data. Prints a "
                    "Markdown table of medians and shmstore's speedup over each peer, with "
                    "the issue's targets marked PASS/MISS, and writes bench.json, bench.md "
                    "and bench.png (with the 'chart' extra) to --out.",
        epilog=f"measures: {', '.join(GROUPS)}. Peers are optional: Redis rows are skipped "
               f"(with the reason) without redis-server on PATH or the redis package, "
               f"memcached rows without memcached on PATH or the pymemcache package, lmdb "
               f"and diskcache rows without their packages (pip install 'shmstore[bench]').",
    )
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: short loops, 3 repeats, small data sets (what CI runs)")
    ap.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                    help=f"directory for bench.json, bench.md, bench.png (default {DEFAULT_OUT}/; "
                         f"'' writes none)")
    ap.add_argument("--json", metavar="PATH", help="also write the JSON document here")
    ap.add_argument("--markdown", metavar="PATH", help="also write the Markdown tables here")
    ap.add_argument("--repeats", type=int, help="timed runs per measure (default 5; --quick 3)")
    ap.add_argument("--target-time", type=float, metavar="S",
                    help="seconds per timed run (default 0.3; --quick 0.03)")
    ap.add_argument("--writer-time", type=float, metavar="S",
                    help="seconds per round of the multi-process measures (default 1.0; --quick 0.1)")
    ap.add_argument("--big-keys", type=int, metavar="N",
                    help="keys of the big data sets (default 1000000; --quick 5000)")
    ap.add_argument("--only", metavar="MEASURES",
                    help=f"comma-separated subset of: {', '.join(GROUPS)}")
    ap.add_argument("--redis-server", default="redis-server", metavar="BINARY",
                    help="the redis-server to start (default: redis-server on PATH)")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis rows")
    ap.add_argument("--memcached", default="memcached", metavar="BINARY",
                    help="the memcached to start (default: memcached on PATH)")
    ap.add_argument("--no-memcached", action="store_true", help="skip the memcached rows")
    args = ap.parse_args(argv)
    if args.only:
        bad = [g for g in args.only.split(",") if g not in GROUPS]
        if bad:
            ap.error(f"--only: unknown measure(s) {', '.join(bad)}; choose from {', '.join(GROUPS)}")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.big_keys is not None and args.big_keys < 1000:
        ap.error("--big-keys must be >= 1000")
    return args


def config(args: argparse.Namespace) -> Config:
    q = args.quick
    return Config(
        quick=q,
        repeats=args.repeats or (3 if q else 5),
        target_s=args.target_time or (0.03 if q else 0.3),
        max_n=200_000 if q else 3_000_000,
        writer_s=args.writer_time or (0.1 if q else 1.0),
        writer_warmup_s=0.05 if q else 0.3,
        groups=args.only.split(",") if args.only else list(GROUPS),
        redis_binary=args.redis_server,
        use_redis=not args.no_redis,
        memcached_binary=args.memcached,
        use_memcached=not args.no_memcached,
        small_keys=10_000,
        big_keys=args.big_keys or (5_000 if q else 1_000_000),
    )


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (0, or 130 when interrupted)."""
    args = parse_args(argv)
    cfg = config(args)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    bench = Bench(cfg)
    t0 = time.monotonic()
    try:
        meta = machine_info(bench)
        log(f"{meta['cpu_model']}, {meta['nproc']} CPUs, Python {meta['python']}; "
            f"{'quick' if cfg.quick else 'full'} run, {cfg.repeats} repeats")
        warn_load(meta)
        bench.setup()
        meta["redis_server"] = bench.redis_version or None
        meta["memcached_server"] = bench.memcached_version or None
        bench.run()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        bench.teardown()
        signal.signal(signal.SIGTERM, old)
    elapsed = time.monotonic() - t0
    md = markdown(bench, meta)
    doc = document(bench, meta, elapsed)
    paths = []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        paths += [os.path.join(args.out, "bench.json"), os.path.join(args.out, "bench.md")]
        why = chart(bench, os.path.join(args.out, "bench.png"))
        if why:
            log(f"NOTE: {why}")
            doc["chart"] = why
        else:
            doc["chart"] = os.path.join(args.out, "bench.png")
    for path in [args.json, *paths[:1]]:
        if path:
            with open(path, "w") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
    for path in [args.markdown, *paths[1:]]:
        if path:
            with open(path, "w") as f:
                f.write(md)
    print(md)
    log(f"done in {elapsed:.1f} s" + (f"; results in {args.out}/" if args.out else ""))
    return 0


def document(bench: Bench, meta: dict[str, Any], elapsed: float) -> dict[str, Any]:
    cfg = bench.cfg
    return {
        "machine": meta,
        "config": {"quick": cfg.quick, "repeats": cfg.repeats, "target_time_s": cfg.target_s,
                   "max_n": cfg.max_n, "writer_time_s": cfg.writer_s,
                   "writer_warmup_s": cfg.writer_warmup_s, "groups": cfg.groups,
                   "small_keys": cfg.small_keys, "big_keys": cfg.big_keys, "get_many_keys": 1000,
                   "values": "str whose msgpack encoding is 64 B or 1 KiB; lmdb and Redis hold "
                             "the msgpack bytes",
                   "store_name": bench.name, "tmpdir": bench.tmpdir, "elapsed_s": elapsed,
                   "loadavg_at_end": list(os.getloadavg())},
        "measures": {s.id: bench.results[s.id].as_json() for s in SPECS if s.id in bench.results},
        "targets": bench.target_rows(),
        "redis_skipped": bench.redis_skip,
        "memcached_skipped": bench.memcached_skip,
        "diskcache_skipped": bench.diskcache_skip,
    }
