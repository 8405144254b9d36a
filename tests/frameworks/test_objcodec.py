"""shmstore._objcodec: plain data stays msgpack (any client reads it), the rest pickles."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import fractions
import pickle
import uuid

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmstore
from shmstore._objcodec import PICKLE_EXT, dumps, loads


class Color(enum.IntEnum):
    RED = 1


class Tag(str):
    pass


class Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("not this one")


def msgpack_exact(v) -> bool:
    """Whether msgpack alone gives back an equal object of the same type."""
    try:
        back = msgspec.msgpack.decode(msgspec.msgpack.encode(v))
    except (TypeError, ValueError, OverflowError):
        return False
    return type(back) is type(v) and back == v and repr(back) == repr(v)


PLAIN = [None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.0, "", "héllo",
         b"", b"\x00\xff", [], [1, "a", None], {}, {"a": [1, {"b": b"x"}], "c": 2.5}]

#: values msgpack would change (type or value): they must pickle
NOT_PLAIN = [(1, 2), {1, 2}, frozenset({3}), datetime.datetime(2024, 1, 2, 3, 4, 5),
             datetime.date(2024, 1, 2), datetime.timedelta(seconds=3), decimal.Decimal("1.10"),
             fractions.Fraction(1, 3), 2**64, -(2**63) - 1, bytearray(b"ab"), Color.RED,
             Tag("x"), collections.OrderedDict(a=1), [1, (2, 3)],
             {"a": {"b": {1, 2}}}, uuid.UUID(int=5), complex(1, 2)]


@pytest.mark.parametrize("v", PLAIN, ids=repr)
def test_plain_values_pass_through_and_msgpack_round_trips_them(v):
    assert msgpack_exact(v)
    assert dumps(v) is v
    assert loads(dumps(v)) is v


@pytest.mark.parametrize("v", NOT_PLAIN, ids=repr)
def test_other_values_pickle_and_msgpack_would_not_keep_them(v):
    assert not msgpack_exact(v)
    d = dumps(v)
    assert type(d) is msgspec.msgpack.Ext and d.code == PICKLE_EXT
    back = loads(d)
    assert type(back) is type(v) and back == v


@pytest.mark.parametrize("v", [datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
                               {1: "int key"}], ids=repr)
def test_pickled_by_rule_though_msgpack_keeps_them(v):
    # Aware UTC datetimes survive msgpack's timestamp, but other zones and naive ones
    # do not; the rule is by type, so all datetimes pickle alike. Dicts: str keys only
    # (what every msgpack client reads as a map it can index).
    assert msgpack_exact(v)
    assert type(dumps(v)) is msgspec.msgpack.Ext
    assert loads(dumps(v)) == v


def test_nan_and_cycles():
    nan = float("nan")
    assert dumps(nan) is nan
    loop: list = [1]
    loop.append(loop)
    back = loads(dumps(loop))  # RecursionError in the plain check, pickle keeps the cycle
    assert back[0] == 1 and back[1] is back
    deep: list = []
    for _ in range(300):
        deep = [deep, (1,)]
    assert loads(dumps(deep)) == deep


def test_unpicklable_raises_pickle_error():
    with pytest.raises(pickle.PicklingError):
        dumps(Unpicklable())


def test_ext_of_another_code_is_returned_as_is():
    e = msgspec.msgpack.Ext(5, b"abc")
    assert loads(e) is e
    assert loads(dumps(e)) == e  # a user's Ext is not plain: it pickles and comes back


plain_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(plain_data)
def test_plain_data_stays_msgpack(v):
    assert dumps(v) is v and msgpack_exact(v)


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.integers() | st.text() | st.tuples(st.integers()) | st.frozensets(st.integers()),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                    max_leaves=10))
def test_any_mix_round_trips(v):
    back = loads(dumps(v))
    assert back == v and type(back) is type(v)


def test_through_a_store_and_a_plain_client(served):
    name, _ = served("objcodec", capacity=100, value_size=4096)
    with shmstore.connect(name) as s, shmstore.connect(name) as plain:
        s.put("plain", dumps({"a": [1, 2], "b": "x"}))
        s.put("tuple", dumps((1, 2)))
        assert plain.get("plain") == {"a": [1, 2], "b": "x"}  # no codec needed to read it
        raw = plain.get("tuple")
        assert type(raw) is msgspec.msgpack.Ext and raw.code == PICKLE_EXT
        assert loads(s.get("tuple")) == (1, 2)
        plain.put("from-plain", [1, {"k": None}])
        assert loads(s.get("from-plain")) == [1, {"k": None}]


def test_only_the_codec_imports_pickle():
    """The core store (library, coordinator, workers) never pickles or unpickles: the
    framework backends reach pickle only through shmstore._objcodec."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    importers = []
    for folder in ("shmstore", "coordinator", "workers"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n.split(".")[0] in ("pickle", "_pickle", "dill", "cloudpickle") for n in names):
                    importers.append(str(path.relative_to(root)))
    assert importers == ["shmstore/_objcodec.py"]
