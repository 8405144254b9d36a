"""What a handle costs: a repeated connect() and the write channel's /dev/shm memory.

    python scripts/handles_cost.py [--connects 20000] [--clients 1,64,256]

Serves a fresh memory-only store with default settings, then
- times ``connect()`` + drop while another handle of the process keeps the attachment
  (the per-request pattern), and ``connect()`` + ``close()``;
- attaches N writing processes (each connects and writes once, then waits) and reports
  the channel segment's and the reply semaphores' allocated bytes (st_blocks * 512).
Prints numbers; asserts nothing. Cleans up what it made.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import time
import uuid

import shmstore


def _shm_bytes(name: str) -> tuple[int, int, int]:
    """(channel bytes allocated, reply semaphores, their bytes allocated)."""
    ch = os.stat(f"/dev/shm/shmstore.{name}@ch")
    sems = [e for e in os.listdir("/dev/shm") if e.startswith(f"sem.shmstore.{name}@r") and e[len(f"sem.shmstore.{name}@r"):].isdigit()]
    sem_bytes = sum(os.stat(f"/dev/shm/{e}").st_blocks * 512 for e in sems)
    return ch.st_blocks * 512, len(sems), sem_bytes


def _client(name: str, ready, stop) -> None:
    s = shmstore.connect(name, timeout=30)
    s.incr("n")
    ready.release()
    stop.wait(300)
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connects", type=int, default=20000)
    ap.add_argument("--clients", default="1,64,256")
    args = ap.parse_args()
    name = "cost-" + uuid.uuid4().hex[:8]
    coord = shmstore.serve(name, capacity=1000)
    try:
        keep = shmstore.connect(name)
        keep.incr("n")
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(args.connects):
            h = shmstore.connect(name)
            del h
        dt = time.perf_counter() - t0
        print(f"connect()+drop, attachment kept by another handle: {dt / args.connects * 1e6:.1f} us")
        t0 = time.perf_counter()
        for _ in range(args.connects):
            shmstore.connect(name).close()
        dt = time.perf_counter() - t0
        print(f"connect()+close(): {dt / args.connects * 1e6:.1f} us")
        t0 = time.perf_counter()
        for _ in range(args.connects // 10):
            h = shmstore.connect(name)
            h.incr("n")
            del h
        dt = time.perf_counter() - t0
        print(f"connect()+incr()+drop: {dt / (args.connects // 10) * 1e6:.1f} us")
        keep.close()
        time.sleep(0.3)  # the coordinator reclaims the block on its tick
        b, n, sb = _shm_bytes(name)
        print(f"0 clients attached: channel {b / 1024:.0f} KiB allocated, {n} reply semaphores ({sb / 1024:.0f} KiB)")
        ctx = mp.get_context("fork")
        for count in [int(c) for c in args.clients.split(",")]:
            ready, stop = ctx.Semaphore(0), ctx.Event()
            procs = [ctx.Process(target=_client, args=(name, ready, stop)) for _ in range(count)]
            for p in procs:
                p.start()
            for _ in range(count):
                ready.acquire(timeout=120)
            b, n, sb = _shm_bytes(name)
            print(f"{count} clients attached: channel {b / 1024:.0f} KiB allocated "
                  f"({b / count / 1024:.0f} KiB each), {n} reply semaphores ({sb / 1024:.0f} KiB)")
            stop.set()
            for p in procs:
                p.join(30)
            time.sleep(0.3)
        b, n, sb = _shm_bytes(name)
        print(f"after they exited: channel {b / 1024:.0f} KiB allocated, {n} reply semaphores")
        print(f"(the segment's size: {os.stat(f'/dev/shm/shmstore.{name}@ch').st_size / 2**20:.0f} MiB, max_clients 256)")
    finally:
        coord.stop()
        shmstore.destroy(name)


if __name__ == "__main__":
    main()
