"""Mapping the data segment, and the lock-free seqlock reads out of it.

Design
------
Readers never take a lock and never write the segment (clients map it PROT_READ).
Every 8-byte word that the protocol depends on (slot ``seq``, ``meta``, index buckets,
header counters) is read through ``memoryview.cast('Q')``: CPython copies such an item
with one aligned 8-byte load. ``struct.unpack('<Q')`` would copy it byte by byte.

Reading one slot (:meth:`Segment.read_slot`; slot = a reference, see ``_layout``)::

    pte1 = the page table's entry of the slot's page;  0 (free, being moved) -> retry
    s1 = seq;  odd -> back off and retry
    copy meta, version, expiry, key bytes, value bytes (the value at +32 +
        align8(klen); lengths clamped to key_size / value_size and to the page's end)
    s2 = seq;  s1 != s2, or the page's entry != pte1 (the page was reassigned) -> retry
    only now look at the copied bytes

Looking a key up (:meth:`Segment.lookup`) probes the index from ``key_hash(key)``. For a
bucket whose hash matches it reads the slot, then re-reads the bucket: if the bucket
changed meanwhile (the record was rewritten into another slot) it probes that bucket
again, so an update never shows up as a false miss. A miss ends at an empty bucket and
is trusted only if the index generation (odd while buckets move, bumped on each move)
was even and unchanged across the whole probe; otherwise the probe starts over.

A slot the index points to is never written (see ``_layout``), so a reader can only meet
an odd ``seq`` through a stale bucket; it then re-reads the bucket rather than wait.
Waiting happens only on an odd index generation (or an odd slot, in ``read_slot``):
bounded spinning, then yields, then sleeps (:class:`Backoff`), and every
``stall_timeout`` a check (:meth:`Segment._check_coordinator`): a dead coordinator
raises :class:`CoordinatorUnavailableError` at once; a live one that has not finished
its change within ``read_timeout`` (the handle's ``timeout``) raises
:class:`StoreTimeoutError`, because a live pid is not progress: the coordinator may be
stopped (SIGSTOP), frozen or held in a debugger. So every read ends. Only this slow
path looks at the clock; the fast path never does.

Opening, creating and unlinking the segment: ``_shm``; process liveness: ``_liveness``.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import TYPE_CHECKING, Callable

from . import _compiled
from . import _layout as L
from ._ttl import now_ns
from ._errors import (
    CoordinatorUnavailableError,
    CorruptionError,
    IncompatibleStoreError,
    StoreTimeoutError,
)
from ._liveness import pid_alive

if TYPE_CHECKING:
    import numpy as np

key_hash = L.key_hash
# The fast paths inline key_hash (see there).
mod_prime = L._mod_prime
from_bytes = int.from_bytes

#: lookup() result for a missing key.
MISS = None


class Backoff:
    """Bounded waiting for a transient state: spin, then yield, then sleep.

    Args:
        on_stall: called with the seconds waited so far each time ``stall_timeout``
            passes; it raises to give up (see :meth:`Segment._check_coordinator`).
        stall_timeout: seconds between calls of ``on_stall``.
    """

    __slots__ = ("n", "started", "deadline", "on_stall", "stall_timeout")

    def __init__(self, on_stall: Callable[[float], None], stall_timeout: float) -> None:
        self.n = 0
        self.started = 0.0
        self.deadline = 0.0
        self.on_stall = on_stall
        self.stall_timeout = stall_timeout

    def wait(self) -> None:
        n = self.n = self.n + 1
        if n < 64:
            return
        if n == 64:
            self.started = time.monotonic()
            self.deadline = self.started + self.stall_timeout
        if n < 256:
            os.sched_yield()
            return
        time.sleep(min(0.001, 0.00001 * (n - 255)))
        now = time.monotonic()
        if now > self.deadline:
            self.on_stall(now - self.started)
            self.deadline = time.monotonic() + self.stall_timeout


class Segment:
    """One process's mapping of a store's data segment.

    Attributes are plain ints and views so the read path touches no properties.
    ``q`` views the whole segment as u64 words, ``mv`` as bytes.
    """

    def __init__(self, name: str, mm: mmap.mmap, writable: bool, read_timeout: float = 5.0) -> None:
        self.name = name
        self.mm = mm
        self.writable = writable
        self.mv = memoryview(mm)
        self.q = self.mv.cast("Q")
        q = self.q
        if len(self.mv) < L.HEADER_SIZE or q[L.H_MAGIC] != L.MAGIC:
            self.close()
            raise IncompatibleStoreError(
                f"segment {L.data_name(name)} is not a shmstore segment (bad magic); "
                f"remove it with shmstore.destroy({name!r})"
            )
        if q[L.H_FORMAT] != L.FORMAT_VERSION:
            fmt = q[L.H_FORMAT]
            self.close()
            raise IncompatibleStoreError(
                f"store {name!r} has segment format {fmt}, this shmstore reads format "
                f"{L.FORMAT_VERSION}. To move its records: with the shmstore release that "
                f"made it, `shmstore scan {name} > FILE`; stop its coordinator; `shmstore "
                f"destroy {name}`; then with this release serve it anew and `shmstore load "
                f"{name} FILE`"
            )
        self.layout = L.Layout(
            capacity=q[L.H_CAPACITY], key_size=q[L.H_KEY_SIZE], value_size=q[L.H_VALUE_SIZE],
            memory=q[L.H_MEMORY], growth=q[L.H_GROWTH] / 1e6,
        )
        lay = self.layout
        if (
            q[L.H_LAYOUT_FP] != lay.fingerprint
            or q[L.H_NSLOTS] != lay.nslots
            or q[L.H_SLOT_SIZE] != lay.largest_slot
            or q[L.H_NBUCKETS] != lay.nbuckets
            or q[L.H_NPAGES] != lay.npages
            or q[L.H_PAGE_SIZE] != lay.page_size
            or q[L.H_NCLASSES] != len(lay.classes)
            or q[L.H_PAGES_OFFSET] != lay.pages_offset
            or len(self.mv) < lay.size
        ):
            self.close()
            raise IncompatibleStoreError(
                f"store {name!r}: the segment's layout fields disagree with its "
                f"fingerprint or size; it is damaged or from another build. Destroy it "
                f"(shmstore destroy {name}) and recover from the data directory."
            )
        self.instance = q[L.H_INSTANCE]
        self.key_size = lay.key_size
        #: the largest value the store takes
        self.value_size = lay.value_size
        #: slot sizes of the size classes, ascending
        self.classes = lay.classes
        self.npages = lay.npages
        self.page_size = lay.page_size
        # Slot references: a bucket's slot field is ref + 1, and slot ref starts at byte
        # pages_offset + SLOT_UNIT * ref; so a slot's first word is slot0 + slot_words * ref
        # whatever its class (the names keep the arithmetic of fixed-size slots).
        self.nslots = lay.nrefs  # refs, not slots: the bound of a bucket's slot field
        self.slot_words = L.SLOT_UNIT // 8
        self.slot0 = lay.pages_offset // 8  # first page, in words
        #: a ref's page is ref >> ref_shift
        self.ref_shift = (lay.page_size // L.SLOT_UNIT).bit_length() - 1
        self.pt0 = lay.pt_offset // 8  # the page table, in words
        self.nbuckets = lay.nbuckets
        self.mask = lay.nbuckets - 1
        self.idx0 = lay.index_offset // 8  # first bucket, in words
        #: seconds a read waits for a live coordinator to finish a change before it
        #: raises StoreTimeoutError (the timeout of the handle that opened the mapping)
        self.read_timeout = read_timeout
        native = _compiled.native
        #: the compiled read protocol over this mapping (``shmstore._native.Mapping``),
        #: or None when the pure-Python core runs
        self.core = None
        self._retries = 0
        self._stall_timeout = 1.0
        if native is not None:
            self.core = native.Mapping(mm, self.sizes(), self._check_coordinator)
            # The full lookup in C: the same protocol, in C11 atomics (protocol.h).
            self.lookup = self.core.lookup

    def sizes(self) -> tuple[int, ...]:
        """The layout as the compiled core takes it: the first page in words, words per
        slot unit (2), slot refs, the first bucket in words, index mask, key size,
        largest value, mapping size, the page table in words, the ref -> page shift."""
        return (self.slot0, self.slot_words, self.nslots, self.idx0, self.mask,
                self.key_size, self.value_size, self.layout.size, self.pt0, self.ref_shift)

    # -- pages and slots -----------------------------------------------------------------

    def page_class(self, page: int) -> int:
        """The class page ``page`` is assigned to, or -1 (free). One load of its entry."""
        return (self.q[self.pt0 + page] & 0xFF) - 1

    def class_of(self, ref: int) -> int:
        """The class of the page slot ``ref`` lies in (-1: a free page)."""
        return (self.q[self.pt0 + (ref >> self.ref_shift)] & 0xFF) - 1

    def page_end(self, ref: int) -> int:
        """Byte offset just past the page holding slot ``ref`` (a length clamp)."""
        return 8 * self.slot0 + (((ref >> self.ref_shift) + 1) << self.ref_shift) * L.SLOT_UNIT

    def page_table(self) -> np.ndarray:
        """The page table as a u64 view (entry: ``(epoch << 8) | (class + 1)``, 0 free)."""
        import numpy as np  # noqa: PLC0415

        return np.ndarray((self.npages,), dtype=np.uint64, buffer=self.mm, offset=self.pt0 * 8)

    def slot_refs(self, pt: np.ndarray | None = None, cls: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every slot of the assigned pages as ``(refs, classes)``, int64 arrays in ref
        order, from page table ``pt`` (a copy: the current table by default); only class
        ``cls``'s if given. Slots of a page: ``page_size // slot_size`` from its start."""
        import numpy as np  # noqa: PLC0415

        if pt is None:
            pt = self.page_table().copy()
        pcls = (pt & np.uint64(0xFF)).astype(np.int64) - 1
        unit_shift = self.ref_shift
        refs_parts = []
        cls_parts = []
        for c, size in enumerate(self.classes):
            if cls is not None and c != cls:
                continue
            pages = np.flatnonzero(pcls == c)
            if not len(pages):
                continue
            per = self.page_size // size
            step = size // L.SLOT_UNIT
            r = (pages[:, None] << unit_shift) + np.arange(per, dtype=np.int64)[None, :] * step
            refs_parts.append(r.ravel())
            cls_parts.append(np.full(r.size, c, dtype=np.int64))
        if not refs_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        refs = np.concatenate(refs_parts)
        classes = np.concatenate(cls_parts)
        order = np.argsort(refs, kind="stable")
        return refs[order], classes[order]

    def headers(self, refs: np.ndarray) -> np.ndarray:
        """A copy of the four header words ``(seq, version, expiry, meta)`` of each slot
        in ``refs``, shape ``(n, 4)`` (plain loads: a scan validates what it uses)."""
        import numpy as np  # noqa: PLC0415

        words = np.ndarray((len(self.mv) // 8,), dtype=np.uint64, buffer=self.mm)
        at = self.slot0 + self.slot_words * refs
        return words[at[:, None] + np.arange(4, dtype=np.int64)[None, :]]

    @property
    def retries(self) -> int:
        """Reads through this mapping that met a change in progress and read again."""
        return self.core.retries if self.core is not None else self._retries

    @retries.setter
    def retries(self, value: int) -> None:
        if self.core is not None:
            self.core.retries = value
        else:
            self._retries = value

    @property
    def stall_timeout(self) -> float:
        """Seconds between checks of the coordinator while a read waits."""
        return self._stall_timeout

    @stall_timeout.setter
    def stall_timeout(self, value: float) -> None:
        self._stall_timeout = value
        if self.core is not None:
            self.core.stall_timeout = value

    # -- lifecycle -------------------------------------------------------------------

    #: the access bytes of LRU eviction (a writable byte view of the access segment,
    #: see :meth:`open_access`), or None: reads then touch nothing
    access: memoryview | None = None

    def open_access(self) -> memoryview | None:
        """Map the store's access segment read-write if the store evicts by LRU.

        Readers set byte ``ref >> 2`` of it after every hit (``_layout``); a hostile
        client can skew which record is evicted with it, never the data. Decided once,
        at connect: only when the header's ``H_EVICTION`` is ``EVICT_LRU``. A missing,
        short or inaccessible access segment means no touching, never an error.

        Returns:
            :attr:`access` (None: nothing to touch).
        """
        if self.access is not None or self.q[L.H_EVICTION] != L.EVICT_LRU:
            return self.access
        import posix_ipc  # noqa: PLC0415 (only stores that evict by LRU need it here)

        size = self.layout.access_size
        try:
            shm = posix_ipc.SharedMemory(L.access_name(self.name))
        except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
            return None
        try:
            if os.fstat(shm.fd).st_size < size:
                return None
            mm = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            return None
        finally:
            shm.close_fd()
        self._access_mm = mm
        self.access = memoryview(mm)
        return self.access

    def close(self) -> None:
        """Release the mapping. Views handed out must be gone first."""
        core = self.__dict__.get("core")
        if core is not None:
            core.close()
        access = self.__dict__.pop("access", None)
        if access is not None:
            try:
                access.release()
            except BufferError:  # get_many's numpy view of it lives on; the GC frees both
                pass
        amm = self.__dict__.pop("_access_mm", None)
        if amm is not None:
            try:
                amm.close()
            except BufferError:  # a view still exports it; the GC unmaps later
                pass
        for attr in ("q", "mv"):
            view = self.__dict__.pop(attr, None)
            if view is not None:
                view.release()
        mm = self.__dict__.pop("mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a numpy view still exports it; the GC unmaps later
                pass

    @property
    def closed(self) -> bool:
        return "mm" not in self.__dict__

    # -- numpy views (vectorized scans) ----------------------------------------------

    def index_view(self) -> np.ndarray:
        import numpy as np  # noqa: PLC0415

        return np.ndarray((self.nbuckets,), dtype=np.uint64, buffer=self.mm, offset=self.idx0 * 8)

    # -- the read protocol -------------------------------------------------------------

    def read_slot(self, slot: int, backoff: Backoff | None = None, *,
                  wait: bool = True) -> tuple[int, int, int, int, bytes, bytes] | None:
        """Copy one slot out under its seqlock and its page's entry.

        Args:
            slot: the slot reference (see ``_layout``: its offset from the first page
                in SLOT_UNITs).
            backoff: a Backoff to share with the caller's other waits.
            wait: False returns None for a slot being written instead of waiting. Scans
                use it: a slot the index points to is never written, so an odd slot
                holds no published record (and may be one a dead coordinator left).

        Returns:
            ``(seq, version, expiry, flags, key, value)``, all from one validated read;
            None when ``slot`` is no slot now: out of range, in a free page, or not a
            slot's start in its page's class (a reference from before a page move).
        """
        if self.core is not None:
            return self.core.read_slot(slot, wait)
        if not 0 <= slot < self.nslots:
            return None
        q = self.q
        mv = self.mv
        p = slot >> self.ref_shift
        ptw = self.pt0 + p
        w = self.slot0 + slot * self.slot_words
        kofs = w * 8 + L.SLOT_HEADER
        pend = self.page_end(slot)
        in_page = (slot - (p << self.ref_shift)) * L.SLOT_UNIT  # byte offset in the page
        classes = self.classes
        ksz = self.key_size
        vsz = self.value_size
        while True:
            pte1 = q[ptw]
            c = (pte1 & 0xFF) - 1
            if pte1 == 0 or c >= len(classes) or in_page % classes[c] or in_page + classes[c] > self.page_size:
                return None
            s1 = q[w]
            if s1 & 1:
                if not wait:
                    return None
                if backoff is None:
                    backoff = Backoff(self._check_coordinator, self.stall_timeout)
                backoff.wait()
                continue
            version = q[w + 1]
            expiry = q[w + 2]
            meta = q[w + 3]
            # Invariant: nothing read before validation is trusted; clamp lengths so
            # a torn meta word can at worst make us copy the wrong bytes, never fault
            # and never read past the page.
            klen = min(meta & 0xFFFF, ksz, max(0, pend - kofs))
            vofs = kofs + ((klen + 7) & ~7)
            vlen = min(meta >> 32, vsz, max(0, pend - vofs))
            key = bytes(mv[kofs : kofs + klen])
            value = bytes(mv[vofs : vofs + vlen])
            if q[w] == s1 and q[ptw] == pte1:
                return s1, version, expiry, (meta >> 16) & 0xFFFF, key, value

    def lookup(self, kb: bytes) -> tuple[int, int, int, bytes, int] | None:
        """Find a key. Lock-free; never returns a torn value or a false miss.

        With the compiled core this method is replaced by ``core.lookup``: the same
        protocol in C (``shmstore/_csrc/protocol.h``).

        Args:
            kb: the key's bytes.

        Returns:
            ``(slot, seq, version, value_bytes, expiry)`` or None when the key is
            missing or expired (``expiry`` is checked against the wall clock).

        Raises:
            CorruptionError: a bucket names a slot beyond the pages.
        """
        q = self.q
        mv = self.mv
        mask = self.mask
        idx0 = self.idx0
        pt0 = self.pt0
        shift = self.ref_shift
        nrefs = self.nslots
        h = key_hash(kb)
        n = len(kb)
        backoff = None
        while True:
            g1 = q[L.H_INDEX_GEN]
            if g1 & 1:
                self.retries += 1
                if backoff is None:
                    backoff = Backoff(self._check_coordinator, self.stall_timeout)
                backoff.wait()
                continue
            pos = h & mask
            while True:
                b = q[idx0 + pos]
                if b == 0:
                    if q[L.H_INDEX_GEN] == g1:
                        return MISS
                    self.retries += 1
                    break  # buckets moved under us: probe again
                if b >> 32 == h:
                    slot = (b & 0xFFFFFFFF) - 1
                    if not 0 <= slot < nrefs:
                        raise CorruptionError(
                            f"store {self.name!r}: index bucket {pos} names slot {slot}, "
                            f"beyond the store's {nrefs} slot references; the segment is "
                            f"damaged. Stop the coordinator, destroy the segment (shmstore "
                            f"destroy {self.name}) and recover from the data directory."
                        )
                    pw = pt0 + (slot >> shift)
                    pte1 = q[pw]  # 0: a stale reference into a page being moved
                    w = self.slot0 + slot * self.slot_words
                    s1 = q[w]
                    if pte1 and not s1 & 1:
                        meta = q[w + 3]
                        version = q[w + 1]
                        expiry = q[w + 2]
                        kofs = w * 8 + L.SLOT_HEADER
                        pend = 8 * self.slot0 + (((slot >> shift) + 1) << shift) * L.SLOT_UNIT
                        klen = min(meta & 0xFFFF, self.key_size, max(0, pend - kofs))
                        key = bytes(mv[kofs : kofs + klen])
                        vofs = kofs + ((klen + 7) & ~7)
                        vlen = min(meta >> 32, self.value_size, max(0, pend - vofs))
                        value = bytes(mv[vofs : vofs + vlen])
                        if q[w] == s1 and q[idx0 + pos] == b and q[pw] == pte1:
                            # Validated: the slot was stable, still the bucket's, and
                            # its page still the class it was read as.
                            if klen == n and key == kb and not (meta >> 16) & L.FLAG_FREE:
                                if expiry and expiry <= now_ns():
                                    return MISS
                                access = self.access
                                if access is not None and not access[slot >> 2]:
                                    access[slot >> 2] = 1
                                return slot, s1, version, value, expiry
                            pos = (pos + 1) & mask
                            continue
                    # The slot, its page or the bucket moved under us: read this bucket
                    # again. (A slot the index points to is never odd, so this is brief.)
                    self.retries += 1
                    if backoff is None:
                        backoff = Backoff(self._check_coordinator, self.stall_timeout)
                    backoff.wait()
                    continue
                pos = (pos + 1) & mask

    def _check_coordinator(self, waited: float) -> None:
        """Called every ``stall_timeout`` while a reader waits on a transient state
        (an odd index generation or slot seq), with the seconds it has waited.

        Raises:
            CoordinatorUnavailableError: the coordinator died mid-change.
            StoreTimeoutError: it lives but has not finished the change within
                ``read_timeout`` (stopped, frozen, in a debugger).
        """
        if not coordinator_alive(self):
            raise CoordinatorUnavailableError(
                f"store {self.name!r}: the coordinator died in the middle of a change "
                f"(index entries moving, or a slot being written), so this read cannot "
                f"be answered safely. Start a coordinator (shmstore serve {self.name}); "
                f"it repairs the segment on start."
            )
        if waited >= self.read_timeout:
            pid = self.q[L.H_COORD_PID]
            raise StoreTimeoutError(
                f"store {self.name!r}: a read waited {waited:.1f} s for the coordinator "
                f"(pid {pid}) to finish a change (index entries moving, or a slot being "
                f"written); it is alive but makes no progress: stopped (SIGSTOP), frozen or "
                f"held in a debugger? Resume it (kill -CONT {pid}) or restart it (shmstore "
                f"serve {self.name} after stopping it), then read again; a larger timeout= "
                f"on connect() waits longer."
            )

    # -- header ----------------------------------------------------------------------

    @property
    def state(self) -> int:
        return self.q[L.H_STATE]

    @property
    def epoch(self) -> int:
        return self.q[L.H_EPOCH]


# -- processes ---------------------------------------------------------------------


def coordinator_alive(seg: Segment) -> bool:
    q = seg.q
    return q[L.H_COORD_INCARNATION] != 0 and pid_alive(q[L.H_COORD_PID], q[L.H_COORD_START])
