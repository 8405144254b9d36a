"""One handle's reads over a mapping: the get fast path, the read cache, get_many.

Split from ``_segment`` (which maps the segment and holds the full lookup protocol):
:func:`make_readers` builds a handle's :class:`Readers` over a :class:`Segment`, in C
when the compiled core runs (``shmstore/_csrc/reader.c``), else as Python closures that
follow the same protocol (see the ``_segment`` module docstring and ``_layout``).
"""

from __future__ import annotations

from typing import Callable, Iterable

from . import _compiled
from . import _layout as L
from ._segment import Segment, from_bytes, mod_prime
from ._ttl import now_ns


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
