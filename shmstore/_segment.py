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
from typing import TYPE_CHECKING, Callable, Iterable

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
            if pte1 == 0 or c >= len(classes) or in_page % classes[c]:
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


#: Values a cache hit may hand out again as they are: the caller cannot change them.
IMMUTABLE = frozenset({str, bytes, int, float, bool, type(None)})

#: ``get`` calls ``on_publish`` once every this many reads (a power of two, minus one).
PUBLISH_MASK = 4095


class Readers:
    """One handle's reads over one mapping, as :func:`make_readers` builds them.

    ``get(key, default=None)``; ``reads()``, ``cache_hits()``, ``cached()``: the
    handle's counts (``shmstore._stats._Counters`` reads them). With the compiled core
    ``get_many(keys, default)`` answers a whole batch in one call (a list; None when a
    write after the epoch it read spoiled the answer; NotImplemented for keys it leaves
    to the general path) and ``probe_many`` is None; with the pure-Python core
    ``get_many`` is None and ``probe_many(keys, lens, words=None)`` (``_many``) returns
    the keys found, their values as one msgpack array and the highest seq accepted.
    """

    __slots__ = ("get", "get_many", "probe_many", "reads", "cache_hits", "cached", "native")

    def __init__(self, get: Callable, get_many: Callable | None, probe_many: Callable | None,
                 reads: Callable[[], int], cache_hits: Callable[[], int], cached: Callable[[], int]) -> None:
        self.get = get
        self.get_many = get_many
        self.probe_many = probe_many
        self.reads = reads
        self.cache_hits = cache_hits
        self.cached = cached
        #: whether the compiled core answers these reads
        self.native = get_many is not None


def make_readers(seg: Segment, decode: Callable[[bytes], object],
                 on_stale: Callable[..., object],
                 on_publish: Callable[[], object] | None = None,
                 read_cache: int = 0, probe_cache: dict | None = None,
                 decode_list: Callable[[bytes], list] | None = None,
                 access: memoryview | None = None) -> Readers:
    """Build one handle's :class:`Readers` for one mapping.

    With the compiled core (``seg.core``) they are a ``shmstore._native.Reader``: the
    protocol below, the read cache and ``get_many`` in C (``shmstore/_csrc/reader.c``).
    ``decode_list`` decodes a msgpack array of values (``get_many``'s answer).

    The pure-Python ``get`` is a closure with everything bound as locals.

    The common case runs inline: the walk from the key's home bucket to the first
    bucket with its hash (usually the home bucket itself) or an empty one, the slot's
    seqlock read, a re-check of the bucket, one decode; a miss is trusted when the
    index generation was even and did not move. Anything else (a full-hash collision,
    an odd seq, a moving index, a long key, a key neither str nor bytes, an expired
    record, a destroyed segment) takes the full :meth:`Segment.lookup` path, which has
    the same protocol plus backoff.

    Reading a slot (format 4): the slot's page entry is loaded before the seqlock read
    (0: a page being moved, the full lookup waits), the key and value lengths are
    clamped to the page's end, the value is read at ``+32 + align8(klen)``, and the
    page entry is checked unchanged with the seq and the bucket after the copy.

    ``access``: None, or a writable byte view of the store's access segment (LRU
    eviction, :meth:`Segment.open_access`): byte ``ref >> 2`` is set to 1 (if 0) after
    every hit, cache hits included.

    The read cache (``read_cache`` records; ``Store.get`` states the contract): a
    cached record is answered again only after checking, on every call, that the store
    is live, that the index bucket that found it still points to its slot, that
    the slot still carries the seq it was read under and that its page still has the
    entry it had: four loads of shared memory instead of a hash, a probe and a copy. Since a slot the index points to is never
    rewritten and every write takes a new seq, a hit returns exactly what a fresh read
    would return at that moment. A miss is kept too, as the empty bucket that ended
    the walk and the index generation: the key's insert fills that bucket, and every
    move or removal of buckets bumps the generation, so a kept miss holds exactly
    while both are unchanged. When the cache is full, nothing is added until 8x
    ``read_cache`` further uncached reads have passed; then it starts over.

    ``get`` counts its calls in a closure cell (``get.reads()``) and calls
    ``on_publish()`` every ``PUBLISH_MASK + 1`` of them, so the handle's counters
    (``shmstore._stats._Counters``) can publish to shared memory without a store per
    read.
    """
    if seg.core is not None:
        native = _compiled.native
        extra = () if access is None else (access,)
        r = native.Reader(seg.core, seg.mm, seg.sizes(), decode, decode_list, on_stale, on_publish, read_cache,
                          *extra)
        return Readers(r.get, r.get_many, None, r.reads, r.cache_hits, r.cached)
    q = seg.q
    mv = seg.mv
    mask = seg.mask
    idx0 = seg.idx0
    last = idx0 + mask  # the index's last bucket, as a word of q
    slot0 = seg.slot0
    sw = seg.slot_words
    pt0 = seg.pt0
    shift = seg.ref_shift
    nrefs = seg.nslots
    page0 = 8 * slot0  # the first page's byte offset
    page_bytes = seg.page_size
    ksz = seg.key_size
    vsz = seg.value_size
    lookup = seg.lookup
    acc = access
    H_STATE = L.H_STATE
    H_GEN = L.H_INDEX_GEN
    READY = L.STATE_READY
    HDR = L.SLOT_HEADER
    FREE = L.FLAG_FREE << 16

    MULT = L.HASH_MULT
    M32 = 0xFFFFFFFF

    def probe(kb: bytes) -> tuple[bytes, int] | None:
        """The first-probe fast path: (value bytes, seq), None for a miss, or the full
        lookup's answer when anything is unusual."""
        h = mod_prime(from_bytes(kb, "little") * MULT)  # key_hash(kb), inline
        h = h & M32 ^ h >> 29  # == (h ^ h >> 29) & M32, on smaller ints
        g = q[H_GEN]
        pos = idx0 + (h & mask)
        b = q[pos]
        while b and b >> 32 != h:  # another key's bucket: walk the run
            pos = pos + 1 if pos != last else idx0
            b = q[pos]
        if b == 0:
            if not g & 1 and q[H_GEN] == g:
                return None
        elif 0 < (b & M32) <= nrefs:  # the hash matches (a damaged ref: lookup raises)
            r = (b & M32) - 1
            p = r >> shift
            pte = q[pt0 + p]
            w = slot0 + r * sw
            s1 = q[w]
            meta = q[w + 3]
            vlen = meta >> 32
            expiry = q[w + 2]
            o = w * 8 + HDR
            n = len(kb)
            va = o + ((n + 7) & ~7)  # the value, if the key is the query's
            stop = va + (vlen if vlen <= vsz else vsz)
            pend = page0 + (p + 1) * page_bytes
            raw = mv[o : stop if stop <= pend else pend].tobytes()
            # Invariant: every word used below was read between s1 and s2.
            if (q[w] == s1 and q[pos] == b and q[pt0 + p] == pte and pte and not s1 & 1
                    and meta & 0xFFFF == n and not meta & FREE and (not expiry or expiry > now_ns())
                    and raw.startswith(kb)):
                if acc is not None and not acc[r >> 2]:
                    acc[r >> 2] = 1
                return raw[va - o :], s1
            if s1 & 1 or q[w] != s1 or q[pos] != b or not pte or q[pt0 + p] != pte:
                seg.retries += 1  # a change in progress: the full lookup reads again
        r = lookup(kb)
        if r is None:
            return None
        if acc is not None and not acc[r[0] >> 2]:
            acc[r[0] >> 2] = 1
        return r[3], r[1]

    reads = 0  # gets through this closure (one writer: this process)
    publish = on_publish if on_publish is not None else (lambda: None)
    assert PUBLISH_MASK == 4095  # written as a literal below: a constant, not a cell load

    # key -> (bucket word, bucket, slot's seq word, seq, page entry word, page entry,
    # value, True: as is / False: to decode, access byte), or for a miss (H_INDEX_GEN,
    # generation, the empty bucket's word, 0, the same word, 0, None, None, -1)
    cache: dict = {}
    cache_get = cache.get
    cap = read_cache
    full_misses = 0  # uncached reads since the cache filled up
    uncached = 0  # gets not answered from the cache (hits = reads - uncached)
    refill_after = 8 * cap

    def get(key: object, default: object = None) -> object:
        # probe() inlined: a Python call costs ~10% of a get. (So is the cache insert,
        # twice: a call per uncached get costs ~10% once the cache is full.)
        nonlocal reads, uncached, full_misses
        reads += 1
        if not reads & 4095:  # PUBLISH_MASK
            publish()
        try:
            e = cache_get(key)
        except TypeError:  # unhashable: not a key
            return on_stale(key, default)
        # A cached record is current while its bucket still points to its slot, the
        # slot still carries the seq it was read under and its page the entry it was
        # read with; a cached miss while the index generation and the empty bucket that
        # ended the walk are unchanged (see make_readers' docstring).
        if (e is not None and q[H_STATE] == READY and q[e[0]] == e[1] and q[e[2]] == e[3]
                and q[e[4]] == e[5]):
            kind = e[7]  # True: the value as is; False: to decode; None: a miss
            if kind is None:
                return default
            if acc is not None and not acc[e[8]]:
                acc[e[8]] = 1
            return e[6] if kind else decode(e[6])
        uncached += 1
        cls = key.__class__
        if cls is str:
            try:  # free in 3.11 (zero-cost exceptions) unless raised
                kb = key.encode()
            except UnicodeEncodeError:  # a lone surrogate: Store.get raises InvalidKeyError
                return on_stale(key, default)
        elif cls is bytes:
            kb = key
        else:
            return on_stale(key, default)
        n = len(kb)
        if n and n <= ksz and q[H_STATE] == READY:
            h = mod_prime(from_bytes(kb, "little") * MULT)  # key_hash(kb), inline
            h = h & M32 ^ h >> 29  # == (h ^ h >> 29) & M32, on smaller ints
            g = q[H_GEN]
            pos = idx0 + (h & mask)
            b = q[pos]
            while b and b >> 32 != h:  # another key's bucket: walk the run
                pos = pos + 1 if pos != last else idx0
                b = q[pos]
            if b == 0:
                if not g & 1 and q[H_GEN] == g:
                    if len(cache) < cap:
                        cache[key] = (H_GEN, g, pos, 0, pos, 0, None, None, -1)
                    elif cap:  # full: start over after 8x cap uncached reads
                        full_misses += 1
                        if full_misses > refill_after:
                            full_misses = 0
                            cache.clear()
                    return default
            elif 0 < (b & M32) <= nrefs:  # the hash matches (a damaged ref: lookup raises)
                r = (b & M32) - 1
                pw = pt0 + (r >> shift)
                pte = q[pw]
                w = slot0 + r * sw
                s1 = q[w]
                meta = q[w + 3]
                vlen = meta >> 32
                expiry = q[w + 2]
                o = w * 8 + HDR
                va = o + ((n + 7) & ~7)  # the value, if the key is the query's
                stop = va + (vlen if vlen <= vsz else vsz)
                pend = page0 + ((r >> shift) + 1) * page_bytes
                raw = mv[o : stop if stop <= pend else pend].tobytes()
                # Invariant: every word used below was read between s1 and s2.
                if (q[w] == s1 and q[pos] == b and q[pw] == pte and pte and not s1 & 1
                        and meta & 0xFFFF == n and not meta & FREE and not expiry and raw.startswith(kb)):
                    vb = raw[va - o :]
                    value = decode(vb)
                    if acc is not None and not acc[r >> 2]:
                        acc[r >> 2] = 1
                    if len(cache) < cap:
                        if value.__class__ in IMMUTABLE:
                            cache[key] = (pos, b, w, s1, pw, pte, value, True, r >> 2)
                        else:  # the caller may change it: decode anew on each hit
                            cache[key] = (pos, b, w, s1, pw, pte, vb, False, r >> 2)
                    elif cap:
                        # Full: start over only after 8x cap uncached reads, so a store
                        # far larger than the cache does not pay an insert per get.
                        full_misses += 1
                        if full_misses > refill_after:
                            full_misses = 0
                            cache.clear()
                    return value
            r = lookup(kb)
            if r is None:
                return default
            if acc is not None and not acc[r[0] >> 2]:
                acc[r[0] >> 2] = 1
            return decode(r[3])
        return on_stale(key, default)

    def probe_each(kbs: list[bytes], which: Iterable[int]) -> tuple[dict[int, bytes], int]:
        found = {}
        top = 0
        for i in which:
            r = probe(kbs[i])
            if r is not None:
                found[i] = r[0]
                if r[1] > top:
                    top = r[1]
        return found, top

    built = None

    def probe_many(keys: list, lens: object, words: object = None) -> tuple:
        # Built on first use (it costs ~0.4 ms: numpy views of the whole mapping), and
        # shared through ``probe_cache`` by the handles of one mapping.
        nonlocal built
        if built is None:
            built = probe_cache.get(id(seg)) if probe_cache is not None else None
            if built is None:
                from ._many import make_probe_many  # noqa: PLC0415

                built = make_probe_many(seg, probe_each, acc)
                if probe_cache is not None:
                    probe_cache[id(seg)] = built
        return built(keys, lens, words)

    def count() -> int:
        return reads

    def cache_hits() -> int:
        return reads - uncached

    return Readers(get, None, probe_many, count, cache_hits, cache.__len__)
