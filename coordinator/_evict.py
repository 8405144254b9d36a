"""Eviction: which records make room when a size class is full (``eviction=``).

Design
------
Clients map the data segment read-only, so a read cannot mark a record as used there.
Each store that evicts by LRU has a second, small segment, the access bytes
(``shmstore._layout.access_name``, ``Layout.access_size``: one byte per 64 bytes of
pages, so every slot has its own byte at ``ref >> 2``), which client processes map
read-write. A reader sets a record's byte to 1 after each hit (only if it is 0, so a
hot record's byte is not written again and again: no cache line ping-pong); the
coordinator sets it for every record it writes.

:class:`Clock` is the CLOCK approximation of LRU (the second-chance algorithm), one
hand per size class over the class's slots in page order: a live record whose byte is
1 has been used since the hand last passed; the hand clears it and moves on; the first
live record whose byte is 0 is the victim. A record read at least once per turn of the
hand is never evicted, which is what LRU promises for a hot set smaller than the class.
It costs the readers one byte load per hit and the coordinator a numpy pass over a
chunk of header words per eviction batch; nothing per read reaches the coordinator.

Why not sampled access reports in each client's block: a report is a write per read
(or per sampled read) into memory the coordinator must then drain and sort; the byte
is the same information, already in place, and its worst case (a byte set by a
process that read a record, then died) costs nothing.

A hostile client can set or clear any byte: that changes which record is evicted,
never what a record holds, and an evicted record is a logged op like any other.

Evictions are batched (:meth:`Clock.batch`: a few records per class at a time, so a
full store does not pay a scan per put) and logged by the engine as one ``Evict`` op
(an epoch per key; ``changes()`` reports the keys; the slot carries FLAG_EVICTED).

``volatile-ttl`` (:class:`Volatile`) evicts only records that carry an expiry, the
soonest to expire first (Redis's policy of that name); a class with none refuses the
write (StoreFullError), as a store without eviction does.

When the class that needs room holds no page at all and no page is free, a whole page
of another class is emptied (its records evicted, :meth:`Clock.victim_page`, a CLOCK
over pages that gives a page whose records were used a second chance) and moves to the
class (the engine's ``move_page``). Pages move only then, or when another class can
give one up without losing a record. What that costs: a class's share of the pages is
set by the mix of sizes written while the store filled up; if the mix shifts later, the
classes that now get more writes keep their few pages and evict sooner than a global
LRU would (memcached calls this slab calcification and rebalances pages by eviction
age: not built here).
"""

from __future__ import annotations

import numpy as np

from shmstore import _layout as L

CHUNK = 4096  # slots the hand looks at per numpy pass
_FREE = np.uint64(L.FLAG_FREE << 16)


class Clock:
    """CLOCK eviction over each size class (eviction="lru").

    Args:
        engine: the coordinator's Engine (its segment, classes, page size).
        access: the access bytes, a writable uint8 array of ``Layout.access_size``.
    """

    def __init__(self, engine: object, access: np.ndarray) -> None:
        self.engine = engine
        self.seg = engine.seg
        self.acc = access
        n = len(engine.classes)
        self.hands = [0] * n
        self._refs: list[np.ndarray | None] = [None] * n
        self.page_hand = 0

    def reset(self) -> None:
        """The pages of the classes changed: list their slots again."""
        self._refs = [None] * len(self._refs)

    def refs(self, c: int) -> np.ndarray:
        r = self._refs[c]
        if r is None:
            r = self._refs[c] = self.seg.slot_refs(cls=c)[0]
        return r

    def batch(self, c: int) -> int:
        """How many records to evict when class ``c`` is full: ~1/256 of its slots,
        1 to 16."""
        return max(1, min(16, len(self.refs(c)) // 256))

    def _live(self, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hdr = self.seg.headers(refs)
        live = ((hdr[:, L.S_META] & _FREE) == 0) & (hdr[:, L.S_SEQ] != 0)
        return live, hdr

    def victims(self, c: int, n: int) -> list[int]:
        """Up to ``n`` live records of class ``c`` to evict (of the class holding the
        most records if ``c`` holds none)."""
        q = self.seg.q
        if not q[L.class_word(c, L.C_RECORDS)]:
            counts = [q[L.class_word(k, L.C_RECORDS)] for k in range(len(self._refs))]
            c = int(np.argmax(counts))
            if not counts[c]:
                return []
        refs = self.refs(c)
        total = len(refs)
        hand = self.hands[c] % total if total else 0
        out: list[int] = []
        scanned = 0
        acc = self.acc
        while len(out) < n and scanned < 2 * total + CHUNK and total:
            chunk = refs[hand : hand + CHUNK]
            live, _ = self._live(chunk)
            used = acc[chunk >> 2] != 0
            pick = np.flatnonzero(live & ~used)[: n - len(out)]
            upto = int(pick[-1]) + 1 if len(pick) else len(chunk)
            passed = chunk[:upto][live[:upto] & used[:upto]]
            acc[passed >> 2] = 0  # second chance: used since the hand last came by
            out.extend(chunk[pick].tolist())
            hand += upto
            scanned += upto
            if hand >= total:
                hand = 0
        self.hands[c] = hand
        q[L.H_CLOCK_SCANS] += scanned
        return out

    def victim_page(self, c: int, keep: frozenset = frozenset()) -> tuple[int, list[int]]:
        """A page of another class (not ``c``, not in ``keep``) to empty for class ``c``:
        ``(its class, its live records)``, or ``(-1, [])``. A CLOCK over pages: a page
        whose records were used since the hand passed gets a second chance (their bytes
        cleared); a class's last page is taken only when no other will do."""
        seg = self.seg
        pt = seg.page_table().copy()
        pcls = (pt & np.uint64(0xFF)).astype(np.int64) - 1
        npages = len(pt)
        per_class = np.bincount(pcls[pcls >= 0], minlength=len(self._refs))
        fallback = None
        for step in range(2 * npages):
            page = (self.page_hand + step) % npages
            k = int(pcls[page])
            if k < 0 or k == c or k in keep:
                continue
            refs = self.refs(k)
            on = refs[(refs >> seg.ref_shift) == page]
            live, hdr = self._live(on)
            mine = on[live]
            if not self._may_take(hdr[live]):
                continue
            if per_class[k] <= 1:
                fallback = fallback or (k, mine.tolist(), page)
                continue
            used = self.acc[mine >> 2] != 0
            if used.any() and step < npages:
                self.acc[mine[used] >> 2] = 0
                continue
            self.page_hand = page + 1
            return k, mine.tolist()
        if fallback is not None:
            self.page_hand = fallback[2] + 1
            return fallback[0], fallback[1]
        return -1, []

    def _may_take(self, hdr: np.ndarray) -> bool:
        return True


class Volatile(Clock):
    """volatile-ttl: only records with an expiry are evicted, the soonest first."""

    def victims(self, c: int, n: int) -> list[int]:
        refs = self.refs(c)
        if not len(refs):
            return []
        live, hdr = self._live(refs)
        expiry = hdr[:, L.S_EXPIRY]
        cand = np.flatnonzero(live & (expiry != 0))
        if not len(cand):
            return []
        order = cand[np.argsort(expiry[cand], kind="stable")][:n]
        self.seg.q[L.H_CLOCK_SCANS] += len(refs)
        return refs[order].tolist()

    def _may_take(self, hdr: np.ndarray) -> bool:
        return bool((hdr[:, L.S_EXPIRY] != 0).all())


def make_evictor(policy: int, engine: object, access: np.ndarray | None) -> Clock | None:
    """The evictor of an ``L.EVICT_*`` policy, or None (a full class refuses writes)."""
    if policy == L.EVICT_LRU and access is not None:
        return Clock(engine, access)
    if policy == L.EVICT_VOLATILE_TTL:
        return Volatile(engine, access if access is not None else np.zeros(engine.seg.layout.access_size, np.uint8))
    return None
