"""scripts/read_profile.py: its loops run and clean up, and its summary adds up right."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.processes import shm_objects

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "read_profile.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.pid = proc.pid
    return done


@pytest.mark.parametrize("args", [["get", "--cache", "0"], ["get", "--hot"], ["get_many"]])
def test_loops_run_and_leave_nothing(args):
    out = _run(*args, "--seconds", "0.3")
    assert out.returncode == 0, out.stderr
    assert f"{args[0]}: " in out.stdout and "ns per call" in out.stdout
    # The loop's store is named after the script's pid: nothing of it is left.
    assert shm_objects(f"readprof-{out.pid}") == []


def test_summary_counts_only_stacks_within(tmp_path):
    raw = tmp_path / "p.txt"
    raw.write_text(
        "<module> (x.py:1);setup (x.py:5) 50\n"
        "<module> (x.py:1);make_readers.<locals>.get (shmstore/_segment.py:548) 30\n"
        "<module> (x.py:1);make_readers.<locals>.get (shmstore/_segment.py:561) 10\n"
        "<module> (x.py:1);make_readers.<locals>.get (shmstore/_segment.py:548) 20\n"
        "not a stack line\n"
    )
    out = _run("summary", str(raw))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(" 83.3%") and "_segment.py:548" in lines[0]
    assert lines[1].startswith(" 16.7%") and "_segment.py:561" in lines[1]
    assert "60 samples" in lines[-1]


def test_summary_by_callee(tmp_path):
    raw = tmp_path / "p.txt"
    raw.write_text(
        "a (m.py:1);Store.get_many (s.py:9);key_words (k.py:3) 3\n"
        "a (m.py:1);Store.get_many (s.py:9);key_words (k.py:4) 1\n"
        "a (m.py:1);Store.get_many (s.py:12) 4\n"
    )
    out = _run("summary", str(raw), "--within", "get_many (", "--callees")
    assert out.returncode == 0, out.stderr
    assert [ln.split()[0] for ln in out.stdout.splitlines()[:2]] == ["50.0%", "50.0%"]
    assert "key_words (k.py)" in out.stdout and "Store.get_many (s.py)" in out.stdout


def test_help():
    out = _run("--help")
    assert out.returncode == 0 and "summary" in out.stdout
