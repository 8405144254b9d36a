"""The cost of one ``store.get`` on the fast path: the number the per-client read
counters must not move.

    python scripts/get_overhead.py                 # 7 runs of 200,000 gets, the median
    python scripts/get_overhead.py --runs 11 --n 500000

It serves a memory-only store, writes 1,000 small records, then times a loop of
``get`` over them (hits, str keys) and a loop of misses; each run's ns/get is printed
and the median of the runs reported. Compare two checkouts by running this same file
with each on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import shmstore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs (default 7); the median is reported")
    p.add_argument("--n", type=int, default=200_000, help="gets per run (default 200,000)")
    args = p.parse_args(argv)
    name = f"getbench-{os.getpid()}"
    coord = shmstore.serve(name, capacity=4096, key_size=32, value_size=64)
    try:
        with shmstore.connect(name) as s:
            keys = [f"key:{i}" for i in range(1000)]
            for k in keys:
                s.put(k, {"v": 1})
            miss = [f"nokey:{i}" for i in range(1000)]
            get = s.get
            rounds = max(1, args.n // len(keys))
            res = {"hit": [], "miss": []}
            for _ in range(args.runs):
                for label, ks in (("hit", keys), ("miss", miss)):
                    t0 = time.perf_counter_ns()
                    for _ in range(rounds):
                        for k in ks:
                            get(k)
                    res[label].append((time.perf_counter_ns() - t0) / (rounds * len(ks)))
            for label, xs in res.items():
                print(f"get {label}: median {statistics.median(xs):.0f} ns "
                      f"(runs: {', '.join(f'{x:.0f}' for x in xs)})")
    finally:
        coord.stop()
        shmstore.destroy(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
