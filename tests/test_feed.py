"""Change feeds and watch: every change is listed (or the feed says it cannot be),
across real processes; watchers are woken by the coordinator and do not spin."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import threading

import pytest

import shmstore
from shmstore import _layout as L
from tests.helpers.processes import python, reap, wait_for

#: Every test here runs on both cores: the compiled one and pure Python (conftest.core).
pytestmark = pytest.mark.usefixtures("core")


def test_changes_lists_puts_updates_deletes_and_incrs_once(store):
    e0 = store.epoch
    store.put("a", 1)
    store.put("b", 2)
    store.put("a", 3)  # an update: two slots of "a" change at one epoch
    store.delete("b")  # a deletion: the freed slot keeps the key
    store.incr("n")
    keys, e1 = store.changes(e0)
    assert keys == [b"a", b"b", b"n"] and e1 == store.epoch == 5
    assert store.changes(e1) == ([], e1)
    store.delete("a")
    with store.batch() as b:
        b.put("user:1", 1)
        b.put("other", 1)
    assert store.changes(e1) == ([b"a", b"other", b"user:1"], store.epoch)
    assert store.changes(e1, prefix="user:") == ([b"user:1"], store.epoch)
    assert store.changes(e1, prefix=b"a") == ([b"a"], store.epoch)
    assert store.changes(0)[0] == [b"a", b"b", b"n", b"other", b"user:1"]


def test_changes_refuses_bad_cursors(store):
    store.put("a", 1)
    for bad in (-1, 1.5, "3", None, True):
        with pytest.raises(shmstore.InvalidCursorError):
            store.changes(bad)
    with pytest.raises(shmstore.FeedTruncatedError):
        store.changes(store.epoch + 10)  # a cursor from a later (recreated) store
    with pytest.raises(shmstore.InvalidKeyError):
        store.changes(0, prefix=3)


def test_slot_reuse_keeps_deletions_as_long_as_it_can_then_says_so(served):
    """Free slots are reused oldest first, so a deletion is remembered until every
    slot freed before it was reused; then the feed raises instead of missing it."""
    n, _ = served(capacity=4, key_size=8, value_size=16)  # 4 records; a page of slots
    with shmstore.connect(n) as s:
        nslots = len(s._seg.slot_refs()[0])  # the page holds more than capacity + 1
        e0 = s.epoch
        s.put("gone", 1)
        s.delete("gone")  # its slot is now the newest free one
        for k in ("k1", "k2", "k3"):
            s.put(k, 1)  # never-written slots go first
        assert s.changes(e0)[0] == [b"gone", b"k1", b"k2", b"k3"]
        assert s._seg.q[L.H_FEED_HORIZON] == 0
        s.put("k4", 1)
        for i in range(nslots - 5):  # updates take the other never-written slots
            s.put("k2", 10 + i)
            assert s._seg.q[L.H_FEED_HORIZON] == 0
        assert b"gone" in s.changes(e0)[0]
        s.put("k1", 2)  # the deletion's slot is the oldest free one: reused
        assert s._seg.q[L.H_FEED_HORIZON] == 2  # the epoch of the erased deletion
        with pytest.raises(shmstore.FeedTruncatedError) as e:
            s.changes(e0)
        assert isinstance(e.value, LookupError) and "Re-read" in str(e.value)
        assert s.changes(2)[0] == [b"k1", b"k2", b"k3", b"k4"]


WRITER = """
import json, random, sys, shmstore
s = shmstore.connect(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
log = []
for i in range(int(sys.argv[3])):
    k = f"k{rng.randrange(40)}"
    r = rng.random()
    if r < 0.5:
        log.append([k, s.put(k, i)])
    elif r < 0.7:
        if s.delete(k):
            log.append([k, s.epoch])  # the only writer: the epoch is the delete's
    elif r < 0.85:
        k = f"n{rng.randrange(5)}"
        s.incr(k)
        log.append([k, s.epoch])
    else:
        with s.batch() as b:
            ks = [f"k{rng.randrange(40)}" for _ in range(3)]
            for j in ks:
                b.put(j, i)
        for j, v in zip(ks, b.results):
            log.append([j, v])
s.put("done", 1)
print(json.dumps(log))
"""

CONSUMER = """
import json, sys, shmstore
s = shmstore.connect(sys.argv[1])
since = int(sys.argv[2])
calls = []
done_at = None
while done_at is None or since < done_at:
    keys, e = s.changes(since)
    if keys:
        calls.append([since, e, [k.decode() for k in keys]])
    since = e
    # A key written after the returned epoch may be listed already (the scan runs on
    # while the writer writes): go on until the calls' ranges cover done's epoch.
    if b"done" in keys and done_at is None:
        done_at = s.version("done")
print(json.dumps(calls))
"""


def test_feed_never_misses_a_change_of_a_writer_in_another_process(served):
    """A writer logs (key, epoch) of every change it makes; a consumer in another
    process polls changes() concurrently. Each logged change must be in the consumer's
    call whose (since, epoch] range holds that epoch."""
    seed = random.randrange(1 << 30)
    n, _ = served(capacity=20_000, key_size=16, value_size=16)  # plenty of free slots
    with shmstore.connect(n) as s:
        e0 = s.epoch
    consumer = python(CONSUMER, n, str(e0))
    writer = python(WRITER, n, str(seed), "1500")
    try:
        wout, werr = writer.communicate(timeout=90)
        cout, cerr = consumer.communicate(timeout=60)
    finally:
        reap(writer, consumer)
    assert writer.returncode == 0, werr
    assert consumer.returncode == 0, f"seed {seed}: {cerr}"
    log = json.loads(wout)
    calls = json.loads(cout)
    assert len(log) > 500
    missed = []
    for key, epoch in log:
        call = next((c for c in calls if c[0] < epoch <= c[1]), None)
        if call is None or key not in call[2]:
            missed.append((key, epoch))
    assert not missed, f"seed {seed}: {len(missed)} changes missed, e.g. {missed[:5]}; {len(calls)} calls"


WATCHER = """
import json, sys, time, shmstore
s = shmstore.connect(sys.argv[1])
calls = [0]
changes = s.changes
def counting(*a, **k):
    calls[0] += 1
    return changes(*a, **k)
s.changes = counting
print(json.dumps({"epoch": s.epoch}), flush=True)
for keys, epoch in s.watch(prefix="cfg:", timeout=30, since=int(sys.argv[2])):
    print(json.dumps({"keys": [k.decode() for k in keys], "epoch": epoch, "calls": calls[0]}), flush=True)
    if b"cfg:stop" in keys:
        break
"""


def test_watch_wakes_a_waiter_in_another_process_and_does_not_spin(served, names):
    n, _ = served(capacity=100)
    with shmstore.connect(n) as s:
        e0 = s.epoch
        p = python(WATCHER, n, str(e0))
        try:
            assert "epoch" in json.loads(p.stdout.readline())
            ch_sem = f"sem.shmstore.{n}@w"
            wait_for(lambda: any(x.startswith(ch_sem) for x in os.listdir("/dev/shm")), timeout=30,
                     what="the watcher to register its semaphore")
            s.put("other", 1)  # not under the prefix: wakes it, yields nothing
            threading.Event().wait(1.0)  # idle: a spinning watcher would call changes() a lot
            s.put("cfg:a", 1)
            first = json.loads(p.stdout.readline())
            assert first["keys"] == ["cfg:a"] and first["epoch"] >= 2
            # woken a few times (the post for "other", once-a-second slices), not spinning
            assert first["calls"] < 12, first
            s.put("cfg:stop", 1)
            second = json.loads(p.stdout.readline())
            assert second["keys"] == ["cfg:stop"]
            assert p.wait(timeout=30) == 0, p.stderr.read()
        finally:
            reap(p)
        # The dead watcher's block is reclaimed and its semaphore unlinked.
        wait_for(lambda: not any(x.startswith(ch_sem) for x in os.listdir("/dev/shm")), timeout=30,
                 what="the coordinator to unlink the watch semaphore of a gone client")


def test_watch_timeout_ends_the_iteration_and_threads_share_a_handle(store):
    assert list(store.watch(timeout=0.2)) == []
    got: list = [[], []]

    def watch(i: int) -> None:
        for keys, _ in store.watch(timeout=30, since=store.epoch):
            got[i].extend(keys)
            if b"end" in keys:
                return

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    store.put("x", 1)
    store.put("end", 1)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert all(b"x" in g and b"end" in g for g in got), got


def test_feed_and_watch_continue_across_a_coordinator_restart(served, names):
    """A restarted coordinator adopts the segment: freed slots keep their keys, so a
    cursor from before still works; a watcher re-registers with the new coordinator."""
    n, coord = served(capacity=100)
    with shmstore.connect(n) as s:
        s.put("a", 1)
        cursor = s.epoch
        s.delete("a")
        got: list = []
        ready = threading.Event()

        def watch() -> None:
            it = s.watch(timeout=60)
            ready.set()
            for keys, _ in it:
                got.extend(keys)
                if b"after" in keys:
                    return

        t = threading.Thread(target=watch)
        t.start()
        ready.wait(10)
        coord.stop()
        coord2 = shmstore.serve(n)
        names.coordinators.append(coord2)
        s.put("after", 1)
        t.join(60)
        assert not t.is_alive() and b"after" in got
        assert s.changes(cursor)[0] == [b"a", b"after"]


def test_destroy_removes_watch_semaphores_a_killed_coordinator_left(served):
    n, coord = served(capacity=10)
    with shmstore.connect(n) as s:
        assert list(s.watch(timeout=0.3)) == []  # registers this process's semaphore
        assert any(x.startswith(f"sem.shmstore.{n}@w") for x in os.listdir("/dev/shm"))
        coord.kill()
    shmstore.destroy(n)
    assert not any(x.startswith(f"sem.shmstore.{n}@") for x in os.listdir("/dev/shm"))


def _cache_worker(name: str, requests: mp.Queue, answers: mp.Queue) -> None:
    """A pool/Gunicorn-style worker: a local cache invalidated by a watch thread."""
    try:
        store = shmstore.connect(name)
        cache: dict = {}

        def invalidate() -> None:
            since = store.epoch
            while True:
                try:
                    for keys, since in store.watch(since=since):
                        for k in keys:
                            cache.pop(k.decode(), None)
                except shmstore.FeedTruncatedError:
                    cache.clear()  # fell too far behind: start over from a cold cache
                    since = store.epoch

        threading.Thread(target=invalidate, daemon=True).start()
        answers.put("ready")
        while (key := requests.get()) is not None:
            if key not in cache:
                cache[key] = store.get(key)
            answers.put(cache[key])
        store.close()
    finally:
        os._exit(0)


def test_workers_invalidate_local_caches_on_change(served):
    n, _ = served(capacity=100)
    ctx = mp.get_context("fork")
    workers = []
    with shmstore.connect(n) as s:
        s.put("config", "v1")
        try:
            for _ in range(2):
                rq, aq = ctx.Queue(), ctx.Queue()
                p = ctx.Process(target=_cache_worker, args=(n, rq, aq))
                p.start()
                workers.append((p, rq, aq))
            for _, rq, aq in workers:
                assert aq.get(timeout=30) == "ready"
                rq.put("config")
                assert aq.get(timeout=30) == "v1"  # now cached
            s.put("config", "v2")

            def all_see_v2() -> bool:
                seen = []
                for _, rq, aq in workers:
                    rq.put("config")
                    seen.append(aq.get(timeout=30))
                return all(v == "v2" for v in seen)

            wait_for(all_see_v2, timeout=30, interval=0.05, what="the workers' caches to be invalidated")
        finally:
            for p, rq, _ in workers:
                rq.put(None)
            for p, _, _ in workers:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()


def test_changes_keeps_bytes_keys_exactly(store):
    """Keys are cut from their slots by length: trailing NUL bytes are part of a key."""
    e0 = store.epoch
    keys = [b"a", b"a\x00", b"a\x00\x00", b"\x00", b"\xff\x00b"]
    for k in keys:
        store.put(k, 1)
    store.delete(b"a\x00")
    assert store.changes(e0)[0] == sorted(keys)


# -- format 4: slots of every size class, pages reassigned during a scan ----------------


def test_changes_lists_keys_of_every_size_class(served):
    """A memory store puts records of different sizes in different classes' pages:
    the feed enumerates the slots of every assigned page and reads each key (1 to
    key_size bytes, zero-padded to 8 in its slot) exactly."""
    rnd = random.Random(11)
    n, _ = served(capacity=300, key_size=40, value_size=3000, memory=8 << 20, growth=2.0)
    with shmstore.connect(n) as s:
        e0 = s.epoch
        model = set()
        for i in range(150):
            k = (f"{i}:" + "k" * rnd.randrange(38))[:40]
            s.put(k, "v" * rnd.randrange(2900))
            model.add(k.encode())
        gone = sorted(model)[::5]
        for k in gone:
            s.delete(k)
        seg = s._seg
        classes = {seg.class_of(seg.lookup(k)[0]) for k in model - set(gone)}
        assert len(classes) >= 4, classes
        keys, e1 = s.changes(e0)
        assert keys == sorted(model) and e1 == s.epoch
        e2 = s.epoch
        s.put(sorted(model)[3], 1)
        assert s.changes(e2) == ([sorted(model)[3]], s.epoch)


def test_a_page_reassigned_during_a_scan_yields_no_garbage_keys(names, python_core):
    """The feed reads the page table before its scan and again after it: the slots of
    a page handed to another class meanwhile (its new slots' headers now lie across the
    old slots' keys) are dropped, not read as keys; the other pages' keys are listed."""
    from shmstore._feed import FeedMixin
    from tests.helpers.seqlock import mini_store

    class Feed(FeedMixin):
        name = "feed-test"

        def __init__(self, seg):
            self.seg = seg

        def _live_segment(self):
            return self.seg

    lay = L.Layout(capacity=64, key_size=24, value_size=40, memory=2 << 20)
    with mini_store(names(), lay) as (w, reader):
        w.assign_page(0, 0)
        w.assign_page(1, 1)
        small = {f"s{i}".encode() for i in range(6)}  # 64-byte slots, page 0
        big = {f"b{i}".encode() * 3 for i in range(6)}  # the next class, page 1
        for k in small:
            w.put(k, b"\x01", cls=0)
        for k in big:
            w.put(k, b"\x02" * 20, cls=1)
        feed = Feed(reader)
        assert set(feed.changes(0)[0]) == small | big
        real = reader.page_table
        calls = []

        def page_table():
            calls.append(1)
            if len(calls) == 2:  # the re-read after the scan: page 0 moved meanwhile
                for k in small:
                    w.delete(k, free_slot=False)
                w.assign_page(0, 1)
                # the new slots' headers and a record cross the old keys' bytes
                w.put(b"new" * 8, b"\x03" * 16, cls=1)
            return real()

        reader.page_table = page_table
        try:
            keys, _ = feed.changes(0)
        finally:
            del reader.page_table
        assert len(calls) == 2, "the scan did not re-read the page table"
        assert big <= set(keys), keys
        assert set(keys) <= small | big | {b"new" * 8}, f"garbage keys: {set(keys) - small - big}"
