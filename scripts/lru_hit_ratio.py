"""Hit ratio of shmstore's approximate LRU (eviction="lru") against exact LRU.

A Zipf(alpha) trace of --requests requests over --keys keys (each key's value size
fixed, uniform in [--min-value, --max-value] bytes) is run against a real store served
with ``memory=--memory`` and ``eviction="lru"``: each request is a ``get``; a miss is
followed by a ``put`` of the key's value (a read-through cache). The same trace is
then run through an exact LRU (an OrderedDict) holding at most the same bytes, in two
accountings:

- ``exact LRU, slot bytes``: each record costs the slot it takes in the store (its
  size class), so the only difference left is the approximation (CLOCK per class,
  evictions in small batches, pages split between classes);
- ``exact LRU, key+value bytes``: each record costs its key and value only, the
  budget a user reads as "memory"; the gap to it adds the store's per-record overhead
  (32-byte slot header, class rounding).

Run: ``python scripts/lru_hit_ratio.py`` (about a minute); ``--help`` for the knobs.
Prints one line per policy and the difference in points; ``--json`` for the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import OrderedDict

import numpy as np


def zipf_trace(n_keys: int, n_requests: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Key ids of a Zipf(alpha) trace: rank r is drawn with probability ~ 1 / r**alpha,
    and ranks map to key ids through a random permutation."""
    weights = 1.0 / np.arange(1, n_keys + 1, dtype=np.float64) ** alpha
    weights /= weights.sum()
    ranks = rng.choice(n_keys, size=n_requests, p=weights)
    return rng.permutation(n_keys)[ranks]


def exact_lru(trace: np.ndarray, cost: np.ndarray, budget: int) -> int:
    """Hits of an exact LRU of at most ``budget`` bytes (``cost[key]`` bytes each)."""
    lru: OrderedDict[int, None] = OrderedDict()
    used = 0
    hits = 0
    move = lru.move_to_end
    for k in trace.tolist():
        if k in lru:
            hits += 1
            move(k)
            continue
        c = int(cost[k])
        while used + c > budget and lru:
            old, _ = lru.popitem(last=False)
            used -= int(cost[old])
        lru[k] = None
        used += c
    return hits


def run_store(trace: np.ndarray, sizes: np.ndarray, args: argparse.Namespace) -> tuple[int, dict]:
    import shmstore

    name = f"lruhit-{os.getpid()}"
    coord = shmstore.serve(name, memory=args.memory, value_size=args.max_value + 64, key_size=16,
                           eviction="lru")
    try:
        store = shmstore.connect(name, read_cache=0)
        values = {}
        hits = 0
        get = store.get
        put = store.put
        t0 = time.perf_counter()
        for k in trace.tolist():
            key = f"k{k}"
            if get(key) is not None:
                hits += 1
                continue
            v = values.get(k)
            if v is None:
                v = values[k] = os.urandom(int(sizes[k]))
            put(key, v)
        took = time.perf_counter() - t0
        st = store.stats()
        info = dict(seconds=took, evictions=st.evictions, page_moves=st.page_moves, records=st.records,
                    fragmentation=st.fragmentation, memory_used=st.memory_used,
                    segment_bytes=st.segment_bytes)
        store.close()
        return hits, info
    finally:
        coord.stop()
        shmstore.destroy(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--alpha", type=float, default=0.99)
    ap.add_argument("--memory", type=int, default=16 << 20, help="the store's memory= budget, bytes")
    ap.add_argument("--min-value", type=int, default=100)
    ap.add_argument("--max-value", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from shmstore import _layout as L

    rng = np.random.default_rng(args.seed)
    trace = zipf_trace(args.keys, args.requests, args.alpha, rng)
    sizes = rng.integers(args.min_value, args.max_value + 1, size=args.keys)
    lay = L.Layout(capacity=1, key_size=16, value_size=args.max_value + 64, memory=args.memory)
    klen = np.array([len(f"k{k}") for k in range(args.keys)])
    enc = sizes + np.where(sizes < 256, 2, 3)  # msgpack bin8 / bin16 header
    need = L.SLOT_HEADER + (klen + 7) // 8 * 8 + enc
    slot = np.array(lay.classes)[np.searchsorted(lay.classes, need)]
    budget = lay.npages * lay.page_size

    store_hits, info = run_store(trace, sizes, args)
    slot_hits = exact_lru(trace, slot, budget)
    raw_hits = exact_lru(trace, klen + sizes, budget)
    n = len(trace)
    rows = {
        "shmstore eviction='lru'": store_hits / n,
        "exact LRU, slot bytes": slot_hits / n,
        "exact LRU, key+value bytes": raw_hits / n,
    }
    out = dict(requests=n, keys=args.keys, alpha=args.alpha, memory=budget, hit_ratio=rows,
               points_below_exact_slot=100 * (rows["exact LRU, slot bytes"] - rows["shmstore eviction='lru'"]),
               points_below_exact_raw=100 * (rows["exact LRU, key+value bytes"] - rows["shmstore eviction='lru'"]),
               store=info)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"Zipf({args.alpha}) trace: {n:,} requests over {args.keys:,} keys, values "
          f"{args.min_value}-{args.max_value} B, budget {budget / 2**20:.0f} MiB")
    for k, v in rows.items():
        print(f"  {k:32s} hit ratio {100 * v:6.2f} %")
    print(f"  shmstore minus exact LRU: {-out['points_below_exact_slot']:+.2f} points (slot bytes), "
          f"{-out['points_below_exact_raw']:+.2f} points (key+value bytes)")
    print(f"  store: {info['evictions']:,} evictions, {info['page_moves']} page moves, "
          f"{info['records']:,} records at the end, fragmentation {100 * info['fragmentation']:.1f} %, "
          f"{info['seconds']:.1f} s")


if __name__ == "__main__":
    main()
