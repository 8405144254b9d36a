"""shmstore.flask.ShmStoreCache in a real Flask app: one cache for several processes,
timeouts on shmstore's clock, prefixes, long keys, atomic add/inc, config errors."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest

flask = pytest.importorskip("flask")
flask_caching = pytest.importorskip("flask_caching")

import shmstore  # noqa: E402
from shmstore.flask import ShmStoreCache  # noqa: E402
from tests.helpers.processes import python, reap  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[2])
STORE = {"memory": 16 << 20, "eviction": "lru", "key_size": 256}

# A process with its own Flask app on the same store; runs one command, prints JSON.
CHILD = r"""
import json, os, sys, time
import flask, flask_caching
name, cmd = sys.argv[1], sys.argv[2]
app = flask.Flask("child")
app.config.update(CACHE_TYPE="shmstore.flask.ShmStoreCache", CACHE_SHMSTORE_NAME=name,
                  CACHE_KEY_PREFIX="app:")
cache = flask_caching.Cache(app)

@app.route("/page")
@cache.cached(timeout=60)
def page():
    return f"rendered by {os.getpid()}"

@cache.memoize(60)
def square(x):
    return {"x": x * x, "pid": os.getpid()}

with app.app_context():
    if cmd == "set":
        cache.set("shared", {"from": "child", "n": [1, 2]})
        cache.set("tuple", (1, "a"))
        out = True
    elif cmd == "page":
        out = app.test_client().get("/page").get_data(as_text=True)
    elif cmd == "square":
        out = square(12)
    elif cmd == "race":
        print("ready", flush=True)
        while cache.get("go") is None:
            time.sleep(0.001)
        added = cache.add("winner", os.getpid())
        for _ in range(200):
            cache.cache.inc("hits")
        out = added
    print(json.dumps(out), flush=True)
"""


def _child(name: str, cmd: str) -> object:
    p = python(CHILD, name, cmd, cwd=ROOT)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        reap(p)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def app(clock, served):
    name, _ = served("fl", **STORE)
    a = flask.Flask(__name__)
    a.config.update(CACHE_TYPE="shmstore.flask.ShmStoreCache", CACHE_SHMSTORE_NAME=name,
                    CACHE_KEY_PREFIX="app:", CACHE_DEFAULT_TIMEOUT=100)
    a.store_name = name
    try:
        yield a
    finally:
        for backend in a.extensions.get("cache", {}).values():
            backend.close()


@pytest.fixture
def cache(app):
    return flask_caching.Cache(app)


@pytest.fixture
def backend(app, cache):
    b = app.extensions["cache"][cache]
    assert isinstance(b, ShmStoreCache)
    return b


def test_two_processes_share_one_cache(app, cache, backend):
    name = app.store_name
    assert _child(name, "set") is True
    with app.app_context():
        assert cache.get("shared") == {"from": "child", "n": [1, 2]}
        assert cache.get("tuple") == (1, "a")  # pickled by the child, unpickled here
    # a plain value is stored as itself: any shmstore client reads it
    assert shmstore.connect(name).get("app:shared") == {"from": "child", "n": [1, 2]}


def test_a_cached_view_rendered_once_for_all_processes(app, cache):
    calls = []

    @app.route("/page")
    @cache.cached(timeout=60)
    def page():  # the same view (endpoint and path) as the child's
        calls.append(1)
        return "rendered by the test process"

    first = _child(app.store_name, "page")
    assert first.startswith("rendered by ") and first != "rendered by the test process"
    assert app.test_client().get("/page").get_data(as_text=True) == first
    assert calls == []
    assert _child(app.store_name, "page") == first


def test_memoize_across_processes(app, cache):
    got = _child(app.store_name, "square")
    assert got["x"] == 144
    again = _child(app.store_name, "square")
    assert again == got  # the second process got the first one's result (its pid)


def test_add_and_inc_are_atomic_across_processes(app, cache, backend):
    procs = [python(CHILD, app.store_name, "race", cwd=ROOT) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        with app.app_context():
            cache.set("go", 1)
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        reap(*procs)
    with app.app_context():
        assert (sum(outs), cache.get("hits")) == (1, 800), outs
        assert cache.get("winner") in {p.pid for p in procs}


def test_timeouts(app, cache, backend, clock):
    b = backend
    assert b.set("default", 1)          # CACHE_DEFAULT_TIMEOUT=100
    assert b.set("short", 2, timeout=10)
    assert b.set("forever", 3, timeout=0)
    assert b.set("delta", 4, timeout=dt.timedelta(seconds=30))
    assert b.set("gone", 5, timeout=-1) and b.get("gone") is None and not b.has("gone")
    clock(11)
    assert (b.get("default"), b.get("short"), b.get("forever"), b.get("delta")) == (1, None, 3, 4)
    assert b.add("short", 20, timeout=5)  # expired: add succeeds
    clock(20)
    assert (b.get("default"), b.get("short"), b.get("forever"), b.get("delta")) == (1, None, 3, None)
    clock(70)
    assert (b.get("default"), b.get("forever")) == (None, 3)


@pytest.mark.parametrize("timeout", [math.nan, True, "10", 1e12, math.inf])
def test_bad_timeout(backend, timeout):
    with pytest.raises(shmstore.InvalidArgumentError):
        backend.set("k", 1, timeout=timeout)


def test_whole_api(backend):
    b = backend
    assert b.set_many({"a": 1, "b": [2], "c": {3}}) == ["a", "b", "c"]
    assert b.get_many("a", "b", "c", "nope") == [1, [2], {3}, None]
    assert b.get_dict("a", "nope") == {"a": 1, "nope": None}
    assert b.add("a", 9) is False and b.get("a") == 1
    assert b.inc("a", 5) == 6 and b.dec("a", 2) == 4 and b.inc("new") == 1 and b.dec("neg") == -1
    assert b.delete("a") is True and b.delete("a") is False
    assert b.delete_many("b", "c", "never") == ["b", "c", "never"]
    assert b.get_many("b", "c") == [None, None]
    assert b.set("none", None) and b.has("none") and b.get("none") is None
    assert b.set("text", "x")
    with pytest.raises(shmstore.ValueEncodingError):
        b.inc("text")


def test_prefixes_share_a_store_and_clear_their_own(app, backend):
    other = ShmStoreCache(app.store_name, key_prefix="other:")
    try:
        backend.set("k", "mine")
        other.set("k", "theirs")
        long_key = "x" * 1000  # longer than key_size: stored under a hash, prefix kept
        backend.set(long_key, "long")
        assert (backend.get("k"), other.get("k"), backend.get(long_key)) == ("mine", "theirs", "long")
        assert backend.clear()
        assert (backend.get("k"), other.get("k"), backend.get(long_key)) == (None, "theirs", None)
    finally:
        other.close()


def test_too_large_a_value_is_not_cached(served):
    name, _ = served("fls", memory=4 << 20, value_size=1024)
    b = ShmStoreCache(name, key_prefix="p:")
    try:
        assert b.set("big", b"x" * 4096) is False
        assert b.add("big", b"x" * 4096) is False
        assert b.get("big") is None
        assert b.set_many({"big": b"x" * 4096, "small": 1}) == ["small"]
    finally:
        b.close()


def test_starts_the_coordinator_when_none_runs(names):
    name = names("flo")
    app = flask.Flask(__name__)
    app.config.update(CACHE_TYPE="shmstore.flask.ShmStoreCache", CACHE_SHMSTORE_NAME=name,
                      CACHE_OPTIONS={"memory": 8 << 20, "detach": False})
    cache = flask_caching.Cache(app)
    b = app.extensions["cache"][cache]
    try:
        with app.app_context():
            assert cache.set("k", "v") and cache.get("k") == "v"
        assert b.store.coordinator is not None
    finally:
        coord = b.store.coordinator
        b.close()
        if coord is not None:
            coord.stop()


def test_store_name_from_key_prefix(names):
    name = names("flp")
    app = flask.Flask(__name__)
    app.config.update(CACHE_TYPE="shmstore.flask.ShmStoreCache", CACHE_KEY_PREFIX=name + ":",
                      CACHE_OPTIONS={"memory": 8 << 20, "detach": False})
    cache = flask_caching.Cache(app)
    b = app.extensions["cache"][cache]
    assert b.name == name and b.key_prefix == name + ":"


@pytest.mark.parametrize("config, error", [
    ({"CACHE_KEY_PREFIX": ""}, shmstore.InvalidArgumentError),
    ({"CACHE_SHMSTORE_NAME": "bad name!"}, shmstore.InvalidNameError),
    ({"CACHE_SHMSTORE_NAME": "ok", "CACHE_ARGS": ["x"]}, shmstore.InvalidArgumentError),
    ({"CACHE_SHMSTORE_NAME": "ok", "CACHE_OPTIONS": {"memory": -1}}, shmstore.InvalidLayoutError),
    ({"CACHE_SHMSTORE_NAME": "ok", "CACHE_OPTIONS": {"value_type": int}}, shmstore.InvalidArgumentError),
    ({"CACHE_SHMSTORE_NAME": "ok", "CACHE_DEFAULT_TIMEOUT": math.nan}, shmstore.InvalidArgumentError),
    ({"CACHE_SHMSTORE_NAME": "ok", "CACHE_OPTIONS": {"timeout": math.nan}}, shmstore.InvalidArgumentError),
    ({"CACHE_SHMSTORE_NAME": "ok", "CACHE_OPTIONS": {"read_cache": -1}}, shmstore.InvalidLayoutError),
    ({"CACHE_SHMSTORE_NAME": "ok", "CACHE_OPTIONS": {"eviction": "fifo"}}, shmstore.ShmStoreError),
])
def test_bad_config(config, error):
    app = flask.Flask(__name__)
    app.config.update(CACHE_TYPE="shmstore.flask.ShmStoreCache", **config)
    with pytest.raises(error):
        flask_caching.Cache(app)


def test_bad_keys(backend):
    with pytest.raises(shmstore.InvalidArgumentError):
        backend.get(b"bytes")
    with pytest.raises(shmstore.InvalidArgumentError):
        backend.set(5, 1)


def test_a_forked_child_uses_the_inherited_backend(backend):
    """Gunicorn's preload_app: the app (and its backend, already used) is made before
    the fork; the child's reads and writes go to the same store."""
    import os

    backend.set("before", "fork")
    pid = os.fork()
    if pid == 0:  # the child leaves through os._exit, whatever happens
        code = 1
        try:
            if backend.get("before") == "fork" and backend.set("child", os.getpid()) and backend.inc("n") == 1:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert backend.get("child") == pid and backend.get("n") == 1


def test_store_options(names):
    """The defaults hold unless CACHE_OPTIONS says otherwise; memory=None is a
    fixed-slot store."""
    made = []
    try:
        for options, want in [
            ({}, {"memory": 64 << 20, "key_size": 256}),
            ({"memory": 8 << 20, "key_size": 64}, {"memory": 8 << 20, "key_size": 64}),
            ({"memory": None, "capacity": 100, "value_size": 512},
             {"memory": None, "capacity": 100, "key_size": 64, "value_size": 512}),
        ]:
            b = ShmStoreCache(names("flopt"), key_prefix="p:", detach=False, **options)
            made.append(b)
            assert b.set("k", "v") and b.get("k") == "v"
            st = b.store.stats()
            for field, value in want.items():
                got = getattr(st, field)
                assert (not got if value is None else got == value), (options, field, got)
    finally:
        for b in made:
            coord = b.store.coordinator if b._store is not None else None
            b.close()
            if coord is not None:
                coord.stop()
