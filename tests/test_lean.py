"""A process that only reads stays lean: it imports neither numpy nor the other heavy
modules that only other features need (see ``shmstore._lazy``).

Each test starts a fresh interpreter (``python -c``) that imports shmstore, connects to
a served store and does 1,000 gets, then prints the modules it has imported; the
modules of the write path, tables, snapshots and scans must not be among them.
``shmstore bench``'s ``memory.*_reader`` rows measure what such a process costs.
"""

from __future__ import annotations

import json

import pytest

import shmstore
from tests.helpers.processes import python, reap

#: The reader: import, connect, 1,000 gets (all found), then its modules as JSON.
READER = """
import json, sys
import shmstore
s = shmstore.connect(sys.argv[1])
got = [s.get(f"k{i}") for i in range(1000)]
assert got == [f"v{i}" for i in range(1000)], "wrong values"
print(json.dumps(sorted(sys.modules)), flush=True)
s.close()
"""

#: What a reader must not import, beside numpy: each costs 1-9 MiB of private memory
#: (asyncio with ssl ~9, hashlib's OpenSSL ~3.5, concurrent.futures ~1, subprocess ~1),
#: or is what only writes, get_many, snapshots, tables or stats() need (numpy among it).
HEAVY = ("asyncio", "ssl", "_hashlib", "hashlib", "concurrent", "subprocess", "psutil",
         "shmstore._channel", "shmstore._writes", "shmstore._many", "shmstore._snapshot",
         "shmstore._table", "shmstore._stats")


def _reader_modules(served) -> set[str]:
    name, _coord = served("lean", capacity=2000)
    with shmstore.connect(name) as s:
        for i in range(1000):
            s.put(f"k{i}", f"v{i}", wait=False)
        s.flush()
    p = python(READER, name)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        reap(p)
    assert p.returncode == 0, f"reader failed (exit {p.returncode}):\n{err}"
    return set(json.loads(out))


def test_reader_imports_no_heavy_module(served):
    modules = _reader_modules(served)
    heavy = sorted(m for m in modules if m in HEAVY or m.split(".")[0] in HEAVY)
    assert not heavy, f"a process that only reads imported {heavy}"


def test_reader_imports_no_numpy(served):
    modules = _reader_modules(served)
    assert "numpy" not in modules, "a process that only reads imported numpy"


def test_lazy_exports_resolve():
    """The re-exports loaded on first use are the real objects (and in ``dir``)."""
    from shmstore._data import check
    from shmstore._snapshot import Snapshot
    from shmstore._table import Table
    from shmstore._writes import Batch

    assert (shmstore.Batch, shmstore.Snapshot, shmstore.Table, shmstore.check) == (
        Batch, Snapshot, Table, check)
    assert {"Batch", "Snapshot", "Table", "check", "metrics_app"} <= set(dir(shmstore))
    with pytest.raises(AttributeError):
        shmstore.NoSuchName  # noqa: B018
