"""A hypothesis state machine: the store against a plain dict model."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
import pytest
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import shmstore
from tests.helpers.processes import shm_objects, unique_name

KEYS = st.sampled_from([f"k{i}" for i in range(12)] + [b"b0", b"b1", "\u00e9t\u00e9"])
VALUES = st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=20),
                   st.lists(st.integers(0, 9), max_size=4), st.none(),
                   st.dictionaries(st.text(max_size=3), st.booleans(), max_size=3))
CAPACITY = 8


def _k(key) -> bytes:
    return key.encode() if isinstance(key, str) else key


#: every (name, coordinator) the machine served, for the module's cleanup below
_SERVED: list[tuple[str, shmstore.Coordinator]] = []


@pytest.fixture(scope="module", autouse=True)
def _cleanup_served():
    """A run interrupted mid-example (a timeout, Ctrl-C) skips the machine's teardown:
    stop and destroy whatever it served, and fail if anything is left in /dev/shm."""
    yield
    left = []
    for name, coord in _SERVED:
        coord.stop(timeout=5)
        shmstore.destroy(name)
        if shm_objects(name):
            left.append(name)
    _SERVED.clear()
    assert not left, f"shared-memory objects leaked: {left}"


class StoreVsDict(RuleBasedStateMachine):
    """Every op on the store and on a dict; they must agree after each step."""

    @initialize()
    def start(self):
        self.name = unique_name("hyp")
        self.coord = shmstore.serve(self.name, capacity=CAPACITY, value_size=256)
        _SERVED.append((self.name, self.coord))
        self.store = shmstore.connect(self.name)
        self.model: dict[bytes, object] = {}
        self.versions: dict[bytes, int] = {}

    def teardown(self):
        if hasattr(self, "store"):
            self.store.close()
            self.coord.stop()
            shmstore.destroy(self.name)

    def _full_for(self, key) -> bool:
        return _k(key) not in self.model and len(self.model) >= CAPACITY

    @rule(key=KEYS, value=VALUES)
    def put(self, key, value):
        if self._full_for(key):
            try:
                self.store.put(key, value)
            except shmstore.StoreFullError:
                return
            raise AssertionError("put into a full store succeeded")
        v = self.store.put(key, value)
        assert v > self.versions.get(_k(key), 0)
        self.model[_k(key)] = value
        self.versions[_k(key)] = v

    @rule(key=KEYS)
    def delete(self, key):
        assert self.store.delete(key) == (_k(key) in self.model)
        self.model.pop(_k(key), None)
        self.versions.pop(_k(key), None)

    @rule(key=KEYS, delta=st.integers(-1000, 1000))
    def incr(self, key, delta):
        cur = self.model.get(_k(key), 0)
        if not isinstance(cur, int) or isinstance(cur, bool) or self._full_for(key):
            try:
                self.store.incr(key, delta)
            except (shmstore.ValueEncodingError, shmstore.StoreFullError):
                return
            raise AssertionError(f"incr over {cur!r} succeeded")
        if not -(2**63) <= cur + delta < 2**64:
            return
        assert self.store.incr(key, delta) == cur + delta
        self.model[_k(key)] = cur + delta
        self.versions[_k(key)] = self.store.version(key)

    @rule(key=KEYS, value=VALUES, stale=st.booleans())
    def cas(self, key, value, stale):
        have = self.versions.get(_k(key), 0)
        expect = have + 1 if stale else have
        if stale or self._full_for(key):
            try:
                self.store.compare_and_set(key, value, version=expect)
            except (shmstore.VersionConflictError, shmstore.StoreFullError):
                return
            raise AssertionError("a compare_and_set that had to fail succeeded")
        self.versions[_k(key)] = self.store.compare_and_set(key, value, version=expect)
        self.model[_k(key)] = value

    @rule(puts=st.lists(st.tuples(KEYS, VALUES), max_size=5), dels=st.lists(KEYS, max_size=3))
    def batch(self, puts, dels):
        after = dict(self.model)
        for k, v in puts:
            after[_k(k)] = v
        for k in dels:
            after.pop(_k(k), None)
        grows = any(len({**self.model, **{_k(k): v for k, v in puts[:i + 1]}}) > CAPACITY
                    for i in range(len(puts)))
        try:
            with self.store.batch() as b:
                for k, v in puts:
                    b.put(k, v)
                for k in dels:
                    b.delete(k)
        except shmstore.StoreFullError:
            assert grows
            return
        self.model = after
        for k in {_k(k) for k, _ in puts} | {_k(k) for k in dels}:
            v = self.store.version(k)
            if v is None:
                self.versions.pop(k, None)
            else:
                self.versions[k] = v

    @precondition(lambda self: hasattr(self, "store"))
    @invariant()
    def agrees(self):
        keys = sorted(self.model)
        assert self.store.get_many(keys) == [self.model[k] for k in keys]
        assert len(self.store) == len(self.model)
        assert dict(self.store.items()) == self.model
        for k in keys:
            assert self.store.version(k) == self.versions[k]


TestStoreVsDict = StoreVsDict.TestCase
TestStoreVsDict.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
