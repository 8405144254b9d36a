"""get_many's vectorized probe agrees with per-key gets in every case it must handle."""

from __future__ import annotations

import random
import zlib

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

import shmstore


def crc_collision() -> tuple[bytes, bytes]:
    """Two different 8-byte keys with the same CRC-32: a birthday search over random
    keys from a fixed seed (CRC is linear, so near-identical keys almost never collide)."""
    rng = random.Random(2026)
    seen: dict[int, bytes] = {}
    while True:
        k = rng.randbytes(8)
        h = zlib.crc32(k)
        if h in seen and seen[h] != k:
            return seen[h], k
        seen[h] = k


COLLIDING = crc_collision()


def test_collision_pair_is_real():
    a, b = COLLIDING
    assert a != b and zlib.crc32(a) == zlib.crc32(b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_vectorized_get_many_matches_per_key_gets(served, data):
    n, _ = served(capacity=60, key_size=24, value_size=64)
    alphabet = [b"k%d" % i for i in range(80)] + list(COLLIDING) + [b"x" * 24, b"y" * 23]
    with shmstore.connect(n) as s:
        ops = data.draw(st.lists(st.tuples(st.sampled_from(["put", "del"]), st.sampled_from(alphabet),
                                           st.binary(max_size=40)), max_size=120))
        for op, k, v in ops:
            if op == "put":
                try:
                    s.put(k, v)
                except shmstore.StoreFullError:
                    pass
            else:
                s.delete(k)
        query = data.draw(st.lists(st.sampled_from(alphabet), min_size=32, max_size=200))
        expected = [s.get(k, "MISSING") for k in query]
        assert s.get_many(query, default="MISSING") == expected
        fast, _, slow, _ = s._probe_many(query, __import__("numpy").array([len(k) for k in query]))
        assert len(fast) + len(slow) == sum(e != "MISSING" for e in expected)


def test_colliding_keys_are_told_apart(served):
    n, _ = served(capacity=100)
    a, b = COLLIDING
    with shmstore.connect(n) as s:
        s.put(a, "a")
        keys = [b] * 20 + [a] * 20
        assert s.get_many(keys) == [None] * 20 + ["a"] * 20
        s.put(b, "b")
        assert s.get_many(keys) == ["b"] * 20 + ["a"] * 20
        s.delete(a)
        assert s.get_many(keys) == ["b"] * 20 + [None] * 20
