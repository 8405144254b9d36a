"""The compiled core (shmstore._native) against the layout and the pure-Python core.

What the C protocol does under concurrency is proven in tests/test_native_tsan.py; the
protocol tests (seqlock, read cache, get_many, snapshots, crash) run on both cores
(conftest ``core``). Here: the constants and the hash agree with ``_layout``; the
switch between cores; and the extension's own arguments are hostile-proof.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmstore
from shmstore import _compiled
from shmstore import _layout as L

native = pytest.importorskip("shmstore._native", reason="the compiled core is not built")


def test_word_indices_match_the_layout():
    for attr in ("H_STATE", "H_EPOCH", "H_INDEX_GEN", "H_LAST_DELETE_EPOCH", "H_BATCH_SEQ", "H_COUNT",
                 "STATE_READY", "FLAG_FREE", "SLOT_HEADER"):
        assert getattr(native, attr) == getattr(L, attr), attr


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_key_hash_is_the_layouts(kb):
    assert native.key_hash(kb) == L.key_hash(kb)


def test_key_hash_at_the_modulus_edges():
    P = L.HASH_PRIME
    for x in (P - 1, P, P + 1, 2 * P, (1 << 64) - 1, (1 << 128) - 1, P * (1 << 70)):
        kb = x.to_bytes((x.bit_length() + 7) // 8, "little")
        assert native.key_hash(kb) == L.key_hash(kb), hex(x)
    for n in (8, 16, 4096):
        assert native.key_hash(b"\xff" * n) == L.key_hash(b"\xff" * n)


def test_native_flag_follows_the_environment():
    """NATIVE is True by default and False under SHMSTORE_NO_EXTENSIONS=1."""
    code = "import shmstore; print(shmstore.NATIVE)"
    env = {k: v for k, v in os.environ.items() if k != _compiled.ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    env[_compiled.ENV] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_missing_extension_fails_loudly():
    """Not asked for pure Python, and the extension does not load: the import fails,
    naming both fixes, rather than silently reading through the slow core."""
    code = "import sys; sys.modules['shmstore._native'] = None; import shmstore"
    env = {k: v for k, v in os.environ.items() if k != _compiled.ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "SHMSTORE_NO_EXTENSIONS=1" in out.stderr and "compiler" in out.stderr


def test_sizes_that_do_not_fit_the_mapping_are_refused(served):
    """The extension never trusts sizes it is given: a layout larger than the mapping,
    or an index mask that is not a power of two minus one, is refused before any load."""
    n, _ = served(capacity=8)
    with shmstore.connect(n) as s:
        seg = s._seg
        good = seg.sizes()
        native.Mapping(seg.mm, good, lambda waited: None).close()
        bad = [
            good[:7] + (good[7] * 4,),  # mapping size beyond the mapping
            good[:2] + (good[2] * 1000,) + good[3:],  # slots beyond the mapping
            good[:4] + (good[4] - 1,) + good[5:],  # mask not 2**k - 1
            good[:5] + (70000,) + good[6:],  # key size beyond what meta can hold
        ]
        for sizes in bad:
            with pytest.raises(ValueError):
                native.Mapping(seg.mm, sizes, lambda waited: None)
        with pytest.raises(TypeError):
            native.Mapping(seg.mm, good[:5], lambda waited: None)


def test_a_reader_outlives_its_handle_safely(served):
    """A get bound method kept after close() holds its own export of the mapping: the
    mapping cannot be unmapped under it, so using it never touches freed memory."""
    if _compiled.native is None:
        pytest.skip("the pure-Python core runs here (SHMSTORE_NO_EXTENSIONS)")
    n, _ = served(capacity=8)
    s = shmstore.connect(n)
    s.put("k", "v")
    get = s.get
    s.close()
    assert get("k") == "v"  # still the old mapping, alive while this method is
    del get


def test_get_many_leaves_odd_keys_to_the_general_path(store):
    store.put("a", 1)
    store.put(b"b", 2)

    class Key(str):
        pass

    assert store.get_many([Key("a"), b"b", "zz"], default=0) == [1, 2, 0]
    with pytest.raises(shmstore.InvalidKeyError):
        store.get_many(["a", ""])
    with pytest.raises(shmstore.KeyTooLongError):
        store.get_many(["a", "x" * 1000])
    with pytest.raises(shmstore.InvalidKeyError):
        store.get_many(["a", 3.5])
    assert store.get_many([]) == []


def test_stats_count_get_many_keys_as_reads_not_cache_hits(store):
    store.put("a", 1)
    before = store.stats()
    store.get_many(["a"] * 40 + ["missing"] * 10)
    after = store.stats()
    assert after.reads - before.reads == 50
    assert after.read_cache_hits == before.read_cache_hits
