"""The cost of one ``store.get`` on the fast path: the number the per-client read
counters must not move.

    python scripts/get_overhead.py                 # 7 runs of 200,000 gets, the median
    python scripts/get_overhead.py --runs 11 --n 500000
    python scripts/get_overhead.py --baseline OLD/shmstore/_readers.py   # A/B in one process

It serves a memory-only store, writes 1,000 small records, then times a loop of
``get`` over them (hits, str keys) and a loop of misses; each run's ns/get is printed
and the median of the runs reported. With ``--baseline`` it also builds ``get`` from
another version of ``_readers.py`` (e.g. ``git show BASE:shmstore/_readers.py``) on
the same mapping and alternates the two run by run, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import shmstore


def _baseline_get(path: str, store: shmstore.Store):
    """``get`` built by the ``make_readers`` of another ``_readers.py``, on ``store``'s mapping."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("shmstore._readers_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_readers(store._seg, store._decode, shmstore.Store.get.__get__(store))[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs (default 7); the median is reported")
    p.add_argument("--n", type=int, default=200_000, help="gets per run (default 200,000)")
    p.add_argument("--baseline", default=None, metavar="FILE",
                   help="another _readers.py whose make_readers() to time against this one")
    args = p.parse_args(argv)
    name = f"getbench-{os.getpid()}"
    coord = shmstore.serve(name, capacity=4096, key_size=32, value_size=64)
    try:
        with shmstore.connect(name) as s:
            keys = [f"key:{i}" for i in range(1000)]
            for k in keys:
                s.put(k, {"v": 1})
            miss = [f"nokey:{i}" for i in range(1000)]
            variants = {"": s.get}
            if args.baseline:
                variants = {"baseline ": _baseline_get(args.baseline, s), "this ": s.get}
            rounds = max(1, args.n // len(keys))
            res: dict[str, list[float]] = {}
            for _ in range(args.runs):
                for tag, get in variants.items():
                    for label, ks in (("hit", keys), ("miss", miss)):
                        t0 = time.perf_counter_ns()
                        for _ in range(rounds):
                            for k in ks:
                                get(k)
                        res.setdefault(tag + label, []).append(
                            (time.perf_counter_ns() - t0) / (rounds * len(ks)))
            for label, xs in res.items():
                print(f"get {label}: median {statistics.median(xs):.0f} ns "
                      f"(runs: {', '.join(f'{x:.0f}' for x in xs)})")
            if args.baseline:
                for label in ("hit", "miss"):
                    ratios = [a / b for a, b in zip(res["this " + label], res["baseline " + label])]
                    print(f"get {label}: this / baseline, median of the paired runs: "
                          f"{statistics.median(ratios):.3f}")
    finally:
        coord.stop()
        shmstore.destroy(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
