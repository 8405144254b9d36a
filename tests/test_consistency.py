"""Atomicity and linearizability across real processes, and the coordinator's memory."""

from __future__ import annotations

import psutil

import shmstore
from tests.helpers.processes import python, reap

BATCH_WRITER = """
import sys, shmstore
s = shmstore.connect(sys.argv[1])
keys = [f"k{j}" for j in range(int(sys.argv[2]))]
print("ready", flush=True)
for i in range(1, int(sys.argv[3]) + 1):
    with s.batch() as b:
        for k in keys:
            b.put(k, i)
print("done", flush=True)
"""

SNAPSHOT_READER = """
import sys, shmstore
s = shmstore.connect(sys.argv[1])
keys = [f"k{j}" for j in range(int(sys.argv[2]))]
reads = torn = 0
last = 0
print("ready", flush=True)
while sys.stdin.readline():
    for _ in range(200):
        values = s.get_many(keys)
        reads += 1
        if len(set(values)) != 1:
            torn += 1
        if values[0] is not None and values[0] < last:
            torn += 1
        last = values[0] or 0
    print(reads, torn, s.stats().read_retries, flush=True)
"""


def test_get_many_never_returns_half_a_batch(served):
    """One writer rewrites 50 keys per batch; two reader processes
    check every get_many shows one batch (all values equal) and never goes back."""
    n, _ = served(capacity=200)
    with shmstore.connect(n) as s:
        with s.batch() as b:
            for j in range(50):
                b.put(f"k{j}", 0)
    writer = python(BATCH_WRITER, n, "50", "1500")
    readers = [python(SNAPSHOT_READER, n, "50", stdin=-1) for _ in range(2)]
    try:
        for p in [writer, *readers]:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        results = []
        while writer.poll() is None or not results:
            for r in readers:
                r.stdin.write("go\n")
                r.stdin.flush()
                results.append(r.stdout.readline().split())
        out = writer.stdout.read()
        assert "done" in out, writer.stderr.read()
        torn = sum(int(t) for _, t, _ in results)
        assert torn == 0, f"get_many returned half a batch or went back: {results}"
        assert sum(int(r) for r, _, _ in results) > 0
    finally:
        reap(writer, *readers)


CAS_COUNTER = """
import sys, shmstore
s = shmstore.connect(sys.argv[1])
conflicts = 0
for _ in range(int(sys.argv[2])):
    while True:
        v = s.version("c") or 0
        cur = s.get("c", 0)
        try:
            s.compare_and_set("c", cur + 1, version=v)
            break
        except shmstore.VersionConflictError:
            conflicts += 1
print(conflicts, flush=True)
"""


def test_compare_and_set_counter_from_four_processes_loses_no_increment(served):
    n, _ = served(capacity=10)
    procs = [python(CAS_COUNTER, n, "150") for _ in range(4)]
    try:
        outs = [p.communicate(timeout=100) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        with shmstore.connect(n) as s:
            assert s.get("c") == 600, outs
    finally:
        reap(*procs)


def _anon_kib(pid: int) -> int:
    """Private anonymous memory (the Python heap), not the shared segment's pages."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise AssertionError("no Anonymous line in smaps_rollup")


def test_coordinator_memory_does_not_grow_with_records(served):
    """50,000 records must not cost the coordinator per-record Python objects
    (they would take several MiB); the segment's pages are shared memory."""
    n, coord = served(capacity=60_000, value_size=32)
    with shmstore.connect(n) as s:
        for i in range(20):  # warm every code path first
            with s.batch() as b:
                b.put(f"warm{i}", i)
                b.delete(f"warm{i}")
        s.incr("warm")
        before = _anon_kib(coord.pid)
        for chunk in range(50):
            with s.batch() as b:
                for j in range(1000):
                    b.put(f"key-{chunk}-{j}", j)
        assert len(s) == 50_001
        grown = _anon_kib(coord.pid) - before
        assert grown < 1536, f"coordinator heap grew by {grown} KiB for 50,000 records"
        assert psutil.Process(coord.pid).is_running()
