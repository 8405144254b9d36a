"""``shmstore cleanup``, ``stress``, ``bench`` and ``stats --watch`` end to end.

Every command runs as ``python -m shmstore ...`` in a subprocess (bench's forwarding
in process, with the runner module stood in). ``cleanup`` is always given this test's
own store names: other tests (and other xdist workers) have stores in /dev/shm whose
coordinator is dead for a moment on purpose.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import types

import pytest

import shmstore
from shmstore import _cli
from shmstore._cli._store_cmds import CLEAR
from shmstore._tools._stress import StressOptions, StressReport
from shmstore._tools._stress_workers import check_final
from shmstore._tools._selfcheck import key_of, make_record
from tests.helpers.processes import python, reap, shm_objects, wait_for
from tests.helpers.cli import assert_error, assert_ok, cli, popen_cli

ZERO_LINES = ("torn reads accepted", "acknowledged writes lost", "version monotonicity violations",
              "missing records", "unexpected errors")


def assert_zero_report(out: str) -> None:
    for label in ZERO_LINES:
        m = re.search(rf"^\s+{label}\s+(\d+)", out, re.M)
        assert m and m.group(1) == "0", f"{label!r} is not 0:\n{out}"


# -- cleanup ------------------------------------------------------------------------------


def test_cleanup_lists_then_removes_a_store_whose_coordinator_was_killed(served):
    leaked, coord = served("leak", capacity=50)
    live, _ = served("live", capacity=50)
    with shmstore.connect(leaked) as s:
        s.put("k", 1)
    coord.kill()  # SIGKILL: its segment, channel and semaphores stay behind, orphaned
    before = shm_objects(leaked)
    assert f"shmstore.{leaked}@ch" in before

    out = assert_ok(cli("cleanup", leaked, live, "--dry-run", "--verbose"))
    assert re.search(rf"^would remove {leaked}: its coordinator \(pid {coord.pid}\) died", out, re.M), out
    assert re.search(rf"^kept {live}: served by a live coordinator", out, re.M), out
    assert shm_objects(leaked) == before  # a dry run removes nothing

    # A live process that maps it keeps it: readers still use its records.
    reader = python("import shmstore, sys; s = shmstore.connect(sys.argv[1]); print(s.get('k'), flush=True); "
                    "sys.stdin.readline()", leaked, stdin=subprocess.PIPE)
    try:
        assert reader.stdout.readline().strip() == "1"
        out = assert_ok(cli("cleanup", leaked, "-v"))
        assert re.search(rf"^kept {leaked}: mapped by live process\(es\) {reader.pid}", out, re.M), out
        assert shm_objects(leaked) == before
    finally:
        reap(reader)

    out = assert_ok(cli("cleanup", "--prefix", leaked))
    assert re.search(rf"^removed {leaked}: ", out, re.M), out
    assert shm_objects(leaked) == []
    assert shm_objects(live)  # untouched
    with shmstore.connect(live) as s:
        s.put("still", "served")


def test_cleanup_keeps_a_cleanly_stopped_store_and_removes_orphan_pieces(served, names):
    stopped, coord = served("stopped", capacity=50)
    coord.stop()
    out = assert_ok(cli("cleanup", stopped, "--dry-run", "-v"))
    assert re.search(rf"^kept {stopped}: stopped cleanly", out, re.M), out
    # Pieces of a store whose segment is gone (a semaphore its coordinator left).
    orphan = names("orphan")
    import posix_ipc

    posix_ipc.Semaphore(f"/shmstore.{orphan}@bell", posix_ipc.O_CREX, mode=0o600).close()
    assert shm_objects(orphan) == [f"sem.shmstore.{orphan}@bell"]
    out = assert_ok(cli("cleanup", orphan))
    assert re.search(rf"^removed {orphan}: pieces of a store whose data segment is gone", out, re.M), out
    assert shm_objects(orphan) == []


def test_cleanup_errors_are_one_line():
    assert_error(cli("cleanup", "no/such name"), 1, "invalid store name")
    assert_error(cli("cleanup", "--bogus"), 2)


# -- bench -----------------------------------------------------------------------------------


def test_bench_forwards_its_arguments_to_the_runner(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("shmstore._tools._bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "shmstore._tools._bench", fake)
    assert _cli.main(["bench", "--", "--quick", "--json", "x"]) == 3
    assert _cli.main(["bench"]) == 3
    assert _cli.main(["bench", "--quick", "-n", "5"]) == 3  # no `--` needed
    assert seen == [["--quick", "--json", "x"], [], ["--quick", "-n", "5"]]


def test_bench_without_the_runner_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "shmstore._tools._bench", None)  # import fails as if missing
    assert _cli.main(["bench", "--", "--quick"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("shmstore: error: the benchmark runner"), err


# -- stats --watch ---------------------------------------------------------------------------


def test_stats_watch_redraws_in_place_on_a_terminal(served):
    n, _ = served(capacity=100)
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "shmstore", "stats", n, "--watch", "--interval", "0.1"],
                         stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    try:
        buf = b""
        deadline = time.monotonic() + 60
        while buf.count(CLEAR.encode()) < 3 and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                buf += os.read(master, 65536)
        frames = buf.decode().split(CLEAR)
        assert len(frames) >= 4 and frames[0] == "", buf[:300]  # each redraw starts at home
        assert all("ops/s" in f and "Ctrl-C to stop" in f for f in frames[1:3])
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0
    finally:
        os.close(master)
        reap(p)


# -- stress ----------------------------------------------------------------------------------


def test_stress_with_crash_injection_reports_zero_violations(names):
    n = names("stress")
    r = cli("stress", "--seconds", "3", "--readers", "2", "--writers", "2", "--keys", "64",
            "--kill-coordinator", "0.7", "--kill-clients", "0.5", "--name", n, "--seed", "7")
    out = r.stdout
    assert r.returncode == 0, f"exit {r.returncode}\n{out}\n{r.stderr[-2000:]}"
    assert_zero_report(out)
    kills = re.search(r"coordinator killed (\d+)x, readers killed (\d+)x, writers killed (\d+)x", out)
    assert kills and int(kills.group(1)) >= 1 and int(kills.group(2)) + int(kills.group(3)) >= 1, out
    reads = int(re.search(r"^\s+reads\s+([\d,]+)", out, re.M).group(1).replace(",", ""))
    writes = int(re.search(r"^\s+writes\s+([\d,]+)", out, re.M).group(1).replace(",", ""))
    assert reads > 0 and writes > 0 and out.rstrip().endswith("result: OK")
    assert "[" in r.stderr  # the progress bar (plain lines: stderr is no tty here)
    assert shm_objects(n) == []


def test_stress_durable_store_survives_kills_and_a_rebuild_from_disk(names):
    n = names("stressd")
    r = cli("stress", "--seconds", "2", "--readers", "1", "--writers", "2", "--keys", "32",
            "--sync", "always", "--kill-coordinator", "0.6", "--kill-clients", "0.8", "--name", n,
            "--no-progress")
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-2000:]}"
    assert_zero_report(r.stdout)
    assert "checked again after a rebuild from disk" in r.stdout
    assert r.stderr.count("[") == 0  # --no-progress
    assert shm_objects(n) == []


def test_stress_ctrl_c_prints_the_partial_report_and_leaves_nothing(names):
    n = names("stressint")
    p = popen_cli("stress", "--seconds", "300", "--readers", "1", "--writers", "1", "--keys", "16",
                  "--kill-clients", "0.5", "--name", n)
    try:
        def busy() -> bool:
            try:
                with shmstore.connect(n, timeout=1) as s:
                    return s.stats().ops > 200
            except shmstore.ShmStoreError:
                return False

        wait_for(busy, timeout=60, interval=0.05, what="the stress run to write")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        reap(p)
    assert p.returncode == 130, f"exit {p.returncode}\n{out}\n{err[-2000:]}"  # interrupted, clean
    assert "PARTIAL report (interrupted)" in out and "Traceback" not in err
    assert_zero_report(out)
    assert out.rstrip().endswith("result: OK (so far)")
    assert shm_objects(n) == []


def test_stress_usage_errors_exit_2():
    assert_error(cli("stress", "--writers", "5", "--keys", "4"), 2, "--keys")
    assert_error(cli("stress", "--readers", "-1"), 2)
    assert_error(cli("stress", "--seconds", "0"), 2, "--seconds")


def test_stress_report_fails_on_a_lost_acknowledged_write(served):
    n, _ = served(capacity=10)
    size = 16
    with shmstore.connect(n) as s:
        versions = [s.put(key_of(i), make_record(key_of(i), 3, size)) for i in range(2)]
        # Key 0's writer was told counter 4 was written: the store holds 3 - lost.
        lost, bad, examples = check_final(s, 2, size, {0: [(3, versions[0]), (4, versions[0] + 10)],
                                                          1: [(3, versions[1])]})
    assert (lost, bad) == (1, 0) and "acknowledged counter 4" in examples[0]
    report = StressReport(options=StressOptions(), seed=1, lost=lost)
    assert not report.ok and report.exit_code() == 1
    assert "acknowledged writes lost         1" in report.text()
    assert StressReport(options=StressOptions(), seed=1, interrupted=True).exit_code() == 130
    assert StressReport(options=StressOptions(), seed=1).exit_code() == 0


@pytest.mark.slow
def test_stress_long_run_with_crashes(names):
    n = names("stresslong")
    r = cli("stress", "--seconds", "30", "--readers", "3", "--writers", "3", "--sync", "periodic",
            "--kill-coordinator", "2", "--kill-clients", "1", "--name", n, "--no-progress", timeout=300)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-2000:]}"
    assert_zero_report(r.stdout)


def test_stats_table_lists_live_clients_and_the_new_counters(served):
    n, coord = served(capacity=100)
    with shmstore.connect(n) as s:
        for i in range(5):
            s.put(f"k{i}", i)
        s.get("k1")
        s.get("k1")  # answered from the read cache
        s.incr("hits")  # publishes the totals, the gets' reads included
        s.get("k2")  # counted in the process; published at the next publish moment
        out = assert_ok(cli("stats", n))
    assert re.search(r"by kind\s+put 5, delete 0, cas 0, incr 1, batch 0", out), out
    assert re.search(r"clients\s+1 live", out), out
    # pid, age, reads 2, cache hits 1, retries 0, writes 6, timeouts 0
    assert re.search(rf"^\s+{os.getpid()}\s+\d+s\s+2\s+1\s+0\s+6\s+0\s", out, re.M), out
    assert re.search(rf"coordinator\s+running, pid {coord.pid}, up \d+ s, RSS [\d.]+ MiB", out), out
