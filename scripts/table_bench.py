#!/usr/bin/env python3
"""Benchmark numpy tables: rows/s of ``table.read(rows)`` against numpy floors.

Serves a private memory-only store with one table (``--table-rows`` rows of a
``--itemsize``-byte structured dtype), fills it, and times, each as the median of
``--repeats`` runs of a loop of ``--loops`` calls (gc off, a warm-up call excluded;
every repeat times all measures one after the other, and ratios are medians of the
per-repeat ratios, so load from other processes skews them less):

  read_random     table.read(rows): ``--rows`` distinct random row numbers
  read_range      table.read(range(0, --rows)): a contiguous block
  read_all        table.read_all() (the whole table)
  floor_copy      .copy() of a private plain (uint8) numpy array of the same number of
                  bytes as ``--rows`` records: the floor, a memcpy
  floor_copy_rec  .copy() of a private structured array of ``--rows`` records (numpy
                  copies structured arrays field by field, several times slower)
  floor_gather    arr[rows] from a private array of ``--table-rows`` records (what a
                  gather of the same random rows costs without any seqlock)
  floor_take      np.take of the same rows from that array viewed as a plain integer
                  matrix (the fastest gather numpy offers; what read() does inside)

and prints rows/s and the ratio of each read to ``floor_copy`` (time / floor time;
the target is within 3x). ``--writer`` adds a process rewriting random rows of the
table all the time, to show the cost of the rows that moved being read again.

Usage::

    python scripts/table_bench.py
    python scripts/table_bench.py --rows 100000 --table-rows 200000 --writer
    python scripts/table_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid

import numpy as np

import shmstore


def make_dtype(itemsize: int) -> np.dtype:
    """An int64 id, a float64 price, then int32 fields up to ``itemsize`` bytes."""
    if itemsize < 16 or itemsize % 4:
        raise SystemExit("--itemsize must be a multiple of 4, at least 16")
    fields = [("id", "<i8"), ("price", "<f8")] + [(f"f{i}", "<i4") for i in range((itemsize - 16) // 4)]
    return np.dtype(fields)


def timed_round_robin(fns: dict, loops: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, per repeat. Each repeat times every function
    once, one after the other, so load from other processes on a shared machine hits
    the floors and the reads alike, and per-repeat ratios stay comparable."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    gc.disable()
    try:
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(loops):
                    fn()
                times[k].append((time.perf_counter() - t0) / loops)
    finally:
        gc.enable()
    return times


def writer(name: str, rows_per_write: int, stop: mp.Event) -> None:
    s = shmstore.connect(name)
    t = s.table("bench")
    rng = np.random.default_rng(1)
    vals = np.zeros(rows_per_write, t.dtype)
    while not stop.is_set():
        rows = rng.choice(t.nrows, rows_per_write, replace=False)
        vals["id"] = rows
        t.write(rows, vals)
    s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--rows", type=int, default=100_000, help="rows per read (default 100,000)")
    ap.add_argument("--table-rows", type=int, default=200_000, help="rows in the table (default 200,000)")
    ap.add_argument("--itemsize", type=int, default=32, help="bytes per record (default 32)")
    ap.add_argument("--loops", type=int, default=20, help="calls per timed run (default 20)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported (default 7)")
    ap.add_argument("--writer", action="store_true", help="a process keeps rewriting random rows meanwhile")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if not 1 <= args.rows <= args.table_rows:
        raise SystemExit("--rows must be between 1 and --table-rows")
    dt = make_dtype(args.itemsize)
    name = f"tbench-{uuid.uuid4().hex[:10]}"
    coord = shmstore.serve(name, capacity=16, ring_size=1 << 20)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    wproc = None
    try:
        s = shmstore.connect(name)
        t = s.table("bench", dt, args.table_rows)
        chunk = max(1, (1 << 19) // dt.itemsize)
        for a in range(0, args.table_rows, chunk):
            b = min(a + chunk, args.table_rows)
            v = np.zeros(b - a, dt)
            v["id"] = np.arange(a, b)
            v["price"] = np.arange(a, b) * 0.5
            t.write(range(a, b), v)
        rng = np.random.default_rng(0)
        rows = rng.choice(args.table_rows, args.rows, replace=False)
        private = t.read_all()
        floor_src = private[: args.rows].copy()
        floor_bytes = floor_src.view(np.uint8).copy()  # the same bytes, a plain array
        unit = next(u for u in (8, 4, 2, 1) if dt.itemsize % u == 0)
        private_raw = private.view(f"<u{unit}").reshape(args.table_rows, -1)
        assert (t.read(rows)["id"] == rows).all()
        if args.writer:
            proc = ctx.Process(target=writer, args=(name, 100, stop))
            proc.start()
            wproc = proc
            time.sleep(0.5)
        retries0 = s.stats().read_retries
        L, R = args.loops, args.repeats
        times = timed_round_robin({
            "read_random": lambda: t.read(rows),
            "read_range": lambda: t.read(range(0, args.rows)),
            "read_all": t.read_all,
            "floor_copy": floor_bytes.copy,
            "floor_copy_rec": floor_src.copy,
            "floor_gather": lambda: private[rows],
            "floor_take": lambda: np.take(private_raw, rows, axis=0),
        }, L, R)
        retries = s.stats().read_retries - retries0
        t.close()
        s.close()
    finally:
        stop.set()
        try:
            if wproc is not None:
                wproc.join(10)
                if wproc.is_alive():
                    wproc.kill()
                    wproc.join()
        finally:
            coord.stop()
            shmstore.destroy(name)
    n_of = {"read_all": args.table_rows}
    res = {k: statistics.median(v) for k, v in times.items()}
    print(f"table {args.table_rows:,} rows x {dt.itemsize} B; reads of {args.rows:,} rows; "
          f"writer={'on' if args.writer else 'off'}; python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'measure':<14}{'ms/call':>10}{'Mrows/s':>10}{'x floor_copy':>14}{'x floor_take':>14}")
    out = {}
    for k, sec in res.items():
        n = n_of.get(k, args.rows)
        # per row, against the floor's per-row time: the median of the per-repeat ratios
        ratio = statistics.median(a / b for a, b in zip(times[k], times["floor_copy"])) * (args.rows / n)
        ratio_take = statistics.median(a / b for a, b in zip(times[k], times["floor_take"])) * (args.rows / n)
        out[k] = {"seconds": sec, "rows": n, "rows_per_s": n / sec, "ratio_to_floor_copy": ratio,
                  "ratio_to_floor_take": ratio_take}
        print(f"{k:<14}{sec * 1e3:>10.3f}{n / sec / 1e6:>10.2f}{ratio:>14.2f}{ratio_take:>14.2f}")
    print(f"read retries during the timed runs: {retries}")
    target = out["read_random"]["ratio_to_floor_copy"]
    print(f"read({args.rows:,} random rows) / numpy copy of the same size: {target:.2f}x "
          f"({'within' if target <= 3 else 'NOT within'} the 3x target); / the same gather "
          f"from a private array: {out['read_random']['ratio_to_floor_take']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out, "read_retries": retries}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
