"""``scripts/bench.py --quick`` (``shmstore._tools._bench``) runs end to end, reports every
measure, and cleans up.

No speed is asserted here: the figures depend on the machine. What is checked is the
shape of the outputs (JSON, Markdown, the results directory) and that the run leaves
nothing behind: no shared-memory objects of its stores, no temp dir, no child process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench.py"

#: Every row the benchmark reports, "measure.system" (pinned here on purpose).
_GETS = ["shmstore", "shmstore_nocache", "lmdb_txn", "lmdb_txn_decode", "redis", "diskcache", "memcached",
         "dict"]
EXPECTED = [
    "get_hot.shmstore", "get_hot.shmstore_nocache", "get_hot.lmdb_txn", "get_hot.lmdb_txn_decode",
    "get_hot.lmdb_txn_per_get",
    "get_hot.redis", "get_hot.diskcache", "get_hot.memcached", "get_hot.manager", "get_hot.dict",
    "get_hot.numpy_copy",
    "get_random.shmstore", "get_random.shmstore_nocache", "get_random.lmdb_txn", "get_random.lmdb_txn_decode",
    "get_random.lmdb_txn_per_get", "get_random.redis", "get_random.diskcache", "get_random.memcached",
    "get_random.manager", "get_random.dict",
    *[f"{g}.{s}" for g in ("get_1k", "get_big", "get_big_1k") for s in _GETS],
    "get_many.shmstore", "get_many.lmdb_loop", "get_many.lmdb_loop_decode", "get_many.redis_mget",
    "get_many.diskcache_loop", "get_many.memcached_get_many", "get_many.dict", "get_many.numpy_copy",
    "put.shmstore", "put.redis", "put.diskcache", "put.memcached", "put.lmdb_sync", "put.lmdb_nosync",
    "put.manager", "put.dict", "put.socketpair",
    "put_pipelined.shmstore", "put_pipelined.redis_pipeline", "put_pipelined.lmdb_one_txn",
    "put_pipelined.diskcache_transact", "put_pipelined.memcached_set_many",
    "writes_1proc.shmstore", "writes_1proc.redis", "writes_1proc.lmdb_nosync", "writes_1proc.diskcache",
    "writes_1proc.memcached",
    "writes_2proc.shmstore", "writes_2proc.redis", "writes_2proc.lmdb_nosync", "writes_2proc.lmdb_sync",
    "writes_2proc.diskcache", "writes_2proc.memcached",
    "writes_4proc.shmstore", "writes_4proc.redis", "writes_4proc.lmdb_nosync", "writes_4proc.diskcache",
    "writes_4proc.memcached",
    "reads_under_write.shmstore", "reads_under_write.lmdb", "reads_under_write.redis",
    "reads_under_write.diskcache", "reads_under_write.memcached",
    *[f"durable_{n}proc.{s}" for n in (1, 2, 8) for s in ("shmstore", "lmdb_sync")],
    "memory.shmstore_segment", "memory.shmstore_coordinator", "memory.shmstore_client",
    "memory.lmdb_file", "memory.lmdb_client", "memory.redis_server", "memory.redis_client",
    "memory.diskcache_file", "memory.memcached_server",
    "memory.bare_reader", "memory.shmstore_reader", "memory.lmdb_reader", "memory.redis_reader",
    "memory.diskcache_reader", "memory.memcached_reader",
    "table_read.shmstore", "table_read.numpy_copy",
]
TABLE_ROWS = {"table_read.shmstore", "table_read.numpy_copy"}
TARGET_BASELINES = {"get_hot.lmdb_txn", "get_random.lmdb_txn", "get_many.lmdb_loop",
                    "get_many.redis_mget", "put.redis", "writes_2proc.redis",
                    "durable_8proc.lmdb_sync", "put.socketpair", "writes_2proc.lmdb_nosync",
                    "table_read.numpy_copy"}


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _cells(line: str) -> list[str]:
    # split on unescaped pipes; the line starts and ends with one
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _table(lines: list[str], start: int) -> list[str]:
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def test_bench_quick_runs_reports_everything_and_cleans_up(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    out_md = tmp_path / "bench.md"
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out_json), "--markdown", str(out_md),
         "--out", str(out_dir)],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, f"bench.py --quick failed:\n{proc.stderr[-4000:]}"

    doc = json.loads(out_json.read_text())
    redis_present = shutil.which("redis-server") is not None
    memcached_present = (shutil.which("memcached") is not None
                         and importlib.util.find_spec("pymemcache") is not None)
    diskcache_present = importlib.util.find_spec("diskcache") is not None
    import shmstore

    table_present = hasattr(shmstore, "Table")

    # -- the results directory holds the same documents, and the chart or why not
    assert json.loads((out_dir / "bench.json").read_text())["measures"].keys() == doc["measures"].keys()
    assert (out_dir / "bench.md").read_text() == out_md.read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        png = out_dir / "bench.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib" in doc["chart"]

    # -- machine info and config
    machine = doc["machine"]
    for key in ("cpu_model", "nproc", "python", "packages"):
        assert machine.get(key), f"machine info lacks {key}"
    assert machine["packages"].get("shmstore")
    assert doc["config"]["quick"] is True

    # -- every measure: a positive median (or, for Redis without its binary and the
    #    Table rows without a Table, a reason)
    measures = doc["measures"]
    assert list(measures) == EXPECTED
    repeats = doc["config"]["repeats"]
    for mid, m in measures.items():
        if m.get("skipped"):
            if mid in TABLE_ROWS:
                assert not table_present and "Table" in m["skipped"], m["skipped"]
                continue
            system = mid.split(".")[1]
            for peer, present in (("redis", redis_present), ("memcached", memcached_present),
                                  ("diskcache", diskcache_present)):
                if system.startswith(peer):
                    assert not present, f"{mid} skipped: {m['skipped']}"
                    assert peer in m["skipped"].lower()
                    break
            else:
                raise AssertionError(f"{mid} skipped: {m['skipped']}")
            continue
        assert _positive(m["median"]), f"{mid}: median {m['median']!r}"
        want_runs = 1 if m["unit"] == "bytes" else repeats
        assert len(m["runs"]) == want_runs and all(_positive(r) for r in m["runs"]), mid
        assert m["unit"] in ("ns/op", "ops/s", "bytes"), mid
    if not redis_present:
        assert doc["redis_skipped"], "Redis absent but no skip reason recorded"
    if not memcached_present:
        assert doc["memcached_skipped"], "memcached absent but no skip reason recorded"

    # -- targets are reported, never asserted
    targets = doc["targets"]
    assert {t["baseline"] for t in targets} == TARGET_BASELINES
    for t in targets:
        assert t["status"] in ("pass", "miss", "skipped")
        assert t["status"] == "skipped" or _positive(t["speedup"])
        assert t["status"] == "skipped" or (_positive(t["shmstore"]) and _positive(t["peer"]))

    # -- the Markdown tables: header, separator, one row per measure, same width; then
    #    the targets table with a PASS/MISS per target
    lines = out_md.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = _table(lines, start)
    header, sep, rows = _cells(table[0]), _cells(table[1]), table[2:]
    assert header[0] == "measure" and "median" in header and "status" in header
    assert len(sep) == len(header) and all(re.fullmatch(r":?-{3,}:?", c) for c in sep), table[1]
    assert len(rows) == len(EXPECTED)
    ids = []
    for row in rows:
        cells = _cells(row)
        assert len(cells) == len(header), row
        ids.append(cells[0].strip("`"))
    assert ids == EXPECTED
    tstart = lines.index("## Targets") + 2
    ttable = _table(lines, tstart)
    theader, trows = _cells(ttable[0]), ttable[2:]
    assert theader[-1] == "status" and len(trows) == len(targets)
    for row, t in zip(trows, targets):
        cells = _cells(row)
        assert len(cells) == len(theader) and cells[-1] == t["status"].upper(), row

    # -- nothing left behind: shm objects of the stores, temp dir, child processes
    name = doc["config"]["store_name"]
    assert name.startswith("bench-")
    left = [e for e in os.listdir("/dev/shm")
            if e.startswith(f"shmstore.{name}") or e.startswith(f"sem.shmstore.{name}")]
    assert not left, f"bench left shared memory behind: {left}"
    tmpdir = doc["config"]["tmpdir"]
    assert tmpdir and not os.path.exists(tmpdir), f"bench left {tmpdir}"
    stray = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if name in cmd or tmpdir in cmd:
            stray.append((p.info["pid"], cmd[:200]))
    assert not stray, f"bench left processes running: {stray}"


def test_bench_quick_new_peers_and_reader_memory(tmp_path: Path) -> None:
    """A short run of a few measures has the diskcache and memcached rows (measured when
    the peer is installed, else skipped with the reason) and the reader-memory rows;
    its memcached server is gone afterwards."""
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "get_random,get_many,put,memory",
         "--json", str(out_json), "--out", ""],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, f"bench.py --quick --only ... failed:\n{proc.stderr[-4000:]}"
    doc = json.loads(out_json.read_text())
    measures = doc["measures"]
    present = {
        "diskcache": importlib.util.find_spec("diskcache") is not None,
        "memcached": shutil.which("memcached") is not None and importlib.util.find_spec("pymemcache") is not None,
    }
    rows = {
        "diskcache": ["get_random.diskcache", "get_many.diskcache_loop", "put.diskcache",
                      "memory.diskcache_file", "memory.diskcache_reader"],
        "memcached": ["get_random.memcached", "get_many.memcached_get_many", "put.memcached",
                      "memory.memcached_server", "memory.memcached_reader"],
    }
    for peer, ids in rows.items():
        for mid in ids:
            m = measures[mid]
            if present[peer]:
                assert not m.get("skipped") and _positive(m["median"]), f"{mid}: {m}"
            else:
                assert peer in m["skipped"].lower(), f"{mid}: {m}"
    if present["memcached"]:
        assert doc["memcached_skipped"] is None and doc["machine"]["memcached_server"]

    # the reader rows: USS beyond a bare interpreter, measured from outside
    bare = measures["memory.bare_reader"]
    assert _positive(bare["median"])
    mine = measures["memory.shmstore_reader"]
    assert mine["uss"] - mine["bare_uss"] == mine["median"] > 0
    assert mine["target_bytes"] == 4 << 20 and isinstance(mine["meets_target"], bool)

    tmpdir = doc["config"]["tmpdir"]
    assert tmpdir and not os.path.exists(tmpdir), f"bench left {tmpdir}"
    stray = [(p.info["pid"], " ".join(p.info["cmdline"] or [])[:200])
             for p in psutil.process_iter(["pid", "cmdline"])
             if tmpdir in " ".join(p.info["cmdline"] or [])]
    assert not stray, f"bench left processes running: {stray}"
