"""get_many's vectorized probe agrees with per-key gets in every case it must handle."""

from __future__ import annotations

import random

import hypothesis.strategies as st
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import shmstore
from shmstore import _layout as L
from shmstore._many import key_words, padded_words
from shmstore._segment import make_readers
from tests.helpers.hashes import same_hash_keys

#: Every test here runs on both cores: the compiled one and pure Python (conftest.core).
pytestmark = pytest.mark.usefixtures("core")


COLLIDING = tuple(same_hash_keys(2))  # two keys, one key_hash


def test_collision_pair_is_real():
    a, b = COLLIDING
    assert a != b and L.key_hash(a) == L.key_hash(b)


def test_key_words_match_the_encoded_keys():
    """key_words (the fast key array) gives each key's UTF-8 bytes zero-padded, or
    declines (None) so the caller takes the per-key path that raises typed errors."""
    ksz = 21
    cases = {
        "one length, str": [f"key:{i:06d}" for i in range(40)],
        "one length, bytes": [b"k%05d" % i for i in range(40)],
        "lengths vary": [f"k{i}" * (1 + i % 4) for i in range(40)],
        "not ascii": ["kľúč-%d" % i for i in range(40)],
        "longest allowed": ["x" * ksz] * 40,
        "one length, not ascii": ["é" * 10] * 40,
    }
    for what, keys in cases.items():
        got = key_words(keys, ksz)
        assert got is not None, what
        words, lens = got
        kbs = [k.encode() if isinstance(k, str) else k for k in keys]
        assert lens.tolist() == [len(k) for k in kbs], what
        assert np.array_equal(words, padded_words(kbs, ksz)), what
    declined = {
        "a NUL inside": ["a\0b"] + ["k%d" % i for i in range(39)],
        "a NUL at the end": [b"ab\0"] * 40,
        "too long": ["x" * (ksz + 1)] * 40,
        "too long, lengths vary": ["x" * (ksz + 1)] + ["k%d" % i for i in range(39)],
        "empty": [""] * 40,
        "an empty one": [""] + ["k%d" % i for i in range(39)],
        "str and bytes": ["a", b"b"] * 20,
        "bytearray": [bytearray(b"ab")] * 40,
        "not a key": [1] * 40,
    }
    for what, keys in declined.items():
        assert key_words(keys, ksz) is None, what


def test_get_many_refuses_bad_keys_with_typed_errors(served):
    n, _ = served(capacity=100, key_size=8)
    with shmstore.connect(n) as s:
        with pytest.raises(shmstore.KeyTooLongError):
            s.get_many(["k%d" % i for i in range(40)] + ["x" * 9])
        with pytest.raises(shmstore.KeyTooLongError):
            s.get_many(["y" * 9] * 40)
        with pytest.raises(shmstore.InvalidKeyError):
            s.get_many([""] * 40)
        with pytest.raises(shmstore.InvalidKeyError):
            s.get_many([1] * 40)


ALPHABET = ([b"k%d" % i for i in range(60)] + ["s%d" % i for i in range(20)] + list(COLLIDING)
            + ["ключ", "ключ2", b"n\0ul", b"\xff\xfe", "é"])


# 30 examples per core (60 in all) start 60 coordinators: seconds on a quiet machine,
# minutes on a loaded one.
@pytest.mark.timeout(600)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), key_size=st.sampled_from([21, 24]))
def test_vectorized_get_many_matches_per_key_gets(served, data, key_size):
    """Random puts and deletes, then get_many of random keys (str, bytes, colliding,
    NULs, not ASCII, the longest allowed; key_size 21 makes the last key word run into
    the value) agrees with per-key gets."""
    n, coord = served(capacity=60, key_size=key_size, value_size=64)
    alphabet = ALPHABET + [b"x" * key_size, b"y" * (key_size - 1), "z" * key_size]
    # One coordinator per example, stopped when the example ends: left to the fixture's
    # teardown, 60 of them ran at once and their stops outlasted the test's timeout.
    with coord, shmstore.connect(n) as s:
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
        shape = data.draw(st.sampled_from(["any", "str", "bytes"]))
        pool = [k for k in alphabet if shape == "any" or isinstance(k, str) == (shape == "str")]
        query = data.draw(st.lists(st.sampled_from(pool), min_size=32, max_size=200))
        expected = [s.get(k, "MISSING") for k in query]
        assert s.get_many(query, default="MISSING") == expected
        if s._readers.probe_many is not None:  # the pure-Python core's numpy probe
            lens = np.array([len(k.encode() if isinstance(k, str) else k) for k in query])
            fast, _, slow, _ = s._readers.probe_many(query, lens)
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


def test_short_keys_in_slots_of_longer_keys_take_the_numpy_path(python_core, served):
    """The engine zero-pads a key to 8 bytes (the value follows), so the word-wise key
    compare of the numpy path (ceil(klen / 8) words) accepts a short key in a slot that
    held a longer one (a stale pad would send every such key through the per-key
    path: correct, but slow)."""
    n, _ = served(capacity=40, key_size=24)
    with shmstore.connect(n) as s:
        long_keys = [b"L%02d" % i + b"x" * 21 for i in range(40)]
        short_keys = [b"s%02d" % i for i in range(40)]
        nslots = len(s._seg.slot_refs()[0])  # free slots are taken oldest first:
        for r in range(nslots // len(long_keys) + 2):  # every slot takes a long key
            for k in long_keys:
                s.put(k, r)
        for k in long_keys:
            s.delete(k)
        for k in short_keys:
            s.put(k, 2)  # every slot of the store held a long key before
        fast, _, slow, _ = s._readers.probe_many(short_keys, np.array([len(k) for k in short_keys]))
        assert len(fast) == 40 and not slow, (len(fast), len(slow))
        assert s.get_many(short_keys) == [2] * 40


@pytest.mark.parametrize("value_size", [40, 3000], ids=["whole-records", "longest-value"])
def test_get_many_reads_every_size_class_in_numpy(python_core, served, value_size):
    """A memory store keeps records of different sizes in different classes' pages;
    the numpy probe gathers a record at any slot reference, finds the value after the
    key padded to 8 bytes, and settles every key itself (found or a trusted miss),
    with keys of one length and of mixed lengths."""
    rnd = random.Random(5)
    n, _ = served(capacity=300, key_size=20, value_size=value_size, memory=8 << 20, growth=2.0)
    with shmstore.connect(n) as s:
        model = {}
        for i in range(200):
            k = (f"{i}:" + "k" * rnd.randrange(18))[:20]
            model[k] = b"v" * rnd.randrange(value_size - 8)
            s.put(k, model[k])
        seg = s._seg
        assert len({seg.class_of(seg.lookup(k.encode())[0]) for k in model}) >= min(3, len(seg.classes)) >= 2
        for query in (list(model) + [f"absent{i}" for i in range(30)],
                      [k for k in model if len(k) == 5] * 3 + ["zzzzz"] * 40):
            want = [model.get(k) for k in query]
            assert s.get_many(query) == want
            lens = np.array([len(k.encode()) for k in query])
            fast, _, slow, _ = s._readers.probe_many(query, lens)
            assert len(fast) == sum(w is not None for w in want) and not slow, (len(fast), len(slow))


class _HookedTable(np.ndarray):
    """A page-table view that runs ``hooks[i]`` before its i-th fancy-index read
    (get_many's numpy probe reads the candidates' entries before and after its copy)."""

    hooks: dict = {}
    reads = 0

    def __getitem__(self, item):
        if isinstance(item, np.ndarray):
            cls = type(self)
            cls.reads += 1
            hook = cls.hooks.pop(cls.reads, None)
            if hook is not None:
                hook()
        return np.ndarray.__getitem__(self, item)


def test_get_many_numpy_probe_refuses_slots_whose_page_entry_changed(python_core, names, monkeypatch):
    """Format 4: the numpy probe loads every candidate's page entry before its copy and
    again after it; a page whose entry changed in between (reassigned, here with its
    bytes left as they were so only the entry tells) settles none of its keys in
    numpy: they go the per-key way, which answers them right."""
    from tests.helpers.seqlock import mini_store

    lay = L.Layout(capacity=64, key_size=16, value_size=40, memory=2 << 20)
    with mini_store(names(), lay) as (w, reader):
        w.assign_page(0, 0)
        keys = [f"key{i:03d}" for i in range(40)]
        for k in keys:
            w.put(k, msgspec.msgpack.encode(k), cls=0)
        monkeypatch.setattr(_HookedTable, "hooks", {})
        monkeypatch.setattr(_HookedTable, "reads", 0)
        real = reader.page_table
        monkeypatch.setattr(reader, "page_table", lambda: real().view(_HookedTable), raising=False)
        rd = make_readers(reader, msgspec.msgpack.decode, lambda *a: pytest.fail("stale path"))
        lens = np.array([len(k) for k in keys])
        fast, blob, slow, _ = rd.probe_many(keys, lens)
        assert len(fast) == len(keys) and not slow  # settled in numpy while nothing moves
        pte = w.q[w.seg.pt0]

        def reassign():  # a new epoch in the entry: the page was handed over again
            w.q[w.seg.pt0] = (((pte >> L.PTE_CLASS_BITS) + 1) << L.PTE_CLASS_BITS) | (pte & 0xFF)

        _HookedTable.hooks[_HookedTable.reads + 2] = reassign  # between the two loads
        fast, blob, slow, _ = rd.probe_many(keys, lens)
        assert len(fast) == 0, f"{len(fast)} keys settled from a page whose entry changed"
        assert {keys[i]: msgspec.msgpack.decode(v) for i, v in slow.items()} == {k: k for k in keys}
        del rd
