"""Running the ``shmstore`` command in a subprocess, and judging what it printed."""

from __future__ import annotations

import subprocess
import sys


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m shmstore ARGS`` to completion (the timeout only guards hangs)."""
    return subprocess.run([sys.executable, "-m", "shmstore", *args], capture_output=True,
                          text=True, timeout=timeout)


def popen_cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shmstore", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def assert_ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def assert_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """One line ``shmstore: error: ...`` on stderr, nothing on stdout, no traceback."""
    lines = r.stderr.splitlines()
    detail = f"exit {r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
    assert r.returncode == code, detail
    assert len(lines) == 1 and lines[0].startswith("shmstore: error: "), detail
    assert "Traceback" not in r.stderr and r.stdout == "", detail
    for needle in needles:
        assert needle in lines[0], detail
    return lines[0]
