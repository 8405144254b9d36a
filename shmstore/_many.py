"""``get_many``'s lock-free probe of many keys at once: the seqlock protocol in numpy.

Design
------
The same protocol as one ``get`` (see ``_segment``), done for every key in a few numpy
passes, each pass one numpy call over all keys still in play, in program order:

1. Walk the index: round d loads bucket ``home + d`` of every key still probing. A key
   stops at an empty bucket (a miss) or at a bucket whose hash matches (a candidate);
   the others go on to round d + 1, up to :data:`ROUNDS` rounds.
2. For the candidates: load each slot's ``seq`` (s1); then its version/expiry/meta;
   then its key words and value bytes; then ``seq`` again (s2) and the bucket again.
3. Accept a candidate only if s1 is even and equal to s2, the bucket did not change,
   the slot is live, unexpired, and holds exactly the query's key (length and bytes).
   Accept a miss only if the index generation was even before the first bucket load
   and unchanged after the last one.

Every key not settled by that (a key not found within :data:`ROUNDS` buckets, a
hash that matched another key, a slot that moved under us) goes through the per-key
``probe``, which has the full protocol with backoff. Nothing read is trusted before
its checks pass; lengths are clamped to the slot before slicing.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import _layout as L

#: Index buckets walked per key in numpy before a key falls back to the per-key probe.
ROUNDS = 6
#: Below this many keys the per-key loop beats numpy's fixed costs.
MIN_KEYS = 32

crc32 = L._crc32


def make_probe_many(seg: object, probe_each: Callable) -> Callable:
    """Build ``probe_many(kbs, lens)`` for one mapping (see :func:`_segment.make_readers`).

    Args:
        seg: the :class:`~shmstore._segment.Segment`.
        probe_each: ``probe_each(kbs, positions) -> ({position: value}, top seq)``, the
            per-key path.
    """
    q = seg.q
    mask = seg.mask
    ksz = seg.key_size
    vsz = seg.value_size
    sw = seg.slot_words
    H_GEN = L.H_INDEX_GEN
    HDR = L.SLOT_HEADER
    KW = (ksz + 7) // 8  # u64 words that cover a key (the slot always has room for them)
    KW0 = HDR // 8
    slot_q = np.ndarray((seg.nslots, sw), dtype=np.uint64, buffer=seg.mm, offset=L.SLOTS_OFFSET)
    slot_bytes = np.ndarray((seg.nslots, seg.slot_size), dtype=np.uint8, buffer=seg.mm,
                            offset=L.SLOTS_OFFSET)
    buckets = seg.index_view()
    key_dtype = np.dtype(f"S{KW * 8}")
    # Byte masks of a key's first n bytes, as KW words, for n = 0..ksz (small stores:
    # a table; large key sizes: computed per call).
    byte_cols = np.arange(KW * 8)
    mask_table = None
    if (ksz + 1) * KW * 8 <= 1 << 20:
        mask_table = np.ascontiguousarray(
            (byte_cols[None, :] < np.arange(ksz + 1)[:, None]).astype(np.uint8) * np.uint8(0xFF)
        ).view(np.uint64)
    U32 = np.uint64(0xFFFFFFFF)
    S32 = np.uint64(32)
    ONE = np.uint64(1)
    FREE = np.uint64(L.FLAG_FREE << 16)
    KLEN = np.uint64(0xFFFF)
    MASK = np.int64(mask)
    UMASK = np.uint64(mask)
    VSZ = np.uint64(vsz)

    def key_masks(lens: np.ndarray) -> np.ndarray:
        if mask_table is not None:
            return mask_table[lens]
        m = (byte_cols[None, :] < lens[:, None]).astype(np.uint8) * np.uint8(0xFF)
        return np.ascontiguousarray(m).view(np.uint64)

    def probe_many(kbs: list[bytes], lens: np.ndarray) -> tuple[np.ndarray, bytes, dict[int, bytes], int]:
        """Probe many keys at once.

        Args:
            kbs: the keys' bytes, each 1 to key_size long (checked by the caller).
            lens: their lengths, as int64.

        Returns:
            ``(fast, blob, slow, top)``: positions of the keys found in numpy (ascending),
            their values concatenated in that order, ``{position: value}`` of keys found
            by the per-key path, and the highest seq accepted.
        """
        n = len(kbs)
        if n < MIN_KEYS:
            found, top = probe_each(kbs, range(n))
            return np.empty(0, np.intp), b"", found, top
        hashes = L.key_hash_array(np.fromiter(map(crc32, kbs), np.uint64, n))
        homes = (hashes & UMASK).astype(np.int64)
        # 1. Walk the index, all keys at once.
        g1 = q[H_GEN]
        p = homes
        b = buckets[p]
        empty = b == 0
        match = ~empty & ((b >> S32) == hashes)
        pend = np.flatnonzero(~empty & ~match)
        if pend.size:  # keys past their home bucket: walk on, a round per bucket
            cpos = np.where(match, p, -1)
            cbkt = b
            for d in range(1, ROUNDS):
                p = (homes[pend] + d) & MASK
                b = buckets[p]
                empty = b == 0
                match = ~empty & ((b >> S32) == hashes[pend])
                cpos[pend[match]] = p[match]
                cbkt[pend[match]] = b[match]
                pend = pend[~empty & ~match]
                if not pend.size:
                    break
            ck = np.flatnonzero(cpos >= 0)
            cp = cpos[ck]
            cb = cbkt[ck]
        else:
            ck = np.flatnonzero(match)
            cp = p[ck]
            cb = b[ck]
        # 2. The candidates' slots, under their seqlocks.
        slots = (cb & U32).astype(np.intp) - 1
        s1 = slot_q[slots, 0]
        hdr = slot_q[slots, 1:4]
        meta = hdr[:, 2]
        vlen = np.minimum(meta >> S32, VSZ).astype(np.intp)
        maxv = int(vlen.max()) if slots.size else 0
        kwords = slot_q[slots, KW0 : KW0 + KW]
        body = slot_bytes[slots, HDR + ksz : HDR + ksz + maxv]
        s2 = slot_q[slots, 0]
        b2 = buckets[cp]
        g2 = q[H_GEN]
        # 3. Checks. Invariant: nothing read above is trusted until they pass.
        klens = lens[ck]
        ok = (s1 == s2) & ((s1 & ONE) == 0) & (b2 == cb) & (hdr[:, 1] == 0)
        ok &= (meta & FREE) == 0
        ok &= (meta & KLEN).astype(np.int64) == klens
        if slots.size:
            want = np.array(kbs, dtype=key_dtype).view(np.uint64).reshape(n, KW)
            if ck.size < n:
                want = want[ck]
            diff = (kwords ^ want) & key_masks(klens)
            acc = diff[:, 0]
            for j in range(1, KW):  # column by column: 3x faster than .any(axis=1)
                acc = acc | diff[:, j]
            ok &= acc == 0
        fast = ck[ok]
        vals = body[ok]
        vl = vlen[ok]
        if not vl.size:
            blob = b""
        elif int(vl.min()) == maxv:  # every value has the same length: one copy
            blob = vals.tobytes()
        else:
            blob = vals[np.arange(maxv) < vl[:, None]].tobytes()
        top = int(s1[ok].max()) if fast.size else 0
        rest = np.ones(n, bool)
        rest[fast] = False
        if not g1 & 1 and g2 == g1:
            # Trusted misses: every key that met an empty bucket.
            met = np.ones(n, bool)
            met[pend] = False  # still walking after ROUNDS buckets
            met[ck] = False  # stopped at a matching hash
            rest &= ~met
        found, top2 = probe_each(kbs, np.flatnonzero(rest).tolist())
        return fast, blob, found, max(top, top2)

    return probe_many
