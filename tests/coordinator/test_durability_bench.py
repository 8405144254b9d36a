"""scripts/durability_bench.py runs end to end on a tiny workload and cleans up.

No speed is asserted (the figures depend on the machine): the JSON must hold every
measure, each a number, and the run must leave no store and no directory behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "durability_bench.py"


def test_help():
    r = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--records" in r.stdout and "fdatasync" in r.stdout


def test_tiny_run_reports_every_measure_and_leaves_nothing(tmp_path):
    before = set(os.listdir("/dev/shm"))
    r = subprocess.run([sys.executable, str(BENCH), "--records", "3000", "--seconds", "0.4", "--clients", "1,2",
                        "--dir", str(tmp_path), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    for mode in ("checkpoint", "wal", "default"):
        rec = out[f"recovery_{mode}"]
        assert rec["records"] == 3000 and rec["setup_s"] > 0 and rec["setup_cpu_s"] > 0
    assert out["checkpoint"]["bytes"] > 3000 * 64 and out["checkpoint"]["disk_MB_per_s"] > 0
    for k in (1, 2):
        assert out[f"durable_writes_{k}_clients_per_s"] > 0 and out[f"fsync_per_op_per_s_around_{k}"] > 0
    assert os.listdir(tmp_path) == []
    # only this script's stores (dbench-*): another benchmark may run beside the test
    left = [n for n in set(os.listdir("/dev/shm")) - before if "dbench-" in n]
    assert not left, left
