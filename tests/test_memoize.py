"""``@store.cached``: memoized across real processes, one computation per cold key,
a SIGKILLed or stopped owner taken over, ttl, stable default keys, typed errors."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

import shmstore
from shmstore import _memoize
from tests.helpers.processes import python, reap, wait_for

ROOT = str(Path(__file__).resolve().parents[1])

# A child: connects, waits for "go", calls the memoized function once and prints
# {"result": ..., "computed": bool}. The function counts its calls in the store.
CHILD = r"""
import json, sys, time
import shmstore
name, lease, work = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1
store = shmstore.connect(name)
computed = []

@store.cached(ttl=600, lease=lease, timeout=60)
def slow_square(x):
    computed.append(1)
    store.incr("calls")
    time.sleep(work)
    return {"square": x * x, "pid": __import__("os").getpid()}

print("ready", flush=True)
while store.get("go") is None:
    time.sleep(0.001)
results = [slow_square(7 + i) for i in range(rounds)]  # one cold key after another
print(json.dumps({"result": results[0], "results": results, "computed": len(computed)}), flush=True)
"""


def _children(name: str, n: int, lease: float, work: float, rounds: int = 1) -> list:
    procs = [python(CHILD, name, str(lease), str(work), str(rounds), cwd=ROOT) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return procs


def _outputs(procs: list, timeout: float = 60) -> list[dict]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_cold_key_computed_once_across_processes(served):
    name, _ = served(capacity=1000)
    store = shmstore.connect(name)
    procs = _children(name, 6, lease=30, work=0.2, rounds=4)
    try:
        store.put("go", 1)  # the barrier: every child is waiting on it
        outs = _outputs(procs)
    finally:
        reap(*procs)
    # each of the 4 keys computed once: counted in the store, and by the children
    computed = sum(o["computed"] for o in outs)
    results = {json.dumps(o["results"], sort_keys=True) for o in outs}  # all got the same
    assert (store.get("calls"), computed, len(results)) == (4, 4, 1), outs
    store.close()


def _owner_and_waiter(name: str, store, lease: float):
    """Start one child that claims the key and computes for a long time, then a second
    that must wait for it; returns both once the owner is inside the function."""
    owner = python(CHILD, name, str(lease), "600", cwd=ROOT)
    assert owner.stdout.readline().strip() == "ready", owner.stderr.read()
    store.put("go", 1)
    wait_for(lambda: store.get("calls") == 1, what="the owner to start computing")
    waiter = python(CHILD, name, str(lease), "0", cwd=ROOT)
    assert waiter.stdout.readline().strip() == "ready", waiter.stderr.read()
    return owner, waiter


def test_owner_sigkilled_mid_compute_another_computes(served):
    name, _ = served(capacity=1000)
    store = shmstore.connect(name)
    owner = waiter = None
    try:
        owner, waiter = _owner_and_waiter(name, store, lease=3)
        owner.kill()  # SIGKILL while it holds the claim
        owner.wait()
        (out,) = _outputs([waiter])
    finally:
        reap(*[p for p in (owner, waiter) if p is not None])
    assert out["computed"] == 1 and out["result"]["square"] == 49, out
    assert store.get("calls") == 2
    store.close()


def test_stopped_owner_loses_the_key_after_its_lease(served):
    """A live owner that does not finish (SIGSTOP: its pid still runs) holds the key only
    for its lease; then a waiter claims and computes."""
    name, _ = served(capacity=1000)
    store = shmstore.connect(name)
    owner = waiter = None
    try:
        owner, waiter = _owner_and_waiter(name, store, lease=1.0)
        os.kill(owner.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        (out,) = _outputs([waiter])
        waited = time.monotonic() - t0
    finally:
        if owner is not None:
            os.kill(owner.pid, signal.SIGCONT)
        reap(*[p for p in (owner, waiter) if p is not None])
    assert out["computed"] == 1 and out["result"]["square"] == 49, (out, waited)
    assert store.get("calls") == 2
    store.close()


def test_ttl_expiry_recomputes(clock, served):
    name, _ = served(capacity=1000)
    store = shmstore.connect(name)
    calls = []

    @store.cached(ttl=10)
    def f(x):
        calls.append(x)
        return x + 1

    assert (f(1), f(1)) == (2, 2)
    clock(5)
    assert f(1) == 2 and calls == [1]
    clock(6)  # 11 s after the write: expired for every process
    assert f(1) == 2 and calls == [1, 1]
    store.close()


KEY_CHILD = r"""
import sys
import shmstore
from tests.test_memoize import sample
store = shmstore.connect(sys.argv[1])
f = store.cached(ttl=60)(sample)
print(f.cache_key(3, "x", flag=True, opts={"b": [1, 2.5], "a": None}, tags={"u", "v"}).hex())
print(f(3, "x", flag=True, opts={"b": [1, 2.5], "a": None}, tags={"u", "v"}))
"""


def sample(n, s, *, flag=False, opts=None, tags=frozenset()):
    return f"{n}-{s}-{flag}-{sorted(opts)}-{sorted(tags)}-{os.getpid()}"


def test_default_key_is_stable_across_processes(served):
    name, _ = served(capacity=1000)
    store = shmstore.connect(name)
    f = store.cached(ttl=60)(sample)
    mine = f.cache_key(3, "x", flag=True, opts={"a": None, "b": [1, 2.5]}, tags={"v", "u"})
    # the same call spelled another way is the same key
    assert mine == f.cache_key(n=3, s="x", opts={"b": [1, 2.5], "a": None}, flag=True, tags={"u", "v"})
    assert mine != f.cache_key(3, "x", flag=False, opts={"a": None, "b": [1, 2.5]}, tags={"v", "u"})
    outs = []
    for seed in ("1", "2"):  # str hashes differ per process: the key must not use them
        p = python(KEY_CHILD, name, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed})
        try:
            out, err = p.communicate(timeout=60)
        finally:
            reap(p)
        assert p.returncode == 0, err
        outs.append(out.strip().splitlines())
    assert [o[0] for o in outs] == [mine.hex(), mine.hex()], outs
    # the second child got the first child's value (its pid), as does this process
    assert outs[0][1] == outs[1][1] == f(3, "x", flag=True, opts={"a": None, "b": [1, 2.5]},
                                         tags={"u", "v"}), outs
    store.close()


def test_results_round_trip_and_none_is_cached(store):
    calls = []

    @store.cached()
    def f(x):
        calls.append(x)
        return None if x == 0 else (x, {x}, b"b")

    assert f(0) is None and f(0) is None
    assert f(1) == (1, {1}, b"b") and f(1) == (1, {1}, b"b")
    assert calls == [0, 1]
    assert f.forget(1) and not f.forget(1)
    assert f(1) == (1, {1}, b"b") and calls == [0, 1, 1]


def test_key_format_and_callable(store):
    @store.cached(key="user:{user_id}:{0}")
    def by_format(user_id, extra=1):
        return user_id * 10

    @store.cached(key=lambda args, kwargs: f"k:{args[0]}")
    def by_callable(x):
        return x * 100

    assert by_format(4) == 40 and store.get("user:4:4") == 40
    assert by_format(user_id=5) == 50 and store.get("user:5:5") == 50
    assert by_callable(2) == 200 and store.get("k:2") == 200

    @store.cached(key=lambda args, kwargs: 7)
    def bad(x):
        return x

    with pytest.raises(shmstore.InvalidKeyError, match="must return str or bytes"):
        bad(1)


def test_a_raising_function_releases_its_claim(store):
    calls = []

    @store.cached(timeout=60)
    def f():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return "ok"

    with pytest.raises(RuntimeError):
        f()
    t0 = time.monotonic()
    assert f() == "ok" and len(calls) == 2
    assert time.monotonic() - t0 < 30, "the second call waited for a claim that was released"


def test_waiter_times_out_and_computes_itself(store):
    @store.cached(ttl=60, lease=60, timeout=0.2)
    def f():
        return "mine"

    k = f.cache_key()
    lock = _memoize.lock_key(k, store._live_segment().key_size)
    # a live owner (this very process) holds the claim and never finishes
    from shmstore._liveness import process_start_ms

    store.compare_and_set(lock, [os.getpid(), process_start_ms(os.getpid()), 0], version=0, ttl=60)
    assert f() == "mine"
    assert store.get(k) == "mine"


def test_async_function_computed_once_per_key(store):
    calls = []

    @store.cached(ttl=60)
    async def f(x):
        calls.append(x)
        await asyncio.sleep(0.2)
        return [x, x]

    async def main():
        return await asyncio.gather(*(f(3) for _ in range(5)), f(4))

    assert asyncio.run(main()) == [[3, 3]] * 5 + [[4, 4]]
    assert sorted(calls) == [3, 4]


@pytest.mark.parametrize("ttl", [math.nan, True, -1, 0, math.inf, "10", 1e12])
def test_bad_ttl(store, ttl):
    with pytest.raises(shmstore.InvalidTTLError):
        store.cached(ttl=ttl)


@pytest.mark.parametrize("kwargs", [
    {"key": 5}, {"key": b"raw"}, {"lease": math.nan}, {"lease": 0}, {"lease": True},
    {"timeout": -1}, {"timeout": math.nan}, {"timeout": "1"},
])
def test_bad_arguments(store, kwargs):
    with pytest.raises(shmstore.InvalidArgumentError):
        store.cached(**kwargs)


def test_bad_key_format_fields(store):
    with pytest.raises(shmstore.InvalidArgumentError, match="names no parameter"):
        store.cached(key="u:{nope}")(lambda user: user)
    with pytest.raises(shmstore.InvalidArgumentError, match="past the function"):
        store.cached(key="u:{1}")(lambda user: user)
    with pytest.raises(shmstore.InvalidArgumentError, match="numbered"):
        store.cached(key="u:{}")(lambda user: user)


def test_argument_without_a_stable_key(store):
    f = store.cached()(lambda obj: 1)
    with pytest.raises(shmstore.InvalidArgumentError, match="key="):
        f(object())


def test_bare_decorator(store):
    calls = []

    @store.cached
    def f(x):
        calls.append(x)
        return x

    assert (f(1), f(1), calls) == (1, 1, [1])
    assert store.get(f.cache_key(1)) == 1


def test_default_key_binds_arguments_and_tells_types_apart(store):
    @store.cached()
    def f(a, b=2):
        return a

    k = f.cache_key
    assert k(1) == k(a=1) == k(1, 2) == k(b=2, a=1) == k(1, b=2)
    assert k(1) != k(1, 3)
    keys = [k((1, 2)), k([1, 2]), k(1), k(1.0), k(True), k("1"), k(b"1"), k(None), k({1: 2}),
            k({1, 2}), k(frozenset({1, 2}))]
    assert len(set(keys)) == len(keys)
    assert k({"x": 1, "y": 2}) == k({"y": 2, "x": 1}) and k({3, 1, 2}) == k({1, 2, 3})
    for bad in [lambda: f(), lambda: f(1, 2, 3), lambda: f(1, c=3), lambda: f(1, a=1)]:
        with pytest.raises(TypeError, match="f()"):
            bad()
