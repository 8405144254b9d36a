"""The example Django app (examples/django_app) under a real Gunicorn: one shared cache.

Gunicorn runs as ``python -m gunicorn -c examples/django_app/gunicorn.conf.py`` with 4
sync workers and the ``shmstore.django.ShmStoreCache`` backend, the store served by the
hooks of :mod:`shmstore.workers.gunicorn`: values set through one worker are read by
the others, and a worker SIGKILLed (Gunicorn forks a new one) changes no record and no
answer.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import psutil
import pytest

import shmstore
from scripts.django_bench import AppServer
from tests.helpers.processes import attached_pids, wait_for

pytest.importorskip("django", reason="Django is not installed (pip install -e '.[dev]')")
pytest.importorskip("gunicorn", reason="Gunicorn is not installed (pip install -e '.[dev]')")

WORKERS = 4
#: Distinct workers that must read a value set through one of them.
READERS = 3
OK = 200
#: Values set through the app before the kill, each through whichever worker took it.
VALUES = {f"greeting-{i}": f"hello {i} \u00e9\u00e8 <&>" for i in range(8)}
#: Requests sent at once, so that idle workers take some (sync workers: one each).
PARALLEL = 4


def _gets(server: AppServer, key: str, n: int) -> list[tuple[int, dict]]:
    """``n`` GETs of /get?k=KEY, ``PARALLEL`` at a time: [(status, body)]."""
    out: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            answer = server.get_json("/get?" + urlencode({"k": key}))
        except (OSError, http.client.HTTPException, ValueError) as e:  # no (JSON) answer
            answer = (None, {"error": repr(e)})
        with lock:
            out.append(answer)

    for start in range(0, n, PARALLEL):
        threads = [threading.Thread(target=one) for _ in range(min(PARALLEL, n - start))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    return out


def _read_from_workers(server: AppServer, keys: list[str], want_pids: int,
                       timeout: float = 60.0) -> dict[int, set[str]]:
    """Read ``keys`` until ``want_pids`` workers each answered every one of them with
    its value; any other answer fails the test. Returns {pid: keys it answered}."""
    answered: dict[int, set[str]] = {}
    deadline = time.monotonic() + timeout  # only guards against a hang
    while sum(got >= set(keys) for got in answered.values()) < want_pids:
        assert time.monotonic() < deadline, f"{want_pids} workers did not all answer {keys}: {answered}"
        for key in keys:
            for status, body in _gets(server, key, PARALLEL):
                assert status == OK and body["value"] == VALUES[key], \
                    f"{key}: {status} {body}\n{server.log_tail()}"
                answered.setdefault(body["pid"], set()).add(key)
    return answered


def _records(name: str) -> dict[bytes, tuple[object, int]]:
    """Every record of the store: key -> (stored value, version), read straight from
    shared memory (the test claims no client block)."""
    with shmstore.connect(name) as s:
        with s.snapshot() as snap:
            items = dict(snap.items())
        return {k: (v, s.version(k)) for k, v in items.items()}


def _workers(server: AppServer, coordinator: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(server.pid).children() if c.pid != coordinator}
    except psutil.NoSuchProcess:
        return set()


def test_workers_share_one_cache_and_a_killed_worker_changes_nothing(names, tmp_path: Path):
    name = names("dj")
    server = AppServer("shmstore", name, tmp_path / "gunicorn.log", workers=WORKERS)
    try:
        server.start()
        with shmstore.connect(name) as reader:
            coordinator = reader.stats().coordinator_pid
        assert coordinator is not None and psutil.Process(coordinator).ppid() == server.pid, \
            f"the coordinator is not the Gunicorn master's child\n{server.log_tail()}"

        # A value set through one worker is read by the others.
        setters = set()
        for key, value in VALUES.items():
            status, body = server.get_json("/set?" + urlencode({"k": key, "v": value}))
            assert status == OK, f"{status} {body}\n{server.log_tail()}"
            setters.add(body["pid"])
        first = next(iter(VALUES))
        answered = _read_from_workers(server, [first], want_pids=READERS)
        assert len(answered) >= READERS
        _read_from_workers(server, list(VALUES), want_pids=WORKERS)

        # One record per value, under Django's key (":1:" + key, the default KEY_PREFIX
        # and VERSION), holding the str itself (plain data is stored as msgpack).
        records = _records(name)
        assert {k: v for k, (v, _) in records.items()} == \
            {f":1:{k}".encode(): v for k, v in VALUES.items()}, records

        # SIGKILL one worker: Gunicorn replaces it, nothing else changes.
        before = _workers(server, coordinator)
        assert len(before) == WORKERS, (before, server.log_tail())
        victim = min(before)
        assert victim in attached_pids(name)  # post_fork claimed its client block
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(after := _workers(server, coordinator)) == WORKERS and victim not in after,
                 timeout=60, interval=0.05, what=f"Gunicorn to replace worker {victim}")
        after = _workers(server, coordinator)
        # The victim's block is reclaimed, or taken over by its successor (not counted
        # in clients_reclaimed then): either way only live workers hold one.
        wait_for(lambda: attached_pids(name) == sorted(after), timeout=30, interval=0.05,
                 what=f"client blocks == live workers ({attached_pids(name)} vs {sorted(after)})")

        answered = _read_from_workers(server, list(VALUES), want_pids=WORKERS)
        full = {pid for pid, got in answered.items() if got >= set(VALUES)}
        assert full == after, f"every live worker answers every value: {answered} vs {after}"
        assert _records(name) == records, "the store's records changed"
        with shmstore.connect(name) as reader:
            assert reader.stats().coordinator_pid == coordinator  # the same one throughout

        # SIGTERM: Gunicorn stops its workers, then its hooks stop the coordinator.
        assert server.stop() == 0, server.log_tail()
        assert not psutil.pid_exists(coordinator) or \
            psutil.Process(coordinator).status() == psutil.STATUS_ZOMBIE
    finally:
        server.stop()  # TERM, then KILL of its process group; reaped (names destroys the store)
