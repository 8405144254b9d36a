"""What crosses processes: real fork/spawn children, real SIGKILL, SIGSTOP and restarts."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import threading
import time

import pytest

import shmstore
from shmstore._channel import C_ACK, open_channel
from tests.helpers.processes import python, reap, reap_pids, wait_for

WRITER = """
import sys, shmstore
name, tag = sys.argv[1], sys.argv[2]
s = shmstore.connect(name, timeout=10)
s.incr(f"{tag}-first")  # holds a client block from here on
print("ready", flush=True)
i = 0
while True:
    i += 1
    if i % 3 == 0:
        with s.batch() as b:
            for j in range(20):
                b.put(f"{tag}-b{j}", i)
    elif i % 3 == 1:
        s.put(f"{tag}-{i % 50}", i, wait=False)
    else:
        s.incr(f"{tag}-n")
"""


def test_sigkilled_clients_block_nobody_and_are_reclaimed(served):
    """SIGKILL clients at random points of their write loop, 12 times over."""
    n, _ = served(capacity=5000, max_clients=4)
    seed = int(os.environ.get("SEED", time.time_ns() % 10**9))
    print(f"seed {seed}")
    rng = random.Random(seed)
    s = shmstore.connect(n, timeout=10)
    procs = []
    try:
        for round_ in range(12):
            p = python(WRITER, n, f"w{round_}")
            procs.append(p)
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
            time.sleep(rng.uniform(0.0, 0.05))
            p.kill()
            p.wait()
            # The survivor keeps writing and reading through the same coordinator.
            assert s.incr("survivor") == round_ + 1
            with s.batch() as b:
                b.put("x", round_)
                b.put("y", round_)
            assert s.get_many(["x", "y"]) == [round_, round_]
        # Only 4 client blocks exist, so the 12 writers above (each held one before it
        # printed "ready") prove dead clients' blocks come back, either by reclaim or
        # by a new client taking the lock the kernel dropped. After the last death,
        # only the survivor's block may stay acknowledged.
        ch = open_channel(n)
        try:
            wait_for(lambda: int((ch.words(C_ACK) != 0).sum()) == 1,
                     what=f"dead clients' blocks reclaimed (seed {seed})")
        finally:
            ch.close()
        assert s.stats().clients_reclaimed >= 1
        p = python("import sys, shmstore; s = shmstore.connect(sys.argv[1]); print(s.incr('late'))", n)
        procs.append(p)
        out, err = p.communicate(timeout=30)
        assert out.strip() == "1", err
    finally:
        reap(*procs)
        s.close()


def test_too_many_clients_is_a_clear_error_until_one_leaves(served):
    n, _ = served(capacity=10, max_clients=2)
    holders = [python("import sys, shmstore, time; s = shmstore.connect(sys.argv[1]); s.put('a', 1);"
                      " print('in', flush=True); time.sleep(60)", n) for _ in range(2)]
    try:
        for h in holders:
            assert h.stdout.readline().strip() == "in", h.stderr.read()
        with shmstore.connect(n, timeout=0.5) as s:
            assert s.get("a") == 1  # reading needs no client block
            with pytest.raises(shmstore.TooManyClientsError) as e:
                s.put("b", 2)  # waits its timeout for a block, then says why
            assert "max_clients" in str(e.value)
            holders[0].kill()
            holders[0].wait()
            wait_for(lambda: _try_put(s), what="a client block freed by the dead holder")
            assert s.get("b") == 2
    finally:
        reap(*holders)


def _try_put(s):
    try:
        s.put("b", 2)
        return True
    except shmstore.TooManyClientsError:
        return False


def test_coordinator_sigkill_readers_keep_reading_and_writers_resume(served, names):
    n, coord = served(capacity=100)
    reader = python(
        "import sys, shmstore\n"
        "s = shmstore.connect(sys.argv[1])\n"
        "for line in sys.stdin:\n"
        "    print(s.get('k'), s.get_many(['a', 'b']), flush=True)\n", n, stdin=-1)
    try:
        with shmstore.connect(n, timeout=0.5) as s:
            s.put("k", "before")
            with s.batch() as b:
                b.put("a", 1)
                b.put("b", 2)
            coord.kill()
            assert s.get("k") == "before"
            reader.stdin.write("\n")
            reader.stdin.flush()
            assert reader.stdout.readline().strip() == "before [1, 2]"
            with pytest.raises(shmstore.CoordinatorUnavailableError) as e:
                s.put("k", "during")
            assert "serve" in str(e.value)
            assert s.get("k") == "before"
            # A new coordinator adopts the segment; the same handle writes again.
            coord2 = shmstore.serve(n)
            names.coordinators.append(coord2)
            assert s.put("k", "after") > 0
            reader.stdin.write("\n")
            reader.stdin.flush()
            assert reader.stdout.readline().strip() == "after [1, 2]"
            assert len(s) == 3
    finally:
        reap(reader)


def test_a_write_waits_for_a_coordinator_that_comes_back_within_its_timeout(served, names):
    n, coord = served(capacity=10)
    with shmstore.connect(n, timeout=20) as s:
        s.put("k", 1)
        coord.stop()
        done = []
        t = threading.Thread(target=lambda: done.append(s.put("k", 2)))
        t.start()
        time.sleep(0.2)
        coord2 = shmstore.serve(n)
        names.coordinators.append(coord2)
        t.join(30)
        assert done and s.get("k") == 2


def _forked_child(store: shmstore.Store, w: int) -> None:
    code = 1
    try:
        ok = store.get("parent") == "p"  # through the inherited mapping
        key = f"child-{os.getpid()}"
        store.put(key, os.getpid())  # a write channel of its own
        store.incr("hits")
        code = 0 if ok and store.get(key) == os.getpid() else 2
    finally:
        os.write(w, str(code).encode())
        os._exit(code)


def test_handle_inherited_across_fork_reads_and_writes(store):
    store.put("parent", "p")
    store.incr("hits")  # the parent has a write channel before the fork
    r, w = os.pipe()
    pids = []
    try:
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                _forked_child(store, w)
            pids.append(pid)
        children = list(pids)
        for pid in children:
            _, status = os.waitpid(pid, 0)
            pids.remove(pid)
            assert os.waitstatus_to_exitcode(status) == 0
        # The parent's channel survived its children.
        assert store.incr("hits") == 5
        assert sorted(k for k in store.keys() if k.startswith(b"child-")) == sorted(
            f"child-{pid}".encode() for pid in children)
    finally:
        reap_pids(pids)
        os.close(r)
        os.close(w)


def _spawned(name: str, n: int, q) -> None:
    s = shmstore.connect(name)
    for _ in range(n):
        s.incr("spawned")
    q.put(s.get("spawned") >= n)
    s.close()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_processes_attach_by_name(store, method):
    ctx = mp.get_context(method)
    q = ctx.Queue()
    procs = [ctx.Process(target=_spawned, args=(store.name, 50, q)) for _ in range(3)]
    try:
        for p in procs:
            p.start()
        results = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        assert results == [True] * 3 and [p.exitcode for p in procs] == [0] * 3
        assert store.get("spawned") == 150
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        q.close()
        q.join_thread()


def test_handles_are_thread_safe(store):
    def work():
        for _ in range(200):
            store.incr("n")
            store.put(f"t{threading.get_ident()}", 1, wait=False)
            assert store.get("n") >= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    store.flush()
    assert store.get("n") == 1600


def test_full_queue_applies_backpressure_then_times_out(served):
    n, coord = served(capacity=100_000, ring_size=4096)
    with shmstore.connect(n, timeout=0.5) as s:
        s.put("warm", 1)
        os.kill(coord.pid, signal.SIGSTOP)
        try:
            with pytest.raises(shmstore.StoreTimeoutError) as e:
                for i in range(10_000):
                    s.put(f"k{i}", "v" * 20, wait=False)
            assert "queue" in str(e.value)
            assert isinstance(e.value, TimeoutError)
            sent = i
        finally:
            os.kill(coord.pid, signal.SIGCONT)
        s.flush(timeout=10)
        # Everything accepted before the timeout was applied; nothing silently dropped.
        assert s.get_many([f"k{j}" for j in range(sent)]) == ["v" * 20] * sent
        assert s.get(f"k{sent}") is None


def test_request_larger_than_the_queue_is_refused_up_front(served):
    n, _ = served(capacity=1000, ring_size=4096)
    with shmstore.connect(n) as s:
        with pytest.raises(shmstore.RequestTooLargeError):
            with s.batch() as b:
                for i in range(500):
                    b.put(f"key{i}", i)
        assert len(s) == 0


def test_coordinator_stops_when_its_parent_dies(names):
    n = names()
    parent = python("import sys, shmstore, time; c = shmstore.serve(sys.argv[1], capacity=10);"
                    " print(c.pid, flush=True); time.sleep(60)", n)
    try:
        coord_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait()

        def gone():
            try:
                os.kill(coord_pid, 0)
            except ProcessLookupError:
                return True
            # it is our grandchild's orphan: init reaps it; a zombie counts as gone
            return shmstore._liveness.process_start_ms(coord_pid) is None

        wait_for(gone, timeout=10, what="the orphaned coordinator to stop")
    finally:
        reap(parent)


BATCHER = """
import sys, shmstore
s = shmstore.connect(sys.argv[1], timeout=0.3)
i = 0
print("ready", flush=True)
while True:
    i += 1
    try:
        with s.batch() as b:
            for j in range(40):
                b.put(f"k{j}", i)
    except shmstore.ShmStoreError:
        pass
"""


def test_batches_stay_atomic_across_coordinator_sigkills(served, names):
    """SIGKILL the coordinator while batches are applied; every restart must show
    each batch whole (all 40 keys from one batch), never half of one."""
    n, coord = served(capacity=200)
    keys = [f"k{j}" for j in range(40)]
    p = python(BATCHER, n)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        rng = random.Random()
        for _ in range(8):
            time.sleep(rng.uniform(0.02, 0.15))
            coord.kill()
            coord = shmstore.serve(n)
            names.coordinators.append(coord)
            with shmstore.connect(n) as s:
                values = s.get_many(keys)
                assert len(set(values)) == 1, values
    finally:
        reap(p)


def test_a_frame_that_must_wrap_past_its_own_padding_is_sent(served):
    """A frame longer than the ring offset it would wrap from used to wait for room that
    never came, even with the ring empty (its padding and the frame overlapped); the
    client now publishes the padding alone first."""
    n, _ = served(capacity=10, value_size=3500, ring_size=4096)
    with shmstore.connect(n, timeout=5) as s:
        s.put("a", b"x" * 2000)  # the next frame starts near the middle of the ring
        assert s.put("b", b"y" * 2500, timeout=3) > 0
        assert s.put("c", b"z" * 2500, timeout=3) > 0
        assert (s.get("a"), s.get("b"), s.get("c")) == (b"x" * 2000, b"y" * 2500, b"z" * 2500)
