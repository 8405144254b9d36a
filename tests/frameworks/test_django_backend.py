"""ShmStoreCache: shared across processes, aliases, values, timeouts, atomic incr.

Django's own BaseCacheTests run in test_django_suite.py; these are the properties they
do not reach: several processes on one store, the pickle confinement, fork, options.
Backends are made directly (``ShmStoreCache(location, params)``): no Django settings
are configured in the pytest process.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import http.client
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time

import msgspec
import pytest

pytest.importorskip("django", reason="Django is a dev dependency: pip install -e '.[dev]'")

from django.core.cache import CacheKeyWarning  # noqa: E402

import shmstore  # noqa: E402
from shmstore import django as backend  # noqa: E402
from shmstore._objcodec import PICKLE_EXT  # noqa: E402
from tests.helpers.processes import python, reap, wait_for  # noqa: E402

from .conftest import close_handles  # noqa: E402

CHILD = textwrap.dedent("""
    import json, sys
    from shmstore.django import ShmStoreCache
    cache = ShmStoreCache(sys.argv[1], json.loads(sys.argv[2]))
""")


def run_child(code: str, store: str, params: dict | None = None, timeout: float = 60) -> str:
    p = python(CHILD + textwrap.dedent(code), store, json.dumps(params or {}))
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        reap(p)
    assert p.returncode == 0, err
    return out


def test_value_set_in_one_process_is_read_in_another(django_cache):
    cache = django_cache()
    cache.set("greeting", "hello")
    cache.set("pair", (1, decimal.Decimal("2.5")))
    out = run_child("""
        print(json.dumps([cache.get("greeting"), repr(cache.get("pair"))]))
        cache.set("from-child", {"n": 1})
        cache.set("when", __import__("datetime").date(2024, 5, 6))
    """, django_cache.store_name)
    assert json.loads(out) == ["hello", "(1, Decimal('2.5'))"]
    assert cache.get("from-child") == {"n": 1}
    assert cache.get("when") == datetime.date(2024, 5, 6)


def test_aliases_with_other_prefix_or_version_share_one_store(django_cache):
    a = django_cache()
    b = django_cache(KEY_PREFIX="other")
    v2 = django_cache(VERSION=2)
    a.set("k", "a")
    b.set("k", "b")
    v2.set("k", "v2")
    assert (a.get("k"), b.get("k"), v2.get("k")) == ("a", "b", "v2")
    assert a.get("k", version=2) == "v2"
    assert b.has_key("k") and not b.has_key("k", version=2)
    with shmstore.connect(django_cache.store_name) as plain:
        assert sorted(plain.keys()) == [b":1:k", b":2:k", b"other:1:k"]
    b.clear()  # the whole store, as RedisCache's FLUSHDB
    assert (a.get("k"), b.get("k"), v2.get("k")) == (None, None, None)


def test_plain_values_are_msgpack_and_the_rest_pickled(django_cache):
    cache = django_cache()
    cache.set("plain", {"a": [1, 2.5, "x", None, b"b"]})
    cache.set("tuple", (1, 2))
    cache.set("set", {3})
    with shmstore.connect(django_cache.store_name) as plain:
        assert plain.get(":1:plain") == {"a": [1, 2.5, "x", None, b"b"]}
        raw = plain.get(":1:tuple")
        assert type(raw) is msgspec.msgpack.Ext and raw.code == PICKLE_EXT
        plain.put(":1:by-plain-client", [1, "two"])
    assert cache.get("by-plain-client") == [1, "two"]
    assert cache.get("tuple") == (1, 2) and cache.get("set") == {3}


def test_unpicklable_value_raises_and_writes_nothing(django_cache):
    cache = django_cache()
    cache.set("k", 1)

    class Local:  # a local class cannot be pickled
        pass

    with pytest.raises((pickle.PicklingError, AttributeError)):
        cache.set("k", Local())
    assert cache.get("k") == 1


def test_timeouts(clock, django_cache):
    cache = django_cache(TIMEOUT=60)
    cache.set("default", 1)            # TIMEOUT: 60 s
    cache.set("short", 1, timeout=10)
    cache.set("forever", 1, timeout=None)
    cache.set("long", 1, timeout=10**12)  # past the store's 100 years: kept that long
    cache.set("gone", 1)
    cache.set("gone", 2, timeout=0)     # 0: not stored, and the old value deleted
    cache.set("neg", 2, timeout=-1)
    assert not cache.has_key("gone") and not cache.has_key("neg")
    assert cache.add("zero", 1, timeout=0) is True and not cache.has_key("zero")
    assert cache.add("short", 1, timeout=0) is False
    assert cache.store.ttl(":1:forever") is None
    assert 59 < cache.store.ttl(":1:default") <= 60
    cache.set_many({"m1": 1, "m2": 2}, timeout=10)
    clock(11)
    assert cache.get_many(["short", "m1", "m2", "default", "forever"]) == {"default": 1, "forever": 1}
    clock(50)
    assert cache.get("default") is None and cache.get("forever") == 1 and cache.get("long") == 1


def test_touch_and_incr_keep_or_set_expiry(clock, django_cache):
    cache = django_cache()
    cache.set("t", "v", timeout=10)
    assert cache.touch("t", 100) is True
    assert cache.touch("missing", 100) is False
    cache.set("n", 5, timeout=10)
    assert cache.incr("n", 3) == 8 and cache.decr("n") == 7
    assert 0 < cache.store.ttl(":1:n") <= 10  # incr keeps the expiry
    clock(11)
    assert cache.get("t") == "v" and cache.get("n") is None
    with pytest.raises(ValueError):
        cache.incr("n")  # expired is missing
    assert cache.touch("t", None) is True
    clock(1000)
    assert cache.get("t") == "v"
    assert cache.touch("t", 0) is True and not cache.has_key("t")


def test_incr_missing_or_not_a_number(django_cache):
    cache = django_cache()
    with pytest.raises(ValueError):
        cache.incr("nope")
    assert not cache.has_key("nope")  # not created, unlike store.incr
    cache.set("s", "text")
    with pytest.raises(TypeError):
        cache.incr("s")
    cache.set("big", 2**64 - 1)
    assert cache.incr("big") == 2**64  # past msgpack's range: pickled, still an int
    assert cache.get("big") == 2**64 and cache.decr("big") == 2**64 - 1


def test_incr_is_atomic_across_processes(django_cache, tmp_path):
    cache = django_cache()
    cache.set("counter", 1000)
    go = tmp_path / "go"
    workers, each = 4, 150
    code = f"""
        import os, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        got = [cache.incr("counter") for _ in range({each})]
        print(json.dumps(got))
    """
    procs = [python(CHILD + textwrap.dedent(code), django_cache.store_name, "{}") for _ in range(workers)]
    try:
        go.write_text("")
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        reap(*procs)
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    seen = [v for out, _ in outs for v in json.loads(out)]
    # two independent checks: the final count, and every increment saw its own value
    assert cache.get("counter") == 1000 + workers * each, outs
    assert sorted(seen) == list(range(1001, 1001 + workers * each)), outs


def test_add_is_atomic(django_cache):
    cache = django_cache()
    assert cache.add("k", 1) is True
    assert cache.add("k", 2) is False and cache.get("k") == 1
    out = run_child('print(cache.add("k", 3), cache.add("k2", 3))', django_cache.store_name)
    assert out.split() == ["False", "True"] and cache.get("k2") == 3


def test_long_keys_are_hashed_and_warned_about(django_cache):
    cache = django_cache()
    k1, k2 = "x" * 300 + "1", "x" * 300 + "2"
    with pytest.warns(CacheKeyWarning, match="longer than 250"):
        cache.set(k1, 1)
    with pytest.warns(CacheKeyWarning):
        cache.set(k2, 2)
    with pytest.warns(CacheKeyWarning):
        assert (cache.get(k1), cache.get(k2)) == (1, 2)
    with pytest.warns(CacheKeyWarning):
        assert cache.get_many([k1, k2]) == {k1: 1, k2: 2}
    with shmstore.connect(django_cache.store_name) as plain:
        stored = list(plain.keys())
    assert len(stored) == 2 and all(len(k) == 256 and k.startswith(b":1:xxx") for k in stored)


def test_many_and_batches(django_cache):
    cache = django_cache()
    assert cache.set_many({"a": 1, "b": (2,), "c": None}) == []
    assert cache.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": (2,), "c": None}
    big = {f"big{i}": b"x" * 300_000 for i in range(3)}  # more than one request holds
    assert cache.set_many(big) == []
    assert cache.get_many(list(big)) == big
    cache.delete_many(["a", "b", "big0"])
    assert sorted(cache.get_many(["a", "b", "c", "big0", "big1"])) == ["big1", "c"]
    assert cache.delete("c") is True and cache.delete("c") is False
    assert cache.get_or_set("g", lambda: 7) == 7 and cache.get_or_set("g", 8) == 7


def test_async_api(django_cache):
    cache = django_cache()

    async def main():
        await cache.aset("a", 1)
        assert await cache.aget("a") == 1
        assert await cache.aadd("a", 2) is False
        assert await cache.aincr("a", 4) == 5
        assert await cache.adecr("a") == 4
        assert await cache.ahas_key("a") and not await cache.ahas_key("b")
        await cache.aset_many({"b": (1,), "c": 3})
        assert await cache.aget_many(["a", "b", "c", "d"]) == {"a": 4, "b": (1,), "c": 3}
        assert await cache.atouch("a", 100) is True
        assert await cache.adelete("a") is True
        await cache.adelete_many(["b"])
        assert await cache.aget_or_set("d", 9) == 9
        await cache.aclear()
        assert await cache.aget_many(["c", "d"]) == {}
        await cache.aclose()

    asyncio.run(main())


def test_forked_child_uses_the_cache(django_cache):
    cache = django_cache()
    cache.set("before", 1)  # the parent's handle is open when it forks
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if cache.get("before") == 1:
                cache.set("child", os.getpid())
                code = 0 if cache.incr("before") == 2 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.get("child") == pid and cache.get("before") == 2


def test_backend_serves_the_store_when_none_runs(names):
    name = names("dj-own")
    options = {"memory": 8 << 20, "capacity": 1000}
    cache = backend.ShmStoreCache(name, {"OPTIONS": {**options, "MAX_ENTRIES": 10}})
    try:
        cache.set("k", "v")  # the first call starts the coordinator
        coord = cache.store.coordinator
        assert coord is not None and coord.alive
        st = cache.store.stats()
        assert (st.key_size, st.capacity) == (256, 1000)
        other = backend.ShmStoreCache(name, {"OPTIONS": {"memory": 8 << 20}})
        assert other.get("k") == "v"  # the same process handle, the same store
        assert run_child('print(cache.get("k"))', name, {"OPTIONS": options}).strip() == "v"
        assert coord.alive  # the child used the running coordinator
    finally:
        close_handles([name])


@pytest.mark.parametrize(("location", "options", "error"), [
    ("bad name!", {}, shmstore.InvalidNameError),
    ("fine", {"memory": "lots"}, shmstore.InvalidLayoutError),
    ("fine", {"eviction": "fifo"}, shmstore.InvalidLayoutError),
    ("fine", {"bogus": 1}, TypeError),
    ("fine", {"value_type": int}, shmstore.InvalidArgumentError),
    ("fine", {"timeout": -1}, shmstore.InvalidArgumentError),
    ("fine", {"read_cache": "big"}, shmstore.InvalidLayoutError),
    ("fine", {"key_size": 0}, shmstore.InvalidLayoutError),
])
def test_bad_settings_fail_when_the_backend_is_made(location, options, error):
    with pytest.raises(error):
        backend.ShmStoreCache(location, {"OPTIONS": options})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body[-2000:]
        return json.loads(body)
    finally:
        conn.close()


def _from_every_worker(port: int, path: str, workers: set[int], deadline: float) -> dict[int, dict]:
    """Ask until each of ``workers`` has answered (the kernel picks who accepts)."""
    seen: dict[int, dict] = {}
    while set(seen) < workers:
        assert time.monotonic() < deadline, f"workers {workers - set(seen)} never answered"
        got = _request(port, path)
        seen[got["pid"]] = got
    return seen


def _gunicorn_workers(master: int) -> set[int]:
    import psutil

    live = set()
    for c in psutil.Process(master).children():  # the master's children are its workers
        try:
            if c.status() != psutil.STATUS_ZOMBIE:
                live.add(c.pid)
        except psutil.NoSuchProcess:
            pass
    return live


@pytest.mark.timeout(180)
def test_gunicorn_workers_share_one_cache_and_a_killed_worker_changes_nothing(names, tmp_path):
    pytest.importorskip("gunicorn", reason="Gunicorn is a dev dependency")
    store = names("dj-gunicorn")
    port = _free_port()
    env = {**os.environ, "SHMSTORE_DJANGO_STORE": store}
    master = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "4", "--bind", f"127.0.0.1:{port}",
         "--preload", "--log-level", "warning", "tests.frameworks.djangoapp:application"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    coordinator = None
    try:
        deadline = time.monotonic() + 90
        wait_for(lambda: len(_gunicorn_workers(master.pid)) == 4 or master.poll() is not None,
                 timeout=60, what="4 gunicorn workers")
        assert master.poll() is None, master.stdout.read()
        workers = _gunicorn_workers(master.pid)
        first = _request(port, "/set?k=shared&v=one")  # this worker starts the coordinator
        assert first["started"], first
        with shmstore.connect(store) as plain:
            coordinator = plain.stats().coordinator_pid
        _request(port, "/set?k=n&v=0&int=1")
        answers = _from_every_worker(port, "/get?k=shared", workers, deadline)
        assert {a["value"] for a in answers.values()} == {"one"}, answers

        os.kill(first["pid"], signal.SIGKILL)  # the worker whose call started the coordinator
        wait_for(lambda: (w := _gunicorn_workers(master.pid)) and first["pid"] not in w and len(w) == 4,
                 timeout=30, what="gunicorn to replace the killed worker")
        workers = _gunicorn_workers(master.pid)
        _request(port, "/set?k=shared&v=two")  # writes still go through
        counts = [_request(port, "/incr?k=n")["value"] for _ in range(20)]
        assert sorted(counts) == list(range(1, 21)), counts
        answers = _from_every_worker(port, "/get?k=shared", workers, deadline)
        assert {a["value"] for a in answers.values()} == {"two"}, answers
        assert not any(a["started"] for a in answers.values())  # nobody started another
        with shmstore.connect(store) as plain:
            assert plain.stats().coordinator_pid == coordinator
    finally:
        reap(master, timeout=15)
        if coordinator is not None:  # detached: it outlives Gunicorn; stop it for the test
            try:
                os.kill(coordinator, signal.SIGTERM)
            except ProcessLookupError:
                pass

            def stopped() -> bool:
                try:
                    shmstore.destroy(store)
                except shmstore.CoordinatorRunningError:
                    return False
                return True

            wait_for(stopped, timeout=20, what="the detached coordinator to stop")


def test_key_size_option_keeps_the_largest_record_in_one_page(names):
    name = names("dj-ks")
    cache = backend.ShmStoreCache(name, {"OPTIONS": {"memory": 8 << 20, "key_size": 100}})
    try:
        cache.set("k" * 200, b"x" * 1000)  # hashed to 100 bytes
        st = cache.store.stats()
        assert (st.key_size, st.value_size) == (100, (1 << 20) - 128 - 104)
        big = b"x" * (st.value_size - 10)  # a bytes value: msgpack adds 5 bytes
        cache.set("big", big)
        assert cache.get("big") == big
        with pytest.raises(shmstore.ValueTooLargeError):
            cache.set("bigger", b"x" * st.value_size)
    finally:
        close_handles([name])


def test_a_dead_coordinator_is_replaced_by_the_next_write(names):
    name = names("dj-restart")
    cache = backend.ShmStoreCache(name, {"OPTIONS": {"memory": 8 << 20, "timeout": 1}})
    try:
        cache.set("k", "v")
        cache.set("n", 10)
        first = backend.started[name][0]
        first.kill()  # SIGKILL, reaped
        cache.set("k2", "v2")  # no coordinator answers in 1 s: one is started, the set repeated
        assert len(backend.started[name]) == 2 and backend.started[name][1].alive
        assert cache.get_many(["k", "k2", "n"]) == {"k": "v", "k2": "v2", "n": 10}
        backend.started[name][1].kill()
        with pytest.raises(shmstore.CoordinatorUnavailableError):
            cache.incr("n")  # may have been applied had it been sent: not repeated
        assert cache.incr("n") == 11  # the failed one was not applied, nor repeated
        assert len(backend.started[name]) == 3
        with shmstore.connect(name) as plain:
            assert plain.stats().coordinator_pid == backend.started[name][2].pid
    finally:
        close_handles([name])


def test_add_of_one_key_by_many_processes_has_one_winner(django_cache, tmp_path):
    go = tmp_path / "go"
    code = f"""
        import os, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        print(json.dumps([cache.add(f"slot{{i}}", os.getpid()) for i in range(50)]))
    """
    procs = [python(CHILD + textwrap.dedent(code), django_cache.store_name, "{}") for _ in range(4)]
    try:
        go.write_text("")
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        reap(*procs)
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    wins = [json.loads(out) for out, _ in outs]
    cache = django_cache()
    for i in range(50):  # exactly one process added each key, and its value is there
        winners = [p.pid for p, w in zip(procs, wins) if w[i]]
        assert len(winners) == 1, (i, wins)
        assert cache.get(f"slot{i}") == winners[0]


def test_memory_none_makes_a_fixed_slot_store(names):
    name = names("dj-fixed")
    cache = backend.ShmStoreCache(name, {"OPTIONS": {"memory": None, "capacity": 50, "value_size": 256}})
    try:
        cache.set("k", "v")
        st = cache.store.stats()
        assert (st.capacity, st.value_size, st.key_size) == (50, 256, 64)
        assert st.memory == 0  # no page budget: one class of fixed slots
    finally:
        close_handles([name])


def test_memory_none_with_key_size_keeps_the_fixed_store_default_value_size(names):
    # key_size sizes value_size only for a budget store: a fixed-slot store made with
    # a key_size alone keeps serve()'s value_size (1024), not a ~1 MiB slot per record.
    name = names("dj-fixed-ks")
    cache = backend.ShmStoreCache(name, {"OPTIONS": {"memory": None, "capacity": 50, "key_size": 100}})
    try:
        cache.set("k", "v")
        st = cache.store.stats()
        assert (st.memory, st.capacity, st.key_size, st.value_size) == (0, 50, 100, 1024)
    finally:
        close_handles([name])
