/*
 * shmstore's shared-memory protocol in C11 atomics (GCC/Clang __atomic builtins).
 *
 * One header, included by the reader extension (reader.c), the coordinator's write
 * primitives (writer.c) and the ThreadSanitizer stress harness (tests/native/), so the
 * code the harness proves is the code that runs: every reader's lookup is shm_attempt()
 * below. The layout it reads is shmstore/_layout.py's (format 4: size classes in
 * pages); the word indices below must match it (tests/test_native.py checks them).
 *
 * THE LAYOUT, AS SEEN HERE
 * ------------------------
 * Slots live in pages of 16 << ref_shift bytes; a page-table word per page says which
 * class its slots belong to: 0 (a free page) or (epoch of assignment << 8) | (class + 1).
 * A slot is named by its reference ("ref"): its byte offset from the first page over 16,
 * so its first word is slot0 + 2 * ref whatever its class, and its page is
 * ref >> ref_shift. A slot is the words  seq | version | expiry | meta, then the key
 * zero-padded to 8 bytes, then the value (at +32 + align8(klen)).
 *
 * THE PROTOCOL
 * ------------
 * Only the coordinator writes; readers map the segment read-only.
 *
 * Writer (the coordinator), one slot:                 Reader, one slot (ref r, page p):
 *
 *   W1 store_relaxed(seq, 2E+1)                         R0 pte1 = load_acquire(pt[p]);
 *   W2 fence(release)                                      0 (a free page): retry
 *   W3 body: relaxed word stores                        R1 s1 = load_acquire(seq)
 *      (version, expiry, meta, key, value)              R2 odd s1: retry (bounded backoff)
 *   W4 store_release(seq, 2E+2)                         R3 version, expiry, meta: each
 *                                                          loaded ONCE, relaxed; lengths
 *   A page move (every record of the page freed            clamped to key_size/value_size
 *   and unlinked first, at earlier epochs):                AND to the end of page p
 *   P0 store_relaxed(pt[p], 0)                          R4 key, value: relaxed word loads
 *   P1 for each slot of the new class in the page:      R5 fence(acquire)
 *      W1..W4 at the move's epoch, meta = FREE << 16    R6 s2 = load_relaxed(seq)
 *   P2 store_release(pt[p], new entry)                  R7 s1 == s2 and
 *                                                          load_relaxed(pt[p]) == pte1:
 *                                                          the copy is whole; only now
 *                                                          is anything of it used
 *
 * Why it holds (the C11 model, not just x86's total store order): if any body load
 * in R3/R4 read a value stored by a LATER write's W3, then W2 (release fence, before
 * that store) synchronizes with R5 (acquire fence, after that load), so W1 of that
 * write happens-before R6: s2 reads 2E'+1 or later and differs from s1. If no body
 * load read a later write's store, every body load read, by read coherence, the
 * value the write stamped s1 stored in that word (R1's acquire load synchronized
 * with its W4 release), or, for a word that write did not store, the last earlier
 * write's: exactly the slot as it stood at stamp s1. So s1 == s2 implies an untorn copy
 * - of a slot whose geometry did not change. A page move changes it: after it, the
 * words of an old slot r can be the headers or bodies of new slots whose boundaries
 * differ, so r's own seq word need not change while its meta, key or value do.
 * The page-table check closes that. A reader whose pte1 is the OLD entry: every store
 * of the move but one, and of every later write into the page's new slots, is a W1,
 * W3 or W4 after some W2 release fence that comes after P0 in the coordinator's
 * program order (the first new slot's W2 follows P0; each later store follows that
 * W2). So if any load of R1-R4 read such a store, that W2 synchronizes with R5 and P0
 * happens-before R7's load of pt[p], which then reads 0 or a newer entry and differs
 * from pte1 (entries carry the epoch of assignment, so a page that moves away and
 * back is not an ABA). The one store before the first W2 is the first new slot's W1,
 * at the page's start: the stamp word of the old geometry's first slot too, so a
 * reader of that slot sees it as an odd s1 or a changed s2, and no other old slot
 * holds that word. If no load read a store of the move or later, the copy is of the
 * old slot as it stood at s1, and the stamp check above applies. A reader whose pte1
 * is the NEW entry read it from P2's release store (acquire load): every stamp of the
 * move happens-before its loads, so it reads the new geometry's slots as W4 left
 * them or later, under their own stamps. (Storing the new entry first, before the
 * stamps, would let a scan that found a slot through the new entry read the old
 * geometry's bytes there under an unchanged "stamp" word: tests/native/
 * seqlock_stress.c counted exactly such torn reads.) pte1 == 0: the page is being
 * moved or is free; the reader retries (a lookup walks again) or skips it (a scan).
 * R0 is an acquire load so the slot's loads cannot be satisfied before it. The
 * clamps to the page's end keep a reader inside the page whatever geometry it saw (a
 * stale ref can name the middle of a new slot); they never make a torn copy valid.
 * The body is copied with relaxed atomic loads, never memcpy: a racing plain load is
 * a data race (undefined behaviour) in C11, and ThreadSanitizer would say so.
 *
 * The index: a bucket is one word, stored with one release store (after the slot it
 * points to was published with W4), loaded with an acquire load, so a reader that
 * sees a bucket sees the slot's stamp. Buckets move (backward-shift deletion) only
 * inside an odd index generation, the same seqlock as a slot: gen odd (relaxed) +
 * release fence, the moves, gen even (release); a reader trusts a MISS only if
 * g1 = load_acquire(gen) was even and, after an acquire fence, gen still equals g1.
 * A found record needs no generation check: it is re-validated by its own slot stamp,
 * its page entry and by re-loading its bucket (after R5's fence) to see that it still
 * points there.
 *
 * The epoch: the coordinator stores H_EPOCH with a release store after the op (or
 * the whole batch) is applied, and H_LAST_DELETE_EPOCH with a release store BEFORE
 * the bucket of a deleted key goes. get_many loads H_EPOCH (acquire) first, probes,
 * then (acquire fence) loads H_LAST_DELETE_EPOCH: a miss caused by a delete after
 * the epoch it read is then seen as such.
 *
 * Control fields are read once: a torn meta can at worst make a reader copy the
 * wrong bytes of its own page (lengths are clamped), never fault or read out of the
 * segment, and the stamp and page checks then reject the copy.
 *
 * Everything here is static inline: no symbols, no state.
 */
#ifndef SHMSTORE_PROTOCOL_H
#define SHMSTORE_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Header words (shmstore/_layout.py H_*). */
#define SHM_H_MAGIC 0
#define SHM_H_FORMAT 1
#define SHM_H_STATE 11
#define SHM_H_NCLASSES 15
#define SHM_H_EPOCH 16
#define SHM_H_INDEX_GEN 17
#define SHM_H_COUNT 18
#define SHM_H_LAST_DELETE_EPOCH 19
#define SHM_H_BATCH_SEQ 20
#define SHM_H_FEED_HORIZON 129
#define SHM_H_CLASSES 160 /* SHM_CLASS_WORDS words per class from here */
#define SHM_HEADER_SIZE 4096

#define SHM_CLASS_WORDS 4
#define SHM_C_SLOT_SIZE 0
#define SHM_C_PAGES 1
#define SHM_C_RECORDS 2
#define SHM_C_ASKED 3
#define SHM_MAX_CLASSES 64
#define SHM_SLOT_UNIT 16 /* a ref counts these from the first page */
#define SHM_MIN_SLOT 64
#define SHM_PTE_CLASS_BITS 8

#define SHM_STATE_READY 1
#define SHM_SLOT_HEADER 32 /* bytes: seq, version, expiry, meta */
#define SHM_S_SEQ 0
#define SHM_S_VERSION 1
#define SHM_S_EXPIRY 2
#define SHM_S_META 3
#define SHM_FLAG_FREE 1
#define SHM_FLAG_EVICTED 2

/* key_hash (shmstore/_layout.py): X * MULT mod (2**61 - 1), then (x ^ x >> 29) & M32. */
#define SHM_HASH_PRIME ((uint64_t)0x1FFFFFFFFFFFFFFFull)
#define SHM_HASH_MULT_MOD ((uint64_t)2177342782468422681ull) /* 0x9E3779B97F4A7C15 mod P */

/* -- atomics ------------------------------------------------------------------------ */

static inline uint64_t shm_load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t shm_load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void shm_store_relaxed(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void shm_store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void shm_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void shm_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/* -- the mapping ---------------------------------------------------------------------- */

typedef struct {
    uint64_t *w;        /* the segment as u64 words */
    uint64_t slot0;     /* the first page, in words (ref 0's first word) */
    uint64_t slot_words; /* words per ref (SLOT_UNIT / 8 = 2) */
    uint64_t nslots;    /* refs: the bound of a bucket's slot field (not a number of slots) */
    uint64_t idx0;      /* first bucket, in words */
    uint64_t mask;      /* nbuckets - 1 */
    uint64_t key_size;
    uint64_t value_size;
    uint64_t pt0;       /* the page table, in words */
    uint64_t ref_shift; /* a ref's page is ref >> ref_shift; a page is 16 << ref_shift bytes */
    uint64_t npages;    /* nslots >> ref_shift */
    uint64_t nclasses;  /* from the header (shm_seg_load_classes) */
    uint64_t classes[SHM_MAX_CLASSES]; /* slot sizes in bytes, ascending */
} shm_seg;

static inline uint64_t *shm_slot(const shm_seg *s, uint64_t ref) { return s->w + s->slot0 + ref * s->slot_words; }
static inline uint64_t shm_page_bytes(const shm_seg *s) { return (uint64_t)SHM_SLOT_UNIT << s->ref_shift; }
static inline uint64_t *shm_pte(const shm_seg *s, uint64_t page) { return s->w + s->pt0 + page; }
/* Byte offset (from the segment start) just past the page holding ref. */
static inline uint64_t shm_page_end(const shm_seg *s, uint64_t ref)
{
    return 8 * s->slot0 + (((ref >> s->ref_shift) + 1) << s->ref_shift) * SHM_SLOT_UNIT;
}
/* The first ref of a page. */
static inline uint64_t shm_page_ref(const shm_seg *s, uint64_t page) { return page << s->ref_shift; }
static inline uint64_t shm_align8(uint64_t n) { return (n + 7) & ~(uint64_t)7; }
/* Bytes a record takes in a slot (shmstore/_layout.py slot_need). */
static inline uint64_t shm_slot_need(uint64_t klen, uint64_t vlen) { return SHM_SLOT_HEADER + shm_align8(klen) + vlen; }

/* Do the sizes in s fit a mapping of len bytes at base, of which the layout claims
 * size? Every load and store here stays inside the mapping only if they do: the
 * header (with the class table) lies before the page table, the page table before the
 * pages, the pages before the index, and the index ends within the size; a page is a
 * power of two of at least 64 bytes that holds the largest record; the refs are whole
 * pages and a bucket's 32-bit slot field can name each; the index is a power of two.
 * (A ref in a page's last 32 bytes has its header words in the next page or the
 * index: still inside.) The reader's and the writer's extensions both refuse a mapping
 * this says no to. The class table is checked by shm_seg_load_classes. */
static inline int shm_seg_fits(const shm_seg *s, const void *base, uint64_t len, uint64_t size)
{
    uint64_t words = size / 8, nbuckets = s->mask + 1;
    if (((uintptr_t)base & 7) || len < size || s->mask >= ((uint64_t)1 << 40) || (nbuckets & s->mask) ||
        nbuckets < 2 || s->slot_words != SHM_SLOT_UNIT / 8 || s->ref_shift < 2 || s->ref_shift > 32 ||
        s->key_size < 1 || s->key_size > 65535 || s->value_size >= ((uint64_t)1 << 32) ||
        s->nslots >= 0xFFFFFFFFull || s->nslots < ((uint64_t)1 << s->ref_shift) ||
        (s->nslots & (((uint64_t)1 << s->ref_shift) - 1)))
        return 0;
    uint64_t npages = s->nslots >> s->ref_shift;
    if (shm_slot_need(s->key_size, s->value_size) > shm_page_bytes(s))
        return 0;
    return s->pt0 <= words && s->slot0 <= words && s->idx0 <= words && 8 * s->pt0 >= SHM_HEADER_SIZE &&
           s->pt0 + npages <= s->slot0 && s->slot0 + s->slot_words * s->nslots <= s->idx0 &&
           s->idx0 + nbuckets <= words;
}

/* Read and check the class table in the header (after shm_seg_fits said yes): 1 to 64
 * classes, slot sizes ascending, multiples of 16, at least 64, at most a page. Sets
 * npages too. Returns 0 if the table is not one a layout makes. */
static inline int shm_seg_load_classes(shm_seg *s)
{
    uint64_t n = shm_load_relaxed(s->w + SHM_H_NCLASSES);
    if (n < 1 || n > SHM_MAX_CLASSES)
        return 0;
    uint64_t prev = 0;
    for (uint64_t c = 0; c < n; c++) {
        uint64_t size = shm_load_relaxed(s->w + SHM_H_CLASSES + SHM_CLASS_WORDS * c + SHM_C_SLOT_SIZE);
        if (size % SHM_SLOT_UNIT || size < SHM_MIN_SLOT || size > shm_page_bytes(s) || size <= prev)
            return 0;
        s->classes[c] = prev = size;
    }
    s->nclasses = n;
    s->npages = s->nslots >> s->ref_shift;
    return 1;
}

/* The class of a page-table entry, or -1 (a free page, or a class the table lacks). */
static inline int64_t shm_pte_class(const shm_seg *s, uint64_t pte)
{
    uint64_t c = pte & ((1u << SHM_PTE_CLASS_BITS) - 1);
    return (c == 0 || c > s->nclasses) ? -1 : (int64_t)c - 1;
}

/* Is ref the start of a slot of class cls in its page (cls valid)? */
static inline int shm_ref_is_slot(const shm_seg *s, uint64_t ref, int64_t cls)
{
    uint64_t off = (ref & (((uint64_t)1 << s->ref_shift) - 1)) * SHM_SLOT_UNIT, size = s->classes[cls];
    return off % size == 0 && off + size <= shm_page_bytes(s);
}

/* The smallest class whose slot holds need bytes, or -1. */
static inline int64_t shm_class_for(const shm_seg *s, uint64_t need)
{
    for (uint64_t c = 0; c < s->nclasses; c++)
        if (s->classes[c] >= need)
            return (int64_t)c;
    return -1;
}

/* -- the hash ------------------------------------------------------------------------- */

static inline uint64_t shm_mod_p(__uint128_t x)
{
    uint64_t lo = (uint64_t)(x & SHM_HASH_PRIME) + (uint64_t)((x >> 61) & SHM_HASH_PRIME) + (uint64_t)(x >> 122);
    lo = (lo & SHM_HASH_PRIME) + (lo >> 61);
    lo = (lo & SHM_HASH_PRIME) + (lo >> 61);
    return lo == SHM_HASH_PRIME ? 0 : lo;
}

/* key_hash of n bytes: the bytes as a little-endian integer X, X*MULT mod P, folded. */
static inline uint32_t shm_key_hash(const uint8_t *kb, size_t n)
{
    /* X mod P by Horner over the 64-bit words from the most significant: 2**64 == 8 (mod P). */
    size_t nw = (n + 7) / 8;
    uint64_t acc = 0;
    for (size_t j = nw; j-- > 0;) {
        uint64_t word = 0;
        size_t take = n - 8 * j < 8 ? n - 8 * j : 8;
        memcpy(&word, kb + 8 * j, take); /* little-endian hosts only (_layout.check_platform) */
        acc = shm_mod_p(((__uint128_t)acc << 64) | word);
    }
    uint64_t x = shm_mod_p((__uint128_t)acc * SHM_HASH_MULT_MOD);
    return (uint32_t)((x ^ (x >> 29)) & 0xFFFFFFFFu);
}

/* -- copying out of and into slots ----------------------------------------------------- */

/* Copy n bytes at byte offset off (off may be unaligned) of the word array w into dst,
 * with relaxed 8-byte atomic loads only. Words are whole inside the page: a page and
 * the clamped offsets are multiples of 8 bytes, so the words that cover [off, off+n)
 * never leave it. */
static inline void shm_copy_out(uint8_t *dst, const uint64_t *w, uint64_t off, uint64_t n)
{
    if (!n)
        return;
    uint64_t i = off >> 3;
    unsigned skip = (unsigned)(off & 7);
    uint64_t word = shm_load_relaxed(w + i);
    if (skip) {
        unsigned take = 8 - skip;
        if (take > n)
            take = (unsigned)n;
        memcpy(dst, (const uint8_t *)&word + skip, take);
        dst += take;
        n -= take;
        i++;
        if (!n)
            return;
        word = shm_load_relaxed(w + i);
    }
    while (n >= 8) {
        memcpy(dst, &word, 8);
        dst += 8;
        n -= 8;
        i++;
        if (n)
            word = shm_load_relaxed(w + i);
    }
    for (unsigned j = 0; j < n; j++) /* the last partial word (no variable-length memcpy) */
        dst[j] = (uint8_t)(word >> (8 * j));
}

/* Compare the n key bytes at byte offset off (8-aligned) with kb (relaxed loads; the
 * answer is only trusted after the slot's stamp is validated). */
static inline int shm_key_equal(const uint64_t *w, uint64_t off, const uint8_t *kb, size_t n)
{
    const uint64_t *p = w + (off >> 3);
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        uint64_t a = shm_load_relaxed(p + j / 8), b;
        memcpy(&b, kb + j, 8);
        if (a != b)
            return 0;
    }
    if (j < n) {
        uint64_t a = shm_load_relaxed(p + j / 8), b = 0;
        for (size_t t = 0; t < n - j; t++) /* the last partial word, little-endian */
            b |= (uint64_t)kb[j + t] << (8 * t);
        uint64_t m = (n - j) == 8 ? ~(uint64_t)0 : (((uint64_t)1 << (8 * (n - j))) - 1);
        if ((a & m) != b)
            return 0;
    }
    return 1;
}

/* Writer side: store n bytes at byte offset off of w with relaxed word stores. Bytes of
 * a partial first or last word that lie outside [off, off+n) keep their values (the
 * coordinator is the only writer, so its own relaxed load of them is exact). */
static inline void shm_copy_in(uint64_t *w, uint64_t off, const uint8_t *src, uint64_t n)
{
    while (n) {
        uint64_t i = off >> 3;
        unsigned at = (unsigned)(off & 7);
        unsigned take = 8 - at;
        if (take > n)
            take = (unsigned)n;
        uint64_t word;
        if (take == 8) {
            memcpy(&word, src, 8);
        } else {
            word = shm_load_relaxed(w + i);
            memcpy((uint8_t *)&word + at, src, take);
        }
        shm_store_relaxed(w + i, word);
        src += take;
        off += take;
        n -= take;
    }
}

/* Writer side: zero n bytes at byte offset off of w (relaxed word stores). */
static inline void shm_zero(uint64_t *w, uint64_t off, uint64_t n)
{
    static const uint8_t zeros[64];
    while (n) {
        uint64_t k = n < sizeof zeros ? n : sizeof zeros;
        shm_copy_in(w, off, zeros, k);
        off += k;
        n -= k;
    }
}

/* -- reading one slot ----------------------------------------------------------------- */

/* One record as a reader copied it; valid only when shm_read_end() and
 * shm_page_same() said so. */
typedef struct {
    uint64_t seq, version, expiry, meta;
    uint64_t klen, vlen; /* clamped to key_size / value_size and to the page's end */
    uint64_t ko, vo;     /* byte offsets (from the segment start) of the key and the value */
} shm_rec;

/* R1-R3: the stamp and the control words of slot ref, each loaded once, and the
 * clamps: klen <= key_size, vlen <= value_size, and key and value end inside the page
 * (a stale ref can name the middle of another geometry's slot). Returns 0 for an odd
 * stamp. The caller acquire-loaded the page's entry before (R0). */
static inline int shm_read_begin(const shm_seg *s, uint64_t ref, shm_rec *r)
{
    const uint64_t *sp = shm_slot(s, ref);
    r->seq = shm_load_acquire(sp + SHM_S_SEQ);
    if (r->seq & 1)
        return 0;
    r->version = shm_load_relaxed(sp + SHM_S_VERSION);
    r->expiry = shm_load_relaxed(sp + SHM_S_EXPIRY);
    r->meta = shm_load_relaxed(sp + SHM_S_META);
    uint64_t klen = r->meta & 0xFFFF, vlen = r->meta >> 32;
    uint64_t end = shm_page_end(s, ref);
    uint64_t ko = 8 * (s->slot0 + ref * s->slot_words) + SHM_SLOT_HEADER;
    uint64_t room = end > ko ? end - ko : 0; /* a multiple of 8: so is align8(klen) <= room */
    if (klen > s->key_size)
        klen = s->key_size;
    if (klen > room)
        klen = room;
    uint64_t vo = ko + shm_align8(klen);
    room = end > vo ? end - vo : 0;
    if (vlen > s->value_size)
        vlen = s->value_size;
    if (vlen > room)
        vlen = room;
    r->klen = klen;
    r->vlen = vlen;
    r->ko = ko;
    r->vo = vo;
    return 1;
}

/* R5-R7 (the stamp): after the copy, is the slot still stamped as at R1? */
static inline int shm_read_end(const uint64_t *sp, const shm_rec *r)
{
    shm_fence_acquire();
    return shm_load_relaxed(sp + SHM_S_SEQ) == r->seq;
}

/* R7 (the page): after shm_read_end's fence, does the page still carry entry pte1? */
static inline int shm_page_same(const shm_seg *s, uint64_t page, uint64_t pte1)
{
    return shm_load_relaxed(shm_pte(s, page)) == pte1;
}

/* -- the index walk --------------------------------------------------------------------- */

enum { SHM_MISS = 0, SHM_FOUND = 1, SHM_RETRY = 2, SHM_DAMAGED = 3, SHM_NOMEM = 4 };

/* Where a walk for a hash ended. */
typedef struct {
    uint64_t pos;    /* the bucket's index (0 .. mask) */
    uint64_t bucket; /* its word: 0 (empty) or (hash << 32) | (ref + 1) */
    uint64_t gen;    /* the index generation loaded before the walk */
    uint64_t pte;    /* the found slot's page entry (R0) */
} shm_walk;

/* Walk from the hash's home bucket to the first bucket that is empty or carries the
 * hash, starting at bucket `from` (the home bucket, or one past a hash collision). At
 * most mask+1 buckets (the index is never full). */
static inline void shm_walk_from(const shm_seg *s, uint32_t h, uint64_t from, shm_walk *out)
{
    uint64_t pos = from & s->mask;
    for (uint64_t n = 0; n <= s->mask; n++) {
        uint64_t b = shm_load_acquire(s->w + s->idx0 + pos);
        if (b == 0 || (uint32_t)(b >> 32) == h) {
            out->pos = pos;
            out->bucket = b;
            return;
        }
        pos = (pos + 1) & s->mask;
    }
    out->pos = pos;
    out->bucket = 0;
}

/* Is a miss that ended at an empty bucket trustworthy? The generation loaded before the
 * walk was even and is unchanged after it. */
static inline int shm_miss_valid(const shm_seg *s, uint64_t g1)
{
    shm_fence_acquire();
    return !(g1 & 1) && shm_load_relaxed(s->w + SHM_H_INDEX_GEN) == g1;
}

/* After a slot's copy validated, does its bucket still point to it? (Load after the
 * acquire fence of shm_read_end.) */
static inline int shm_bucket_same(const shm_seg *s, uint64_t pos, uint64_t bucket)
{
    return shm_load_relaxed(s->w + s->idx0 + pos) == bucket;
}

/* -- one lookup attempt ------------------------------------------------------------------ */

/* The stress harness (tests/native/seqlock_stress.c) swaps in broken versions of these
 * to show that ThreadSanitizer and its torn-read count catch a broken protocol. */
#ifndef SHM_COPY_OUT
#define SHM_COPY_OUT shm_copy_out
#endif
#ifndef SHM_READ_END
#define SHM_READ_END shm_read_end
#endif
#ifndef SHM_BUCKET_SAME
#define SHM_BUCKET_SAME shm_bucket_same
#endif
#ifndef SHM_PAGE_SAME
#define SHM_PAGE_SAME shm_page_same
#endif

/* Where a found value is copied: dst(ctx, vlen) returns room for vlen bytes, or NULL
 * (out of memory). The caller owns what it hands out, whatever the attempt returns. */
typedef uint8_t *(*shm_dst_fn)(void *ctx, uint64_t vlen);

/* One validated copy of slot ref (scans: read_slot, the change feed), whose page the
 * caller found with entry pte1 (acquire-loaded before): the key into kb (room for
 * key_size bytes) and, if vdst, the value into vdst(ctx, vlen). Returns 1 (rec valid),
 * 0 (the slot or its page changed under the copy, or the stamp was odd: try again),
 * or -1 (vdst returned NULL). */

static inline int shm_read_slot(const shm_seg *s, uint64_t ref, uint64_t pte1, uint8_t *kb, shm_dst_fn vdst,
                                void *ctx, shm_rec *rec)
{
    const uint64_t *sp = shm_slot(s, ref);
    (void)pte1; /* (unused only in the harness's build without the page check) */
    if (!shm_read_begin(s, ref, rec))
        return 0;
    SHM_COPY_OUT(kb, s->w, rec->ko, rec->klen);
    if (vdst) {
        uint8_t *out = vdst(ctx, rec->vlen);
        if (!out)
            return -1;
        SHM_COPY_OUT(out, s->w, rec->vo, rec->vlen);
    }
    return SHM_READ_END(sp, rec) && SHM_PAGE_SAME(s, ref >> s->ref_shift, pte1);
}

/* One attempt at a key of n bytes (1..key_size) with hash h, as every reader runs it
 * (reader.c's get, lookup and get_many; the stress harness):
 *
 *   SHM_FOUND    the record's value was copied to dst (if dst) inside a validated
 *                window; rec holds its stamp, version, expiry and lengths, wk its bucket
 *                and its page's entry. Expiry is the caller's to judge.
 *   SHM_MISS     the walk ended at an empty bucket (wk) and the generation held.
 *   SHM_RETRY    something moved under the reader (a slot, a bucket, a page; or the
 *                bucket names a slot of a free page): try again (after a backoff).
 *   SHM_DAMAGED  a bucket points past the pages: not a segment this layout wrote.
 *   SHM_NOMEM    dst returned NULL.
 *
 * A bucket with the key's hash whose slot holds another key (a full-hash collision) or
 * a free slot is validated like a record, then walked past. Keys are compared as
 * ceil(n/8) words after klen == n (the pad bytes after a key are zero; the compare
 * masks them anyway). */
static inline int shm_attempt(const shm_seg *s, const uint8_t *kb, size_t n, uint32_t h, shm_dst_fn dst,
                              void *ctx, shm_rec *rec, shm_walk *wk)
{
    uint64_t g1 = shm_load_acquire(s->w + SHM_H_INDEX_GEN);
    wk->gen = g1;
    uint64_t from = h;
    for (uint64_t hops = 0; hops <= s->mask; hops++) {
        shm_walk_from(s, h, from, wk);
        if (wk->bucket == 0)
            return shm_miss_valid(s, g1) ? SHM_MISS : SHM_RETRY;
        uint64_t ref = (wk->bucket & 0xFFFFFFFFu) - 1;
        if (ref >= s->nslots)
            return SHM_DAMAGED;
        uint64_t page = ref >> s->ref_shift;
        uint64_t pte1 = shm_load_acquire(shm_pte(s, page)); /* R0 */
        if (!pte1)
            return SHM_RETRY; /* a stale ref into a page being moved: walk again */
        wk->pte = pte1;
        const uint64_t *sp = shm_slot(s, ref);
        if (!shm_read_begin(s, ref, rec))
            return SHM_RETRY;
        if (rec->klen != n || ((rec->meta >> 16) & SHM_FLAG_FREE) || !shm_key_equal(s->w, rec->ko, kb, n)) {
            /* Validated: another key with the same hash. Walk on past it. */
            if (!SHM_READ_END(sp, rec) || !SHM_PAGE_SAME(s, page, pte1) || !SHM_BUCKET_SAME(s, wk->pos, wk->bucket))
                return SHM_RETRY;
            from = wk->pos + 1;
            continue;
        }
        if (dst) {
            uint8_t *out = dst(ctx, rec->vlen);
            if (!out)
                return SHM_NOMEM;
            SHM_COPY_OUT(out, s->w, rec->vo, rec->vlen);
        }
        if (!SHM_READ_END(sp, rec) || !SHM_PAGE_SAME(s, page, pte1) || !SHM_BUCKET_SAME(s, wk->pos, wk->bucket))
            return SHM_RETRY;
        return SHM_FOUND;
    }
    return SHM_RETRY; /* walked the whole index while it changed under us */
}

/* -- writing (the coordinator only) ------------------------------------------------------ */

/* W1-W2: open a slot for writing at epoch E. */
static inline void shm_write_begin(uint64_t *sp, uint64_t epoch)
{
    shm_store_relaxed(sp + SHM_S_SEQ, 2 * epoch + 1);
    shm_fence_release();
}

/* W4: publish the slot. */
static inline void shm_write_end(uint64_t *sp, uint64_t epoch) { shm_store_release(sp + SHM_S_SEQ, 2 * epoch + 2); }

/* A whole record into a free slot ref (the caller checked that the record fits the
 * slot's class): stamp odd, version, expiry, meta, the key zero-padded to 8 bytes, the
 * value at +32 + align8(klen), stamp even. Bytes after the value keep their values. */
static inline void shm_write_record(const shm_seg *s, uint64_t ref, uint64_t epoch, const uint8_t *kb,
                                    uint64_t klen, const uint8_t *vb, uint64_t vlen, uint64_t version,
                                    uint64_t expiry, uint64_t flags)
{
    uint64_t *sp = shm_slot(s, ref);
    shm_write_begin(sp, epoch);
    shm_store_relaxed(sp + SHM_S_VERSION, version);
    shm_store_relaxed(sp + SHM_S_EXPIRY, expiry);
    shm_store_relaxed(sp + SHM_S_META, klen | (flags << 16) | (vlen << 32));
    uint64_t *kw = sp + SHM_SLOT_HEADER / 8;
    uint64_t j = 0;
    for (; j + 8 <= klen; j += 8) {
        uint64_t word;
        memcpy(&word, kb + j, 8);
        shm_store_relaxed(kw + j / 8, word);
    }
    if (j < klen) { /* the last partial word, zero-padded */
        uint64_t word = 0;
        for (uint64_t t = 0; t < klen - j; t++)
            word |= (uint64_t)kb[j + t] << (8 * t);
        shm_store_relaxed(kw + j / 8, word);
    }
    shm_copy_in(s->w, 8 * (s->slot0 + ref * s->slot_words) + SHM_SLOT_HEADER + shm_align8(klen), vb, vlen);
    shm_write_end(sp, epoch);
}

/* Mark slot ref free at epoch E with flags (FLAG_FREE, | FLAG_EVICTED for an
 * eviction): meta keeps klen (the key stays, for change feeds), vlen 0; expiry 0. */
static inline void shm_free_record(const shm_seg *s, uint64_t ref, uint64_t epoch, uint64_t flags)
{
    uint64_t *sp = shm_slot(s, ref);
    shm_write_begin(sp, epoch);
    uint64_t meta = shm_load_relaxed(sp + SHM_S_META);
    shm_store_relaxed(sp + SHM_S_META, (meta & 0xFFFF) | ((flags & 0xFFFF) << 16));
    shm_store_relaxed(sp + SHM_S_EXPIRY, 0);
    shm_write_end(sp, epoch);
}

/* A page move (or first assignment) at epoch E: P0 the page's entry to 0 (relaxed; the
 * first slot's W2 release fence orders it before every new body), P1 every slot of the
 * new class (slot_size bytes, from the page's start) stamped free: W1, version 0,
 * expiry 0, meta FLAG_FREE << 16 (klen 0, vlen 0), W4; P2 the new entry with a release
 * store (a scan that acquire-loads it sees every stamp). The caller has freed and
 * unlinked every record of the page first, and does the page accounting (C_PAGES,
 * H_FREE_PAGES) and its free lists. A coordinator that dies between P0 and P2 leaves
 * the page's entry 0 over bytes of both geometries: a free page is then not
 * necessarily a never-written one, and whoever hands it out next must stamp (or
 * clear) it rather than assume zeros. */
static inline void shm_page_assign(const shm_seg *s, uint64_t page, uint64_t entry, uint64_t slot_size,
                                   uint64_t epoch)
{
    shm_store_relaxed(shm_pte(s, page), 0);
    uint64_t per = shm_page_bytes(s) / slot_size, step = slot_size / SHM_SLOT_UNIT;
    uint64_t ref = shm_page_ref(s, page);
    for (uint64_t i = 0; i < per; i++, ref += step) {
        uint64_t *sp = shm_slot(s, ref);
        shm_write_begin(sp, epoch);
        shm_store_relaxed(sp + SHM_S_VERSION, 0);
        shm_store_relaxed(sp + SHM_S_EXPIRY, 0);
        shm_store_relaxed(sp + SHM_S_META, (uint64_t)SHM_FLAG_FREE << 16);
        shm_write_end(sp, epoch);
    }
    shm_store_release(shm_pte(s, page), entry);
}

/* The class of the page holding ref (the coordinator's own load), or -1 (free page). */
static inline int64_t shm_class_of(const shm_seg *s, uint64_t ref)
{
    return shm_pte_class(s, shm_load_relaxed(shm_pte(s, ref >> s->ref_shift)));
}

/* Class cls's counters (one writer: the coordinator): records += dr, asked += da. */
static inline void shm_account(const shm_seg *s, int64_t cls, int64_t dr, int64_t da)
{
    uint64_t *cw = s->w + SHM_H_CLASSES + SHM_CLASS_WORDS * (uint64_t)cls;
    shm_store_relaxed(cw + SHM_C_RECORDS, shm_load_relaxed(cw + SHM_C_RECORDS) + (uint64_t)dr);
    shm_store_relaxed(cw + SHM_C_ASKED, shm_load_relaxed(cw + SHM_C_ASKED) + (uint64_t)da);
}

/* Point bucket pos at a published slot ref (release: the slot's stores come first). */
static inline void shm_set_bucket(const shm_seg *s, uint64_t pos, uint32_t h, uint64_t ref)
{
    shm_store_release(s->w + s->idx0 + pos, ((uint64_t)h << 32) | (ref + 1));
}

/* Backward-shift deletion of bucket pos, inside an odd index generation. */
static inline void shm_remove_bucket(const shm_seg *s, uint64_t pos)
{
    uint64_t *gen = s->w + SHM_H_INDEX_GEN;
    uint64_t g = shm_load_relaxed(gen);
    shm_store_relaxed(gen, g + 1);
    shm_fence_release();
    uint64_t mask = s->mask, i = pos, j = pos;
    uint64_t *idx = s->w + s->idx0;
    for (;;) {
        j = (j + 1) & mask;
        uint64_t b = shm_load_relaxed(idx + j);
        if (b == 0)
            break;
        uint64_t home = (b >> 32) & mask;
        /* Move b back to the hole at i unless its home lies cyclically in (i, j]. */
        if ((i <= j && (home <= i || home > j)) || (i > j && home <= i && home > j)) {
            shm_store_relaxed(idx + i, b);
            i = j;
        }
    }
    shm_store_relaxed(idx + i, 0);
    shm_store_release(gen, g + 2);
}

/* Publish the epoch: every op up to it is applied (release). */
static inline void shm_publish_epoch(const shm_seg *s, uint64_t epoch) { shm_store_release(s->w + SHM_H_EPOCH, epoch); }

/* -- the doorbell (shmstore/_channel.py, Wake-ups) --------------------------------------- *
 *
 * A Dekker pair, one side each, with sequentially consistent fences (the only ordering
 * that forbids both sides missing the other's store; x86-64's total store order alone
 * lets a load pass an earlier store, so even there the fence is an mfence):
 *
 *   client:       HEAD = h (release); shm_must_ring: fence(seq_cst); load SLEEPING
 *   coordinator:  shm_set_sleeping(s): SLEEPING = s; fence(seq_cst); then load every
 *                 HEAD (acquire) and block on the doorbell only if none moved; after
 *                 waking, shm_set_sleeping(0)
 *
 * Either the client sees SLEEPING = s and posts, or the coordinator sees the new HEAD
 * and does not block. tests/native/doorbell_stress.c runs exactly these two functions
 * on two threads and counts wake-ups lost (and, with the fence taken out, finds them).
 */
#define SHM_CH_SLEEPING 8 /* channel header words (shmstore/_channel.py CH_W_*) */
#define SHM_CH_ELIDE 9

#ifndef SHM_DOORBELL_FENCE
#define SHM_DOORBELL_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#endif

/* The client, right after publishing HEAD: 0 (no post needed), the SLEEPING value to
 * post the doorbell for (remember it as `posted`: one post per sleep), or -1 (the
 * coordinator keeps no SLEEPING word: post every time). */
static inline long long shm_must_ring(const uint64_t *ch, long long posted)
{
    SHM_DOORBELL_FENCE();
    if (!shm_load_relaxed(ch + SHM_CH_ELIDE))
        return -1;
    uint64_t s = shm_load_relaxed(ch + SHM_CH_SLEEPING) & 0x3FFFFFFFFFFFFFFFull;
    return (s && (long long)s != posted) ? (long long)s : 0;
}

/* The coordinator: it may block on the doorbell (s: nonzero, new per sleep) or not (0). */
static inline void shm_set_sleeping(uint64_t *ch, uint64_t s)
{
    shm_store_relaxed(ch + SHM_CH_SLEEPING, s);
    SHM_DOORBELL_FENCE();
}

#endif /* SHMSTORE_PROTOCOL_H */
