/*
 * shmstore._cwrite: the compiled write path (the coordinator's slot and index stores,
 * and the client <-> coordinator ring words).
 *
 * The protocol and the argument for its memory ordering are in protocol.h; this file
 * binds its WRITER side to Python, so the coordinator publishes with release stores
 * (W1-W4, the index's release stores and odd generation, the epoch's release store),
 * which is what makes it correct off x86-64 too. One type and a few functions:
 *
 *   Core     the coordinator's writable mapping of a data segment (one per
 *            coordinator/_engine.py Engine): find(kb, h), write_record, free_record,
 *            page_assign, set_bucket, remove_bucket, publish_epoch, batch_begin/
 *            batch_end (the batch seqlock H_BATCH_SEQ), and the hot ops whole: put(),
 *            put_frame() and delete(), each one call doing what Engine.put /
 *            Engine.delete do in Python, with the class rule for free slots and the
 *            class counters (tests/test_cwrite.py compares the segments).
 *   ring_publish / ring_take   a client's frame into its ring with a release store of
 *            HEAD; the coordinator's walk of a ring from an acquire load of HEAD, with
 *            every check of coordinator/_server.py's _drain_client (see ring_take).
 *   reply_publish   reply bytes, then REPLY_LEN and DONE with release stores.
 *
 * Only the coordinator process writes the data segment; it is the only writer of
 * every word stored here, so its own relaxed loads of them are exact. Free slots stay
 * in the engine's Python FreeRings, one per class (Engine.frees): put/delete take and
 * give slots through their pop and append methods (C methods, ~40 ns each). Every
 * ref, page and class from Python is checked against the layout before it is used.
 *
 * Everything a client wrote is hostile: ring_take bounds HEAD, TAIL and every frame
 * length against the ring before reading a byte, and never reads outside the ring's
 * bytes of the buffer it was given.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>
#include <time.h>

#include "protocol.h"

/* Header words not in protocol.h (shmstore/_layout.py H_*; tests/test_cwrite.py checks). */

/* Channel words (shmstore/_channel.py C_*; checked by tests/test_cwrite.py). */
#define CH_C_HEAD 1
#define CH_C_TAIL 17
#define CH_C_DONE 18
#define CH_C_REPLY_LEN 19
#define CH_PAD_MARK 0xFFFFFFFFu
/* Channel header words (shmstore/_channel.py CH_W_*): protocol.h's doorbell words. */
#define CH_W_SLEEPING SHM_CH_SLEEPING
#define CH_W_ELIDE SHM_CH_ELIDE

static PyObject *str_pop, *str_append;

/* ---------------------------------------------------------------------------------- */
/* Core                                                                               */

typedef struct {
    PyObject_HEAD
    Py_buffer buf;
    int open;
    shm_seg s;
    Py_buffer acc_buf; /* the access segment (LRU eviction), if acc */
    uint8_t *acc;      /* byte ref >> 2 of every record written is cleared; NULL: none */
} Core;

static PyTypeObject CoreType;

static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PyObject *mm, *sizes;
    unsigned long long v[10];
    if (!PyArg_ParseTuple(args, "OO!", &mm, &PyTuple_Type, &sizes))
        return NULL;
    if (!PyArg_ParseTuple(sizes, "KKKKKKKKKK", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9]))
        return NULL;
    Core *c = (Core *)type->tp_alloc(type, 0);
    if (!c)
        return NULL;
    if (PyObject_GetBuffer(mm, &c->buf, PyBUF_WRITABLE) < 0) {
        Py_DECREF(c);
        return NULL;
    }
    shm_seg *s = &c->s;
    s->slot0 = v[0];
    s->slot_words = v[1];
    s->nslots = v[2];
    s->idx0 = v[3];
    s->mask = v[4];
    s->key_size = v[5];
    s->value_size = v[6];
    s->pt0 = v[8];
    s->ref_shift = v[9];
    if (!shm_seg_fits(s, c->buf.buf, (uint64_t)c->buf.len, v[7])) {
        PyBuffer_Release(&c->buf);
        Py_DECREF(c);
        PyErr_SetString(PyExc_ValueError, "segment sizes do not fit the mapping");
        return NULL;
    }
    s->w = (uint64_t *)c->buf.buf;
    if (!shm_seg_load_classes(s)) {
        s->w = NULL;
        PyBuffer_Release(&c->buf);
        Py_DECREF(c);
        PyErr_SetString(PyExc_ValueError, "the segment's class table is not one a layout makes");
        return NULL;
    }
    c->open = 1;
    return (PyObject *)c;
}

static void Core_release_access(Core *c)
{
    if (c->acc) {
        c->acc = NULL;
        PyBuffer_Release(&c->acc_buf);
    }
}

static void Core_release(Core *c)
{
    if (c->open) {
        c->open = 0;
        c->s.w = NULL;
        PyBuffer_Release(&c->buf);
    }
    Core_release_access(c);
}

static void Core_dealloc(Core *c)
{
    Core_release(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int core_open(Core *c)
{
    if (!c->open) {
        PyErr_SetString(PyExc_ValueError, "the engine's mapping is closed");
        return 0;
    }
    return 1;
}

static PyObject *Core_close(Core *c, PyObject *unused)
{
    Core_release(c);
    Py_RETURN_NONE;
}

/* The coordinator wrote a record into slot ref: its access byte to 0, unreferenced
 * until a reader reads it (Engine._store does the same; relaxed: readers store 1). */
static inline void core_untouch(Core *c, uint64_t ref)
{
    if (c->acc)
        __atomic_store_n(c->acc + (ref >> 2), 0, __ATOMIC_RELAXED);
}

/* set_access(buffer or None): the access segment (writable, at least a byte per 4
 * refs) whose byte ref >> 2 put and put_frame clear for each record they write. */
static PyObject *Core_set_access(Core *c, PyObject *o)
{
    Core_release_access(c);
    if (o == Py_None)
        Py_RETURN_NONE;
    if (!core_open(c))
        return NULL;
    if (PyObject_GetBuffer(o, &c->acc_buf, PyBUF_WRITABLE) < 0)
        return NULL;
    if ((uint64_t)c->acc_buf.len <= ((c->s.nslots - 1) >> 2)) {
        PyBuffer_Release(&c->acc_buf);
        PyErr_SetString(PyExc_ValueError, "the access segment is smaller than the pages need");
        return NULL;
    }
    c->acc = (uint8_t *)c->acc_buf.buf;
    Py_RETURN_NONE;
}

/* -- argument helpers --------------------------------------------------------------- */

static int arg_u64(PyObject *o, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* A slot reference: below nrefs, in an assigned page, at the start of a slot of the
 * page's class. *cls: that class. */
static int check_ref(Core *c, uint64_t ref, int64_t *cls)
{
    const shm_seg *s = &c->s;
    if (ref >= s->nslots) {
        PyErr_Format(PyExc_IndexError, "slot reference %llu out of range", (unsigned long long)ref);
        return -1;
    }
    int64_t k = shm_class_of(s, ref);
    if (k < 0) {
        PyErr_Format(PyExc_IndexError, "slot reference %llu lies in a free page", (unsigned long long)ref);
        return -1;
    }
    if (!shm_ref_is_slot(s, ref, k)) {
        PyErr_Format(PyExc_IndexError, "slot reference %llu is not a slot of its page's class %lld",
                     (unsigned long long)ref, (long long)k);
        return -1;
    }
    *cls = k;
    return 0;
}

static int arg_ref(Core *c, PyObject *o, uint64_t *out, int64_t *cls)
{
    if (arg_u64(o, out) < 0)
        return -1;
    return check_ref(c, *out, cls);
}

static int arg_bytes(PyObject *o, const uint8_t **p, uint64_t *n, uint64_t max, const char *what)
{
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", what);
        return -1;
    }
    *p = (const uint8_t *)PyBytes_AS_STRING(o);
    *n = (uint64_t)PyBytes_GET_SIZE(o);
    if (*n > max) {
        PyErr_Format(PyExc_ValueError, "%s of %llu bytes is longer than the store's %llu", what,
                     (unsigned long long)*n, (unsigned long long)max);
        return -1;
    }
    return 0;
}

#define NARGS(n)                                                                          \
    if (nargs != (n)) {                                                                   \
        PyErr_Format(PyExc_TypeError, "expected %d arguments, got %zd", (int)(n), nargs); \
        return NULL;                                                                      \
    }                                                                                     \
    if (!core_open(c))                                                                    \
        return NULL;

/* -- the index walk (writer side: the coordinator's own loads are exact) ------------- */

/* The bucket of key kb (hash h), or the first empty bucket of its walk.
 * Returns 1 found (*ref set), 0 missing, -1 with an exception (no empty bucket: damaged). */
static int core_find(Core *c, const uint8_t *kb, uint64_t klen, uint32_t h, uint64_t *pos, uint64_t *ref)
{
    const shm_seg *s = &c->s;
    uint64_t p = h & s->mask;
    for (uint64_t n = 0; n <= s->mask; n++) {
        uint64_t b = shm_load_relaxed(s->w + s->idx0 + p);
        if (b == 0) {
            *pos = p;
            return 0;
        }
        if ((uint32_t)(b >> 32) == h) {
            uint64_t r = (b & 0xFFFFFFFFull) - 1;
            if (r < s->nslots) {
                const uint64_t *sp = shm_slot(s, r);
                uint64_t kl = shm_load_relaxed(sp + SHM_S_META) & 0xFFFF;
                uint64_t ko = 8 * (s->slot0 + r * s->slot_words) + SHM_SLOT_HEADER;
                if (kl == klen && ko + klen <= shm_page_end(s, r) && shm_key_equal(s->w, ko, kb, (size_t)klen)) {
                    *pos = p;
                    *ref = r;
                    return 1;
                }
            }
        }
        p = (p + 1) & s->mask;
    }
    PyErr_SetString(PyExc_RuntimeError, "the segment's index has no empty bucket: it is damaged");
    return -1;
}

/* find(kb, h) -> (pos, ref): ref -1 and the first empty pos when the key is missing. */
static PyObject *Core_find(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(2);
    const uint8_t *kb;
    uint64_t klen, h, pos = 0, ref = 0;
    if (arg_bytes(args[0], &kb, &klen, c->s.key_size, "a key") < 0 || arg_u64(args[1], &h) < 0)
        return NULL;
    int r = core_find(c, kb, klen, (uint32_t)h, &pos, &ref);
    if (r < 0)
        return NULL;
    if (r == 0)
        return Py_BuildValue("(Ki)", (unsigned long long)pos, -1);
    return Py_BuildValue("(KK)", (unsigned long long)pos, (unsigned long long)ref);
}

/* write_record(ref, epoch, kb, vb, version, expiry, flags): no class accounting (the
 * Python engine accounts for its own calls). */
static PyObject *Core_write_record(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(7);
    uint64_t ref, epoch, klen, vlen, version, expiry, flags;
    int64_t cls;
    const uint8_t *kb, *vb;
    if (arg_ref(c, args[0], &ref, &cls) < 0 || arg_u64(args[1], &epoch) < 0 ||
        arg_bytes(args[2], &kb, &klen, c->s.key_size, "a key") < 0 ||
        arg_bytes(args[3], &vb, &vlen, c->s.value_size, "a value") < 0 || arg_u64(args[4], &version) < 0 ||
        arg_u64(args[5], &expiry) < 0 || arg_u64(args[6], &flags) < 0)
        return NULL;
    if (flags > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "flags are 16 bits");
        return NULL;
    }
    if (shm_slot_need(klen, vlen) > c->s.classes[cls]) {
        PyErr_Format(PyExc_ValueError, "a record of %llu + %llu bytes does not fit a slot of class %lld (%llu bytes)",
                     (unsigned long long)klen, (unsigned long long)vlen, (long long)cls,
                     (unsigned long long)c->s.classes[cls]);
        return NULL;
    }
    shm_write_record(&c->s, ref, epoch, kb, klen, vb, vlen, version, expiry, flags);
    Py_RETURN_NONE;
}

static int arg_free_flags(PyObject *o, uint64_t *flags)
{
    if (arg_u64(o, flags) < 0)
        return -1;
    if (!(*flags & SHM_FLAG_FREE) || *flags > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "free_record flags must include FLAG_FREE and fit 16 bits");
        return -1;
    }
    return 0;
}

/* free_record(ref, epoch, flags=FLAG_FREE): no class accounting. */
static PyObject *Core_free_record(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_Format(PyExc_TypeError, "free_record(ref, epoch, flags=1), got %zd arguments", nargs);
        return NULL;
    }
    if (!core_open(c))
        return NULL;
    uint64_t ref, epoch, flags = SHM_FLAG_FREE;
    int64_t cls;
    if (arg_ref(c, args[0], &ref, &cls) < 0 || arg_u64(args[1], &epoch) < 0 ||
        (nargs == 3 && arg_free_flags(args[2], &flags) < 0))
        return NULL;
    shm_free_record(&c->s, ref, epoch, flags);
    Py_RETURN_NONE;
}

/* page_assign(page, cls, epoch): shm_page_assign with entry (epoch << 8) | (cls + 1).
 * No accounting and no free lists: the caller's. */
static PyObject *Core_page_assign(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(3);
    uint64_t page, cls, epoch;
    if (arg_u64(args[0], &page) < 0 || arg_u64(args[1], &cls) < 0 || arg_u64(args[2], &epoch) < 0)
        return NULL;
    const shm_seg *s = &c->s;
    if (page >= s->npages) {
        PyErr_Format(PyExc_IndexError, "page %llu out of range", (unsigned long long)page);
        return NULL;
    }
    if (cls >= s->nclasses) {
        PyErr_Format(PyExc_IndexError, "class %llu out of range", (unsigned long long)cls);
        return NULL;
    }
    if (epoch >= ((uint64_t)1 << (64 - SHM_PTE_CLASS_BITS))) {
        PyErr_SetString(PyExc_ValueError, "epoch too large for a page-table entry");
        return NULL;
    }
    shm_page_assign(s, page, (epoch << SHM_PTE_CLASS_BITS) | (cls + 1), s->classes[cls], epoch);
    Py_RETURN_NONE;
}

/* set_bucket(pos, h, ref) */
static PyObject *Core_set_bucket(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(3);
    uint64_t pos, h, ref;
    int64_t cls;
    if (arg_u64(args[0], &pos) < 0 || arg_u64(args[1], &h) < 0 || arg_ref(c, args[2], &ref, &cls) < 0)
        return NULL;
    if (pos > c->s.mask || h > 0xFFFFFFFFull) {
        PyErr_SetString(PyExc_IndexError, "bucket position or hash out of range");
        return NULL;
    }
    shm_set_bucket(&c->s, pos, (uint32_t)h, ref);
    Py_RETURN_NONE;
}

/* remove_bucket(pos): backward-shift deletion inside an odd index generation. */
static PyObject *Core_remove_bucket(Core *c, PyObject *pos_o)
{
    if (!core_open(c))
        return NULL;
    uint64_t pos;
    if (arg_u64(pos_o, &pos) < 0)
        return NULL;
    if (pos > c->s.mask) {
        PyErr_SetString(PyExc_IndexError, "bucket position out of range");
        return NULL;
    }
    shm_remove_bucket(&c->s, pos);
    Py_RETURN_NONE;
}

/* publish_epoch(epoch): H_EPOCH with a release store. */
static PyObject *Core_publish_epoch(Core *c, PyObject *e)
{
    if (!core_open(c))
        return NULL;
    uint64_t epoch;
    if (arg_u64(e, &epoch) < 0)
        return NULL;
    shm_publish_epoch(&c->s, epoch);
    Py_RETURN_NONE;
}

/* batch_begin(): H_BATCH_SEQ odd, then a release fence (a slot's W1 of the same shape). */
static PyObject *Core_batch_begin(Core *c, PyObject *unused)
{
    if (!core_open(c))
        return NULL;
    uint64_t *bs = c->s.w + SHM_H_BATCH_SEQ;
    shm_store_relaxed(bs, shm_load_relaxed(bs) + 1);
    shm_fence_release();
    Py_RETURN_NONE;
}

/* batch_end(): H_BATCH_SEQ even with a release store (after the batch's epoch). */
static PyObject *Core_batch_end(Core *c, PyObject *unused)
{
    if (!core_open(c))
        return NULL;
    uint64_t *bs = c->s.w + SHM_H_BATCH_SEQ;
    shm_store_release(bs, shm_load_relaxed(bs) + 1);
    Py_RETURN_NONE;
}

/* -- the free lists (the engine's FreeRing per class) --------------------------------- */

/* frees: a list of exactly nclasses FreeRings (coordinator/_freering.py). */
static int check_frees(Core *c, PyObject *frees)
{
    if (!PyList_Check(frees) || (uint64_t)PyList_GET_SIZE(frees) != c->s.nclasses) {
        PyErr_Format(PyExc_TypeError, "frees must be a list of %llu free rings (one per class)",
                     (unsigned long long)c->s.nclasses);
        return -1;
    }
    return 0;
}

/* How many free slots class cls has (len of its ring), or -1 with an exception. */
static Py_ssize_t free_count(PyObject *frees, int64_t cls)
{
    return PyObject_Size(PyList_GET_ITEM(frees, cls));
}

/* A slot from class cls's ring (its pop() is deque.popleft), checked to be a slot of
 * that class. */
static int take_free(Core *c, PyObject *frees, int64_t cls, uint64_t *ref)
{
    PyObject *o = PyObject_CallMethodNoArgs(PyList_GET_ITEM(frees, cls), str_pop);
    if (!o)
        return -1;
    int64_t k;
    int r = arg_ref(c, o, ref, &k);
    Py_DECREF(o);
    if (r == 0 && k != cls) {
        PyErr_Format(PyExc_RuntimeError, "the free list of class %lld holds slot %llu of class %lld", (long long)cls,
                     (unsigned long long)*ref, (long long)k);
        return -1;
    }
    return r;
}

static int give_free(PyObject *frees, int64_t cls, uint64_t ref)
{
    PyObject *o = PyLong_FromUnsignedLongLong(ref);
    if (!o)
        return -1;
    PyObject *r = PyObject_CallMethodOneArg(PyList_GET_ITEM(frees, cls), str_append, o);
    Py_DECREF(o);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* A live record in slot ref (class cls) is freed at epoch: its need leaves the class's
 * counters, the slot is stamped free, and it goes to the end of its class's ring. */
static int core_release(Core *c, uint64_t ref, int64_t cls, uint64_t epoch, PyObject *frees)
{
    const shm_seg *s = &c->s;
    uint64_t meta = shm_load_relaxed(shm_slot(s, ref) + SHM_S_META);
    shm_account(s, cls, -1, -(int64_t)shm_slot_need(meta & 0xFFFF, meta >> 32));
    shm_free_record(s, ref, epoch, SHM_FLAG_FREE);
    return give_free(frees, cls, ref);
}

/* Free slots an insert must leave in class cls (Engine.reserve): 1, the spare that
 * lets an update succeed in a full class, where a page holds 4 slots or more; else 0
 * (a spare would cost a quarter of a page or more). */
static inline Py_ssize_t shm_class_reserve(const shm_seg *s, int64_t cls)
{
    return shm_page_bytes(s) / s->classes[cls] >= 4 ? 1 : 0;
}

/* Apply a put whose arguments are checked: the class rule (insert: reserve + 1 free
 * slots and the count below capacity; update: one), then Engine.put's stores: the
 * feed horizon (if the reused slot's change record is newer), the record into a free
 * slot of its class (W1-W4), its access byte cleared, its bucket (release), the class
 * counters, the old slot freed or the count raised, then H_EPOCH (release).
 * Returns 1 applied, 0 refused by the rule (nothing changed), -1 with an exception. */
static int core_put(Core *c, const uint8_t *kb, uint64_t klen, const uint8_t *vb, uint64_t vlen, uint64_t expiry,
                    uint64_t epoch, PyObject *frees, uint64_t capacity)
{
    const shm_seg *s = &c->s;
    uint64_t pos = 0, old = 0, new_ref;
    uint64_t need = shm_slot_need(klen, vlen);
    int64_t cls = shm_class_for(s, need);
    if (cls < 0) {
        PyErr_SetString(PyExc_ValueError, "no class holds the record");
        return -1;
    }
    uint32_t h = shm_key_hash(kb, (size_t)klen);
    int found = core_find(c, kb, klen, h, &pos, &old);
    if (found < 0)
        return -1;
    uint64_t *count = s->w + SHM_H_COUNT;
    if (!found && shm_load_relaxed(count) >= capacity)
        return 0;
    Py_ssize_t nfree = free_count(frees, cls);
    if (nfree < 0)
        return -1;
    if (nfree < (found ? 1 : 1 + shm_class_reserve(s, cls)))
        return 0;
    int64_t old_cls = 0;
    if (found && check_ref(c, old, &old_cls) < 0)
        return -1;
    if (take_free(c, frees, cls, &new_ref) < 0)
        return -1;
    if (found && new_ref == old) {
        PyErr_SetString(PyExc_RuntimeError, "the free list holds a slot the index points to");
        return -1;
    }
    uint64_t *hz = s->w + SHM_H_FEED_HORIZON;
    uint64_t seq = shm_load_relaxed(shm_slot(s, new_ref) + SHM_S_SEQ);
    if (seq >= 2 && (seq - 1) >> 1 > shm_load_relaxed(hz))
        shm_store_relaxed(hz, (seq - 1) >> 1); /* ordered before the body by W2's fence */
    shm_write_record(s, new_ref, epoch, kb, klen, vb, vlen, epoch, expiry, 0);
    core_untouch(c, new_ref);
    shm_set_bucket(s, pos, h, new_ref);
    shm_account(s, cls, 1, (int64_t)need);
    int r = 0;
    if (found)
        r = core_release(c, old, old_cls, epoch, frees);
    else
        shm_store_relaxed(count, shm_load_relaxed(count) + 1);
    shm_publish_epoch(s, epoch);
    return r < 0 ? -1 : 1;
}

/* put(kb, vb, expiry, epoch, frees, capacity) -> epoch, or -1 (the class rule refuses:
 * a new key with no free slot beyond its class's reserve, or the store at capacity; an
 * update with no free slot; nothing done: the engine makes room and calls again).
 * The key and value lengths were checked by the caller (and are again here: a longer
 * one raises ValueError before anything is stored). */
static PyObject *Core_put(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(6);
    const shm_seg *s = &c->s;
    const uint8_t *kb, *vb;
    uint64_t klen, vlen, expiry, epoch, capacity;
    PyObject *frees = args[4];
    if (arg_bytes(args[0], &kb, &klen, s->key_size, "a key") < 0 ||
        arg_bytes(args[1], &vb, &vlen, s->value_size, "a value") < 0 || arg_u64(args[2], &expiry) < 0 ||
        arg_u64(args[3], &epoch) < 0 || check_frees(c, frees) < 0 || arg_u64(args[5], &capacity) < 0)
        return NULL;
    if (klen == 0) {
        PyErr_SetString(PyExc_ValueError, "a key must not be empty");
        return NULL;
    }
    int r = core_put(c, kb, klen, vb, vlen, expiry, epoch, frees, capacity);
    if (r < 0)
        return NULL;
    return r ? PyLong_FromUnsignedLongLong(epoch) : PyLong_FromLong(-1);
}

/* A msgpack bin (bin8/16/32) at p[*at] within n bytes: its bytes and length. */
static int mp_bin(const uint8_t *p, size_t n, size_t *at, const uint8_t **b, uint64_t *len)
{
    size_t i = *at, hl;
    if (i >= n)
        return 0;
    uint64_t l;
    if (p[i] == 0xc4 && i + 2 <= n) {
        l = p[i + 1];
        hl = 2;
    } else if (p[i] == 0xc5 && i + 3 <= n) {
        l = ((uint64_t)p[i + 1] << 8) | p[i + 2];
        hl = 3;
    } else if (p[i] == 0xc6 && i + 5 <= n) {
        l = ((uint64_t)p[i + 1] << 24) | ((uint64_t)p[i + 2] << 16) | ((uint64_t)p[i + 3] << 8) | p[i + 4];
        hl = 5;
    } else {
        return 0;
    }
    if (l > n - i - hl)
        return 0;
    *b = p + i + hl;
    *len = l;
    *at = i + hl + l;
    return 1;
}

/* put_frame(payload, epoch, frees, capacity) -> epoch, or 0: not applied here.
 *
 * The coordinator's fast path for the commonest request, a put without expiry, as the
 * client encodes it: exactly the msgpack bytes  0x95 0x01 WAIT BIN(key) BIN(value) 0x00
 * (WAIT: 0, 1, false or true; BIN: bin8/16/32) and nothing after them, a key of 1 to
 * key_size bytes, a value of at most value_size bytes, and room for the record by the
 * class rule (see put). It is then applied as put() does. Anything else - another op,
 * another encoding of the same op, a TTL, a bad length, no room, a malformed or
 * truncated frame - returns 0 having stored nothing, and the caller takes the general
 * path (msgspec's typed decoder and the engine's checks), which accepts a superset of
 * these bytes, makes room or raises the right error. So this path cannot accept
 * anything the general path would refuse, and reads only the payload's own bytes
 * (every length is checked against what is left of them before it is used). WAIT is
 * the payload's byte 2 (its low bit). */
static PyObject *Core_put_frame(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(4);
    const shm_seg *s = &c->s;
    uint64_t epoch, capacity;
    if (!PyBytes_Check(args[0]) || arg_u64(args[1], &epoch) < 0 || check_frees(c, args[2]) < 0 ||
        arg_u64(args[3], &capacity) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "put_frame(payload: bytes, epoch, frees, capacity)");
        return NULL;
    }
    const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(args[0]);
    size_t n = (size_t)PyBytes_GET_SIZE(args[0]);
    const uint8_t *kb, *vb;
    uint64_t klen, vlen;
    size_t at = 3;
    if (n < 3 + 2 + 2 + 1 || p[0] != 0x95 || p[1] != 0x01 || !(p[2] <= 1 || p[2] == 0xc2 || p[2] == 0xc3) ||
        !mp_bin(p, n, &at, &kb, &klen) || !mp_bin(p, n, &at, &vb, &vlen) || at + 1 != n || p[at] != 0x00 ||
        klen == 0 || klen > s->key_size || vlen > s->value_size)
        return PyLong_FromLong(0);
    int r = core_put(c, kb, klen, vb, vlen, 0, epoch, args[2], capacity);
    if (r < 0)
        return NULL;
    return r ? PyLong_FromUnsignedLongLong(epoch) : PyLong_FromLong(0);
}

/* unlink at epoch: Engine._unlink's stores (LAST_DELETE_EPOCH before the bucket goes,
 * ordered by remove_bucket's release fence), then the slot freed (its class's counters
 * lowered, the slot to its class's ring), the count lowered. */
static int core_unlink(Core *c, uint64_t pos, uint64_t ref, int64_t cls, uint64_t epoch, PyObject *frees)
{
    const shm_seg *s = &c->s;
    shm_store_relaxed(s->w + SHM_H_LAST_DELETE_EPOCH, epoch);
    shm_remove_bucket(s, pos);
    uint64_t *count = s->w + SHM_H_COUNT;
    shm_store_relaxed(count, shm_load_relaxed(count) - 1);
    return core_release(c, ref, cls, epoch, frees);
}

/* delete(kb, epoch, frees) -> bool: whether the key existed (if not, nothing is stored
 * and the epoch is not used). */
static PyObject *Core_delete(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(3);
    const uint8_t *kb;
    uint64_t klen, epoch, pos = 0, ref = 0;
    int64_t cls;
    if (arg_bytes(args[0], &kb, &klen, c->s.key_size, "a key") < 0 || arg_u64(args[1], &epoch) < 0 ||
        check_frees(c, args[2]) < 0)
        return NULL;
    int found = core_find(c, kb, klen, shm_key_hash(kb, (size_t)klen), &pos, &ref);
    if (found < 0)
        return NULL;
    if (!found)
        Py_RETURN_FALSE;
    if (check_ref(c, ref, &cls) < 0)
        return NULL;
    int r = core_unlink(c, pos, ref, cls, epoch, args[2]);
    shm_publish_epoch(&c->s, epoch);
    if (r < 0)
        return NULL;
    Py_RETURN_TRUE;
}

/* unlink(pos, ref, epoch, frees): Engine._unlink (no epoch published). */
static PyObject *Core_unlink(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(4);
    uint64_t pos, ref, epoch;
    int64_t cls;
    if (arg_u64(args[0], &pos) < 0 || arg_ref(c, args[1], &ref, &cls) < 0 || arg_u64(args[2], &epoch) < 0 ||
        check_frees(c, args[3]) < 0)
        return NULL;
    if (pos > c->s.mask) {
        PyErr_SetString(PyExc_IndexError, "bucket position out of range");
        return NULL;
    }
    if (core_unlink(c, pos, ref, cls, epoch, args[3]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* class_of(ref) -> the class of the page holding ref, -1 for a free page. */
static PyObject *Core_class_of(Core *c, PyObject *o)
{
    if (!core_open(c))
        return NULL;
    uint64_t ref;
    if (arg_u64(o, &ref) < 0)
        return NULL;
    if (ref >= c->s.nslots) {
        PyErr_Format(PyExc_IndexError, "slot reference %llu out of range", (unsigned long long)ref);
        return NULL;
    }
    return PyLong_FromLongLong(shm_class_of(&c->s, ref));
}

static PyMethodDef Core_methods[] = {
    {"find", (PyCFunction)(void (*)(void))Core_find, METH_FASTCALL, "find(kb, h) -> (pos, ref); ref -1: missing"},
    {"write_record", (PyCFunction)(void (*)(void))Core_write_record, METH_FASTCALL,
     "write_record(ref, epoch, kb, vb, version, expiry, flags): W1-W4 of protocol.h (no class accounting)"},
    {"free_record", (PyCFunction)(void (*)(void))Core_free_record, METH_FASTCALL,
     "free_record(ref, epoch, flags=FLAG_FREE) (no class accounting)"},
    {"page_assign", (PyCFunction)(void (*)(void))Core_page_assign, METH_FASTCALL,
     "page_assign(page, cls, epoch): the page's entry, then its new slots stamped free (no accounting)"},
    {"set_bucket", (PyCFunction)(void (*)(void))Core_set_bucket, METH_FASTCALL, "set_bucket(pos, h, ref) (release)"},
    {"remove_bucket", (PyCFunction)Core_remove_bucket, METH_O, "remove_bucket(pos): backward shift, odd generation"},
    {"publish_epoch", (PyCFunction)Core_publish_epoch, METH_O, "publish_epoch(epoch) (release)"},
    {"batch_begin", (PyCFunction)Core_batch_begin, METH_NOARGS, "H_BATCH_SEQ odd, release fence"},
    {"batch_end", (PyCFunction)Core_batch_end, METH_NOARGS, "H_BATCH_SEQ even (release)"},
    {"put", (PyCFunction)(void (*)(void))Core_put, METH_FASTCALL,
     "put(kb, vb, expiry, epoch, frees, capacity) -> epoch, or -1: the class rule refuses (nothing done)"},
    {"delete", (PyCFunction)(void (*)(void))Core_delete, METH_FASTCALL, "delete(kb, epoch, frees) -> existed"},
    {"put_frame", (PyCFunction)(void (*)(void))Core_put_frame, METH_FASTCALL,
     "put_frame(payload, epoch, frees, capacity) -> epoch, or 0: not applied here (take the general path)"},
    {"unlink", (PyCFunction)(void (*)(void))Core_unlink, METH_FASTCALL, "unlink(pos, ref, epoch, frees)"},
    {"class_of", (PyCFunction)Core_class_of, METH_O, "class_of(ref) -> class of its page (-1: free page)"},
    {"set_access", (PyCFunction)Core_set_access, METH_O,
     "set_access(buffer or None): the access segment whose byte ref >> 2 every put clears"},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "release the mapping's buffer"},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmstore._cwrite.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Core(mm, sizes): the coordinator's slot, page and index stores on a writable mapping; sizes is "
              "Segment.sizes() (slot0, slot_words, nrefs, idx0, mask, key_size, value_size, size, pt0, ref_shift).",
    .tp_new = Core_new,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
};

/* ---------------------------------------------------------------------------------- */
/* The ring                                                                           */

/* A writable buffer of u64 words covering [0, need) bytes; released by the caller. */
static int ring_buffer(PyObject *o, Py_buffer *b, uint64_t need)
{
    if (PyObject_GetBuffer(o, b, PyBUF_WRITABLE) < 0)
        return -1;
    if (((uintptr_t)b->buf & 7) || (uint64_t)b->len < need) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_ValueError, "the channel buffer does not cover the block");
        return -1;
    }
    return 0;
}

/* ring_publish(mm, w, ring_ofs, ring_size, head, payload) -> new head, or -1 when the
 * ring has no room for it yet (nothing written).
 *
 * The client's side: the frame ([len u32 | 0 u32 | payload | pad to 8], after a padding
 * mark if it does not fit before the ring's end) with relaxed word stores, then HEAD
 * with a release store: the coordinator's acquire load of HEAD (ring_take) sees every
 * byte of the frames it covers. TAIL is loaded with acquire (the coordinator stores it
 * with release after its copies), so space is reused only after the coordinator's
 * copies out of it. The caller handles a
 * frame that overlaps its own padding (publishes the padding alone first) and frames
 * that can never fit. */
static PyObject *mod_ring_publish(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "ring_publish(mm, w, ring_ofs, ring_size, head, payload)");
        return NULL;
    }
    uint64_t w, ring_ofs, R, head;
    if (arg_u64(args[1], &w) < 0 || arg_u64(args[2], &ring_ofs) < 0 || arg_u64(args[3], &R) < 0 ||
        arg_u64(args[4], &head) < 0)
        return NULL;
    if (!PyBytes_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "payload must be bytes");
        return NULL;
    }
    const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(args[5]);
    uint64_t n = (uint64_t)PyBytes_GET_SIZE(args[5]);
    uint64_t need = 8 + ((n + 7) & ~(uint64_t)7);
    if ((ring_ofs & 7) || (R & 7) || R < 16 || need > R || n >= CH_PAD_MARK || (head & 7)) {
        PyErr_SetString(PyExc_ValueError, "ring_publish: bad ring geometry or frame size");
        return NULL;
    }
    Py_buffer b;
    if (ring_buffer(args[0], &b, ring_ofs + R > 8 * (w + CH_C_TAIL + 1) ? ring_ofs + R : 8 * (w + CH_C_TAIL + 1)) < 0)
        return NULL;
    uint64_t *q = (uint64_t *)b.buf;
    uint64_t tail = shm_load_acquire(q + w + CH_C_TAIL);
    uint64_t off = head % R;
    uint64_t pad = off + need > R ? R - off : 0;
    if (pad && pad + need > R) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "ring_publish: the frame overlaps its padding (publish the padding first)");
        return NULL;
    }
    /* As _wait_room in Python ints: a TAIL past HEAD (a refused client's, set to a
     * hostile HEAD) leaves room; the coordinator has closed that channel anyway. */
    if ((int64_t)(head + pad + need - tail) > (int64_t)R) {
        PyBuffer_Release(&b);
        return PyLong_FromLong(-1);
    }
    uint64_t *ring = q + ring_ofs / 8;
    if (pad) {
        uint64_t mark = shm_load_relaxed(ring + off / 8);
        mark = (mark & ~(uint64_t)0xFFFFFFFFu) | CH_PAD_MARK;
        shm_store_relaxed(ring + off / 8, mark);
        off = 0;
    }
    shm_store_relaxed(ring + off / 8, n); /* len u32, then the zero word */
    shm_copy_in(ring, off + 8, p, n);
    head += pad + need;
    shm_store_release(q + w + CH_C_HEAD, head);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(head);
}

/* ring_take(mm, w, ring_ofs, ring_size, tail) -> (frames, tail, bad)
 *
 * The coordinator's side: HEAD with an acquire load (pairs with ring_publish's release
 * store, or the pure-Python client's store after fence_release), then the same walk and
 * checks as _server._drain_client: 0 <= HEAD - TAIL <= R, both 8-aligned; a padding mark
 * only past offset 0 and only where HEAD covers the rest of the ring; a frame's second
 * word 0, its length within the ring from its offset and within HEAD. Frames are copied
 * out (relaxed word loads) into new bytes objects. bad: None, or what was impossible
 * (frames holds the whole frames before it; tail is where the walk stopped). TAIL is
 * NOT stored: the caller stores it (release) once it holds the copies. */
static PyObject *mod_ring_take(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "ring_take(mm, w, ring_ofs, ring_size, tail)");
        return NULL;
    }
    uint64_t w, ring_ofs, R, tail;
    if (arg_u64(args[1], &w) < 0 || arg_u64(args[2], &ring_ofs) < 0 || arg_u64(args[3], &R) < 0 ||
        arg_u64(args[4], &tail) < 0)
        return NULL;
    if ((ring_ofs & 7) || (R & 7) || R < 16) {
        PyErr_SetString(PyExc_ValueError, "ring_take: bad ring geometry");
        return NULL;
    }
    Py_buffer b;
    uint64_t need = ring_ofs + R > 8 * (w + CH_C_TAIL + 1) ? ring_ofs + R : 8 * (w + CH_C_TAIL + 1);
    if (ring_buffer(args[0], &b, need) < 0)
        return NULL;
    const uint64_t *q = (const uint64_t *)b.buf;
    const uint64_t *ring = q + ring_ofs / 8;
    uint64_t head = shm_load_acquire(q + w + CH_C_HEAD);
    PyObject *frames = PyList_New(0);
    PyObject *bad = NULL;
    char msg[160];
    if (!frames)
        goto fail;
    if (head < tail || head - tail > R || (tail % R) & 7) {
        snprintf(msg, sizeof msg, "HEAD=%llu TAIL=%llu (ring of %llu bytes)", (unsigned long long)head,
                 (unsigned long long)tail, (unsigned long long)R);
        goto refuse;
    }
    while (tail < head) {
        uint64_t off = tail % R; /* 8-aligned: tail starts aligned and moves by multiples of 8 */
        uint64_t word = off + 8 <= R ? shm_load_relaxed(ring + off / 8) : CH_PAD_MARK;
        uint64_t n = word & 0xFFFFFFFFu, zero = word >> 32;
        if (off + 8 > R)
            zero = 0;
        if (n == CH_PAD_MARK) {
            if (off == 0 || tail + R - off > head) {
                snprintf(msg, sizeof msg, "a padding mark at ring offset %llu", (unsigned long long)off);
                goto refuse;
            }
            tail += R - off;
            continue;
        }
        uint64_t fneed = 8 + ((n + 7) & ~(uint64_t)7);
        if (zero || n > R - off - 8 || tail + fneed > head) {
            snprintf(msg, sizeof msg, "a frame of %llu bytes at ring offset %llu", (unsigned long long)n,
                     (unsigned long long)off);
            goto refuse;
        }
        PyObject *f = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
        if (!f)
            goto fail;
        shm_copy_out((uint8_t *)PyBytes_AS_STRING(f), ring, off + 8, n);
        if (PyList_Append(frames, f) < 0) {
            Py_DECREF(f);
            goto fail;
        }
        Py_DECREF(f);
        tail += fneed;
    }
    PyBuffer_Release(&b);
    return Py_BuildValue("(NKO)", frames, (unsigned long long)tail, Py_None);
refuse:
    PyBuffer_Release(&b);
    bad = PyUnicode_FromString(msg);
    if (!bad) {
        Py_DECREF(frames);
        return NULL;
    }
    return Py_BuildValue("(NKN)", frames, (unsigned long long)tail, bad);
fail:
    PyBuffer_Release(&b);
    Py_XDECREF(frames);
    return NULL;
}

/* store_release(mm, word, value) / load_acquire(mm, word): one control word. */
static PyObject *mod_store_release(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t i, v;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "store_release(mm, word, value)");
        return NULL;
    }
    if (arg_u64(args[1], &i) < 0 || arg_u64(args[2], &v) < 0)
        return NULL;
    Py_buffer b;
    if (ring_buffer(args[0], &b, 8 * (i + 1)) < 0)
        return NULL;
    shm_store_release((uint64_t *)b.buf + i, v);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* reply_publish(mm, w, reply_ofs, reply_size, blob, done): the reply bytes (relaxed
 * word stores), REPLY_LEN, then DONE with a release store: a client that loads DONE
 * with acquire (after its spin or its semaphore) sees the reply it vouches for. */
static PyObject *mod_reply_publish(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "reply_publish(mm, w, reply_ofs, reply_size, blob, done)");
        return NULL;
    }
    uint64_t w, ofs, size, done;
    if (arg_u64(args[1], &w) < 0 || arg_u64(args[2], &ofs) < 0 || arg_u64(args[3], &size) < 0 ||
        arg_u64(args[5], &done) < 0)
        return NULL;
    PyObject *blob = args[4];
    if (blob != Py_None && !PyBytes_Check(blob)) {
        PyErr_SetString(PyExc_TypeError, "blob must be bytes or None");
        return NULL;
    }
    uint64_t n = blob == Py_None ? 0 : (uint64_t)PyBytes_GET_SIZE(blob);
    if (n > size || (ofs & 7)) {
        PyErr_SetString(PyExc_ValueError, "reply_publish: the reply does not fit the reply area");
        return NULL;
    }
    Py_buffer b;
    uint64_t need = ofs + size > 8 * (w + CH_C_REPLY_LEN + 1) ? ofs + size : 8 * (w + CH_C_REPLY_LEN + 1);
    if (ring_buffer(args[0], &b, need) < 0)
        return NULL;
    uint64_t *q = (uint64_t *)b.buf;
    if (blob != Py_None) {
        shm_copy_in(q, ofs, (const uint8_t *)PyBytes_AS_STRING(blob), n);
        shm_store_relaxed(q + w + CH_C_REPLY_LEN, n);
    }
    shm_store_release(q + w + CH_C_DONE, done);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* -- the doorbell: posted only while the coordinator may sleep ------------------------ *
 *
 * A Dekker pair, one side each, with sequentially consistent fences (the only ordering
 * that forbids both sides missing the other's store):
 *
 *   client:       HEAD = h (release, ring_publish); fence(seq_cst); load SLEEPING:
 *                 post the doorbell if it is nonzero and not the value this client
 *                 already posted for (or if ELIDE is 0: a coordinator that does not
 *                 follow this, e.g. the pure-Python one, gets every post)
 *   coordinator:  SLEEPING = s (a new nonzero value per sleep); fence(seq_cst); load
 *                 every active HEAD: sleep on the doorbell only if none moved; after
 *                 waking SLEEPING = 0; fence(seq_cst); then drain
 *
 * Either the client sees SLEEPING = s and posts, or the coordinator sees the new HEAD
 * and does not sleep. A client that sees the s it already posted for skips the post:
 * that post wakes the coordinator, and the coordinator's drain after it sees this HEAD,
 * because the client's load of SLEEPING came before the coordinator's store of 0 (it
 * read s), and the two fences forbid both the client's load missing that store and the
 * coordinator's later load of HEAD missing the client's store. So a pipelining client
 * posts once per sleep of the coordinator, not once per frame. The pure-Python client
 * cannot issue the fence, so it always posts.
 */

static double mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* must_ring(mm, posted) -> 0 (no post needed), or the value to post for (remember it
 * as `posted`; -1: the coordinator wants every post). The client's side, right after
 * ring_publish. */
static PyObject *mod_must_ring(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "must_ring(mm, posted)");
        return NULL;
    }
    long long posted = PyLong_AsLongLong(args[1]);
    if (posted == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer b;
    if (ring_buffer(args[0], &b, 8 * (CH_W_ELIDE + 1)) < 0)
        return NULL;
    long long ring = shm_must_ring((const uint64_t *)b.buf, posted);
    PyBuffer_Release(&b);
    return PyLong_FromLongLong(ring);
}

/* set_sleeping(mm, s): the coordinator's SLEEPING word, then a seq_cst fence. */
static PyObject *mod_set_sleeping(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t v;
    if (nargs != 2 || arg_u64(args[1], &v) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "set_sleeping(mm, flag)");
        return NULL;
    }
    Py_buffer b;
    if (ring_buffer(args[0], &b, 8 * (CH_W_ELIDE + 1)) < 0)
        return NULL;
    shm_set_sleeping((uint64_t *)b.buf, v);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* wait_pending(mm, words, spin_ns) -> bool: does a ring of the client blocks whose first
 * control words are `words` hold frames (HEAD != TAIL, HEAD loaded with acquire)? Polls
 * for up to spin_ns (0: one look), without the GIL. */
static PyObject *mod_wait_pending(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t spin;
    if (nargs != 3 || !PyList_Check(args[1]) || arg_u64(args[2], &spin) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "wait_pending(mm, words: list, spin_ns)");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(args[1]);
    uint64_t ws[64], *wp = ws;
    if (n > 64 && !(wp = PyMem_Malloc(sizeof(uint64_t) * (size_t)n)))
        return PyErr_NoMemory();
    uint64_t top = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        if (arg_u64(PyList_GET_ITEM(args[1], j), &wp[j]) < 0)
            goto fail;
        if (wp[j] > top)
            top = wp[j];
    }
    Py_buffer b;
    if (ring_buffer(args[0], &b, 8 * (top + CH_C_TAIL + 1)) < 0)
        goto fail;
    const uint64_t *q = (const uint64_t *)b.buf;
    int found = 0;
    Py_BEGIN_ALLOW_THREADS
    double end = spin ? mono_ns() + (double)spin : 0;
    for (unsigned k = 0;; k++) {
        for (Py_ssize_t j = 0; j < n && !found; j++)
            found = shm_load_acquire(q + wp[j] + CH_C_HEAD) != shm_load_relaxed(q + wp[j] + CH_C_TAIL);
        if (found || !spin || ((k & 7) == 7 && mono_ns() >= end))
            break;
        /* Give the CPU to a runnable process (a client) between looks: on a host with
         * fewer cores than spinners, a spin that keeps its core starves the very
         * process it waits for. */
        sched_yield();
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (wp != ws)
        PyMem_Free(wp);
    return PyBool_FromLong(found);
fail:
    if (wp != ws)
        PyMem_Free(wp);
    return NULL;
}

static PyObject *mod_key_hash(PyObject *m, PyObject *key)
{
    if (!PyBytes_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "key_hash takes bytes");
        return NULL;
    }
    return PyLong_FromUnsignedLong(shm_key_hash((const uint8_t *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key)));
}

static PyMethodDef module_methods[] = {
    {"ring_publish", (PyCFunction)(void (*)(void))mod_ring_publish, METH_FASTCALL,
     "ring_publish(mm, w, ring_ofs, ring_size, head, payload) -> new head, or -1: no room yet"},
    {"ring_take", (PyCFunction)(void (*)(void))mod_ring_take, METH_FASTCALL,
     "ring_take(mm, w, ring_ofs, ring_size, tail) -> (frames, tail, bad)"},
    {"store_release", (PyCFunction)(void (*)(void))mod_store_release, METH_FASTCALL,
     "store_release(mm, word, value)"},
    {"reply_publish", (PyCFunction)(void (*)(void))mod_reply_publish, METH_FASTCALL,
     "reply_publish(mm, w, reply_ofs, reply_size, blob, done)"},
    {"key_hash", (PyCFunction)mod_key_hash, METH_O, "key_hash(kb): shmstore._layout.key_hash in C"},
    {"must_ring", (PyCFunction)(void (*)(void))mod_must_ring, METH_FASTCALL,
     "must_ring(mm, posted) -> 0, or the value to post for (-1: always)"},
    {"set_sleeping", (PyCFunction)(void (*)(void))mod_set_sleeping, METH_FASTCALL,
     "set_sleeping(mm, s): the coordinator may sleep on the doorbell (s: nonzero, new per sleep) or not (0); seq_cst fence"},
    {"wait_pending", (PyCFunction)(void (*)(void))mod_wait_pending, METH_FASTCALL,
     "wait_pending(mm, words, spin_ns) -> bool: a ring holds frames (polled up to spin_ns)"},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "shmstore._cwrite",
    "The compiled write path: the coordinator's slot and index stores, the ring and reply words.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__cwrite(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    str_pop = PyUnicode_InternFromString("pop");
    str_append = PyUnicode_InternFromString("append");
    if (!str_pop || !str_append)
        return NULL;
    PyObject *mod = PyModule_Create(&moduledef);
    if (!mod)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(mod, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(mod);
        return NULL;
    }
    PyModule_AddIntConstant(mod, "H_FEED_HORIZON", SHM_H_FEED_HORIZON);
    PyModule_AddIntConstant(mod, "H_CLASSES", SHM_H_CLASSES);
    PyModule_AddIntConstant(mod, "C_RECORDS", SHM_C_RECORDS);
    PyModule_AddIntConstant(mod, "C_ASKED", SHM_C_ASKED);
    PyModule_AddIntConstant(mod, "FLAG_FREE", SHM_FLAG_FREE);
    PyModule_AddIntConstant(mod, "FLAG_EVICTED", SHM_FLAG_EVICTED);
    PyModule_AddIntConstant(mod, "C_HEAD", CH_C_HEAD);
    PyModule_AddIntConstant(mod, "C_TAIL", CH_C_TAIL);
    PyModule_AddIntConstant(mod, "C_DONE", CH_C_DONE);
    PyModule_AddIntConstant(mod, "C_REPLY_LEN", CH_C_REPLY_LEN);
    PyModule_AddIntConstant(mod, "CH_W_SLEEPING", CH_W_SLEEPING);
    PyModule_AddIntConstant(mod, "CH_W_ELIDE", CH_W_ELIDE);
    return mod;
}
