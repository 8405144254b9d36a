"""Spies and helpers for the seqlock protocol tests (tests/test_seqlock*.py, test_read_cache).

Protocol tests emulate a reader straddling writes deterministically: the coordinator is
stopped, the test maps the segment writable and drives ``coordinator._engine.Engine``
itself, and a reader's ``Segment.q`` / ``Segment.mv`` are replaced by spies that
forward every access to the real views and run the "writer" at a chosen point.
"""

from __future__ import annotations

import contextlib

import numpy as np

from shmstore import _layout as L
from shmstore._segment import Segment
from shmstore._shm import open_segment
from shmstore.coordinator._engine import Engine



class WordsSpy:
    """Stands in for ``Segment.q`` (the u64 view): forwards and logs every access.

    ``before_read[i]`` is a callable run once, just before word ``i`` is next read.
    """

    def __init__(self, q: memoryview, log: list) -> None:
        self.q = q
        self.log = log
        self.before_read: dict = {}

    def __getitem__(self, i: int) -> int:
        hook = self.before_read.pop(i, None)
        if hook is not None:
            hook()
        v = self.q[i]
        self.log.append(("qr", i, v))
        return v

    def __setitem__(self, i: int, v: int) -> None:
        self.log.append(("qw", i, v))
        self.q[i] = v

    def __len__(self) -> int:
        return len(self.q)


class BytesSpy:
    """Stands in for ``Segment.mv`` (the byte view): forwards and logs slices.

    ``before_slice(start, stop)`` runs before every slice read.
    """

    def __init__(self, mv: memoryview, log: list) -> None:
        self.mv = mv
        self.log = log
        self.before_slice = None

    def __getitem__(self, s: slice) -> memoryview:
        assert isinstance(s, slice), f"byte view indexed with {s!r}, not a slice"
        if self.before_slice is not None:
            self.before_slice(s.start, s.stop)
        self.log.append(("mr", s.start, s.stop))
        return self.mv[s]

    def __setitem__(self, s: slice, v: bytes) -> None:
        assert isinstance(s, slice), f"byte view indexed with {s!r}, not a slice"
        self.log.append(("mw", s.start, s.stop))
        self.mv[s] = v

    def __len__(self) -> int:
        return len(self.mv)


@contextlib.contextmanager
def spied(seg: Segment):
    """Install a WordsSpy/BytesSpy pair on a Segment; restore the real views after.

    The spies sit in the pure-Python read path, so inside the block the segment reads
    through it (``seg.core`` None; readers built there are Python closures) even when the
    compiled core runs: these tests pin the reference implementation's interleavings;
    the compiled core's are proven under ThreadSanitizer (tests/test_native_tsan.py).
    """
    log: list = []
    q, mv = seg.q, seg.mv
    core = seg.core
    seg.core = None
    seg.__dict__.pop("lookup", None)  # the class's Python lookup
    seg.q, seg.mv = WordsSpy(q, log), BytesSpy(mv, log)
    try:
        yield seg.q, seg.mv, log
    finally:
        seg.q, seg.mv = q, mv
        if core is not None:
            seg.core = core
            seg.lookup = core.lookup


class SlotGeometry:
    """Word and byte offsets of one slot."""

    def __init__(self, seg: Segment, slot: int) -> None:
        self.slot = slot
        self.w = seg.slot0 + slot * seg.slot_words  # the seq word
        self.base = self.w * 8
        self.kofs = self.base + L.SLOT_HEADER
        self.vofs = self.kofs + seg.key_size
        self.end = self.base + seg.slot_size


def slot_of_byte(seg: Segment, offset: int) -> int:
    return (offset - L.SLOTS_OFFSET) // seg.slot_size


@contextlib.contextmanager
def writer_side(served, compiled: bool | None = None, **serve_kwargs):
    """A served store whose coordinator is then STOPPED: the test is the only writer.

    ``compiled``: the Engine's core (None: the one that runs; False: the Python stores,
    which a test can spy on through ``eng.q`` / ``eng.mv``).

    Yields ``(name, writable Segment, Engine)``.
    """
    n, coord = served(**serve_kwargs)
    coord.stop()
    seg = open_segment(n, writable=True)
    try:
        eng = Engine(seg, compiled=compiled)
        eng.rebuild_free_list()
        yield n, seg, eng
    finally:
        seg.close()


def bucket_pos(seg: Segment, kb: bytes) -> int:
    """The index position (0-based) whose bucket holds ``kb``'s record."""
    slot = seg.lookup(kb)[0]
    want = (L.key_hash(kb) << 32) | (slot + 1)
    hits = np.flatnonzero(seg.index_view() == np.uint64(want))
    assert len(hits) == 1, f"{kb!r}: {len(hits)} buckets point at slot {slot}"
    return int(hits[0])


def result_of(fn):
    """``fn()``'s result, or the exception it raised."""
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - handed back to the test to assert on
        return e


def colliding_keys(mask: int, count: int) -> list[str]:
    """``count`` keys whose key_hash & mask (their home bucket) is the same."""
    homes: dict[int, list[str]] = {}
    for i in range(1_000_000):
        k = f"c{i}"
        group = homes.setdefault(L.key_hash(k.encode()) & mask, [])
        group.append(k)
        if len(group) == count:
            return group
    raise AssertionError("no colliding keys found")

