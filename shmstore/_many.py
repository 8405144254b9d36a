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
2. For the candidates: load each slot's ``seq`` (s1); then (records over 256 bytes
   only) its meta word, for the longest value; then one gather of expiry, meta, key
   and value (a strided view of one fixed-width record per slot, so the gather is one
   copy per slot); then ``seq`` again (s2) and the bucket again.
3. Accept a candidate only if s1 is even and equal to s2, the bucket did not change,
   the slot is live, unexpired, and holds exactly the query's key: its length, and
   its bytes compared as whole words (the engine keeps the key area zero-padded).
   Accept a miss only if the index generation was even before the first bucket load
   and unchanged after the last one.

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


def make_probe_many(seg: object, probe_each: Callable) -> Callable:
    """Build ``probe_many(keys, lens, words=None)`` for one mapping (see
    :func:`_segment.make_readers`).

    Args:
        seg: the :class:`~shmstore._segment.Segment`.
        probe_each: ``probe_each(kbs, positions) -> ({position: value}, top seq)``, the
            per-key path; ``kbs[i]`` is key i's bytes.
    """
    q = seg.q
    mask = seg.mask
    ksz = seg.key_size
    vsz = seg.value_size
    slot_size = seg.slot_size
    nslots = seg.nslots
    mm = seg.mm
    H_GEN = L.H_INDEX_GEN
    KW = (ksz + 7) // 8  # u64 words that cover a key (the slot always has room for them)
    slot_q = np.ndarray((nslots, seg.slot_words), dtype=np.uint64, buffer=mm, offset=L.SLOTS_OFFSET)
    seq_col = slot_q[:, 0]
    meta_col = slot_q[:, L.S_META]
    buckets = seg.index_view()  # 1-D u64
    # A record from the expiry word on: expiry, meta, key, value (RECORD_OFF bytes in).
    RECORD_OFF = 8 * L.S_EXPIRY
    KEY_AT = L.SLOT_HEADER - RECORD_OFF  # the key's byte offset in a record
    records: dict[int, np.ndarray] = {}  # record width -> strided view of every slot
    WHOLE = KEY_AT + ksz + vsz <= 256  # whole records are cheap to copy

    def record_view(maxv: int) -> np.ndarray:
        width = max(KEY_AT + 8 * KW, L.align(KEY_AT + ksz + maxv, 8))
        view = records.get(width)
        if view is None:
            view = records[width] = np.ndarray(
                (nslots,), dtype=np.dtype(f"V{width}"), buffer=mm,
                offset=L.SLOTS_OFFSET + RECORD_OFF, strides=(slot_size,))
        return view

    U32 = np.uint64(0xFFFFFFFF)
    S32 = np.uint64(32)
    ONE = np.uint64(1)
    LIVE_KEY = np.uint64((L.FLAG_FREE << 16) | 0xFFFF)  # meta & this == klen: live, that length
    MASK = np.intp(mask)
    # With key_size not a multiple of 8 the last key word runs into the value: its
    # difference is masked to the key's bytes.
    TAIL = np.uint64((1 << 8 * (ksz % 8)) - 1) if ksz % 8 else None
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
        # 2. The candidates' slots, under their seqlocks.
        slots = (cb & U32).astype(np.intp) - 1
        s1 = seq_col[slots]
        if WHOLE:  # small records: copy them whole rather than look up the longest value
            rec = record_view(vsz)[slots].view(np.uint64).reshape(slots.size, -1)
        else:
            maxv = min(int((meta_col[slots] >> S32).max()), vsz)
            rec = record_view(maxv)[slots].view(np.uint64).reshape(slots.size, -1)
        s2 = seq_col[slots]
        bb = buckets[cp]
        g2 = q[H_GEN]
        # 3. Checks. Invariant: nothing read above is trusted until they pass.
        meta = rec[:, 1]
        vlen = (meta >> S32).astype(np.intp)
        if WHOLE:
            maxv = min(int(vlen.max()), vsz)
        # s1 == s2 and even; the bucket unchanged; no expiry; live, with the key's length.
        bad = (s1 ^ s2) | (s1 & ONE) | (bb ^ cb) | rec[:, 0] | ((meta & LIVE_KEY) ^ klens.astype(np.uint64))
        # Keys are zero-padded in their slots (the engine writes them so), so a key
        # compares word by word; only the last word, when it runs into the value, is
        # masked. A slot with other bytes there fails and goes the per-key way.
        want = words[ck] if ck.size < n else words
        for j in range(KW):
            d = rec[:, 2 + j] ^ want[:, j]
            if j == KW - 1 and TAIL is not None:
                d &= TAIL
            bad |= d
        ok = (bad == 0) & (vlen <= maxv)
        all_ok = bool(ok.all())
        fast = ck if all_ok else ck[ok]
        body = rec.view(np.uint8)[:, KEY_AT + ksz : KEY_AT + ksz + maxv]
        vals = body if all_ok else body[ok]
        vl = vlen if all_ok else vlen[ok]
        blob = values_array(vals, vl, maxv, first_bytes)
        top = int((s1 if all_ok else s1[ok]).max()) if fast.size else 0
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
