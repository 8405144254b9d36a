"""Durability benchmark: recovery time, checkpoint speed, durable writes/s.

    python scripts/durability_bench.py                     # the full run (1 M records)
    python scripts/durability_bench.py --records 200000 --seconds 3 --json

Measures, on the file system of ``--dir`` (default: a temporary directory under the
current directory, removed afterwards):

1. Recovery of ``--records`` records (8-byte keys, 64-byte values) into a new segment
   (the reboot case), in this process with the real coordinator code:
   a. from a checkpoint (the store was checkpointed, then its segment destroyed);
   b. from the WAL only (every record one logged put after an empty checkpoint);
   c. from a checkpoint plus 200,000 logged puts: the most WAL a store with the
      default ``checkpoint_ops=200_000`` replays.
   The target is <= 2 s for 1 M records.
2. Checkpoint write speed (the 1 M-record image, written and fsynced) against the
   disk's sequential write speed measured in the same run: the same number of bytes
   written in 1 MiB pieces and fdatasynced (what ``dd conv=fdatasync`` does). The
   copy out of the segment (the only part writers wait for) is timed apart.
3. Durable writes/s under ``sync="always"`` with 1, 2 and 8 client processes, each
   writing waiting puts for ``--seconds``, against a loop doing one ``write`` +
   ``fdatasync`` of a 100-byte record per op (the one-fsync-per-op floor).
   Group commit should put 8 clients at >= 5x that loop.

Numbers are reported, not asserted: timing depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import shmstore
from shmstore._shm import open_segment

KEY_SIZE = 16
VALUE = b"v" * 62  # msgpack bin8: 64 bytes encoded


def _name(tag: str) -> str:
    return f"dbench-{tag}-{uuid.uuid4().hex[:8]}"


def _load(name: str, n: int, *, single: bool, first: int = 0) -> None:
    """Write ``n`` records: pipelined single puts (one WAL record each) or batches."""
    with shmstore.connect(name, timeout=60) as s:
        if single:
            for i in range(first, first + n):
                s.put(b"k%07d" % i, VALUE, wait=False)
            s.flush(timeout=600)
        else:
            for lo in range(0, n, 2000):
                with s.batch() as b:
                    for i in range(lo, min(n, lo + 2000)):
                        b.put(b"k%07d" % i, VALUE)


def _recover(name: str, path: str) -> tuple[float, float, int, float]:
    """(wall seconds of the coordinator's setup, seconds of the rebuild, records, CPU
    seconds of the setup: on a shared machine, wall time also counts waiting for a CPU)."""
    from shmstore.coordinator import CoordinatorServer, ServerConfig

    server = CoordinatorServer(ServerConfig(name=name, path=path, sync="always", max_clients=1))
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        server.setup()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        rebuilt = server.journal.restored or {}
        return wall, rebuilt.get("seconds", float("nan")), int(server.seg.q[18]), cpu
    finally:
        server.close()


def bench_recovery(root: str, n: int, results: dict, modes: list[str]) -> None:
    cap = n + 16
    tail = min(200_000, n)
    for mode in modes:
        name = _name(mode)
        path = os.path.join(root, f"rec-{mode}")
        coord = shmstore.serve(name, path=path, capacity=cap, key_size=KEY_SIZE, value_size=64, sync="periodic",
                               checkpoint_ops=10**9, checkpoint_interval=10**6, timeout=60, ring_size=4 << 20)
        try:
            t0 = time.perf_counter()
            _load(name, n, single=(mode == "wal"))
            if mode != "wal":
                with shmstore.connect(name) as s:
                    s.checkpoint(timeout=600)
            if mode == "default":  # then as many WAL records as checkpoint_ops=200_000 allows
                _load(name, tail, single=True, first=n - tail)
            load_s = time.perf_counter() - t0
            coord.kill()  # no shutdown checkpoint: the WAL case replays everything
            shmstore.destroy(name)
            wal_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.startswith("wal-"))
            wall, rebuild, count, cpu = _recover(name, path)
            assert count == n, (count, n)
            results[f"recovery_{mode}"] = {"records": n, "load_s": round(load_s, 2), "wal_bytes": wal_bytes,
                                           "setup_s": round(wall, 3), "rebuild_s": round(rebuild, 3),
                                           "setup_cpu_s": round(cpu, 3)}
            what = {"checkpoint": "a checkpoint", "wal": "the WAL only",
                    "default": f"a checkpoint + {tail:,} WAL records"}[mode]
            print(f"recovery from {what}, {n:,} records: coordinator setup {wall:.2f} s "
                  f"({cpu:.2f} s of CPU; rebuild {rebuild:.2f} s; WAL {wal_bytes / 1e6:.0f} MB; loading took {load_s:.1f} s)",
                  flush=True)
            if mode == "checkpoint":
                bench_checkpoint(name, path, root, results)
        finally:
            coord.kill()
            shmstore.destroy(name)
            shutil.rmtree(path, ignore_errors=True)


def bench_checkpoint(name: str, path: str, root: str, results: dict) -> None:
    """Checkpoint of the recovered store (its segment rebuilt by ``_recover``)."""
    from shmstore.coordinator._durable._checkpoint import take_snapshot, write_checkpoint

    shmstore.destroy(name)
    coord = shmstore.serve(name, path=path, timeout=120)
    try:
        seg = open_segment(name)
        t0 = time.perf_counter()
        snap = take_snapshot(seg, seg.q[16])
        copy_s = time.perf_counter() - t0
        out = os.path.join(root, "ckpt-bench")
        os.mkdir(out)
        t0 = time.perf_counter()
        snap.materialize()  # picks the live rows out of the copy (the writer thread does it)
        pick_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = write_checkpoint(out, snap, ckpt_id=1, wal_id=0)
        write_s = time.perf_counter() - t0
        size = os.path.getsize(p)
        del snap
        seg.close()
        shutil.rmtree(out)
        # The disk: as many random bytes (a virtual disk may compress constant ones),
        # 1 MiB per write, then fdatasync: dd if=random of=F bs=1M conv=fdatasync.
        raw = os.path.join(root, "dd-bench")
        data = memoryview(os.urandom(size))
        t0 = time.perf_counter()
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for o in range(0, size, 1 << 20):
            os.write(fd, data[o : o + (1 << 20)])
        os.fdatasync(fd)
        os.close(fd)
        dd_s = time.perf_counter() - t0
        os.unlink(raw)
        ck_rate, dd_rate = size / write_s / 1e6, size / dd_s / 1e6
        results["checkpoint"] = {"bytes": size, "copy_s": round(copy_s, 3), "pick_rows_s": round(pick_s, 3),
                                 "write_s": round(write_s, 3),
                                 "MB_per_s": round(ck_rate, 1), "disk_MB_per_s": round(dd_rate, 1),
                                 "ratio": round(ck_rate / dd_rate, 2)}
        print(f"checkpoint  {size / 1e6:.0f} MB: copy out of the segment {copy_s * 1000:.0f} ms (writers wait "
              f"for this); rows picked in {pick_s:.2f} s; file written+fsynced in {write_s:.2f} s = "
              f"{ck_rate:.0f} MB/s; disk sequential write+fdatasync "
              f"{dd_rate:.0f} MB/s -> {ck_rate / dd_rate:.2f}x the disk", flush=True)
    finally:
        coord.kill()


_WORKER = r"""
import shmstore, sys, time
name, wid, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = shmstore.connect(name, timeout=30)
s.put(b"w%d-warm" % wid, b"x")
print("ready", flush=True)
start = float(sys.stdin.readline())  # the same instant for every worker, sent once all are ready
while time.time() < start:
    time.sleep(0.001)
end = start + seconds
n = 0
v = b"v" * 62
while time.time() < end:
    s.put(b"w%d-%d" % (wid, n % 1000), v)
    n += 1
print(n)
"""


def fsync_floor(root: str, seconds: float) -> float:
    """Ops/s of one write + fdatasync of a 100-byte record per op."""
    p = os.path.join(root, "fsync-per-op")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    rec = b"r" * 100
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        os.write(fd, rec)
        os.fdatasync(fd)
        n += 1
    rate = n / (time.perf_counter() - t0)
    os.close(fd)
    os.unlink(p)
    return rate


def bench_writes(root: str, seconds: float, clients: list[int], results: dict) -> None:
    # The disk is shared and its fsync latency drifts: the floor is measured right
    # before and right after each run, and the run is compared with their mean.
    floors = [fsync_floor(root, seconds / 2)]
    for k in clients:
        name = _name(f"w{k}")
        path = os.path.join(root, f"writes-{k}")
        coord = shmstore.serve(name, path=path, capacity=k * 1000 + 100, key_size=KEY_SIZE, value_size=64,
                               sync="always", timeout=60)
        try:
            procs = [subprocess.Popen([sys.executable, "-c", _WORKER, name, str(w), str(seconds)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                     for w in range(k)]
            # Start the clock only once every worker has imported, connected and written:
            # a fixed head start lost whole windows on a busy machine.
            for pr in procs:
                if pr.stdout.readline().strip() != "ready":
                    raise RuntimeError("a durable-writes worker died before it was ready")
            start = time.time() + 0.05
            counts = [int(pr.communicate(f"{start}\n", timeout=seconds + 120)[0]) for pr in procs]
            q = open_segment(name)
            groups, frames, fsyncs, fsync_ns = q.q[41], q.q[42], q.q[52], q.q[53]
            q.close()
            floors.append(fsync_floor(root, seconds / 2))
            base = (floors[-2] + floors[-1]) / 2
            rate = sum(counts) / seconds
            results[f"durable_writes_{k}_clients_per_s"] = round(rate)
            results[f"fsync_per_op_per_s_around_{k}"] = round(base)
            print(f"sync='always', {k} client process(es): {rate:,.0f} acknowledged writes/s = "
                  f"{rate / base:.1f}x one fsync per op ({base:,.0f} ops/s = {1e6 / base:.0f} us each, measured "
                  f"before and after); avg group {frames / max(groups, 1):.1f} requests, "
                  f"{fsyncs:,} fsyncs averaging {fsync_ns / max(fsyncs, 1) / 1000:.0f} us", flush=True)
        finally:
            coord.stop()
            shmstore.destroy(name)
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000, help="records for recovery/checkpoint (default 1 M)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per durable-writes run (default 5)")
    ap.add_argument("--clients", default="1,2,8", help="client process counts (default 1,2,8)")
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir here)")
    ap.add_argument("--recovery", default="checkpoint,wal,default",
                    help="recovery cases: checkpoint,wal,default (the checkpoint speed runs with 'checkpoint')")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: recovery,writes")
    ap.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="shmstore-dbench-", dir=args.dir or os.getcwd())
    results: dict = {"records": args.records}
    skip = set(filter(None, args.skip.split(",")))
    try:
        if "recovery" not in skip:
            bench_recovery(root, args.records, results, args.recovery.split(","))
        if "writes" not in skip:
            bench_writes(root, args.seconds, [int(c) for c in args.clients.split(",")], results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
