"""``get_many``'s lock-free probe of many keys at once: the seqlock protocol in numpy.

Design
------
The same protocol as one ``get`` (see ``_segment``), done for every key in a few numpy
passes, each pass one numpy call over all keys still in play, in program order:

0. The keys as a zero-padded ``(n, kw)`` array of u64 words (:func:`key_words`: one
   join and a reshape when the keys have one length, else a split and one
   ``np.array(kbs, "S..")``), hashed in numpy (:func:`_layout.key_hash_words`, the
   same value as ``key_hash``).
1. Walk the index: load every key's home bucket; a key stops at an empty bucket (a
   miss) or a bucket whose hash matches (a candidate). The few keys that met neither
   load a window of the next buckets at once and stop at the first of either there.
2. For the candidates: load the page-table entry of each slot's page, then the
   slot's ``seq`` (s1); then (records over 256 bytes only) its meta word, for the
   longest value; then one gather of expiry, meta, key and value (a strided view of
   one fixed-width record at every slot reference, 16 bytes apart, so the gather is
   one copy per slot whatever its size class); then ``seq`` again (s2), the bucket
   and the page entry again.
3. Accept a candidate only if its page is assigned and its entry did not change (the
   page was not reassigned to another class meanwhile), s1 is even and equal to s2,
   the bucket did not change, the slot is live, unexpired, holds exactly the query's
   key: its length, and its first ``ceil(klen / 8)`` words (the key is zero-padded
   to 8 bytes in the slot, the value follows at ``+32 + align8(klen)``), and its
   value ends inside the page. Accept a miss only if the index generation was even
   before the first bucket load and unchanged after the last one.

Every key not settled by that (a key not found within :data:`MAX_WALK` buckets, a
hash that matched another key, a slot that moved under us) goes through the per-key
``probe``, which has the full protocol with backoff. Nothing read is trusted before
its checks pass; lengths are clamped to the slot before slicing.

Where the time goes for 1000 keys of 16 bytes with 64-byte values, ~170 us in all
(py-spy over ``scripts/read_profile.py get_many``): the key array ~28 us, the hash
~27 us, the walk ~12 us, the gathers and checks ~45 us, the values array ~9 us, and
the msgspec decode of all values in one call (in ``Store.get_many``) ~19 us.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import _layout as L

#: Buckets walked in numpy (the home bucket, then a window of the rest) before a key
#: falls back to the per-key probe.
MAX_WALK = 32
#: Below this many keys the per-key loop beats numpy's fixed costs.
MIN_KEYS = 32

_EMPTY = np.empty(0, np.intp)
_NO_VALUES = b"\x90"  # a msgpack array of no values


def array_header(n: int) -> bytes:
    """A msgpack array header: values concatenated after it decode in one call."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def values_array(vals: np.ndarray, vlen: np.ndarray, maxv: int,
                 first_bytes: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """The msgpack array of values: an array header, then each row's first
    ``vlen[i]`` bytes of ``vals`` (uint8 ``(k, maxv)``), in one buffer.

    ``first_bytes(vlen, maxv)`` gives the bool ``(k, maxv)`` mask of those bytes.
    """
    head = array_header(len(vlen))
    h = len(head)
    if len(vlen) and int(vlen.min()) == maxv:  # every value has the same length
        out = np.empty(h + vals.size, np.uint8)
        out[h:].reshape(vals.shape)[...] = vals
    else:  # a contiguous copy first: boolean indexing is 3x faster on it
        out = np.empty(h + int(vlen.sum()), np.uint8)
        out[h:] = np.ascontiguousarray(vals)[first_bytes(vlen, maxv)]
    out[:h] = np.frombuffer(head, np.uint8)
    return out


def key_words(keys: list, key_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The keys as zero-padded u64 words and their byte lengths, in a few C calls.

    Applies to a list of only str or only bytes, each 1 to ``key_size`` bytes, with no
    key holding a NUL byte; returns ``None`` otherwise: the caller then encodes and
    checks key by key (and raises the typed error for a bad key). Keys of one length (``user:000042``) take
    the fastest way: one join, then a reshape of the joined bytes.

    Returns:
        ``(words, lens)``: uint64 ``(n, ceil(key_size / 8))`` and int64 ``(n,)``.
    """
    n = len(keys)
    kw = (key_size + 7) // 8
    try:
        joined = "\0".join(keys).encode()
    except TypeError:  # not all str
        try:
            joined = b"\0".join(keys)
        except TypeError:
            return None
        if set(map(type, keys)) != {bytes}:
            return None  # (bytearray and memoryview join too)
    if not n or joined.count(0) != n - 1:  # a key holds a NUL
        return None
    width = (len(joined) + 1) // n - 1
    if (width + 1) * n == len(joined) + 1:
        # Every key is `width` bytes: the only n - 1 NULs are the separators, and they
        # fall every width + 1 bytes exactly when the keys are of one length.
        flat = np.frombuffer(joined + b"\0", np.uint8).reshape(n, width + 1)
        if 1 <= width <= key_size and not flat[:, width].any():
            out = np.zeros((n, 8 * kw), np.uint8)
            out[:, :width] = flat[:, :width]
            return out.view(np.uint64), np.full(n, width, np.int64)
    kbs = joined.split(b"\0")
    arr = np.array(kbs, dtype=f"S{8 * kw + 8}")  # one word more: a longer key shows
    lens = np.char.str_len(arr).astype(np.int64, copy=False)  # exact: no NULs inside
    if int(lens.max()) > key_size or int(lens.min()) < 1:
        return None
    return arr.view(np.uint64).reshape(n, kw + 1)[:, :kw], lens


def padded_words(kbs: list[bytes], key_size: int) -> np.ndarray:
    """uint64 ``(n, ceil(key_size / 8))``: each key's bytes zero-padded (keys checked
    to be 1 to key_size bytes; NULs inside are kept, the lengths say where keys end)."""
    kw = (key_size + 7) // 8
    return np.array(kbs, dtype=f"S{8 * kw}").view(np.uint64).reshape(len(kbs), kw)


def make_probe_many(seg: object, probe_each: Callable, access: memoryview | None = None) -> Callable:
    """Build ``probe_many(keys, lens, words=None)`` for one mapping (see
    :func:`_readers.make_readers`).

    Args:
        seg: the :class:`~shmstore._segment.Segment`.
        probe_each: ``probe_each(kbs, positions) -> ({position: value}, top seq)``, the
            per-key path; ``kbs[i]`` is key i's bytes (it touches its own hits).
        access: the access bytes (LRU eviction) or None: byte ``ref >> 2`` of every
            slot found is set to 1 where it is 0.
    """
    acc = None if access is None else np.frombuffer(access, dtype=np.uint8)
    q = seg.q
    mask = seg.mask
    ksz = seg.key_size
    vsz = seg.value_size
    nrefs = seg.nslots  # slot references (format 4: 16-byte units of the pages)
    shift = seg.ref_shift
    mm = seg.mm
    H_GEN = L.H_INDEX_GEN
    KW = (ksz + 7) // 8  # u64 words that cover the longest key
    pages_off = 8 * seg.slot0
    words_all = np.ndarray((len(mm) // 8,), dtype=np.uint64, buffer=mm)
    page_table = seg.page_table()
    buckets = seg.index_view()  # 1-D u64
    # A record from the expiry word on: expiry, meta, key, value (RECORD_OFF bytes in).
    RECORD_OFF = 8 * L.S_EXPIRY
    KEY_AT = L.SLOT_HEADER - RECORD_OFF  # the key's byte offset in a record
    # record width -> (strided view of a record at every ref, how many refs it covers)
    records: dict[int, tuple[np.ndarray, int]] = {}
    WHOLE = KEY_AT + 8 * KW + vsz <= 256  # whole records are cheap to copy

    def record_view(maxv: int) -> tuple[np.ndarray, int]:
        """Records of ``maxv`` bytes of value after the longest key, one per ref (a
        ref that is not a slot's start is never gathered: its bucket would be stale,
        which the checks catch). The last refs' records may not fit in the mapping:
        those refs (beyond the count returned) go the per-key way."""
        width = L.align(KEY_AT + 8 * KW + maxv, 8)
        got = records.get(width)
        if got is None:
            off = pages_off + RECORD_OFF
            count = max(0, min(nrefs, (len(mm) - off - width) // L.SLOT_UNIT + 1))
            view = np.ndarray((count,), dtype=np.dtype(f"V{width}"), buffer=mm,
                              offset=off, strides=(L.SLOT_UNIT,))
            got = records[width] = (view, count)
        return got

    U32 = np.uint64(0xFFFFFFFF)
    S32 = np.uint64(32)
    ONE = np.uint64(1)
    LIVE_KEY = np.uint64((L.FLAG_FREE << 16) | 0xFFFF)  # meta & this == klen: live, that length
    MASK = np.intp(mask)
    SHIFT = np.intp(shift)
    PAGE_SHIFT = np.intp(shift + 4)  # a page's bytes: 1 << this
    J = np.arange(KW, dtype=np.int64)[None, :]
    WINDOWS = [np.arange(1, 8, dtype=np.intp), np.arange(8, MAX_WALK, dtype=np.intp)]

    mask_tables: dict[int, np.ndarray] = {}  # maxv -> row n: n True, then False

    def first_bytes(vlen: np.ndarray, maxv: int) -> np.ndarray:
        table = mask_tables.get(maxv)
        if table is None:
            if (vsz + 1) * maxv > 1 << 20:  # too big to keep: compute it
                return np.arange(maxv) < vlen[:, None]
            if len(mask_tables) >= 64:
                mask_tables.clear()
            table = mask_tables[maxv] = np.arange(maxv) < np.arange(vsz + 1)[:, None]
        return table.take(vlen, axis=0)  # take, not [vlen]: 5x faster for rows

    def walk(homes: np.ndarray, hashes: np.ndarray, steps: np.ndarray):
        """Buckets ``home + steps`` of each key: where each stops, if it does."""
        pos = (homes[:, None] + steps) & MASK
        b = buckets[pos]
        stop = (b == 0) | ((b >> S32) == hashes[:, None])
        first = stop.argmax(axis=1)
        at = np.arange(len(homes)) * len(steps) + first
        return stop.reshape(-1)[at], pos.reshape(-1)[at], b.reshape(-1)[at]

    def probe_many(keys: list, lens: np.ndarray, words: np.ndarray | None = None
                   ) -> tuple[np.ndarray, bytes | np.ndarray, dict[int, bytes], int]:
        """Probe many keys at once.

        Args:
            keys: the keys, str or bytes, each 1 to key_size bytes (checked by the
                caller).
            lens: their lengths in bytes, as int64.
            words: their :func:`key_words`, if the caller has them.

        Returns:
            ``(fast, values, slow, top)``: positions of the keys found in numpy
            (ascending), their values as one msgpack array in that order (a buffer
            that decodes in one call), ``{position: value}`` of keys found by the
            per-key path, and the highest seq accepted.
        """
        n = len(keys)
        if n < MIN_KEYS:
            kbs = [k if k.__class__ is bytes else k.encode() for k in keys]
            found, top = probe_each(kbs, range(n))
            return _EMPTY, _NO_VALUES, found, top
        if words is None:
            words = padded_words([k if k.__class__ is bytes else k.encode() for k in keys], ksz)
        hashes = L.key_hash_words(words)
        homes = hashes.astype(np.intp)  # below 2**32; walk() masks
        # 1. Walk the index: every key's home bucket, then a window past it for the
        # few keys that met neither an empty bucket nor their hash there.
        g1 = q[H_GEN]
        stop_pos = homes & MASK
        stop_b = buckets[stop_pos]
        stopped = (stop_b == 0) | ((stop_b >> S32) == hashes)
        pend = np.flatnonzero(~stopped)
        for steps in WINDOWS:
            if not pend.size:
                break
            st2, pos2, b2 = walk(homes[pend], hashes[pend], steps)
            stopped[pend] = st2
            stop_pos[pend] = pos2
            stop_b[pend] = b2
            pend = pend[~st2]
        hit = stopped & (stop_b != 0)  # stopped at a matching hash
        if hit.all():  # the usual case: every key has a candidate
            ck, cp, cb, klens = np.arange(n), stop_pos, stop_b, lens
        else:
            ck = np.flatnonzero(hit)
            cp, cb, klens = stop_pos[ck], stop_b[ck], lens[ck]
        if not ck.size:
            g2 = q[H_GEN]
            return settle(keys, _EMPTY, _NO_VALUES, 0, g1, g2, pend, ck)
        # 2. The candidates' slots, under their page entries and seqlocks.
        slots = (cb & U32).astype(np.intp) - 1
        if WHOLE:
            view, count = record_view(vsz)
        # A ref past the pages is damaged (the per-key lookup raises), one past the
        # records' view goes the per-key way too: gather a harmless 0 for both.
        inside = (slots >= 0) & (slots < nrefs)
        if not inside.all():
            slots = np.where(inside, slots, 0)
        pages = slots >> SHIFT
        pte1 = page_table[pages]
        seqw = seg.slot0 + 2 * slots
        s1 = words_all[seqw]
        if not WHOLE:  # the longest value among them, clamped, sizes the gather
            maxv = min(int((words_all[seqw + L.S_META] >> S32).max()), vsz)
            view, count = record_view(maxv)
        if count < nrefs:
            inside &= slots < count
            gather = np.where(slots < count, slots, 0)
        else:
            gather = slots
        rec = view[gather].view(np.uint64).reshape(slots.size, -1)
        s2 = words_all[seqw]
        bb = buckets[cp]
        pte2 = page_table[pages]
        g2 = q[H_GEN]
        # 3. Checks. Invariant: nothing read above is trusted until they pass.
        meta = rec[:, 1]
        vlen = (meta >> S32).astype(np.intp)
        if WHOLE:
            maxv = min(int(vlen.max()), vsz)
        # s1 == s2 and even; the bucket and the page entry unchanged (and the page
        # assigned); no expiry; live, with the key's length.
        bad = ((s1 ^ s2) | (s1 & ONE) | (bb ^ cb) | (pte1 ^ pte2) | rec[:, 0]
               | ((meta & LIVE_KEY) ^ klens.astype(np.uint64)))
        # Keys are zero-padded to 8 bytes in their slots, the value follows: a key of
        # klen bytes compares as its first ceil(klen / 8) words.
        kwords = (klens + 7) >> 3
        want = words[ck] if ck.size < n else words
        d = rec[:, 2 : 2 + KW] ^ want
        key_bad = ((d != 0) & (J < kwords[:, None])).any(axis=1)
        # The value (at +32 + 8 * kwords) must end inside the slot's page.
        vend = (slots << 4) + (L.SLOT_HEADER + 8 * kwords + vlen)
        ok = (bad == 0) & ~key_bad & inside & (pte1 != 0) & (vlen <= maxv) & (vend <= (pages + 1) << PAGE_SHIFT)
        all_ok = bool(ok.all())
        fast = ck if all_ok else ck[ok]
        raw = rec.view(np.uint8)
        kw_ok = kwords if all_ok else kwords[ok]
        if not len(kw_ok) or int(kw_ok.min()) == int(kw_ok.max()):  # keys of one word count
            at = KEY_AT + 8 * (int(kw_ok[0]) if len(kw_ok) else KW)
            body = raw[:, at : at + maxv]
            vals = body if all_ok else body[ok]
        else:  # each row's value from its own offset
            rows = np.flatnonzero(ok)
            vals = raw[rows[:, None], (KEY_AT + 8 * kw_ok)[:, None] + np.arange(maxv)[None, :]]
        vl = vlen if all_ok else vlen[ok]
        blob = values_array(vals, vl, maxv, first_bytes)
        top = int((s1 if all_ok else s1[ok]).max()) if fast.size else 0
        if acc is not None and fast.size:  # the hits' access bytes: store only the zeros
            at = (slots if all_ok else slots[ok]) >> 2
            acc[at[acc[at] == 0]] = 1
        if fast.size == n:
            return fast, blob, {}, top
        return settle(keys, fast, blob, top, g1, g2, pend, ck)

    def settle(keys: list, fast: np.ndarray, blob: bytes | np.ndarray, top: int, g1: int, g2: int,
               pend: np.ndarray, ck: np.ndarray
               ) -> tuple[np.ndarray, bytes | np.ndarray, dict[int, bytes], int]:
        """The keys numpy did not settle, through the per-key probe."""
        n = len(keys)
        rest = np.ones(n, bool)
        rest[fast] = False
        if not g1 & 1 and g2 == g1:
            # Trusted misses: every key that met an empty bucket.
            met = np.ones(n, bool)
            met[pend] = False  # still walking after MAX_WALK buckets
            met[ck] = False  # stopped at a matching hash
            rest &= ~met
        which = np.flatnonzero(rest).tolist()
        kbs = {i: keys[i] if keys[i].__class__ is bytes else keys[i].encode() for i in which}
        found, top2 = probe_each(kbs, which)
        return fast, blob, found, max(top, top2)

    return probe_many
