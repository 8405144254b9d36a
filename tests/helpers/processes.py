"""Helpers for tests that cross processes: unique names, readiness polling, reaping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Callable

#: Every store a test creates starts with this, so the session can check for leaks.
TEST_PREFIX = "t-"


def unique_name(tag: str = "") -> str:
    """A store name no other test (or xdist worker) uses."""
    return f"{TEST_PREFIX}{tag[:16]}{uuid.uuid4().hex[:12]}"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
             what: str = "condition") -> object:
    """Poll until ``predicate()`` is truthy; fail with a message after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    """Start ``python -c code`` with the test environment (stdout/stderr piped)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def reap(*procs: subprocess.Popen, timeout: float = 5.0) -> None:
    """TERM, then KILL, then wait: leave no child behind, whatever state it is in."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass


def reap_pids(pids: list[int], timeout: float = 5.0) -> None:
    """The same for forked children known only by pid."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def shm_objects(name: str) -> list[str]:
    """Names in /dev/shm that belong to store ``name`` (segments and semaphores)."""
    return sorted(e for e in os.listdir("/dev/shm")
                  if e.startswith(f"shmstore.{name}") and e[len(f"shmstore.{name}"):][:1] in ("", "@")
                  or e.startswith(f"sem.shmstore.{name}@"))


def attached_pids(name: str) -> list[int]:
    """Pids of the client blocks the coordinator has acknowledged (and not reclaimed)."""
    from shmstore._channel import C_ACK, C_PID, open_channel

    ch = open_channel(name)
    try:
        acked = ch.words(C_ACK) != 0
        pids = ch.words(C_PID)[acked].tolist()
        del acked
        return sorted(pids)
    finally:
        ch.close()


def run_collecting(procs: list, out, count: int, timeout: float = 90.0) -> list:
    """Start multiprocessing ``procs``, take ``count`` results from queue ``out``, join
    them all; every one of them must exit 0. Whatever happens, none is left running."""
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=timeout) for _ in range(count)]
        for p in procs:
            p.join(timeout)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
