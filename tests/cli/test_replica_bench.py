"""scripts/replica_bench.py runs end to end with tiny sizes and prints well-formed JSON.

A smoke run only: the numbers must be there and positive; nothing asserts a speed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "replica_bench.py"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not on PATH (install Redis 7 to run the replica benchmark)")


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _shm_left(pid: int) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f"rbench-{pid}-" in f]


@pytest.mark.timeout(90)
def test_a_tiny_run_prints_json_of_positive_numbers():
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--json", "--seconds", "0.3", "--keys", "200",
                             "--hosts", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=80)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    assert not _shm_left(proc.pid), "the script left shared-memory objects"
    res = json.loads(out)
    assert set(res) >= {"environment", "settings", "lag", "writes", "reads"}
    assert res["settings"]["hosts"] == [1]

    assert set(res["lag"]) == {"loaded", "unloaded"}
    for lag in res["lag"].values():
        for key in ("lag_ms", "ack_ms"):
            assert lag[key]["count"] > 0, lag
            assert _positive(lag[key]["p50"]) and lag[key]["p99"] >= lag[key]["p50"], lag
    assert _positive(res["lag"]["loaded"]["background_puts_per_s"])

    assert [row["hosts"] for row in res["writes"]] == [1]
    for row in res["writes"]:
        for key in ("shmstore_sync", "shmstore_pipelined", "redis_sync", "redis_pipelined"):
            assert _positive(row[key]), row

    reads = res["reads"]
    assert set(reads) == {"shmstore", "redis", "redis-csc"}
    for kind, row in reads.items():
        if kind == "redis-csc" and "skipped" in row:  # redis-py needs Redis 7.4+ for it
            assert row["skipped"]
            continue
        assert _positive(row["random"]) and _positive(row["hot"]), (kind, row)
        if kind != "shmstore":
            assert all(_positive(v) for v in row["shmstore_ratio"].values()), row
