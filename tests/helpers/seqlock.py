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
    """Word and byte offsets of one slot (a ref) as its page's class lays it out now."""

    def __init__(self, seg: Segment, slot: int, klen: int | None = None) -> None:
        self.slot = slot
        self.w = seg.slot0 + slot * seg.slot_words  # the seq word
        self.base = self.w * 8
        self.kofs = self.base + L.SLOT_HEADER
        if klen is None:
            klen = seg.q[self.w + L.S_META] & 0xFFFF
        self.vofs = self.kofs + L.align(klen, 8)  # the value follows the padded key
        c = seg.class_of(slot)
        self.end = self.base + (seg.classes[c] if c >= 0 else L.SLOT_UNIT)
        self.page_word = seg.pt0 + (slot >> seg.ref_shift)  # its page-table entry


def slot_of_byte(seg: Segment, offset: int) -> int:
    """The ref of the slot whose bytes hold ``offset`` (a byte offset of the segment)."""
    page = (offset - 8 * seg.slot0) // seg.page_size
    c = seg.page_class(page)
    size = seg.classes[c]
    start = 8 * seg.slot0 + page * seg.page_size
    return (start + (offset - start) // size * size - 8 * seg.slot0) // L.SLOT_UNIT


class MiniWriter:
    """A small coordinator stand-in over a writable Segment, for read-path unit tests
    that need no Engine: the spec's write order (seq odd, body, seq even; a page
    move's entry before its new slot headers), buckets inserted by linear probing.

    Not the engine: no WAL, no counters beyond H_EPOCH / H_COUNT, no eviction; every
    op takes the next epoch, so stamps are unique as the protocol needs.
    """

    def __init__(self, seg: Segment) -> None:
        assert seg.writable
        self.seg = seg
        self.q = seg.q
        self.mv = seg.mv
        self.epoch = seg.q[L.H_EPOCH]
        #: class -> free refs (lowest first), from the pages assigned now
        self.free: dict[int, list[int]] = {}
        refs, classes = seg.slot_refs()
        for r, c in zip(refs.tolist(), classes.tolist()):
            self.free.setdefault(c, []).append(r)
        for c in self.free:
            self.free[c].sort(reverse=True)  # pop() takes the lowest
        self.where: dict[bytes, int] = {}  # key -> ref of its live record

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def publish(self) -> None:
        self.q[L.H_EPOCH] = self.epoch

    # -- slots ---------------------------------------------------------------------

    def write_record(self, ref: int, epoch: int, key: bytes, value: bytes, version: int | None = None,
                     expiry: int = 0, flags: int = 0) -> None:
        q, mv = self.q, self.mv
        g = SlotGeometry(self.seg, ref, len(key))
        assert L.slot_need(len(key), len(value)) <= g.end - g.base, "record too big for its class"
        q[g.w] = 2 * epoch + 1
        q[g.w + L.S_VERSION] = epoch if version is None else version
        q[g.w + L.S_EXPIRY] = expiry
        q[g.w + L.S_META] = len(key) | (flags << 16) | (len(value) << 32)
        mv[g.kofs : g.vofs] = key + bytes(g.vofs - g.kofs - len(key))
        mv[g.vofs : g.vofs + len(value)] = value
        q[g.w] = 2 * epoch + 2

    def free_record(self, ref: int, epoch: int, flags: int = L.FLAG_FREE) -> None:
        q = self.q
        w = self.seg.slot0 + ref * self.seg.slot_words
        klen = q[w + L.S_META] & 0xFFFF
        q[w] = 2 * epoch + 1
        q[w + L.S_EXPIRY] = 0
        q[w + L.S_META] = klen | (flags << 16)
        q[w] = 2 * epoch + 2

    def assign_page(self, page: int, cls: int, epoch: int | None = None) -> list[int]:
        """A page move as the engine makes it: the entry 0 (the page is moving), every
        new slot's header stamped free at ``epoch``, then the new entry."""
        seg = self.seg
        epoch = self.next_epoch() if epoch is None else epoch
        q = self.q
        for c in self.free:  # its old slots are no longer free slots of their class
            self.free[c] = [r for r in self.free[c] if r >> seg.ref_shift != page]
        q[seg.pt0 + page] = 0
        if cls < 0:
            return []
        size = seg.classes[cls]
        refs = [(page << seg.ref_shift) + i * size // L.SLOT_UNIT for i in range(seg.page_size // size)]
        for r in refs:
            w = seg.slot0 + r * seg.slot_words
            q[w] = 2 * epoch + 1
            q[w + L.S_VERSION] = 0
            q[w + L.S_EXPIRY] = 0
            q[w + L.S_META] = L.FLAG_FREE << 16
            q[w] = 2 * epoch + 2
        q[seg.pt0 + page] = (epoch << L.PTE_CLASS_BITS) | (cls + 1)
        self.free[cls] = sorted(self.free.get(cls, []) + refs, reverse=True)
        self.publish()
        return refs

    # -- records through the index -------------------------------------------------

    def _bucket_of(self, kb: bytes) -> int:
        """The index word holding kb's bucket, or the empty one its insert would take."""
        seg, q = self.seg, self.q
        h = L.key_hash(kb)
        pos = h & seg.mask
        while True:
            b = q[seg.idx0 + pos]
            if b == 0:
                return seg.idx0 + pos
            ref = (b & 0xFFFFFFFF) - 1
            if b >> 32 == h and self.where.get(kb) == ref:
                return seg.idx0 + pos
            pos = (pos + 1) & seg.mask

    def put(self, key: bytes | str, value: bytes, *, expiry: int = 0, cls: int | None = None) -> int:
        """Insert or update (copy-on-write: a new slot, the bucket, the old slot freed);
        returns the new ref."""
        kb = key.encode() if isinstance(key, str) else key
        seg = self.seg
        if cls is None:
            cls = seg.layout.class_for(L.slot_need(len(kb), len(value)))
        if not self.free.get(cls):  # a free page for the class, the engine's way
            free_pages = np.flatnonzero(seg.page_table() == 0)
            assert len(free_pages), "no free page left"
            self.assign_page(int(free_pages[0]), cls)
        ref = self.free[cls].pop()
        epoch = self.next_epoch()
        self.write_record(ref, epoch, kb, value, expiry=expiry)
        word = self._bucket_of(kb)
        old = self.where.get(kb)
        self.q[word] = (L.key_hash(kb) << 32) | (ref + 1)
        self.where[kb] = ref
        if old is not None:
            self.free_record(old, epoch)
            self.free[seg.class_of(old)].append(old)
        else:
            self.q[L.H_COUNT] += 1
        self.publish()
        return ref

    def delete(self, key: bytes | str, *, free_slot: bool = True) -> None:
        """Remove the bucket (backward-shift would move buckets: this bumps the
        generation around a tombstone-free re-insert of the run), free the slot."""
        kb = key.encode() if isinstance(key, str) else key
        seg, q = self.seg, self.q
        epoch = self.next_epoch()
        ref = self.where.pop(kb)
        word = self._bucket_of_ref(kb, ref)
        q[L.H_INDEX_GEN] += 1  # odd: buckets move
        q[word] = 0
        # re-insert the rest of the run after it
        pos = (word - seg.idx0 + 1) & seg.mask
        while q[seg.idx0 + pos]:
            b = q[seg.idx0 + pos]
            q[seg.idx0 + pos] = 0
            home = (b >> 32) & seg.mask
            while q[seg.idx0 + home]:
                home = (home + 1) & seg.mask
            q[seg.idx0 + home] = b
            pos = (pos + 1) & seg.mask
        q[L.H_INDEX_GEN] += 1
        q[L.H_LAST_DELETE_EPOCH] = epoch
        c = seg.class_of(ref)
        if free_slot and c >= 0:  # (a slot of a page moved away is no slot now)
            self.free_record(ref, epoch)
            self.free[c].append(ref)
        q[L.H_COUNT] -= 1
        self.publish()

    def _bucket_of_ref(self, kb: bytes, ref: int) -> int:
        want = (L.key_hash(kb) << 32) | (ref + 1)
        hits = np.flatnonzero(self.seg.index_view() == np.uint64(want))
        assert len(hits) == 1
        return self.seg.idx0 + int(hits[0])


@contextlib.contextmanager
def mini_store(name: str, layout: L.Layout, *, state: int = L.STATE_READY):
    """A segment made by ``create_segment`` with no coordinator, a :class:`MiniWriter`
    over it, and a read-only Segment of the same store, as a client maps it. Both are
    unmapped and the segment unlinked on exit, even on failure.

    Yields ``(writer, reader Segment)``.
    """
    from shmstore._shm import create_segment, unlink_quietly  # noqa: PLC0415
    import posix_ipc  # noqa: PLC0415

    seg = create_segment(name, layout, 0)
    rseg = None
    try:
        seg.q[L.H_STATE] = state
        w = MiniWriter(seg)
        rseg = open_segment(name)
        yield w, rseg
    finally:
        if rseg is not None:
            rseg.close()
        seg.close()
        unlink_quietly(posix_ipc.SharedMemory, L.data_name(name))
        unlink_quietly(posix_ipc.SharedMemory, L.access_name(name))


@contextlib.contextmanager
def writer_side(served, compiled: bool | None = None, **serve_kwargs):
    """A served store whose coordinator is then STOPPED: the test is the only writer.

    ``compiled``: the Engine's core (None: the one that runs; False: the Python stores,
    which a test can spy on through ``eng.q`` / ``eng.mv``).

    Yields ``(name, writable Segment, Engine)``.
    """
    from shmstore.coordinator._engine import Engine  # noqa: PLC0415 (MiniWriter tests need none)

    n, coord = served(**serve_kwargs)
    coord.stop()
    seg = open_segment(n, writable=True)
    try:
        eng = Engine(seg, compiled=compiled)
        eng.rebuild_free_list()
        yield n, seg, eng
    finally:
        seg.close()


@contextlib.contextmanager
def engine_side(name: str, compiled: bool | None = False, **layout):
    """A store whose only writer is the test, with no coordinator ever started: the
    segment made by ``create_segment`` (Layout(**layout)), set ready, and driven by
    ``coordinator._engine.Engine``. For protocol tests of the read side, which need the
    writer's stores, not its process. ``name`` comes from the ``names`` fixture, which
    removes what is left; this unmaps and unlinks the segment on exit too.

    Yields ``(name, writable Segment, Engine)``.
    """
    from shmstore._shm import create_segment, unlink_quietly  # noqa: PLC0415
    from shmstore.coordinator._engine import Engine  # noqa: PLC0415
    import posix_ipc  # noqa: PLC0415

    seg = create_segment(name, L.Layout(**layout).validate(), 0)
    try:
        seg.q[L.H_STATE] = L.STATE_READY
        eng = Engine(seg, compiled=compiled)
        eng.rebuild_free_list()
        try:
            yield name, seg, eng
        finally:
            eng.close()
    finally:
        seg.close()
        unlink_quietly(posix_ipc.SharedMemory, L.data_name(name))


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

