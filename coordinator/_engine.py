"""Applying ops to the data segment: the coordinator's only writer of slots and index.

Design
------
Every op takes the next epoch ``E`` and is applied copy-on-write (see
``shmstore._layout``)::

    insert   write a free slot (seq 2E+1 -> body -> 2E+2), then store its bucket
    update   write a free slot, repoint the bucket with one store, then free the old
             slot (also stamped 2E+1 -> 2E+2, key kept for change feeds)
    delete   remove the bucket (index generation odd -> backward shift -> even), then
             free the slot; record LAST_DELETE_EPOCH

``H_EPOCH`` is stored after each op, or once after a whole batch, so a reader that
read ``H_EPOCH = E`` knows every op up to E is fully applied and no later op is. A batch
also holds ``H_BATCH_SEQ`` odd while it is applied.

Invariant: a slot the index points to is never written; only free slots are.
Invariant: ops are validated completely before the first store into the segment, so a
rejected op leaves no trace. A batch is validated as a whole first.

The engine keeps no per-key Python objects: lookups probe the segment's own index and
free slots live in one deque, reused oldest first (see ``_freering``); its memory does
not grow with the records.

Two cores, one behaviour
------------------------
With the compiled core (``shmstore._compiled.native`` is not None) every store into the
slots and the index goes through ``shmstore._cwrite.Core`` (``shmstore/_csrc/writer.c``,
the writer side of ``protocol.h``): the stamp odd + release fence, relaxed body stores,
the stamp even with a release store; buckets with release stores; bucket moves inside an
odd index generation; ``H_EPOCH`` and ``H_BATCH_SEQ`` with release stores. That is
correct on aarch64 as well. ``put`` and ``delete`` are one C call each. Without it
(``SHMSTORE_NO_EXTENSIONS=1``) the same stores are made from Python through
memoryviews, in the same order, relying on x86-64's total store order (the pure core
refuses to run elsewhere). Both produce byte-identical segments for the same ops
(``tests/test_cwrite.py``).

Where a put's time went (``scripts/write_profile.py``, py-spy, pipelined puts from one
client, 2 shared cores): the coordinator spent ~17 us of CPU per put, about half of it
in ``Engine.put`` (Python ``key_hash`` ~1 us, ``find``/``_key_at`` ~2 us, ``_store`` and
``_write_slot`` ~4 us); the C ``put`` does all of that in well under 1 us.
"""

from __future__ import annotations

from bisect import bisect_left

import msgspec
import numpy as np

from shmstore import _compiled
from shmstore import _layout as L
from shmstore._errors import (
    CorruptionError,
    KeyTooLongError,
    StoreFullError,
    ValueEncodingError,
    ValueTooLargeError,
    VersionConflictError,
)
from shmstore._segment import Segment
from shmstore._ttl import now_ns

from ._freering import FreeRing

H_FEED_HORIZON = L.H_FEED_HORIZON

key_hash = L.key_hash
_int_decode = msgspec.msgpack.Decoder(int).decode
_encode = msgspec.msgpack.encode


PAGED = 1  # _grow: a free page was handed to the class
MOVED = 2  # _grow: records were moved or evicted (look the key up again)


def _never() -> int:
    return 0


def _core_for(seg: Segment) -> object | None:
    """The compiled writer of a writable segment, or None when the pure core runs."""
    if _compiled.native is None:
        return None
    from shmstore import _cwrite  # noqa: PLC0415 (built with _native; missing: a broken install)

    return _cwrite.Core(seg.mm, seg.sizes())


def _show(kb: bytes) -> str:
    try:
        return repr(kb.decode())
    except UnicodeDecodeError:
        return repr(kb)


class Engine:
    """Slot and index mutations on a writable segment (coordinator process only).

    Args:
        seg: the writable segment.
        compiled: use the compiled writer (``shmstore._cwrite``); None (the default):
            exactly when the compiled core runs (``shmstore._compiled.native``). False
            forces the pure-Python stores (tests compare the two).
    """

    def __init__(self, seg: Segment, *, compiled: bool | None = None) -> None:
        assert seg.writable
        self.seg = seg
        #: the compiled writer, or None: the stores are made from Python (x86-64 only)
        self.core = _core_for(seg) if compiled is None or compiled else None
        if compiled and self.core is None:
            raise RuntimeError("the compiled core is not loaded (SHMSTORE_NO_EXTENSIONS is set)")
        if self.core is not None:
            self.find = self.core.find  # same signature and result, one C call
        self.q = seg.q
        self.mv = seg.mv
        self.epoch = seg.q[L.H_EPOCH]
        self.classes = seg.classes
        #: one FreeRing of slot refs per size class
        self.frees: list[FreeRing] = [FreeRing() for _ in self.classes]
        #: free slots an insert must leave in a class: 1 (the spare that lets an update
        #: succeed in a full class) where a page holds 4 slots or more, else 0 (a spare
        #: would cost a quarter of a page or more: updates of such large records in a
        #: full class need a free page, a page move or an eviction like inserts)
        self.reserve = [1 if seg.page_size // size >= 4 else 0 for size in self.classes]
        #: pages no class holds yet, lowest first (a memory store hands them out on demand)
        self.free_pages: list[int] = []
        self.capacity = seg.layout.capacity
        self.redo = None  # a RedoArea once serving: holds the batch being applied
        self._pad = bytes(8)  # a key's zero padding to a word (see _write_slot)
        #: What makes room when a class is full (coordinator/_evict.py), or None: the
        #: store refuses the write (StoreFullError). Set by the server for eviction="lru"
        #: or "volatile-ttl"; never during replay, where evictions come from the log.
        self.evictor = None
        #: Where the ops the engine decides on its own (evictions, page moves) are logged,
        #: ``log(epoch_before, payload)``, before the op that needed them; the server
        #: sets it to the journal's append.
        self.log = None
        #: the access bytes (a writable uint8 view) when eviction is LRU: the engine
        #: clears the byte of every record it writes (used once a reader reads it)
        self.access = None
        #: called with each evicted key (the server purges its TTL index)
        self.on_evict = None
        #: The clock cas/incr judge expiries by. The default (0: nothing is expired)
        #: keeps replay deterministic: the live coordinator reclaims an expired record
        #: with a logged op before an op that looks at it, and sets this to the time it
        #: judged by (coordinator/_expiry.py).
        self.clock = _never
        #: A lower bound of every expiry in the slots (0: unknown). The background
        #: reclaim scans the slots only once the clock passes it (coordinator/_expiry.py).
        self.next_expiry = 0
        #: Whether a class short of room may take a page from another class by moving
        #: its records (a logged MovePage, one epoch). A replica's epochs are the global
        #: versions, so it takes none of its own: False there (coordinator/_replica.py).
        self.page_moves = True

    # -- setup -----------------------------------------------------------------------

    def rebuild_free_list(self) -> None:
        """Free slots = slots of assigned pages no bucket points to; stamps unreferenced,
        unfree slots free; recounts the records, the class counters and the free pages."""
        seg = self.seg
        q = self.q
        idx = seg.index_view()
        live = idx[idx != 0]
        used_refs = np.sort((live & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1)
        pt = seg.page_table().copy()
        refs, cls = seg.slot_refs(pt)
        hdr = seg.headers(refs) if len(refs) else np.zeros((0, 4), np.uint64)
        used = np.isin(refs, used_refs, assume_unique=False)
        free_flag = ((hdr[:, L.S_META] >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) != 0
        orphans = refs[~used & ~free_flag & (hdr[:, L.S_SEQ] != 0)]
        for ref in orphans.tolist():
            self._stamp_free(int(ref), self.next_epoch())
        if len(orphans):
            self.publish()
            hdr = seg.headers(refs)
        # Oldest freed first (never-written slots, stamp 0, before all): see _freering.
        self.frees = []
        for c in range(len(self.classes)):
            mine = (cls == c) & ~used
            fr = refs[mine]
            order = np.argsort(hdr[mine, L.S_SEQ], kind="stable")
            self.frees.append(FreeRing(fr[order].tolist()))
        self.free_pages = np.flatnonzero(pt == 0).tolist()
        q[L.H_FREE_PAGES] = len(self.free_pages)
        q[L.H_COUNT] = int(used.sum())
        meta = hdr[used, L.S_META]
        need = (L.SLOT_HEADER + ((meta & np.uint64(0xFFFF)) + np.uint64(7)) // np.uint64(8) * np.uint64(8)
                + (meta >> np.uint64(32))).astype(np.int64)
        pcls = (pt & np.uint64(0xFF)).astype(np.int64) - 1
        for c in range(len(self.classes)):
            in_c = cls[used] == c
            q[L.class_word(c, L.C_PAGES)] = int((pcls == c).sum())
            q[L.class_word(c, L.C_RECORDS)] = int(in_c.sum())
            q[L.class_word(c, L.C_ASKED)] = int(need[in_c].sum())
        if self.evictor is not None:
            self.evictor.reset()

    def close(self) -> None:
        """Release the compiled writer's hold on the mapping (the engine is unusable after)."""
        if self.core is not None:
            self.core.close()

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def publish(self) -> None:
        if self.core is not None:
            self.core.publish_epoch(self.epoch)
        else:
            self.q[L.H_EPOCH] = self.epoch

    # -- low level -------------------------------------------------------------------

    def _slot_word(self, slot: int) -> int:
        return self.seg.slot0 + slot * self.seg.slot_words

    def _value_at(self, w: int) -> memoryview:
        """The value bytes of the slot whose first word is ``w`` (a view of the segment)."""
        meta = self.q[w + L.S_META]
        vo = w * 8 + L.SLOT_HEADER + ((meta & 0xFFFF) + 7 & ~7)
        return self.mv[vo : vo + (meta >> 32)]

    def _key_at(self, slot: int) -> bytes:
        w = self._slot_word(slot)
        klen = self.q[w + L.S_META] & 0xFFFF
        o = w * 8 + L.SLOT_HEADER
        return bytes(self.mv[o : o + klen])

    def find(self, kb: bytes, h: int) -> tuple[int, int]:
        """Probe for a key: ``(pos, slot)`` if present, else ``(first empty pos, -1)``."""
        q = self.q
        seg = self.seg
        mask = seg.mask
        idx0 = seg.idx0
        pos = h & mask
        while True:
            b = q[idx0 + pos]
            if b == 0:
                return pos, -1
            if b >> 32 == h:
                slot = (b & 0xFFFFFFFF) - 1
                if self._key_at(slot) == kb:
                    return pos, slot
            pos = (pos + 1) & mask

    def _write_slot(self, slot: int, epoch: int, kb: bytes, vb: bytes, version: int, expiry: int, flags: int) -> None:
        if expiry and expiry < self.next_expiry:
            self.next_expiry = expiry
        if self.core is not None:
            self.core.write_record(slot, epoch, kb, vb, version, expiry, flags)
            return
        q = self.q
        mv = self.mv
        w = self._slot_word(slot)
        # Invariant: seq is odd from the first byte written to the last (x86-64 keeps
        # the order of these stores as issued).
        q[w] = 2 * epoch + 1
        q[w + L.S_VERSION] = version
        q[w + L.S_EXPIRY] = expiry
        kl = len(kb)
        q[w + L.S_META] = kl | (flags << 16) | (len(vb) << 32)
        o = w * 8 + L.SLOT_HEADER
        mv[o : o + kl] = kb
        # The key is zero-padded to a word (get_many compares keys as whole u64 words);
        # the value starts at the next word.
        ka = (kl + 7) & ~7
        if ka > kl:
            mv[o + kl : o + ka] = self._pad[: ka - kl]
        if vb:
            vo = o + ka
            mv[vo : vo + len(vb)] = vb
        q[w] = 2 * epoch + 2

    def _stamp_free(self, slot: int, epoch: int, flags: int = L.FLAG_FREE) -> None:
        """Stamp a slot free at ``epoch``: its key kept (for change feeds), its value gone."""
        if self.core is not None:
            self.core.free_record(slot, epoch, flags)
            return
        q = self.q
        w = self._slot_word(slot)
        q[w] = 2 * epoch + 1
        meta = q[w + L.S_META]
        q[w + L.S_META] = (meta & 0xFFFF) | (flags << 16)
        q[w + L.S_EXPIRY] = 0
        q[w] = 2 * epoch + 2

    def _free_slot(self, slot: int, epoch: int, flags: int = L.FLAG_FREE) -> None:
        """Free the slot of a live record at ``epoch``: its class counters drop, it is
        stamped free and goes back to its class's ring."""
        q = self.q
        c = self.seg.class_of(slot)
        meta = q[self._slot_word(slot) + L.S_META]
        q[L.class_word(c, L.C_RECORDS)] -= 1
        q[L.class_word(c, L.C_ASKED)] -= L.slot_need(meta & 0xFFFF, meta >> 32)
        self._stamp_free(slot, epoch, flags)
        self.frees[c].append(slot)

    def _set_bucket(self, pos: int, h: int, slot: int) -> None:
        """Point bucket ``pos`` at a published slot (one store)."""
        if self.core is not None:
            self.core.set_bucket(pos, h, slot)
        else:
            self.q[self.seg.idx0 + pos] = (h << 32) | (slot + 1)

    def _page_refs(self, page: int, c: int) -> range:
        """The slot references of ``page`` cut into class ``c``'s slots."""
        first = page << self.seg.ref_shift
        step = self.classes[c] // L.SLOT_UNIT
        return range(first, first + self._per_page(c) * step, step)

    def _remove_bucket(self, pos: int) -> None:
        """Backward-shift deletion; the index generation is odd throughout."""
        if self.core is not None:
            self.core.remove_bucket(pos)
            return
        q = self.q
        seg = self.seg
        mask = seg.mask
        idx0 = seg.idx0
        q[L.H_INDEX_GEN] += 1
        i = pos
        j = pos
        while True:
            j = (j + 1) & mask
            b = q[idx0 + j]
            if b == 0:
                break
            home = (b >> 32) & mask
            # Move b back to the hole at i unless its home lies cyclically in (i, j].
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                q[idx0 + i] = b
                i = j
        q[idx0 + i] = 0
        q[L.H_INDEX_GEN] += 1

    # -- checks ----------------------------------------------------------------------

    def check_key(self, kb: object) -> bytes:
        if not isinstance(kb, bytes) or not kb:
            raise ValueEncodingError("a key must be non-empty bytes on the wire")
        if len(kb) > self.seg.key_size:
            raise KeyTooLongError(
                f"key {_show(kb)[:80]} is {len(kb)} bytes; this store's key_size is {self.seg.key_size}"
            )
        return kb

    def check_value(self, vb: object) -> bytes:
        if not isinstance(vb, bytes):
            raise ValueEncodingError("a value must be msgpack bytes on the wire")
        if len(vb) > self.seg.value_size:
            raise ValueTooLargeError(
                f"value of {len(vb)} encoded bytes exceeds value_size={self.seg.value_size}"
            )
        return vb

    # -- ops -------------------------------------------------------------------------

    def get(self, kb: bytes) -> tuple[int, bytes] | None:
        """The live record of a key, ``(version, value)``, from the writer's side."""
        pos, slot = self.find(kb, key_hash(kb))
        if slot < 0:
            return None
        w = self._slot_word(slot)
        q = self.q
        expiry = q[w + L.S_EXPIRY]
        if expiry and expiry <= now_ns():
            return None
        return q[w + L.S_VERSION], bytes(self._value_at(w))

    def class_for(self, kb: bytes, vb: bytes) -> int:
        """The size class a record of this key and value goes to."""
        return bisect_left(self.classes, L.SLOT_HEADER + (len(kb) + 7 & ~7) + len(vb))

    def _store(self, kb: bytes, h: int, pos: int, old: int, vb: bytes, expiry: int, epoch: int,
               version: int = 0) -> int:
        """Write a record copy-on-write at ``epoch`` (its version: ``epoch``, or
        ``version`` if given); the caller made room (_make_room)."""
        c = self.class_for(kb, vb)
        new = self.frees[c].pop()
        q = self.q
        # Invariant: the feed horizon is raised before the reused slot's old change
        # record is overwritten (note_reuse, inlined: this is the hot path).
        seq = q[self.seg.slot0 + new * self.seg.slot_words]
        if seq >= 2 and (seq - 1) >> 1 > q[H_FEED_HORIZON]:
            q[H_FEED_HORIZON] = (seq - 1) >> 1
        self._write_slot(new, epoch, kb, vb, version or epoch, expiry, 0)
        q[L.class_word(c, L.C_RECORDS)] += 1
        q[L.class_word(c, L.C_ASKED)] += L.slot_need(len(kb), len(vb))
        if self.access is not None:
            self.access[new >> 2] = 0  # unreferenced until a reader reads it
        self._set_bucket(pos, h, new)
        if old >= 0:
            self._free_slot(old, epoch)
        else:
            q[L.H_COUNT] += 1
        return epoch

    # -- room: pages, page moves, eviction ----------------------------------------------

    def _full(self, kb: bytes, why: str) -> StoreFullError:
        return StoreFullError(f"store is full: {why} (key {_show(kb)[:80]} not written)")

    def _make_room(self, c: int, insert: bool, kb: bytes) -> bool:
        """Make class ``c`` able to take one record (a new key if ``insert``): an insert
        needs ``reserve[c] + 1`` free slots in the class (the spare lets an update succeed
        in a full class) and the record count below capacity, an update one free slot.
        Returns whether records were evicted or moved (the caller
        looks its key up again). Raises StoreFullError, nothing changed, when it cannot.

        In order: a free page; a page another class can give up without losing a record
        (its free slots outnumber a page's, so its records move within the class); with
        an evictor, evictions (from ``c`` when it holds pages, else a whole page of
        another class, which then moves).
        """
        q = self.q
        changed = False
        for _ in range(4 * len(self.classes) + 64):
            if insert and q[L.H_COUNT] >= self.capacity:
                if self.evictor is None:
                    raise self._full(kb, f"{self.capacity} records, its capacity; delete records or "
                                         f"serve it with a larger capacity= (or eviction='lru')")
                if not self.evict_refs(self.evictor.victims(c, 1)):
                    raise self._full(kb, f"{self.capacity} records, its capacity, and none can be evicted")
                changed = True
                continue
            if len(self.frees[c]) >= (self.reserve[c] + 1 if insert else 1):
                return changed
            grew = self._grow(c, kb)
            if not grew:
                raise self._full(kb, f"no room for a {self.classes[c]}-byte slot and no free "
                                     f"memory page; delete records or serve it with more memory= "
                                     f"(or eviction='lru')")
            changed = changed or grew == MOVED
        raise self._full(kb, "room could not be made (eviction found no victim)")

    def _grow(self, c: int, kb: bytes, keep: frozenset = frozenset()) -> int:
        """One step of room for class ``c``: a free page; else a page another class gives
        up keeping its records; else (with an evictor) evictions from ``c``, or of a whole
        page of another class that then moves to ``c``; no record of the classes in
        ``keep`` (a batch's) is evicted for it. Returns PAGED (a free page, no record touched),
        MOVED (records were moved or evicted) or 0 (nothing possible)."""
        if self.free_pages:
            self.assign_page(c)
            return PAGED
        src = self._page_donor(c) if self.page_moves else -1  # keeps every record: a batch's classes may give too
        if src >= 0:
            self.move_page(src, c)
            return MOVED
        if self.evictor is None:
            return 0
        if self.q[L.class_word(c, L.C_PAGES)]:
            return MOVED if self.evict_refs(self.evictor.victims(c, self.evictor.batch(c))) else 0
        src, refs = self.evictor.victim_page(c, keep)
        if src < 0:
            return 0
        self.evict_refs(refs)
        self.move_page(src, c)
        return MOVED

    def _batch_short(self, ops: list) -> tuple[int, bool] | None:
        """Simulate a batch's use of free slots and pages: None if it fits, else the
        class that runs short and whether the record count (capacity) is what does."""
        from ._ops import BatchPut  # noqa: PLC0415

        free = [len(r) for r in self.frees]
        pages = len(self.free_pages)
        count = self.q[L.H_COUNT]
        where: dict[bytes, int] = {}
        for op in ops:
            kb = op.key
            old_c = where.get(kb)
            if old_c is None:
                slot = self.find(kb, key_hash(kb))[1]
                old_c = where[kb] = self.seg.class_of(slot) if slot >= 0 else -1
            if type(op) is BatchPut:
                c = self.class_for(kb, op.value)
                if old_c < 0 and count >= self.capacity:
                    return c, True
                need = self.reserve[c] + 1 if old_c < 0 else 1
                while free[c] < need:
                    if not pages:
                        return c, False
                    pages -= 1
                    free[c] += self._per_page(c)
                free[c] -= 1
                if old_c >= 0:
                    free[old_c] += 1
                else:
                    count += 1
                where[kb] = c
            elif old_c >= 0:
                free[old_c] += 1
                count -= 1
                where[kb] = -1
        return None

    def _per_page(self, c: int) -> int:
        return self.seg.page_size // self.classes[c]

    def _page_donor(self, c: int) -> int:
        """A class other than ``c`` that can give up a page keeping all its records (its
        free slots, less a page's worth, still leave it its spare), or -1."""
        best = -1
        best_spare = 0
        for a, ring in enumerate(self.frees):
            if a == c or not self.q[L.class_word(a, L.C_PAGES)]:
                continue
            spare = len(ring) - self._per_page(a)
            if spare >= 1 and spare >= best_spare:
                best, best_spare = a, spare
        return best

    def assign_page(self, c: int) -> int:
        """Hand the lowest free page to class ``c`` (a never-written page: its slots read
        as never-written until used). No epoch: nothing a reader can see changes."""
        seg = self.seg
        page = self.free_pages.pop(0)
        q = self.q
        q[seg.pt0 + page] = (self.epoch << L.PTE_CLASS_BITS) | (c + 1)
        q[L.H_FREE_PAGES] = len(self.free_pages)
        q[L.class_word(c, L.C_PAGES)] += 1
        self.frees[c].extend(self._page_refs(page, c))
        if self.evictor is not None:
            self.evictor.reset()
        return page

    def _logged(self, op: object) -> None:
        """Log an op the engine decided on (before applying it: the epoch before it)."""
        if self.log is not None:
            self.log(self.epoch, _encode(op))

    def evict_refs(self, refs: list[int]) -> int:
        """Evict the live records in slots ``refs`` as one logged op (an epoch per key)."""
        keys = [self._key_at(r) for r in refs]
        if not keys:
            return 0
        from ._ops import Evict  # noqa: PLC0415

        self._logged(Evict(0, keys))
        for kb in keys:
            self.evict(kb)
        self.publish()
        return len(keys)

    def evict(self, kb: bytes) -> bool:
        """Evict one key at the next epoch (its slot is freed with FLAG_EVICTED)."""
        pos, slot = self.find(kb, key_hash(kb))
        if slot < 0:
            return False
        epoch = self.next_epoch()
        q = self.q
        q[L.H_LAST_DELETE_EPOCH] = epoch
        self._remove_bucket(pos)
        self._free_slot(slot, epoch, L.FLAG_FREE | L.FLAG_EVICTED)
        q[L.H_COUNT] -= 1
        q[L.H_EVICTIONS] += 1
        if self.on_evict is not None:
            self.on_evict(kb)
        return True

    def move_page(self, src: int, dst: int) -> int:
        """Move a page from class ``src`` to class ``dst`` as one logged op at the next
        epoch: the page of ``src`` holding the fewest records; those records move into
        free slots of ``src`` elsewhere (same version, a new stamp); its free slots leave
        ``src``'s ring; the feed horizon rises past the change records it held; its entry
        changes and its new slots are stamped free. Returns the page."""
        seg = self.seg
        q = self.q
        n = len(self.classes)
        if not (0 <= src < n and 0 <= dst < n) or src == dst:
            raise CorruptionError(f"a page move from class {src} to class {dst}: this store has "
                                  f"classes 0 to {n - 1}")
        refs, _ = seg.slot_refs(cls=src)
        if not len(refs):
            raise CorruptionError(f"a page move from class {src}, which holds no page")
        hdr = seg.headers(refs)
        idx = seg.index_view()
        live_refs = np.sort((idx[idx != 0] & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1)
        live = np.isin(refs, live_refs)
        pages = refs >> seg.ref_shift
        upages, inv = np.unique(pages, return_inverse=True)
        counts = np.bincount(inv, weights=live, minlength=len(upages))
        page = int(upages[int(np.argmin(counts))])
        on_page = pages == page
        movers = refs[on_page & live].tolist()
        ring = self.frees[src]
        others = [r for r in ring if r >> seg.ref_shift != page]
        if len(others) < len(movers) + (1 if movers else 0):
            raise CorruptionError(f"a page move from class {src}: no page of it can be emptied")
        from ._ops import MovePage  # noqa: PLC0415

        self._logged(MovePage(0, src, dst))
        epoch = self.next_epoch()
        ring.clear()
        ring.extend(others)
        for ref in movers:  # relocate: copy-on-write within the class, version kept
            w = self._slot_word(ref)
            kb = self._key_at(ref)
            version = q[w + L.S_VERSION]
            expiry = q[w + L.S_EXPIRY]
            vb = bytes(self._value_at(w))
            h = key_hash(kb)
            pos, _ = self.find(kb, h)
            new = ring.pop()
            self._write_slot(new, epoch, kb, vb, version, expiry, 0)
            self._set_bucket(pos, h, new)
            self._stamp_free(ref, epoch)  # the record moved within its class: counts unchanged
        # Invariant: the horizon rises before the page's change records are overwritten
        # (the slots just vacated carry this epoch's stamp).
        seqs = hdr[on_page, L.S_SEQ]
        top = int(seqs.max()) if len(seqs) else 0
        if movers:
            top = max(top, 2 * epoch + 2)
        if top >= 2 and (top - 1) >> 1 > q[H_FEED_HORIZON]:
            q[H_FEED_HORIZON] = (top - 1) >> 1
        self._stamp_page(page, dst, epoch)
        q[L.class_word(src, L.C_PAGES)] -= 1
        q[L.class_word(dst, L.C_PAGES)] += 1
        self.frees[dst].extend(self._page_refs(page, dst))
        q[L.H_PAGE_MOVES] += 1
        if self.evictor is not None:
            self.evictor.reset()
        self.publish()
        return page

    def _stamp_page(self, page: int, c: int, epoch: int) -> None:
        """Give ``page`` to class ``c`` at ``epoch`` (protocol.h ``shm_page_assign``): its
        entry to 0, every new slot stamped free, then the new entry. A reader that met
        the page's old entry before and sees another (or 0) after its copy retries; a
        coordinator that dies in between leaves a free page that repair clears."""
        seg = self.seg
        if self.core is not None:
            self.core.page_assign(page, c, epoch)
            return
        q = self.q
        q[seg.pt0 + page] = 0
        size = self.classes[c]
        w0 = seg.slot0 + (page << seg.ref_shift) * seg.slot_words
        for i in range(self._per_page(c)):
            w = w0 + i * (size // 8)
            q[w] = 2 * epoch + 1
            q[w + L.S_VERSION] = 0
            q[w + L.S_EXPIRY] = 0
            q[w + L.S_META] = L.FLAG_FREE << 16
            q[w] = 2 * epoch + 2
        q[seg.pt0 + page] = (epoch << L.PTE_CLASS_BITS) | (c + 1)

    def put(self, kb: bytes, vb: bytes, expiry: int = 0) -> int:
        core = self.core
        if core is not None:
            v = core.put(kb, vb, expiry, self.epoch + 1, self.frees, self.capacity)
            if v >= 0:
                self.epoch = v
                if expiry and expiry < self.next_expiry:
                    self.next_expiry = expiry
                return v
        h = key_hash(kb)
        pos, old = self.find(kb, h)
        # Making room may evict or move this very record: look again, and make room
        # again for what the write now is (an insert needs more than an update).
        while self._make_room(self.class_for(kb, vb), old < 0, kb):
            pos, old = self.find(kb, h)
        v = self._store(kb, h, pos, old, vb, expiry, self.next_epoch())
        self.publish()
        return v

    def restore(self, kb: bytes, vb: bytes, version: int, expiry: int) -> None:
        """Write a record as another store has it, ``version`` included, at the next
        epoch (a replica's resync: coordinator/_replica.py). Not logged, not published:
        the caller publishes once the whole state is in."""
        h = key_hash(kb)
        pos, old = self.find(kb, h)
        while self._make_room(self.class_for(kb, vb), old < 0, kb):
            pos, old = self.find(kb, h)
        self._store(kb, h, pos, old, vb, expiry, self.next_epoch(), version)

    def delete(self, kb: bytes) -> bool:
        if self.core is not None:
            if not self.core.delete(kb, self.epoch + 1, self.frees):
                return False
            self.epoch += 1
            return True
        pos, slot = self.find(kb, key_hash(kb))
        if slot < 0:
            return False
        epoch = self.next_epoch()
        self._unlink(pos, slot, epoch)
        self.publish()
        return True

    def _unlink(self, pos: int, slot: int, epoch: int) -> None:
        if self.core is not None:
            self.core.unlink(pos, slot, epoch, self.frees)
            return
        q = self.q
        # Invariant: LAST_DELETE_EPOCH is stored BEFORE the bucket goes, so a reader
        # that saw the miss and then reads it sees this delete's epoch (a consistent
        # read accepts a miss only if no delete happened after its epoch).
        q[L.H_LAST_DELETE_EPOCH] = epoch
        self._remove_bucket(pos)
        self._free_slot(slot, epoch)
        q[L.H_COUNT] -= 1

    def _current_version(self, slot: int) -> int:
        if slot < 0:
            return 0
        w = self._slot_word(slot)
        expiry = self.q[w + L.S_EXPIRY]
        if expiry and expiry <= self.clock():
            return 0
        return self.q[w + L.S_VERSION]

    def cas(self, kb: bytes, vb: bytes, expect: int, expiry: int = 0) -> int:
        h = key_hash(kb)
        pos, old = self.find(kb, h)
        cur = self._current_version(old)
        if cur != expect:
            raise VersionConflictError(
                f"compare_and_set on key {_show(kb)[:80]}: expected version {expect}, "
                f"found {cur if cur else 'no record (version 0)'}; read it again and retry"
            )
        while self._make_room(self.class_for(kb, vb), old < 0, kb):
            pos, old = self.find(kb, h)
            if self._current_version(old) != cur:  # evicted to make room: retry
                raise VersionConflictError(
                    f"compare_and_set on key {_show(kb)[:80]}: the record was evicted to make "
                    f"room; read it again and retry"
                )
        v = self._store(kb, h, pos, old, vb, expiry, self.next_epoch())
        self.publish()
        return v

    def _counter(self, kb: bytes, old: int) -> tuple[int, int]:
        """``(current integer, expiry)`` of incr's key in slot ``old`` (0, 0 if none)."""
        if not self._current_version(old):
            return 0, 0  # missing, or expired: counts from 0 with no expiry
        w = self._slot_word(old)
        try:
            return _int_decode(self._value_at(w)), self.q[w + L.S_EXPIRY]
        except msgspec.DecodeError:  # not an int, or not msgpack at all (a raw frame's value)
            raise ValueEncodingError(
                f"incr on key {_show(kb)[:80]}: the stored value is not an integer"
            ) from None

    def incr(self, kb: bytes, delta: int) -> int:
        h = key_hash(kb)
        while True:
            pos, old = self.find(kb, h)
            cur, expiry = self._counter(kb, old)
            new_value = cur + delta
            if not -(1 << 63) <= new_value < (1 << 64):
                raise ValueEncodingError(
                    f"incr on key {_show(kb)[:80]}: {cur} + {delta} leaves the 64-bit range msgpack stores"
                )
            vb = _encode(new_value)
            # Making room may evict this very record: then look again (it counts from 0).
            if not self._make_room(self.class_for(kb, vb), old < 0, kb):
                break
        self._store(kb, h, pos, old, vb, expiry, self.next_epoch())
        self.publish()
        return new_value

    def batch(self, ops: list, payload: bytes | None = None) -> list:
        """Apply a batch's ops (``_ops.BatchPut`` / ``_ops.BatchDelete``) atomically.

        Validation (key and value sizes, capacity) happens for the whole batch before
        the first store; then the ops apply in order inside one odd ``H_BATCH_SEQ``.
        The ops' types and integer ranges were checked when they were decoded.

        Returns:
            Per op: the new version for a put, whether it existed for a delete.
        """
        from ._ops import BatchDelete, BatchPut, batch_from_lists

        if ops and type(ops[0]) is list:  # the wire form, from a caller other than apply
            try:
                ops = batch_from_lists(ops)
            except msgspec.ValidationError as e:
                raise ValueEncodingError(f"malformed batch: {e}") from None
        # Pass 1: validate everything, then simulate the room the batch needs and make
        # it (free pages, page moves, evictions) before the first store of the batch.
        for op in ops:
            t = type(op)
            if t is not BatchPut and t is not BatchDelete:
                raise ValueEncodingError(f"unknown op {op!r:.80} in a batch")
            self.check_key(op.key)
            if t is BatchPut:
                self.check_value(op.value)
        keep = frozenset(self.class_for(op.key, op.value) for op in ops if type(op) is BatchPut)
        for _ in range(2 * len(ops) + 64):
            short = self._batch_short(ops)
            if short is None:
                break
            c, count_bound = short
            kb = b"batch"
            if count_bound:
                if self.evictor is None:
                    raise StoreFullError(
                        f"batch needs more new records than the store has room for (capacity "
                        f"{self.capacity}, holding {self.q[L.H_COUNT]}). Nothing in the batch was written."
                    )
                if not self.evict_refs(self.evictor.victims(c, 1)):
                    raise StoreFullError(
                        f"batch needs more new records than the store has room for (capacity "
                        f"{self.capacity}, none can be evicted). Nothing in the batch was written."
                    )
            elif not self._grow(c, kb, keep):
                raise StoreFullError(
                    f"batch needs more {self.classes[c]}-byte slots than the store has room for "
                    f"(no free memory page, and no page of a class the batch does not write to "
                    f"can be taken). Nothing in the batch was written."
                )
        else:
            raise StoreFullError("batch: room could not be made. Nothing in the batch was written.")
        # Pass 2: apply. The redo copy goes first, so a death mid-batch rolls forward.
        q = self.q
        if self.redo is not None and payload is not None:
            self.redo.write(payload)
        core = self.core
        if core is not None:
            core.batch_begin()
        else:
            q[L.H_BATCH_SEQ] += 1
        results = []
        try:
            for op in ops:
                kb = op.key
                h = key_hash(kb)
                pos, slot = self.find(kb, h)
                if type(op) is BatchPut:
                    self._make_room(self.class_for(kb, op.value), slot < 0, kb)  # free pages only
                epoch = self.next_epoch()
                if type(op) is BatchPut:
                    results.append(self._store(kb, h, pos, slot, op.value, op.expiry, epoch))
                elif slot >= 0:
                    self._unlink(pos, slot, epoch)
                    results.append(True)
                else:
                    results.append(False)
        finally:
            self.publish()
            if core is not None:
                core.batch_end()
            else:
                q[L.H_BATCH_SEQ] += 1
        if self.redo is not None and payload is not None:
            self.redo.clear()
        return results
