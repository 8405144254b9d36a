/*
 * seqlock_stress: protocol.h under real threads, for ThreadSanitizer and for torn reads.
 *
 * No Python. One buffer shaped like a data segment (the header words, NSLOTS slots,
 * an index; shm_seg and the word offsets of protocol.h) is shared by
 *
 *   one writer thread   the coordinator's role, op for op as coordinator/_engine.py:
 *                       every op takes the next epoch E; a put writes a free slot
 *                       (shm_write_record at E), points the bucket at it
 *                       (shm_set_bucket), frees the old slot (shm_free_record at E);
 *                       a delete stores H_LAST_DELETE_EPOCH, removes the bucket
 *                       (shm_remove_bucket: backward shift in an odd generation) and
 *                       frees the slot; then shm_publish_epoch(E). Free slots are
 *                       reused oldest first, with one spare, so a slot is rewritten
 *                       soon after it is unlinked.
 *                       Mode "inplace" rewrites a live key's own slot instead (no
 *                       bucket change): the engine never does that, but it leaves the
 *                       slot's stamp as the only defence and meets readers mid-copy
 *                       thousands of times a second (copy-on-write: a reader only sees
 *                       a rewrite if its bucket word comes back to the same slot).
 *   several readers     protocol.h's shm_attempt(), the lookup reader.c runs: walk,
 *                       read_begin, key compare, copy_out, read_end, bucket_same;
 *                       a miss is trusted only if shm_miss_valid; bounded retries.
 *
 * The keys are chosen to make walks pass other keys: three share their full 32-bit
 * hash (X, X + P*k, X + 2P*k as integers: key_hash works mod P = 2**61 - 1), so a walk
 * passes them by the key compare on a validated slot; two more share only their home
 * bucket, so a walk passes them by hash. Deleting one of them shifts the others back.
 * A fourth member of the hash family is never inserted (every lookup of it must be a
 * validated miss), and two keys are never deleted (a validated miss of one is wrong).
 *
 * Every record is self-checking: version = E, expiry and value are functions of
 * (key, E, value length), the length varies with E and the value starts at an
 * unaligned offset (KEY_SIZE is not a multiple of 8), so the partial-word paths of
 * shm_copy_in / shm_copy_out run. A copy that shm_read_end validated but whose words
 * disagree is a TORN read.
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
 *   -DSHM_BROKEN_VALIDATE  read_end and bucket_same accept every copy: the torn
 *                       counter must see it (mode inplace, -O2, no TSan).
 *   -DVALUE_SIZE=n      longer values (default 61): longer copies, more overlap.
 *
 * aarch64, read from aarch64-linux-gnu-gcc 12.2 -O2 -S (the shm_probe_* functions at
 * the end; tests/test_native_tsan.py checks the same):
 *   shm_read_begin   ldar x0,[seq] (R1), then plain ldr of version/expiry/meta (R3)
 *   shm_read_end     dmb ishld; ldr [seq]     (R5 acquire fence, R6 relaxed load)
 *   shm_miss_valid   dmb ishld; ldr [gen]
 *   shm_write_begin  str [seq]; dmb ish       (W1 relaxed store, W2 release fence: a
 *                    release fence must order earlier loads AND stores before later
 *                    stores, so the full dmb ish, not dmb ishst)
 *   shm_write_end    stlr [seq]               (W4)
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

/* -- the deliberately broken readers (one swapped step of shm_attempt each) ------------- */

#ifdef SHM_BROKEN_ORDER
/* A plain memcpy from the live slot: races with the writer's word stores. */
#define SHM_COPY_OUT(dst, w, off, n) broken_copy_out((dst), (const uint8_t *)(w) + (off), (n))
static void *broken_copy_out(void *dst, const void *src, size_t n) { return memcpy(dst, src, n); }
#endif

#ifdef SHM_BROKEN_VALIDATE
/* Trusts every copy: neither the stamp nor the bucket is compared again. (The bucket
 * alone catches most tears: copy-on-write writes only slots no bucket points to, so a
 * slot rewritten under a reader was unlinked first; only an ABA of the bucket word
 * escapes it. Both checks go, or tears are too rare to show in a second.) */
#define SHM_READ_END(sp, r) (shm_fence_acquire(), 1)
#define SHM_BUCKET_SAME(s, pos, bucket) 1
#endif

#include "protocol.h"

/* -- the segment ------------------------------------------------------------------------ */

#define KEY_SIZE 20   /* not a multiple of 8: the value starts mid-word */
#ifndef VALUE_SIZE
#define VALUE_SIZE 61 /* value lengths 8 .. VALUE_SIZE (-DVALUE_SIZE=: longer copies) */
#endif
#define NKEYS 7       /* the keys the writer inserts; capacity = NKEYS */
#define NSLOTS (NKEYS + 1) /* + the spare slot, as _layout.Layout.nslots */
#define NBUCKETS 16   /* _layout: the first power of two >= 8 and >= 2 * NSLOTS */
#define PAGE 4096
#define SLOT_WORDS ((SHM_SLOT_HEADER + KEY_SIZE + VALUE_SIZE + 7) / 8)
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

/* -- the writer (one thread: the coordinator) -------------------------------------------- */

typedef struct {
    uint64_t epoch, puts, deletes;
    int slot_key[NSLOTS]; /* writer-private: which key a live slot holds, -1 free */
    uint64_t ring[NSLOTS], head, tail; /* free slots, oldest first (_freering) */
    uint64_t rng;
} writer_t;

static uint64_t rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

/* The engine's find: walk to the key's bucket or the empty one. The writer reads its
 * own stores, so relaxed loads are exact. Returns the slot or -1; *pos the bucket. */
static int64_t writer_find(const writer_t *wr, unsigned k, uint64_t *pos)
{
    uint64_t p = keys[k].h & seg.mask;
    for (;;) {
        uint64_t b = shm_load_relaxed(seg.w + seg.idx0 + p);
        if (b == 0) {
            *pos = p;
            return -1;
        }
        uint64_t slot = (b & 0xFFFFFFFFu) - 1;
        if ((uint32_t)(b >> 32) == keys[k].h && wr->slot_key[slot] == (int)k) {
            *pos = p;
            return (int64_t)slot;
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
    if (inplace && old >= 0) {
        /* The live slot itself, under its stamp: the seqlock is the only defence. */
        shm_write_record(&seg, (uint64_t)old, e, keys[k].b, keys[k].n, v, vlen, e, expiry_of(k, e), 0);
        shm_publish_epoch(&seg, e);
        wr->puts++;
        return;
    }
    uint64_t slot = wr->ring[wr->head++ % NSLOTS];
    shm_write_record(&seg, slot, e, keys[k].b, keys[k].n, v, vlen, e, expiry_of(k, e), 0);
    wr->slot_key[slot] = (int)k;
    shm_set_bucket(&seg, pos, keys[k].h, slot);
    if (old >= 0) {
        shm_free_record(&seg, (uint64_t)old, e);
        wr->slot_key[old] = -1;
        wr->ring[wr->tail++ % NSLOTS] = (uint64_t)old;
    }
    shm_publish_epoch(&seg, e);
    wr->puts++;
}

static void writer_delete(writer_t *wr, uint64_t pos, uint64_t slot)
{
    uint64_t e = ++wr->epoch;
    /* Stored BEFORE the bucket goes (_engine._unlink). */
    shm_store_release(seg.w + SHM_H_LAST_DELETE_EPOCH, e);
    shm_remove_bucket(&seg, pos);
    shm_free_record(&seg, slot, e);
    wr->slot_key[slot] = -1;
    wr->ring[wr->tail++ % NSLOTS] = slot;
    shm_publish_epoch(&seg, e);
    wr->deletes++;
}

static void writer_op(writer_t *wr)
{
    unsigned k = (unsigned)(rnd(&wr->rng) % NKEYS);
    uint64_t pos;
    int64_t slot = writer_find(wr, k, &pos);
    if (slot >= 0 && !keys[k].stable && rnd(&wr->rng) % 4 == 0)
        writer_delete(wr, pos, (uint64_t)slot);
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
    uint64_t reads, found, misses, retries, torn, wrong, gave_up;
    uint64_t rng;
    char pad[64]; /* the counters of two readers never share a cache line */
} reader_t;

#define MAX_ATTEMPTS 200000 /* then the lookup gives up (counted; a stalled writer) */

static void lookup(reader_t *rd, unsigned k)
{
    const key_t_ *key = &keys[k];
    uint8_t value[VALUE_SIZE], want[VALUE_SIZE];
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
            uint64_t e = rec.version;
            if (rec.vlen != value_len(k, e) || rec.expiry != expiry_of(k, e) || rec.seq != 2 * e + 2) {
                rd->torn++;
            } else {
                value_bytes(want, k, e, rec.vlen);
                if (memcmp(value, want, rec.vlen))
                    rd->torn++;
            }
        }
        return;
    }
    rd->gave_up++;
}

static void *reader_main(void *arg)
{
    reader_t *rd = arg;
    while (!__atomic_load_n(&stop, __ATOMIC_ACQUIRE))
        lookup(rd, (unsigned)(rnd(&rd->rng) % (NKEYS + 1)));
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

static uint64_t *make_segment(void)
{
    uint64_t idx_off = ((uint64_t)PAGE + NSLOTS * SLOT_WORDS * 8 + PAGE - 1) / PAGE * PAGE;
    uint64_t size = (idx_off + NBUCKETS * 8 + PAGE - 1) / PAGE * PAGE;
    uint64_t *w = aligned_alloc(PAGE, size);
    if (!w) {
        perror("aligned_alloc");
        exit(2);
    }
    memset(w, 0, size);
    seg.w = w;
    seg.slot0 = PAGE / 8;
    seg.slot_words = SLOT_WORDS;
    seg.nslots = NSLOTS;
    seg.idx0 = idx_off / 8;
    seg.mask = NBUCKETS - 1;
    seg.key_size = KEY_SIZE;
    seg.value_size = VALUE_SIZE;
    w[SHM_H_FORMAT] = 3;
    w[SHM_H_STATE] = SHM_STATE_READY;
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
    for (unsigned i = 0; i < NSLOTS; i++) {
        wr.slot_key[i] = -1;
        wr.ring[wr.tail++] = i;
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
        writer_op(&wr);
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
        idle += rd[i].found == 0;
    }
    printf("mode=%s writes=%llu deletes=%llu readers=%d reads=%llu found=%llu misses=%llu retries=%llu "
           "torn=%llu wrong=%llu gave_up=%llu idle_readers=%d\n",
           inplace ? "inplace" : "cow", (unsigned long long)wr.puts, (unsigned long long)wr.deletes, nreaders, (unsigned long long)sum.reads,
           (unsigned long long)sum.found, (unsigned long long)sum.misses, (unsigned long long)sum.retries,
           (unsigned long long)sum.torn, (unsigned long long)sum.wrong, (unsigned long long)sum.gave_up, idle);
    free(mem);
    return (sum.torn || sum.wrong || idle) ? 1 : 0;
}

/* -- probes: each protocol step as a function of its own, to read its code (-S) ----------- */

__attribute__((noinline)) int shm_probe_read_begin(const shm_seg *s, const uint64_t *sp, shm_rec *r)
{
    return shm_read_begin(s, sp, r);
}
__attribute__((noinline)) int shm_probe_read_end(const uint64_t *sp, const shm_rec *r) { return shm_read_end(sp, r); }
__attribute__((noinline)) void shm_probe_write_begin(uint64_t *sp, uint64_t e) { shm_write_begin(sp, e); }
__attribute__((noinline)) void shm_probe_write_end(uint64_t *sp, uint64_t e) { shm_write_end(sp, e); }
__attribute__((noinline)) void shm_probe_set_bucket(const shm_seg *s, uint64_t pos, uint32_t h, uint64_t slot)
{
    shm_set_bucket(s, pos, h, slot);
}
__attribute__((noinline)) int shm_probe_miss_valid(const shm_seg *s, uint64_t g1) { return shm_miss_valid(s, g1); }
__attribute__((noinline)) void shm_probe_walk_from(const shm_seg *s, uint32_t h, uint64_t from, shm_walk *out)
{
    shm_walk_from(s, h, from, out);
}
