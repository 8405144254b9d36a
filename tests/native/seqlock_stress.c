/*
 * seqlock_stress: protocol.h under real threads, for ThreadSanitizer and for torn reads.
 *
 * No Python. One buffer shaped like a format-4 data segment (the header with a class
 * table of two classes, a page table, NPAGES pages, an index; shm_seg and the word
 * offsets of protocol.h) is shared by
 *
 *   one writer thread   the coordinator's role, op for op as coordinator/_engine.py:
 *                       every op takes the next epoch E; a put writes a free slot of
 *                       the record's class (the smallest that holds it:
 *                       shm_write_record at E), points the bucket at it
 *                       (shm_set_bucket), frees the old slot (shm_free_record at E);
 *                       a delete stores H_LAST_DELETE_EPOCH, removes the bucket
 *                       (shm_remove_bucket: backward shift in an odd generation) and
 *                       frees the slot; then shm_publish_epoch(E). Free slots are
 *                       reused oldest first, per class, so a slot is rewritten soon
 *                       after it is unlinked.
 *                       Every MOVE_EVERY ops it MOVES A PAGE to the other class: the
 *                       records living in it are put again elsewhere (each a new
 *                       record at a new epoch, copy-on-write), its free slots leave the
 *                       free list, then shm_page_assign at a new epoch (the entry, then
 *                       every new slot stamped free). The two classes' slot sizes are
 *                       not multiples of each other, so a slot of the old geometry
 *                       overlaps headers and bodies of the new one.
 *                       Mode "inplace" rewrites a live key's own slot instead (no
 *                       bucket change) when the new record fits its class: the engine
 *                       never does that, but it leaves the slot's stamp as the only
 *                       defence and meets readers mid-copy thousands of times a second.
 *   several readers     half their time protocol.h's shm_attempt(), the lookup
 *                       reader.c runs (walk, page entry, read_begin, key compare,
 *                       copy_out, read_end, page_same, bucket_same; a miss is trusted
 *                       only if shm_miss_valid; bounded retries); half a PAGE SCAN as
 *                       reader.c's changed_keys runs it: the page's entry loaded once,
 *                       then every slot of its class read with shm_read_slot (stamp and
 *                       page entry checked per slot) - the reader that a page move
 *                       tears if the page check is missing, since no bucket guards it.
 *
 * The keys are chosen to make walks pass other keys: three share their full 32-bit
 * hash (X, X + P*k, X + 2P*k as integers: key_hash works mod P = 2**61 - 1), so a walk
 * passes them by the key compare on a validated slot; two more share only their home
 * bucket, so a walk passes them by hash. Deleting one of them shifts the others back.
 * A fourth member of the hash family is never inserted (every lookup of it must be a
 * validated miss), and two keys are never deleted (a validated miss of one is wrong).
 *
 * Every record is self-checking: version = E, expiry and value are functions of
 * (key, E, value length), the length varies with E (and with it the class) and the
 * value starts right after the key padded to 8 bytes (KEY_SIZE 20 keys: a partial
 * last key word), so the partial-word paths of shm_copy_in / shm_copy_out run. A copy
 * that validated but whose words disagree is a TORN read; for a scan, a validated
 * slot must be a live record that checks, a freed one (its key kept, no value), or a
 * new page's free slot (no key), in a class that holds it.
 *
 *   seqlock_stress [seconds [readers [cow|inplace]]]   (defaults 1, 3, cow)
 *     prints the counts; exits 1 if torn > 0, a wrong miss or find, or a reader found
 *     nothing (TSan's own exit code, 66, if it reported)
 *
 * What each build proves (tests/test_native_tsan.py runs them):
 *   -fsanitize=thread   no data race: every access to shared words is atomic. TSan does
 *                       NOT model __atomic_thread_fence (GCC says so: -Wtsan), so it
 *                       cannot check the ORDER argument of protocol.h; the torn counter
 *                       and the aarch64 code below are what speak to that.
 *   -DSHM_BROKEN_ORDER  copy_out is a plain memcpy of the live slot (the classic seqlock
 *                       mistake, undefined behaviour in C11): TSan must report it.
 *   -DSHM_BROKEN_VALIDATE  read_end, page_same and bucket_same accept every copy: the
 *                       torn counter must see it (mode inplace, -O2, no TSan).
 *   -DSHM_BROKEN_PAGE   only the page entry re-check is gone (stamp and bucket kept):
 *                       the page scans must count torn reads as pages move (-O2).
 *   -DVALUE_SIZE=n      longer values (default 61): longer copies, more overlap, and
 *                       larger pages.
 *
 * aarch64, read from aarch64-linux-gnu-gcc 12.2 -O2 -S (the shm_probe_* functions at
 * the end; tests/test_native_tsan.py checks the same):
 *   shm_read_begin   ldar x0,[seq] (R1), then plain ldr of version/expiry/meta (R3)
 *   shm_read_end     dmb ishld; ldr [seq]     (R5 acquire fence, R6 relaxed load)
 *   shm_page_same    ldr [pte]                (R7, after read_end's fence)
 *   shm_pte_load     ldar [pte]               (R0)
 *   shm_miss_valid   dmb ishld; ldr [gen]
 *   shm_write_begin  str [seq]; dmb ish       (W1 relaxed store, W2 release fence: a
 *                    release fence must order earlier loads AND stores before later
 *                    stores, so the full dmb ish, not dmb ishst)
 *   shm_write_end    stlr [seq]               (W4)
 *   shm_page_assign  str [pte], then per slot str [seq]; dmb ish; ...; stlr [seq]
 *   shm_set_bucket   stlr;   shm_walk_from: ldar per bucket
 * Exactly the barriers the argument needs; relaxed loads and stores (the body,
 * copy_out, key_equal, copy_in) are plain ldr/str. Under qemu-aarch64 the -static build runs clean too, but qemu on an x86
 * host is TSO underneath: that run checks the build, not weak-memory reordering.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* -- the deliberately broken readers (one swapped step of the protocol each) ------------ */

#ifdef SHM_BROKEN_ORDER
/* A plain memcpy from the live slot: races with the writer's word stores. */
#define SHM_COPY_OUT(dst, w, off, n) broken_copy_out((dst), (const uint8_t *)(w) + (off), (n))
static void *broken_copy_out(void *dst, const void *src, size_t n) { return memcpy(dst, src, n); }
#endif

#ifdef SHM_BROKEN_VALIDATE
/* Trusts every copy: neither the stamp, nor the page, nor the bucket is compared again.
 * (The bucket alone catches most tears of a lookup: copy-on-write writes only slots no
 * bucket points to, so a slot rewritten under a reader was unlinked first; only an ABA
 * of the bucket word escapes it. All checks go, or tears are too rare to show in a
 * second.) */
#define SHM_READ_END(sp, r) (shm_fence_acquire(), 1)
#define SHM_BUCKET_SAME(s, pos, bucket) 1
#define SHM_PAGE_SAME(s, page, pte1) 1
#endif

#ifdef SHM_BROKEN_PAGE
/* The page entry is not re-checked: a slot of the old geometry whose own stamp word a
 * move did not rewrite validates, though its meta, key or value are the new slots'. */
#define SHM_PAGE_SAME(s, page, pte1) 1
#endif

#include "protocol.h"

/* -- the segment ------------------------------------------------------------------------ */

#define KEY_SIZE 20   /* not a multiple of 8: the key's last word is partial */
#ifndef VALUE_SIZE
#define VALUE_SIZE 61 /* value lengths 8 .. VALUE_SIZE (-DVALUE_SIZE=: longer copies) */
#endif
#define NKEYS 7       /* the keys the writer inserts */
#define NBUCKETS 16   /* _layout: a power of two >= 8 and well above NKEYS */
#define PAGE 4096     /* the header; the page table is one 4 KiB page too */
#define ALIGN16(n) (((n) + 15) / 16 * 16)
/* The two classes: the largest record's slot, and about 5/8 of it; neither a multiple
 * of the other, so the geometries of a moved page overlap. */
#define BIG_SLOT ALIGN16(SHM_SLOT_HEADER + (KEY_SIZE + 7) / 8 * 8 + VALUE_SIZE)
#define SMALL_SLOT ALIGN16(BIG_SLOT * 5 / 8)
/* A page holds 8 big slots at least (more than NKEYS + 1: one page is enough for any
 * class); a power of two. */
#define PAGE_BYTES (BIG_SLOT * 8 <= 1024 ? 1024 : BIG_SLOT * 8 <= 2048 ? 2048 : BIG_SLOT * 8 <= 4096 ? 4096 : 8192)
#define NPAGES 6
#define MOVE_EVERY 16 /* writer ops between page moves */
#define MAX_SLOTS_PER_PAGE (PAGE_BYTES / 64)
#define MAX_READERS 16

typedef struct {
    uint8_t b[KEY_SIZE];
    size_t n;
    uint32_t h;
    int stable; /* never deleted: a validated miss of it is wrong */
    int ghost;  /* never inserted: a validated find of it is wrong */
} key_t_;

static key_t_ keys[NKEYS + 1]; /* keys[NKEYS] is the ghost; written before any thread starts */
static shm_seg seg;
static int stop; /* __atomic only */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* The record the writer stores for key k at epoch e, and the check a reader applies. */
static uint64_t value_len(unsigned k, uint64_t e) { return 8 + (mix64(e * 31 + k) % (VALUE_SIZE - 7)); }
static uint64_t expiry_of(unsigned k, uint64_t e) { return mix64(e ^ ((uint64_t)k << 56)) | 1; }
static void value_bytes(uint8_t *out, unsigned k, uint64_t e, uint64_t vlen)
{
    uint64_t w[(VALUE_SIZE + 7) / 8];
    w[0] = (e << 24) | (vlen << 8) | k;
    for (unsigned i = 1; i < sizeof w / 8; i++)
        w[i] = mix64(w[0] + i);
    memcpy(out, w, vlen);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t refs_per_page(void) { return (uint64_t)1 << seg.ref_shift; }

/* -- the writer (one thread: the coordinator) -------------------------------------------- */

#define NREFS (NPAGES * PAGE_BYTES / SHM_SLOT_UNIT)
#define MAX_FREE (NPAGES * MAX_SLOTS_PER_PAGE)

typedef struct {
    uint64_t epoch, puts, deletes, moves;
    int ref_key[NREFS]; /* writer-private: which key a live slot holds, -1 free */
    uint64_t free[2][MAX_FREE]; /* per class, oldest first (_freering) */
    unsigned nfree[2];
    int page_class[NPAGES];
    int moving; /* the page being emptied for a move, or -1 */
    uint64_t rng;
} writer_t;

static uint64_t rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

static int64_t class_for(uint64_t klen, uint64_t vlen) { return shm_class_for(&seg, shm_slot_need(klen, vlen)); }

/* The oldest free slot of class c that is not in the page being moved. */
static uint64_t take_free(writer_t *wr, int64_t c)
{
    for (unsigned i = 0; i < wr->nfree[c]; i++) {
        uint64_t ref = wr->free[c][i];
        if (wr->moving >= 0 && (int)(ref >> seg.ref_shift) == wr->moving)
            continue;
        memmove(&wr->free[c][i], &wr->free[c][i + 1], (wr->nfree[c] - i - 1) * sizeof(uint64_t));
        wr->nfree[c]--;
        return ref;
    }
    fprintf(stderr, "harness bug: class %lld has no free slot\n", (long long)c);
    exit(2);
}

static void give_free(writer_t *wr, uint64_t ref)
{
    int64_t c = shm_class_of(&seg, ref);
    wr->free[c][wr->nfree[c]++] = ref;
}

/* The engine's find: walk to the key's bucket or the empty one. The writer reads its
 * own stores, so relaxed loads are exact. Returns the ref or -1; *pos the bucket. */
static int64_t writer_find(const writer_t *wr, unsigned k, uint64_t *pos)
{
    uint64_t p = keys[k].h & seg.mask;
    for (;;) {
        uint64_t b = shm_load_relaxed(seg.w + seg.idx0 + p);
        if (b == 0) {
            *pos = p;
            return -1;
        }
        uint64_t ref = (b & 0xFFFFFFFFu) - 1;
        if ((uint32_t)(b >> 32) == keys[k].h && wr->ref_key[ref] == (int)k) {
            *pos = p;
            return (int64_t)ref;
        }
        p = (p + 1) & seg.mask;
    }
}

static int inplace; /* set before the threads start */

static void writer_put(writer_t *wr, unsigned k)
{
    uint64_t pos, e = ++wr->epoch;
    int64_t old = writer_find(wr, k, &pos);
    uint8_t v[VALUE_SIZE];
    uint64_t vlen = value_len(k, e);
    value_bytes(v, k, e, vlen);
    int64_t c = class_for(keys[k].n, vlen);
    if (inplace && old >= 0 && shm_class_of(&seg, (uint64_t)old) == c && (int)((uint64_t)old >> seg.ref_shift) != wr->moving) {
        /* The live slot itself, under its stamp: the seqlock is the only defence. */
        shm_write_record(&seg, (uint64_t)old, e, keys[k].b, keys[k].n, v, vlen, e, expiry_of(k, e), 0);
        shm_publish_epoch(&seg, e);
        wr->puts++;
        return;
    }
    uint64_t ref = take_free(wr, c);
    shm_write_record(&seg, ref, e, keys[k].b, keys[k].n, v, vlen, e, expiry_of(k, e), 0);
    wr->ref_key[ref] = (int)k;
    shm_set_bucket(&seg, pos, keys[k].h, ref);
    if (old >= 0) {
        shm_free_record(&seg, (uint64_t)old, e, SHM_FLAG_FREE);
        wr->ref_key[old] = -1;
        give_free(wr, (uint64_t)old);
    }
    shm_publish_epoch(&seg, e);
    wr->puts++;
}

static void writer_delete(writer_t *wr, uint64_t pos, uint64_t ref)
{
    uint64_t e = ++wr->epoch;
    /* Stored BEFORE the bucket goes (_engine._unlink). */
    shm_store_release(seg.w + SHM_H_LAST_DELETE_EPOCH, e);
    shm_remove_bucket(&seg, pos);
    shm_free_record(&seg, ref, e, SHM_FLAG_FREE);
    wr->ref_key[ref] = -1;
    give_free(wr, ref);
    shm_publish_epoch(&seg, e);
    wr->deletes++;
}

/* Move a page of a class that has two or more to the other class. */
static void writer_move(writer_t *wr)
{
    int from = (int)(rnd(&wr->rng) % 2), n = 0, pages[NPAGES];
    for (int p = 0; p < NPAGES; p++)
        if (wr->page_class[p] == from)
            pages[n++] = p;
    if (n < 2)
        from = 1 - from;
    n = 0;
    for (int p = 0; p < NPAGES; p++)
        if (wr->page_class[p] == from)
            pages[n++] = p;
    int page = pages[rnd(&wr->rng) % (uint64_t)n];
    wr->moving = page;
    uint64_t lo = (uint64_t)page << seg.ref_shift, hi = lo + refs_per_page();
    /* The records living in the page: put again elsewhere (copy-on-write, new epochs). */
    for (uint64_t ref = lo; ref < hi; ref++)
        if (wr->ref_key[ref] >= 0)
            writer_put(wr, (unsigned)wr->ref_key[ref]);
    /* Its free slots leave the free list. */
    unsigned m = 0;
    for (unsigned i = 0; i < wr->nfree[from]; i++)
        if (wr->free[from][i] < lo || wr->free[from][i] >= hi)
            wr->free[from][m++] = wr->free[from][i];
    wr->nfree[from] = m;
    int to = 1 - from;
    uint64_t e = ++wr->epoch;
    shm_page_assign(&seg, (uint64_t)page, (e << SHM_PTE_CLASS_BITS) | (uint64_t)(to + 1), seg.classes[to], e);
    shm_publish_epoch(&seg, e);
    wr->page_class[page] = to;
    uint64_t step = seg.classes[to] / SHM_SLOT_UNIT, per = PAGE_BYTES / seg.classes[to];
    for (uint64_t i = 0; i < per; i++)
        give_free(wr, lo + i * step);
    wr->moving = -1;
    wr->moves++;
}

static void writer_op(writer_t *wr, uint64_t op)
{
    if (op % MOVE_EVERY == MOVE_EVERY - 1) {
        writer_move(wr);
        return;
    }
    unsigned k = (unsigned)(rnd(&wr->rng) % NKEYS);
    uint64_t pos;
    int64_t ref = writer_find(wr, k, &pos);
    if (ref >= 0 && !keys[k].stable && rnd(&wr->rng) % 4 == 0)
        writer_delete(wr, pos, (uint64_t)ref);
    else
        writer_put(wr, k);
}

/* -- the readers ------------------------------------------------------------------------- */

enum { R_DAMAGED = SHM_DAMAGED };

/* Every reader's lookup is protocol.h's shm_attempt (reader.c's get, lookup and
 * get_many call it too); here its value goes into the reader's buffer. */
static uint8_t *dst_buffer(void *ctx, uint64_t vlen)
{
    (void)vlen; /* <= VALUE_SIZE: shm_read_begin clamps it to the segment's value_size */
    return (uint8_t *)ctx;
}

static int attempt(const shm_seg *s, const uint8_t *kb, size_t n, uint32_t h, uint8_t *value, shm_rec *rec,
                   shm_walk *wk)
{
    return shm_attempt(s, kb, n, h, dst_buffer, value, rec, wk);
}

typedef struct {
    uint64_t reads, found, misses, retries, torn, wrong, gave_up, scanned, page_moved;
    uint64_t rng;
    char pad[64]; /* the counters of two readers never share a cache line */
} reader_t;

#define MAX_ATTEMPTS 200000 /* then the lookup gives up (counted; a stalled writer) */

/* Is a validated live record of key k self-consistent? */
static int record_ok(unsigned k, const shm_rec *rec, const uint8_t *value)
{
    uint64_t e = rec->version;
    uint8_t want[VALUE_SIZE];
    if (rec->vlen != value_len(k, e) || rec->expiry != expiry_of(k, e) || rec->seq != 2 * e + 2)
        return 0;
    value_bytes(want, k, e, rec->vlen);
    return !memcmp(value, want, rec->vlen);
}

static void lookup(reader_t *rd, unsigned k)
{
    const key_t_ *key = &keys[k];
    uint8_t value[VALUE_SIZE];
    shm_rec rec = {0};
    shm_walk wk;
    for (int n = 0; n < MAX_ATTEMPTS; n++) {
        int r = attempt(&seg, key->b, key->n, key->h, value, &rec, &wk);
        if (r == SHM_RETRY) {
            rd->retries++;
            if (n >= 64)
                sched_yield(); /* the writer may be preempted mid-slot (2 cores, N threads) */
            continue;
        }
        rd->reads++;
        if (r == R_DAMAGED) {
            rd->wrong++;
        } else if (r == SHM_MISS) {
            rd->misses++;
            if (key->stable)
                rd->wrong++;
        } else {
            rd->found++;
            if (key->ghost)
                rd->wrong++;
            if (!record_ok(k, &rec, value))
                rd->torn++;
        }
        return;
    }
    rd->gave_up++;
}

/* A validated slot of a scan: a live record that checks, a freed one (key kept, no
 * value, no expiry), or a new page's free slot (no key, version 0), whose record fits
 * the slot's class. */
static int slot_ok(const shm_rec *rec, const uint8_t *kb, const uint8_t *value, uint64_t slot_size)
{
    uint64_t flags = (rec->meta >> 16) & 0xFFFF;
    int k = -1;
    for (unsigned i = 0; i < NKEYS; i++)
        if (keys[i].n == rec->klen && !memcmp(keys[i].b, kb, rec->klen))
            k = (int)i;
    if (shm_slot_need(rec->klen, rec->vlen) > slot_size)
        return 0;
    if (flags == 0)
        return k >= 0 && record_ok((unsigned)k, rec, value);
    if (flags != SHM_FLAG_FREE || rec->vlen || rec->expiry || rec->seq & 1)
        return 0;
    if (rec->klen == 0)
        return rec->version == 0;
    return k >= 0 && rec->seq >= 2 * rec->version + 2;
}

/* changed_keys' page scan: the entry once, then every slot of its class. */
static void scan(reader_t *rd, uint64_t page)
{
    uint64_t pte1 = shm_load_acquire(shm_pte(&seg, page));
    if (!pte1) { /* being moved (shm_page_assign's P0): changed_keys skips the page */
        rd->page_moved++;
        return;
    }
    int64_t c = shm_pte_class(&seg, pte1);
    if (c < 0) {
        rd->wrong++;
        return;
    }
    uint64_t size = seg.classes[c], per = PAGE_BYTES / size, ref = page << seg.ref_shift;
    uint8_t kb[KEY_SIZE], value[VALUE_SIZE];
    for (uint64_t i = 0; i < per; i++, ref += size / SHM_SLOT_UNIT) {
        shm_rec rec = {0};
        for (int n = 0;; n++) {
            int r = shm_read_slot(&seg, ref, pte1, kb, dst_buffer, value, &rec);
            if (r > 0) {
                rd->scanned++;
                if (!slot_ok(&rec, kb, value, size))
                    rd->torn++;
                break;
            }
            rd->retries++;
            if (shm_load_acquire(shm_pte(&seg, page)) != pte1) {
                rd->page_moved++; /* changed_keys scans the page again; here: the next one */
                return;
            }
            if (n >= 64)
                sched_yield();
        }
    }
}

static void *reader_main(void *arg)
{
    reader_t *rd = arg;
    while (!__atomic_load_n(&stop, __ATOMIC_ACQUIRE)) {
        uint64_t x = rnd(&rd->rng);
        if (x & 1)
            lookup(rd, (unsigned)((x >> 1) % (NKEYS + 1)));
        else
            scan(rd, (x >> 1) % NPAGES);
    }
    return NULL;
}

/* -- setup ------------------------------------------------------------------------------- */

static void key_from_u128(key_t_ *k, __uint128_t x)
{
    memset(k->b, 0, sizeof k->b);
    memcpy(k->b, &x, 16); /* little-endian, as key_hash reads a key */
    k->n = 16;
    k->h = shm_key_hash(k->b, k->n);
}

static void key_from_str(key_t_ *k, const char *s)
{
    memset(k->b, 0, sizeof k->b);
    k->n = strlen(s);
    memcpy(k->b, s, k->n);
    k->h = shm_key_hash(k->b, k->n);
}

/* Insertion order puts a deletable key before the stable F0 in the same probe chain,
 * so deletes shift F0's bucket back while readers walk to it. */
static void make_keys(void)
{
    const __uint128_t P = SHM_HASH_PRIME, X = 0xFEDCBA9876543210ull;
    const __uint128_t step = P * 0x10001u; /* a multiple of P: the same key_hash */
    key_t_ f0 = {0}, f1 = {0}, f2 = {0}, ghost = {0};
    key_from_u128(&f1, X + step);
    key_from_u128(&f0, X);
    key_from_u128(&f2, X + 2 * step);
    key_from_u128(&ghost, X + 3 * step);
    if (f1.h != f0.h || f2.h != f0.h || ghost.h != f0.h) {
        fprintf(stderr, "key_hash is not linear mod P: the hash family does not collide\n");
        exit(2);
    }
    /* Two keys with F's home bucket but another hash: found by search (deterministic). */
    key_t_ g[2];
    memset(g, 0, sizeof g);
    unsigned found = 0;
    char buf[32];
    for (unsigned i = 0; found < 2; i++) {
        snprintf(buf, sizeof buf, "grp-%07u", i);
        key_from_str(&g[found], buf);
        if ((g[found].h & (NBUCKETS - 1)) == (f0.h & (NBUCKETS - 1)) && g[found].h != f0.h)
            found++;
    }
    keys[0] = f1;
    keys[1] = g[0];
    keys[2] = f0;
    keys[2].stable = 1;
    keys[3] = f2;
    keys[4] = g[1];
    key_from_str(&keys[5], "solo-key-twenty-byte"); /* KEY_SIZE bytes: no zero tail */
    keys[5].stable = 1;
    key_from_str(&keys[6], "short");
    keys[NKEYS] = ghost;
    keys[NKEYS].ghost = 1;
}

/* The segment: header (class table), page table, pages, index; checked by the same
 * shm_seg_fits and shm_seg_load_classes the extensions run. */
static uint64_t *make_segment(void)
{
    uint64_t pt_off = PAGE, pages_off = 2 * PAGE;
    uint64_t idx_off = pages_off + (uint64_t)NPAGES * PAGE_BYTES;
    uint64_t size = (idx_off + NBUCKETS * 8 + PAGE - 1) / PAGE * PAGE;
    uint64_t *w = aligned_alloc(PAGE, size);
    if (!w) {
        perror("aligned_alloc");
        exit(2);
    }
    memset(w, 0, size);
    seg.w = w;
    seg.slot0 = pages_off / 8;
    seg.slot_words = SHM_SLOT_UNIT / 8;
    seg.ref_shift = (uint64_t)__builtin_ctz(PAGE_BYTES / SHM_SLOT_UNIT);
    seg.nslots = NREFS;
    seg.pt0 = pt_off / 8;
    seg.idx0 = idx_off / 8;
    seg.mask = NBUCKETS - 1;
    seg.key_size = KEY_SIZE;
    seg.value_size = VALUE_SIZE;
    w[SHM_H_FORMAT] = 4;
    w[SHM_H_STATE] = SHM_STATE_READY;
    w[SHM_H_NCLASSES] = 2;
    w[SHM_H_CLASSES + SHM_C_SLOT_SIZE] = SMALL_SLOT;
    w[SHM_H_CLASSES + SHM_CLASS_WORDS + SHM_C_SLOT_SIZE] = BIG_SLOT;
    if (!shm_seg_fits(&seg, w, size, size) || !shm_seg_load_classes(&seg) || SMALL_SLOT < 64 ||
        BIG_SLOT % SMALL_SLOT == 0 || PAGE_BYTES < 8 * BIG_SLOT) {
        fprintf(stderr, "the harness's segment does not fit protocol.h's checks\n");
        exit(2);
    }
    return w;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    int nreaders = argc > 2 ? atoi(argv[2]) : 3;
    inplace = argc > 3 && !strcmp(argv[3], "inplace");
    if (nreaders < 1 || nreaders > MAX_READERS || !(seconds > 0) || (argc > 3 && !inplace && strcmp(argv[3], "cow"))) {
        fprintf(stderr, "usage: %s [seconds [readers 1-%d [cow|inplace]]]\n", argv[0], MAX_READERS);
        return 2;
    }
    make_keys();
    uint64_t *mem = make_segment();

    static writer_t wr;
    wr.rng = 12345;
    wr.moving = -1;
    for (unsigned i = 0; i < NREFS; i++)
        wr.ref_key[i] = -1;
    /* Half the pages to each class, assigned at epoch 1 as a memory store's are. */
    wr.epoch = 1;
    for (int p = 0; p < NPAGES; p++) {
        int c = p % 2;
        wr.page_class[p] = c;
        shm_page_assign(&seg, (uint64_t)p, (1u << SHM_PTE_CLASS_BITS) | (uint64_t)(c + 1), seg.classes[c], 1);
        uint64_t step = seg.classes[c] / SHM_SLOT_UNIT, per = PAGE_BYTES / seg.classes[c];
        for (uint64_t i = 0; i < per; i++)
            give_free(&wr, ((uint64_t)p << seg.ref_shift) + i * step);
    }
    for (unsigned k = 0; k < NKEYS; k++)
        writer_put(&wr, k);

    static reader_t rd[MAX_READERS];
    pthread_t th[MAX_READERS];
    for (int i = 0; i < nreaders; i++) {
        rd[i].rng = 1000 + (uint64_t)i;
        if (pthread_create(&th[i], NULL, reader_main, &rd[i])) {
            perror("pthread_create");
            return 2;
        }
    }
    /* The writer runs on the main thread. */
    double deadline = now_s() + seconds;
    for (uint64_t ops = 0;; ops++) {
        if ((ops & 255) == 0 && now_s() >= deadline)
            break;
        writer_op(&wr, ops);
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);

    reader_t sum = {0};
    int idle = 0;
    for (int i = 0; i < nreaders; i++) {
        pthread_join(th[i], NULL);
        sum.reads += rd[i].reads;
        sum.found += rd[i].found;
        sum.misses += rd[i].misses;
        sum.retries += rd[i].retries;
        sum.torn += rd[i].torn;
        sum.wrong += rd[i].wrong;
        sum.gave_up += rd[i].gave_up;
        sum.scanned += rd[i].scanned;
        sum.page_moved += rd[i].page_moved;
        idle += rd[i].found == 0;
    }
    printf("mode=%s writes=%llu deletes=%llu moves=%llu readers=%d reads=%llu found=%llu misses=%llu "
           "scanned=%llu page_moved=%llu retries=%llu torn=%llu wrong=%llu gave_up=%llu idle_readers=%d\n",
           inplace ? "inplace" : "cow", (unsigned long long)wr.puts, (unsigned long long)wr.deletes,
           (unsigned long long)wr.moves, nreaders, (unsigned long long)sum.reads, (unsigned long long)sum.found,
           (unsigned long long)sum.misses, (unsigned long long)sum.scanned, (unsigned long long)sum.page_moved,
           (unsigned long long)sum.retries, (unsigned long long)sum.torn, (unsigned long long)sum.wrong,
           (unsigned long long)sum.gave_up, idle);
    free(mem);
    return (sum.torn || sum.wrong || idle) ? 1 : 0;
}

/* -- probes: each protocol step as a function of its own, to read its code (-S) ----------- */

__attribute__((noinline)) int shm_probe_read_begin(const shm_seg *s, uint64_t ref, shm_rec *r)
{
    return shm_read_begin(s, ref, r);
}
__attribute__((noinline)) int shm_probe_read_end(const uint64_t *sp, const shm_rec *r) { return shm_read_end(sp, r); }
__attribute__((noinline)) int shm_probe_page_same(const shm_seg *s, uint64_t page, uint64_t pte1)
{
    return shm_page_same(s, page, pte1);
}
__attribute__((noinline)) uint64_t shm_probe_pte_load(const shm_seg *s, uint64_t page)
{
    return shm_load_acquire(shm_pte(s, page));
}
__attribute__((noinline)) void shm_probe_write_begin(uint64_t *sp, uint64_t e) { shm_write_begin(sp, e); }
__attribute__((noinline)) void shm_probe_write_end(uint64_t *sp, uint64_t e) { shm_write_end(sp, e); }
__attribute__((noinline)) void shm_probe_page_assign(const shm_seg *s, uint64_t page, uint64_t entry, uint64_t size,
                                                     uint64_t e)
{
    shm_page_assign(s, page, entry, size, e);
}
__attribute__((noinline)) void shm_probe_set_bucket(const shm_seg *s, uint64_t pos, uint32_t h, uint64_t slot)
{
    shm_set_bucket(s, pos, h, slot);
}
__attribute__((noinline)) int shm_probe_miss_valid(const shm_seg *s, uint64_t g1) { return shm_miss_valid(s, g1); }
__attribute__((noinline)) void shm_probe_walk_from(const shm_seg *s, uint32_t h, uint64_t from, shm_walk *out)
{
    shm_walk_from(s, h, from, out);
}
