"""What TTL, change feeds, watch and the asyncio calls cost, each against its baseline
in the same run (medians; the machine's other load shows up in both sides).

    python scripts/feature_costs.py            # ~30 s
    python scripts/feature_costs.py --quick    # smoke run, a few seconds

Rows: get of a record with an expiry vs without; put(ttl=) vs put; changes() on a
store of 100,000 slots (few changes, and every record); aput vs put (one at a time,
and 200 gathered); watch wake-up latency across processes vs a put round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid

import shmstore


def per_call(fn, n: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` runs of ``n`` calls."""
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n)
    return statistics.median(runs)


WATCHER = """
import sys, time, shmstore
s = shmstore.connect(sys.argv[1])
print("ready", flush=True)
for keys, _ in s.watch(since=s.epoch):
    print(time.time_ns(), flush=True)
    if b"stop" in keys:
        break
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short loops, for a smoke run")
    args = ap.parse_args()
    n, repeats = (500, 3) if args.quick else (5000, 5)
    name = f"fc-{uuid.uuid4().hex[:10]}"
    coord = shmstore.serve(name, capacity=100_000, key_size=32, value_size=64)
    rows = []
    try:
        s = shmstore.connect(name)
        s.put("plain", "x" * 40)
        s.put("ttl", "x" * 40, ttl=3600)
        g0 = per_call(lambda: s.get("plain"), n * 20, repeats)
        g1 = per_call(lambda: s.get("ttl"), n * 20, repeats)
        rows.append(("get, record with an expiry / without", g1, g0))
        p0 = per_call(lambda: s.put("p", 1), n, repeats)
        p1 = per_call(lambda: s.put("p", 1, ttl=60), n, repeats)
        rows.append(("put(ttl=60) / put", p1, p0))
        e_fill = s.epoch
        for chunk in range(0, 50_000, 5000):
            with s.batch() as b:
                for i in range(chunk, chunk + 5000):
                    b.put(f"k{i}", i)
        for i in range(100):
            s.put(f"k{i}", -i)
        e = s.epoch - 100
        c1 = per_call(lambda: s.changes(e), 20, repeats)
        c_all = per_call(lambda: s.changes(e_fill), 3, repeats)
        rows.append(("changes(): 100 changed keys / every one of 50,100 records", c1, c_all))

        async def seq_aput() -> None:
            for i in range(n):
                await s.aput("a", i)

        async def gathered() -> None:
            await asyncio.gather(*(s.aput(f"g{i}", i) for i in range(200)))

        t = time.perf_counter()
        asyncio.run(seq_aput())
        a1 = (time.perf_counter() - t) / n
        rows.append(("aput one at a time / put", a1, p0))
        t = time.perf_counter()
        asyncio.run(gathered())
        rows.append(("200 aputs gathered, per aput / put", (time.perf_counter() - t) / 200, p0))

        w = subprocess.Popen([sys.executable, "-c", WATCHER, name], stdout=subprocess.PIPE, text=True)
        try:
            assert w.stdout.readline().strip() == "ready"
            time.sleep(0.5)  # let it register and fall asleep
            lat = []
            for i in range(10 if args.quick else 60):
                t0 = time.time_ns()
                s.put("w", i)
                woke = int(w.stdout.readline())
                lat.append((woke - t0) / 1e9)
                time.sleep(0.05)  # idle longer than watch's min_interval (10 ms)
            s.put("stop", 1)
            w.wait(10)
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()
        rows.append(("watch: put -> watcher in another process woken / put round trip",
                     statistics.median(lat), p0))
        s.close()
    finally:
        coord.stop()
        shmstore.destroy(name)
    print("| measure | value | baseline | ratio |\n|---|---:|---:|---:|")
    for what, v, base in rows:
        print(f"| {what} | {v * 1e6:.1f} us | {base * 1e6:.1f} us | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
