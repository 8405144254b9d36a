"""Smoke run of scripts/django_bench.py with tiny numbers: every backend serves the
warm /fragments view under Gunicorn, and the run leaves no server and no store behind.

It checks that the benchmark works, never how fast anything is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from scripts.django_bench import BACKENDS, markdown

pytest.importorskip("django", reason="Django is not installed (pip install -e '.[dev]')")
pytest.importorskip("gunicorn", reason="Gunicorn is not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_runs_every_backend_warm_and_cleans_up():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "django_bench.py"), "--requests", "20", "--clients", "2",
         "--workers", "2", "--rounds", "1", "--json"],
        capture_output=True, text=True, timeout=100, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    ran = {r["backend"]: r for r in report["results"]}
    expected_skips = {"redis"} if shutil.which("redis-server") is None else set()
    assert set(report["skipped"]) == expected_skips, report["skipped"]
    assert set(ran) == set(BACKENDS) - expected_skips, report
    for backend, r in ran.items():
        assert r["errors"] == 0 and r["misses"] == 0, (backend, r, proc.stderr[-4000:])
        assert r["req_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"], (backend, r)
        assert r["workers_seen"] >= 1 and r["warmup_requests"] > 0, (backend, r)
    # Every gunicorn master stopped cleanly (SIGTERM) and is gone; the store is destroyed.
    assert set(report["servers"]) == set(ran)
    for backend, s in report["servers"].items():
        assert s["exit_code"] == 0, (backend, s, proc.stderr[-4000:])
        assert not psutil.pid_exists(s["pid"]) or psutil.Process(s["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not [e for e in os.listdir("/dev/shm") if report["store_prefix"] in e]

    table = markdown(report)
    assert "| backend | req/s |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ") and "ms |" in line]) == len(ran)
