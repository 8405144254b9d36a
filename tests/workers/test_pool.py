"""shmstore.workers.pool with real pools: fork, spawn and forkserver workers,
multiprocessing.Pool and concurrent.futures.ProcessPoolExecutor, and real SIGKILLs."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

import shmstore
from shmstore.workers import pool
from tests.helpers.processes import attached_pids, reap_pids, wait_for

METHODS = ["fork", "spawn", "forkserver"]
KINDS = ["Pool", "ProcessPoolExecutor"]
TASKS = 8
STEPS = 25  # increments per task

#: The parent's handle, seen by forked workers as the very same object.
_PARENT_HANDLE: shmstore.Store | None = None


# -- tasks (module level: spawn and forkserver workers import them) -----------------


def _count(key: str, n: int) -> tuple[int, bool, object, int]:
    """n increments of a per-task counter and of a shared total, then an atomic batch."""
    s = pool.store()
    for _ in range(n):
        s.incr(key)
        s.incr("total")
    with s.batch() as b:
        b.put(f"{key}:a", n)
        b.put(f"{key}:b", n)
    return os.getpid(), s is _PARENT_HANDLE, s.get("seed"), s.get(key)


def _victim() -> int:
    """Write until killed (bounded, so a test bug cannot hang a worker forever)."""
    s = pool.store()
    s.put("victim-pid", os.getpid())
    deadline = time.monotonic() + 60
    i = 0
    while time.monotonic() < deadline:
        i += 1
        with s.batch() as b:
            b.put("va", i)
            b.put("vb", i)
        s.put(f"q{i % 10}", i, wait=False)
        s.incr("victim-n")
    return i


# -- helpers -------------------------------------------------------------------------


def _run(kind: str, ctx, name: str, jobs: list[tuple[str, int]]) -> list[tuple]:
    if kind == "Pool":
        p = ctx.Pool(3, initializer=pool.init_worker, initargs=(name,))
        try:
            results = p.starmap(_count, jobs, chunksize=1)
            p.close()
            p.join()  # workers exit normally: their handles are flushed and closed
        finally:
            p.terminate()
            p.join()
        return results
    with ProcessPoolExecutor(3, mp_context=ctx, initializer=pool.init_worker, initargs=(name,)) as ex:
        futures = [ex.submit(_count, *job) for job in jobs]
        return [f.result(timeout=60) for f in futures]


def _consistent(s: shmstore.Store) -> None:
    """Every record is readable once and the record count agrees with a scan."""
    keys = list(s.keys())
    assert len(keys) == len(set(keys)) == len(s), (len(keys), len(set(keys)), len(s))


# -- tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_pool_workers_share_counters_and_records(names, method, kind):
    global _PARENT_HANDLE
    name = names("pool")
    ctx = mp.get_context(method)
    jobs = [(f"task{i}", STEPS) for i in range(TASKS)]
    with pool.shared(name, capacity=1000) as s:
        s.put("seed", 42)  # the parent writes too: it holds a client block
        _PARENT_HANDLE = s
        try:
            results = _run(kind, ctx, name, jobs)
        finally:
            _PARENT_HANDLE = None
        assert s.get("total") == TASKS * STEPS
        for key, n in jobs:
            assert s.get(key) == n and s.get_many([f"{key}:a", f"{key}:b"]) == [n, n]
        pids = {pid for pid, _, _, _ in results}
        assert os.getpid() not in pids and 1 <= len(pids) <= 3
        assert all(seed == 42 and own == STEPS for _, _, seed, own in results), results
        # A forked worker reuses the parent's handle; spawned ones connect their own.
        assert {inherited for _, inherited, _, _ in results} == {method == "fork"}, results
        # The workers exited normally: only the parent's client block is left.
        wait_for(lambda: attached_pids(name) == [os.getpid()], timeout=30,
                 what=f"the workers' client blocks released ({attached_pids(name)})")
        _consistent(s)
    with shmstore.connect(name) as s:
        assert s.stats().coordinator_pid is None  # shared() stopped the coordinator


def test_handle_opened_before_fork_reads_without_reattaching_and_writes(names):
    name = names("fork")
    with pool.shared(name, capacity=100) as s:
        s.put("before", "parent")  # the parent's write channel exists before the fork
        segment = f"/dev/shm/shmstore.{name}\n"
        pid = os.fork()
        if pid == 0:  # the child leaves through os._exit whatever happens
            code = 70
            try:
                with open("/proc/self/maps") as f:
                    before = sum(line.endswith(segment) for line in f)
                ok = pool.store() is s and s.get("before") == "parent" and s.get_many(["before"]) == ["parent"]
                with open("/proc/self/maps") as f:
                    after = sum(line.endswith(segment) for line in f)
                s.put("from-child", os.getpid())  # opens the child's own write channel
                s.incr("n")
                code = 0 if ok and before == after == 1 else 71
            finally:
                os._exit(code)
        try:
            _, status = os.waitpid(pid, 0)
        finally:
            reap_pids([pid])
        assert os.waitstatus_to_exitcode(status) == 0
        assert s.get("from-child") == pid and s.get("n") == 1
        assert s.incr("n") == 2  # the parent's own channel still works
        wait_for(lambda: attached_pids(name) == [os.getpid()], timeout=30,
                 what="the child's client block reclaimed")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_worker_sigkilled_mid_task_corrupts_nothing(names, method, kind):
    name = names("kill")
    ctx = mp.get_context(method)
    jobs = [(f"task{i}", STEPS) for i in range(4)]
    with pool.shared(name, capacity=1000, max_clients=8) as s:
        s.put("seed", 1)
        if kind == "Pool":
            p = ctx.Pool(2, initializer=pool.init_worker, initargs=(name,))
            victim_pid = None
            try:
                doomed = p.apply_async(_victim)
                others = [p.apply_async(_count, job) for job in jobs]
                victim_pid = wait_for(lambda: s.get("victim-pid"), timeout=60, what="the victim task")
                wait_for(lambda: (s.get("victim-n") or 0) >= 5, timeout=30, what="the victim writing")
                os.kill(victim_pid, signal.SIGKILL)
                # The pool replaces the dead worker; the other tasks all finish.
                results = [r.get(timeout=60) for r in others]
                assert not doomed.ready()  # its result died with its worker
            finally:
                p.terminate()
                p.join()
            assert all(own == STEPS for _, _, _, own in results), results
            finished = [key for key, _ in jobs]
        else:
            with ProcessPoolExecutor(2, mp_context=ctx, initializer=pool.init_worker,
                                     initargs=(name,)) as ex:
                doomed = ex.submit(_victim)
                others = [ex.submit(_count, *job) for job in jobs]
                victim_pid = wait_for(lambda: s.get("victim-pid"), timeout=60, what="the victim task")
                wait_for(lambda: (s.get("victim-n") or 0) >= 5, timeout=30, what="the victim writing")
                os.kill(victim_pid, signal.SIGKILL)
                with pytest.raises(BrokenProcessPool):
                    doomed.result(timeout=60)
                finished = []
                for (key, _), f in zip(jobs, others):
                    try:
                        f.result(timeout=60)
                        finished.append(key)
                    except BrokenProcessPool:
                        pass  # the broken pool stopped it, maybe halfway
        # Nothing half-done is visible: batches whole, finished tasks exact.
        va, vb = s.get_many(["va", "vb"])
        assert va == vb and va >= 5, (va, vb)
        for key, n in jobs:
            done = s.get(key, 0)
            assert done == n if key in finished else 0 <= done <= n, (key, done, finished)
            if s.get(f"{key}:a") is not None:
                assert s.get_many([f"{key}:a", f"{key}:b"]) == [n, n]
        # Other processes keep writing: the parent, and a new pool with exact totals.
        assert s.incr("after") == 1
        before = s.get("total", 0)
        results = _run(kind, ctx, name, [(f"again{i}", STEPS) for i in range(3)])
        assert s.get("total") == before + 3 * STEPS
        assert all(own == STEPS for _, _, _, own in results)
        # The dead worker's client block came back to the coordinator.
        wait_for(lambda: attached_pids(name) == [os.getpid()], timeout=30,
                 what=f"dead clients' blocks reclaimed ({attached_pids(name)})")
        assert victim_pid not in attached_pids(name)
        assert s.stats().clients_reclaimed >= 1
        _consistent(s)


def test_store_without_init_names_the_fix():
    with pytest.raises(shmstore.StoreNotFoundError, match="init_worker"):
        pool.store()
