"""shmstore.workers.gunicorn against a real gunicorn: a master, 4 workers, real HTTP.

Each run starts ``python -m gunicorn`` with a gunicorn.conf.py that uses the hooks
exactly as the docs say, serves ``shmstore.workers.example_app``, drives it from
client threads, SIGKILLs a worker mid-traffic, recycles workers with max_requests,
then stops gunicorn with SIGTERM and checks that nothing is left behind.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

import shmstore
from shmstore.workers.gunicorn import chain, hooks
from tests.helpers.processes import attached_pids, reap, shm_objects, wait_for

WORKERS = 4
CLIENT_THREADS = 4
ROUNDS = 40  # per client thread and phase: an /incr each, a /put + /get every 4th
MAX_REQUESTS = 50  # small: every worker is recycled several times per run

CONF = """\
from shmstore.workers.gunicorn import hooks
globals().update(hooks({name!r}, capacity=10_000, max_clients=32))

bind = "127.0.0.1:{port}"
workers = {workers}
worker_class = {worker_class!r}
threads = {threads}
preload_app = {preload}
max_requests = {max_requests}
max_requests_jitter = 0
timeout = 60
graceful_timeout = 10
loglevel = "info"
control_socket_disable = True
"""

# Never through an http_proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, timeout: float = 20.0) -> tuple[int | None, dict | str]:
    """(status, JSON body), or (None, the error) when no HTTP answer came."""
    try:
        with _opener.open(base + path, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"{}")
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e)


class Tally:
    """What the client threads saw, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: list[int] = []  # what each successful /incr returned
        self.incr_failed = 0  # /incr requests that got no answer
        self.pids: set[int] = set()  # workers that answered
        self.cross_reads = 0  # a /get answered by another worker than the /put
        self.bad_reads: list[str] = []  # a /get that missed a completed /put
        self.errors: list[str] = []  # anything unexpected in a client thread
        self.after_kill = 0  # successful /incr after the SIGKILL
        self.killed = threading.Event()
        self.progress = threading.Condition(self.lock)


def _client(base: str, tag: str, rounds: int, t: Tally) -> None:
    try:
        for i in range(rounds):
            status, body = _get(base, "/incr")
            with t.lock:
                if status == 200:
                    t.values.append(body["value"])
                    t.pids.add(body["pid"])
                    t.after_kill += t.killed.is_set()
                    t.progress.notify_all()
                elif status is None:
                    t.incr_failed += 1
                else:
                    t.errors.append(f"/incr: {status} {body}")
            if i % 4 == 0:
                _put_then_get(base, f"{tag}-{i}", t)
    except Exception as e:  # noqa: BLE001 - reported by the test, never lost in a thread
        with t.lock:
            t.errors.append(f"{tag}: {e!r}")


def _put_then_get(base: str, key: str, t: Tally) -> None:
    """Write through one worker, then read until another worker answers."""
    status, body = _get(base, f"/put?k={key}&v=v-{key}")
    if status != 200:
        return  # a put cut off by the kill; nothing to check
    writer = body["pid"]
    for _ in range(50):
        status, body = _get(base, f"/get?k={key}")
        if status is None:
            continue
        if status != 200 or body["value"] != f"v-{key}":
            with t.lock:
                t.bad_reads.append(f"{key}: {status} {body} after a put by {writer}")
            return
        if body["pid"] != writer:
            with t.lock:
                t.cross_reads += 1
            return


def _run_clients(base: str, phase: str, t: Tally) -> list[threading.Thread]:
    threads = [threading.Thread(target=_client, args=(base, f"{phase}{j}", ROUNDS, t), daemon=True)
               for j in range(CLIENT_THREADS)]
    for th in threads:
        th.start()
    return threads


def _workers(master: int, coordinator: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(master).children() if c.pid != coordinator}
    except psutil.NoSuchProcess:
        return set()


def _fixed_objects(objects: list[str]) -> list[str]:
    """The store's /dev/shm objects but the reply semaphores (one per claimed block)."""
    return [o for o in objects if not re.search(r"@r[0-9]+$", o)]


@pytest.mark.parametrize(("worker_class", "preload"), [
    ("sync", False), ("sync", True), ("gthread", False), ("gthread", True),
])
def test_gunicorn_workers_share_one_store(names, tmp_path: Path, worker_class: str, preload: bool):
    name = names("gu")
    port = _free_port()
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(CONF.format(name=name, port=port, workers=WORKERS, worker_class=worker_class,
                                threads=2 if worker_class == "gthread" else 1, preload=preload,
                                max_requests=MAX_REQUESTS))
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(conf), "shmstore.workers.example_app:app"],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def log_text() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    def up() -> bool:
        assert proc.poll() is None, f"gunicorn exited with {proc.returncode}:\n{log_text()}"
        return _get(base, "/pid", timeout=2)[0] == 200

    sleeper = None
    try:
        wait_for(up, timeout=60, interval=0.1, what="gunicorn to answer")
        reader = shmstore.connect(name)  # the test only reads: it claims no client block
        try:
            coord = reader.stats().coordinator_pid
            assert coord is not None and psutil.Process(coord).ppid() == proc.pid, \
                "the coordinator is not a child of the master"
            # Reply semaphores are made per claimed client block (issue 14): counted apart.
            objects_at_boot = _fixed_objects(shm_objects(name))
            t = Tally()

            # Phase 1: traffic from 4 threads.
            for th in _run_clients(base, "a", t):
                th.join(120)

            # Phase 2: park a request in one worker, SIGKILL that worker mid-traffic.
            tag = uuid.uuid4().hex[:8]
            sleep_result: list = []
            sleeper = threading.Thread(target=lambda: sleep_result.append(
                _get(base, f"/sleep?s=30&tag={tag}", timeout=60)), daemon=True)
            sleeper.start()
            victim = wait_for(lambda: reader.get(f"sleeping:{tag}"), timeout=30, what="the sleeping worker")
            with t.lock:
                started = len(t.values)
            threads = _run_clients(base, "b", t)
            with t.lock:
                t.progress.wait_for(lambda: len(t.values) >= started + 20 or not any(
                    th.is_alive() for th in threads), timeout=60)
            os.kill(victim, signal.SIGKILL)
            t.killed.set()
            for th in threads:
                th.join(120)
            sleeper.join(60)

            # The counter: every successful /incr got its own value, and the counter
            # equals them plus increments whose reply the kill cut off (none for sync
            # workers: the victim held only the sleeping request).
            counter = reader.get("hits")
            values = sorted(t.values)
            lost = counter - len(values)
            report = (f"counter {counter}, {len(values)} successful /incr, {t.incr_failed} without "
                      f"an answer, errors {t.errors[:5]}, bad reads {t.bad_reads[:5]}\n{log_text()}")
            print(f"{worker_class} preload={preload}: {len(values)} /incr ok, {t.incr_failed} cut off, "
                  f"{lost} applied without a reply, {t.cross_reads} cross-worker reads, "
                  f"{len(t.pids)} worker pids, {t.after_kill} /incr after the kill")
            assert not t.errors and not t.bad_reads, report
            assert len(set(values)) == len(values) and values[-1] <= counter, report
            assert 0 <= lost <= t.incr_failed, report
            if worker_class == "sync":
                assert t.incr_failed == 0 and counter == len(values), report
            assert t.after_kill > 0, "nothing was served after the SIGKILL: " + report
            assert sleep_result and sleep_result[0][0] is None, sleep_result  # its worker died
            assert t.cross_reads > 0, "no read was answered by another worker than the write"
            assert len(t.pids) > WORKERS, f"workers were not recycled: {sorted(t.pids)}"
            assert "Autorestarting worker" in log_path.read_text(), log_text()

            # No leaks while serving: every live worker holds exactly one client block,
            # dead and recycled ones none, and no segment or semaphore was added.
            def settled() -> bool:
                live = _workers(proc.pid, coord)
                return len(live) == WORKERS and attached_pids(name) == sorted(live)

            wait_for(settled, timeout=30, interval=0.05,
                     what=f"client blocks == live workers ({attached_pids(name)} vs "
                          f"{sorted(_workers(proc.pid, coord))})")
            assert victim not in attached_pids(name)
            assert reader.stats().clients_reclaimed >= 1
            objects = shm_objects(name)
            assert _fixed_objects(objects) == objects_at_boot
            assert len(objects) - len(objects_at_boot) == len(attached_pids(name)), objects
            assert reader.get("hits") == counter  # nobody wrote since
        finally:
            reader.close()

        # SIGTERM to the master: gunicorn stops its workers, then on_exit the coordinator.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_text()
        assert not psutil.pid_exists(coord) or psutil.Process(coord).status() == psutil.STATUS_ZOMBIE
        with shmstore.connect(name) as s:
            assert s.stats().coordinator_pid is None
            assert s.get("hits") == counter  # the segment outlives the server
        assert shmstore.destroy(name)
        assert shm_objects(name) == []
    finally:
        reap(proc, timeout=30)
        if sleeper is not None:
            sleeper.join(60)


def test_hooks_name_the_extra_when_gunicorn_is_missing():
    code = (
        "import sys; sys.modules['gunicorn'] = None\n"
        "import shmstore.workers.gunicorn as g\n"  # importing needs no gunicorn
        "try:\n    g.hooks('app')\nexcept ImportError as e:\n    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'shmstore[gunicorn]'" in r.stdout, r.stderr


def test_hooks_and_chain_pass_gunicorn_arity_checks():
    from gunicorn.config import Config

    cfg = Config()
    shm = hooks("t-chain-check", capacity=10)  # no side effect until gunicorn calls them
    calls = []

    def post_fork(server, worker):
        calls.append(("mine", server, worker))

    for hook_name, fn in shm.items():
        cfg.set(hook_name, fn)  # gunicorn validates the arity here
    cfg.set("post_fork", chain(lambda server, worker: calls.append(("first", server, worker)), post_fork))
    cfg.post_fork("srv", "wrk")
    assert calls == [("first", "srv", "wrk"), ("mine", "srv", "wrk")]
    with pytest.raises(TypeError, match="different numbers"):
        chain(shm["on_exit"], post_fork)
    with pytest.raises(TypeError):
        hooks("t-chain-check", capcity=10)  # a typo is caught in gunicorn.conf.py


def test_reexec_usr2_hands_the_coordinator_to_the_new_master(names, tmp_path: Path):
    """USR2: the new master takes the coordinator over; the old master's exit leaves it."""
    name = names("usr2")
    port = _free_port()
    pidfile = tmp_path / "gunicorn.pid"
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(CONF.format(name=name, port=port, workers=2, worker_class="sync", threads=1,
                                preload=False, max_requests=0) + f"pidfile = {str(pidfile)!r}\n")
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        old = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(conf), "shmstore.workers.example_app:app"],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    new_pid = None

    def log_text() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    def incr() -> int:
        status, body = _get(base, "/incr")
        assert status == 200, f"{status} {body}\n{log_text()}"
        return body["value"]

    try:
        wait_for(lambda: old.poll() is None and _get(base, "/pid", timeout=2)[0] == 200,
                 timeout=60, interval=0.1, what="gunicorn to answer")
        reader = shmstore.connect(name)
        try:
            first = reader.stats().coordinator_pid
            assert [incr() for _ in range(3)] == [1, 2, 3]
            old.send_signal(signal.SIGUSR2)
            pidfile2 = Path(f"{pidfile}.2")
            new_pid = int(wait_for(lambda: pidfile2.exists() and pidfile2.read_text().strip(),
                                   timeout=60, what="the new master's pidfile"))

            def handed_over() -> bool:
                pid = reader.stats().coordinator_pid
                return pid is not None and pid != first and psutil.Process(pid).ppid() == new_pid

            wait_for(handed_over, timeout=60, what=f"the new master's coordinator\n{log_text()}")
            second = reader.stats().coordinator_pid
            wait_for(lambda: len(_workers(new_pid, second)) == 2, timeout=60, what="the new workers")
            values = [incr() for _ in range(10)]  # old and new workers share the new coordinator
            old.send_signal(signal.SIGTERM)
            assert old.wait(60) == 0, log_text()
            assert reader.stats().coordinator_pid == second  # the old master left it alone
            values += [incr() for _ in range(10)]
            assert values == list(range(4, 24)) and reader.get("hits") == 23
        finally:
            reader.close()
        os.kill(new_pid, signal.SIGTERM)
        wait_for(lambda: not psutil.pid_exists(new_pid) or psutil.Process(new_pid).status()
                 == psutil.STATUS_ZOMBIE, timeout=60, what="the new master to exit")
        wait_for(lambda: not psutil.pid_exists(second), timeout=30, what="its coordinator to exit")
        assert shmstore.destroy(name)
    finally:
        reap(old, timeout=30)
        if new_pid is not None and psutil.pid_exists(new_pid):
            os.kill(new_pid, signal.SIGKILL)  # not our child: its workers and coordinator follow it
