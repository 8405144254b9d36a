/*
 * shmstore._native: the compiled read path.
 *
 * The protocol and the argument for its memory ordering are in protocol.h; this file
 * binds it to Python. Two types:
 *
 *   Mapping  one process's view of a data segment (one per shmstore._segment.Segment):
 *            lookup(kb), read_slot(ref, wait), changed_keys(bound) (a scan of the
 *            assigned pages through the page table), the per-mapping retry counter and the
 *            bounded backoff (spin, yield, sleep; every stall_timeout seconds it calls
 *            on_stall(waited), which raises to give up: the coordinator is dead, or
 *            alive and making no progress).
 *   Reader   one handle's get(key, default) and get_many(keys, default), with the
 *            handle's read cache (the contract is _segment.make_readers'): a cached
 *            record is answered only after four acquire loads show the store READY,
 *            its bucket still pointing at its slot, its slot still carrying the stamp
 *            it was read under and its page still carrying the entry it had; a cached
 *            miss while the index generation and the empty bucket that ended the walk
 *            are unchanged. With an access segment (LRU eviction) every hit sets the
 *            slot's access byte.
 *
 * Every object that dereferences the mapping holds its own buffer export of the mmap,
 * so the mapping cannot be unmapped under it (mmap.close() refuses while exported;
 * shmstore's Segment.close then leaves the unmap to the collector).
 *
 * Values are copied into a new bytes object inside the validated window (relaxed word
 * loads, protocol.h) and only then handed to the decoder: msgspec never sees a view of
 * a live slot. Small copies do not release the GIL; only the backoff's sleeps do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>
#include <time.h>

#include "protocol.h"

#define PUBLISH_MASK 4095
/* get_many fetches the slot lines of the key this many keys ahead of the one it reads */
#define PREFETCH_AHEAD 8

/* ---------------------------------------------------------------------------------- */

/* The test clock (shmstore._ttl): a callable returning ns, or NULL for the wall clock. */
static PyObject *clock_hook = NULL;

static uint64_t now_ns(void)
{
    if (clock_hook) {
        PyObject *r = PyObject_CallNoArgs(clock_hook);
        if (r) {
            unsigned long long v = PyLong_AsUnsignedLongLong(r);
            Py_DECREF(r);
            if (!(v == (unsigned long long)-1 && PyErr_Occurred()))
                return v;
        }
        PyErr_Clear(); /* a broken test clock: the wall clock */
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static PyObject *raise_damaged(const char *what)
{
    PyObject *mod = PyImport_ImportModule("shmstore._errors");
    if (!mod)
        return NULL;
    PyObject *cls = PyObject_GetAttrString(mod, "IncompatibleStoreError");
    Py_DECREF(mod);
    if (!cls)
        return NULL;
    PyErr_Format(cls, "the store's segment is damaged (%s); destroy it and recover from the data directory", what);
    Py_DECREF(cls);
    return NULL;
}

/* Take a buffer export of the mapping and check it covers the layout: sizes is
 * shmstore._segment.Segment.sizes() (slot0, slot_words, nrefs, idx0, mask, key_size,
 * value_size, size, pt0, ref_shift); the class table is read from the header. */
static int export_segment(PyObject *mm, Py_buffer *buf, shm_seg *s, PyObject *sizes)
{
    unsigned long long v[10];
    if (!PyArg_ParseTuple(sizes, "KKKKKKKKKK", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9]))
        return -1;
    if (PyObject_GetBuffer(mm, buf, PyBUF_SIMPLE) < 0)
        return -1;
    s->slot0 = v[0];
    s->slot_words = v[1];
    s->nslots = v[2];
    s->idx0 = v[3];
    s->mask = v[4];
    s->key_size = v[5];
    s->value_size = v[6];
    s->pt0 = v[8];
    s->ref_shift = v[9];
    if (!shm_seg_fits(s, buf->buf, (uint64_t)buf->len, v[7])) {
        PyBuffer_Release(buf);
        PyErr_SetString(PyExc_ValueError, "segment sizes do not fit the mapping");
        return -1;
    }
    s->w = (uint64_t *)buf->buf;
    if (!shm_seg_load_classes(s)) {
        s->w = NULL;
        PyBuffer_Release(buf);
        PyErr_SetString(PyExc_ValueError, "the segment's class table is not one a layout makes");
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------- */
/* Mapping                                                                            */

typedef struct {
    PyObject_HEAD
    Py_buffer buf;
    int open;
    shm_seg s;
    unsigned long long retries;
    double stall_timeout;
    PyObject *on_stall;
} Mapping;

static PyTypeObject MappingType;

typedef struct {
    int n;
    double started, deadline;
} backoff_t;

/* Wait a little before reading again; -1 with an exception set to give up. */
static int backoff_wait(Mapping *m, backoff_t *b)
{
    int n = ++b->n;
    if (n < 64) {
        cpu_relax();
        return 0;
    }
    if (n == 64) {
        b->started = monotonic();
        b->deadline = b->started + m->stall_timeout;
    }
    if (n < 256) {
        sched_yield();
        return 0;
    }
    double pause = 0.00001 * (n - 255);
    if (pause > 0.001)
        pause = 0.001;
    struct timespec ts = {0, (long)(pause * 1e9)};
    Py_BEGIN_ALLOW_THREADS nanosleep(&ts, NULL);
    Py_END_ALLOW_THREADS double now = monotonic();
    if (now > b->deadline) {
        PyObject *r = PyObject_CallFunction(m->on_stall, "d", now - b->started);
        if (!r)
            return -1;
        Py_DECREF(r);
        b->deadline = monotonic() + m->stall_timeout;
    }
    return 0;
}

enum { A_MISS = SHM_MISS, A_FOUND = SHM_FOUND, A_RETRY = SHM_RETRY, A_DAMAGED = SHM_DAMAGED, A_ERROR = SHM_NOMEM,
       A_EXPIRED = 16 };

/* shm_attempt's dst for a value of its own: a new bytes object in *ctx. */
static uint8_t *dst_bytes(void *ctx, uint64_t vlen)
{
    PyObject **v = (PyObject **)ctx;
    *v = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)vlen);
    return *v ? (uint8_t *)PyBytes_AS_STRING(*v) : NULL;
}

/* One attempt at a key (protocol.h's shm_attempt). FOUND: *value (if value) is a new
 * bytes object and rec/wk describe the record; MISS: wk is the empty bucket that ended
 * a validated walk; EXPIRED: validated, but past its expiry; RETRY: something moved
 * under us (nothing is returned). */
static int attempt(const shm_seg *s, const uint8_t *kb, size_t n, uint32_t h, PyObject **value, shm_rec *rec,
                   shm_walk *wk)
{
    PyObject *v = NULL;
    int r = shm_attempt(s, kb, n, h, value ? dst_bytes : NULL, &v, rec, wk);
    if (r == SHM_NOMEM)
        return A_ERROR; /* MemoryError is set */
    if (r == SHM_FOUND && rec->expiry && rec->expiry <= now_ns())
        r = A_EXPIRED;
    if (r == SHM_FOUND)
        *value = v;
    else
        Py_XDECREF(v);
    return r;
}

/* The full lookup: attempts with backoff until one is conclusive. */
static int lookup_full(Mapping *m, const shm_seg *s, const uint8_t *kb, size_t n, PyObject **value, shm_rec *rec,
                       shm_walk *wk)
{
    uint32_t h = shm_key_hash(kb, n);
    backoff_t b = {0, 0, 0};
    for (;;) {
        int r = attempt(s, kb, n, h, value, rec, wk);
        if (r != A_RETRY)
            return r;
        m->retries++;
        if (backoff_wait(m, &b) < 0)
            return A_ERROR;
    }
}

static int key_bytes(PyObject *key, const uint8_t **kb, Py_ssize_t *n)
{
    if (PyBytes_Check(key)) {
        *kb = (const uint8_t *)PyBytes_AS_STRING(key);
        *n = PyBytes_GET_SIZE(key);
        return 0;
    }
    PyErr_SetString(PyExc_TypeError, "a key must be bytes here");
    return -1;
}

static PyObject *Mapping_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PyObject *mm, *sizes, *on_stall;
    if (!PyArg_ParseTuple(args, "OO!O", &mm, &PyTuple_Type, &sizes, &on_stall))
        return NULL;
    Mapping *m = (Mapping *)type->tp_alloc(type, 0);
    if (!m)
        return NULL;
    if (export_segment(mm, &m->buf, &m->s, sizes) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    m->open = 1;
    m->stall_timeout = 1.0;
    Py_INCREF(on_stall);
    m->on_stall = on_stall;
    return (PyObject *)m;
}

static int Mapping_traverse(Mapping *m, visitproc visit, void *arg)
{
    Py_VISIT(m->on_stall);
    return 0;
}

static int Mapping_clear(Mapping *m)
{
    Py_CLEAR(m->on_stall);
    return 0;
}

static void Mapping_release(Mapping *m)
{
    if (m->open) {
        m->open = 0;
        m->s.w = NULL;
        PyBuffer_Release(&m->buf);
    }
}

static void Mapping_dealloc(Mapping *m)
{
    PyObject_GC_UnTrack(m);
    Mapping_release(m);
    Mapping_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static int mapping_open(Mapping *m)
{
    if (!m->open) {
        PyErr_SetString(PyExc_ValueError, "the mapping is closed");
        return 0;
    }
    return 1;
}

static PyObject *Mapping_close(Mapping *m, PyObject *unused)
{
    Mapping_release(m);
    Py_RETURN_NONE;
}

/* lookup(kb) -> (slot, seq, version, value, expiry) or None: the full protocol. */
static PyObject *Mapping_lookup(Mapping *m, PyObject *key)
{
    const uint8_t *kb;
    Py_ssize_t n;
    if (!mapping_open(m) || key_bytes(key, &kb, &n) < 0)
        return NULL;
    if (n < 1 || (uint64_t)n > m->s.key_size)
        Py_RETURN_NONE;
    PyObject *value = NULL;
    shm_rec rec;
    shm_walk wk;
    int r = lookup_full(m, &m->s, kb, (size_t)n, &value, &rec, &wk);
    if (r == A_ERROR)
        return NULL;
    if (r == A_DAMAGED)
        return raise_damaged("an index bucket points past the slots");
    if (r != A_FOUND)
        Py_RETURN_NONE;
    uint64_t slot = (wk.bucket & 0xFFFFFFFFu) - 1;
    return Py_BuildValue("(KKKNK)", (unsigned long long)slot, (unsigned long long)rec.seq,
                         (unsigned long long)rec.version, value, (unsigned long long)rec.expiry);
}

/* read_slot(ref, wait=True) -> (seq, version, expiry, flags, key, value) or None.
 *
 * None: the ref is out of range, its page is free (or being moved, or its entry names
 * no class), or the ref is not the start of a slot of its page's class (a scan's ref
 * from an older page table), or (wait=False) the slot is being written. Otherwise one
 * copy validated by the slot's stamp and its page's entry. */
static PyObject *Mapping_read_slot(Mapping *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "read_slot(ref, wait=True)");
        return NULL;
    }
    if (!mapping_open(m))
        return NULL;
    unsigned long long ref = PyLong_AsUnsignedLongLong(args[0]);
    if (ref == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int wait = nargs < 2 ? 1 : PyObject_IsTrue(args[1]);
    if (wait < 0)
        return NULL;
    const shm_seg *s = &m->s;
    if (ref >= s->nslots)
        Py_RETURN_NONE; /* no slot (Segment.read_slot's contract, both cores) */
    uint64_t page = ref >> s->ref_shift;
    backoff_t b = {0, 0, 0};
    for (;;) {
        uint64_t pte1 = shm_load_acquire(shm_pte(s, page));
        int64_t cls = shm_pte_class(s, pte1);
        if (!pte1 || cls < 0 || !shm_ref_is_slot(s, ref, cls))
            Py_RETURN_NONE;
        shm_rec rec;
        PyObject *k = NULL, *v = NULL;
        uint8_t kbuf[64];
        uint8_t *kb = s->key_size <= sizeof kbuf ? kbuf : PyMem_Malloc(s->key_size);
        if (!kb)
            return PyErr_NoMemory();
        int r = shm_read_slot(s, ref, pte1, kb, dst_bytes, &v, &rec);
        if (r > 0)
            k = PyBytes_FromStringAndSize((const char *)kb, (Py_ssize_t)rec.klen);
        if (kb != kbuf)
            PyMem_Free(kb);
        if (r < 0)
            return NULL;
        if (r > 0) {
            if (!k) {
                Py_DECREF(v);
                return NULL;
            }
            return Py_BuildValue("(KKKKNN)", (unsigned long long)rec.seq, (unsigned long long)rec.version,
                                 (unsigned long long)rec.expiry, (unsigned long long)((rec.meta >> 16) & 0xFFFF), k,
                                 v);
        }
        Py_XDECREF(v);
        if (!wait && (shm_load_relaxed(shm_slot(s, ref) + SHM_S_SEQ) & 1) &&
            shm_load_relaxed(shm_pte(s, page)) == pte1)
            Py_RETURN_NONE;
        m->retries++;
        if (backoff_wait(m, &b) < 0)
            return NULL;
    }
}

/* changed_keys(bound) -> list of the keys of every slot whose stamp exceeds bound, each
 * read under the slot's seqlock and its page's entry. The change feed's scan over the
 * assigned pages (the page table says which, and each page's class its slots): one
 * acquire load per page and per slot looked at. A page whose entry changed during its
 * scan (a move) is scanned again with its new entry; a slot being written is waited
 * for with the bounded backoff. Keys may repeat. */
static PyObject *Mapping_changed_keys(Mapping *m, PyObject *arg)
{
    if (!mapping_open(m))
        return NULL;
    unsigned long long bound = PyLong_AsUnsignedLongLong(arg);
    if (bound == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    const shm_seg *s = &m->s;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    uint8_t kbuf[4096];
    uint8_t *kb = s->key_size <= sizeof kbuf ? kbuf : PyMem_Malloc(s->key_size);
    if (!kb) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    for (uint64_t page = 0; page < s->npages; page++) {
        backoff_t b = {0, 0, 0};
    rescan:;
        uint64_t pte1 = shm_load_acquire(shm_pte(s, page));
        if (!pte1)
            continue;
        int64_t cls = shm_pte_class(s, pte1);
        if (cls < 0) {
            raise_damaged("a page-table entry names no class");
            goto fail;
        }
        uint64_t size = s->classes[cls], per = shm_page_bytes(s) / size, step = size / SHM_SLOT_UNIT;
        uint64_t ref = shm_page_ref(s, page);
        for (uint64_t i = 0; i < per; i++, ref += step) {
            if (shm_load_relaxed(shm_slot(s, ref) + SHM_S_SEQ) <= bound)
                continue;
            for (;;) {
                shm_rec rec;
                int r = shm_read_slot(s, ref, pte1, kb, NULL, NULL, &rec);
                if (r > 0) {
                    if (rec.seq > bound && rec.klen) {
                        PyObject *k = PyBytes_FromStringAndSize((const char *)kb, (Py_ssize_t)rec.klen);
                        if (!k || PyList_Append(out, k) < 0) {
                            Py_XDECREF(k);
                            goto fail;
                        }
                        Py_DECREF(k);
                    }
                    break;
                }
                m->retries++;
                if (backoff_wait(m, &b) < 0)
                    goto fail;
                if (shm_load_acquire(shm_pte(s, page)) != pte1)
                    goto rescan; /* the page moved: its slots are another class's now */
            }
        }
        /* The skipped slots were judged by plain loads of their stamps: valid only if
         * the page kept its geometry through the scan. */
        shm_fence_acquire();
        if (!shm_page_same(s, page, pte1)) {
            m->retries++;
            if (backoff_wait(m, &b) < 0)
                goto fail;
            goto rescan;
        }
    }
    if (kb != kbuf)
        PyMem_Free(kb);
    return out;
fail:
    if (kb != kbuf)
        PyMem_Free(kb);
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef Mapping_methods[] = {
    {"lookup", (PyCFunction)Mapping_lookup, METH_O,
     "lookup(kb) -> (slot, seq, version, value, expiry), or None if missing or expired."},
    {"read_slot", (PyCFunction)(void (*)(void))Mapping_read_slot, METH_FASTCALL,
     "read_slot(ref, wait=True) -> (seq, version, expiry, flags, key, value), or None (a free page, not a slot of its class, or an odd slot with wait=False)."},
    {"changed_keys", (PyCFunction)Mapping_changed_keys, METH_O,
     "changed_keys(bound) -> keys (bytes, may repeat) of the slots stamped above bound, each read under its seqlock."},
    {"close", (PyCFunction)Mapping_close, METH_NOARGS, "Release this object's export of the mapping."},
    {NULL}};

static PyObject *Mapping_get_retries(Mapping *m, void *c) { return PyLong_FromUnsignedLongLong(m->retries); }
static int Mapping_set_retries(Mapping *m, PyObject *v, void *c)
{
    if (!v)
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    m->retries = x;
    return 0;
}
static PyObject *Mapping_get_stall(Mapping *m, void *c) { return PyFloat_FromDouble(m->stall_timeout); }
static int Mapping_set_stall(Mapping *m, PyObject *v, void *c)
{
    if (!v)
        return -1;
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred())
        return -1;
    m->stall_timeout = x;
    return 0;
}

static PyGetSetDef Mapping_getset[] = {
    {"retries", (getter)Mapping_get_retries, (setter)Mapping_set_retries,
     "reads through this mapping that met a change in progress and read again", NULL},
    {"stall_timeout", (getter)Mapping_get_stall, (setter)Mapping_set_stall,
     "seconds between on_stall calls while a read waits", NULL},
    {NULL}};

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmstore._native.Mapping",
    .tp_basicsize = sizeof(Mapping),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Mapping(mm, sizes, on_stall): the read protocol over one mapping of a data segment.",
    .tp_new = Mapping_new,
    .tp_dealloc = (destructor)Mapping_dealloc,
    .tp_traverse = (traverseproc)Mapping_traverse,
    .tp_clear = (inquiry)Mapping_clear,
    .tp_methods = Mapping_methods,
    .tp_getset = Mapping_getset,
};

/* ---------------------------------------------------------------------------------- */
/* Cache entries                                                                      */

/* A cached answer: valid while w[a] == av, w[b] == bv and w[c] == cv (and, if expiry,
 * not past it). A record: its bucket, its slot's stamp, its page's entry (and ref, for
 * the access byte); a miss: the index generation, the empty bucket, the generation
 * again. kind: 1 the value as is, 0 bytes to decode on each hit, -1 a miss. */
typedef struct {
    PyObject_HEAD
    uint64_t a, av, b, bv, c, cv, expiry, ref;
    int kind;
    PyObject *value;
} Entry;

static void Entry_dealloc(Entry *e)
{
    Py_XDECREF(e->value);
    PyObject_Free(e);
}

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmstore._native.Entry",
    .tp_basicsize = sizeof(Entry),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Entry_dealloc,
};

static Entry *entry_new(uint64_t a, uint64_t av, uint64_t b, uint64_t bv, uint64_t c, uint64_t cv, uint64_t ref,
                        uint64_t expiry, int kind, PyObject *value)
{
    Entry *e = PyObject_New(Entry, &EntryType);
    if (!e)
        return NULL;
    e->a = a;
    e->av = av;
    e->b = b;
    e->bv = bv;
    e->c = c;
    e->cv = cv;
    e->ref = ref;
    e->expiry = expiry;
    e->kind = kind;
    Py_XINCREF(value);
    e->value = value;
    return e;
}

/* ---------------------------------------------------------------------------------- */
/* Reader                                                                             */

typedef struct {
    PyObject_HEAD
    Py_buffer buf;
    int open;
    shm_seg s;
    Mapping *mapping;     /* retries, backoff, the full lookup */
    PyObject *decode;     /* decode(bytes) -> value */
    PyObject *decode_all; /* decode_all(bytes of a msgpack array) -> list */
    PyObject *on_stale;   /* on_stale(key, default): the general path */
    PyObject *on_publish; /* on_publish() every PUBLISH_MASK + 1 gets, or None */
    PyObject *cache;      /* dict key -> Entry, or NULL (read_cache=0) */
    Py_ssize_t cap, full_misses;
    unsigned long long reads, uncached;
    Py_buffer acc_buf;    /* the access segment (LRU eviction), if acc */
    uint8_t *acc;         /* byte ref >> 2 is set to 1 after every hit; NULL: none */
} Reader;

/* A hit on slot ref: its access byte to 1 if it is 0 (relaxed: a hint for the
 * coordinator's CLOCK, which clears it; the index was bounded at construction). */
static inline void touch(Reader *r, uint64_t ref)
{
    if (r->acc) {
        uint8_t *p = r->acc + (ref >> 2);
        if (!__atomic_load_n(p, __ATOMIC_RELAXED))
            __atomic_store_n(p, 1, __ATOMIC_RELAXED);
    }
}

static int is_immutable(PyObject *v)
{
    PyTypeObject *t = Py_TYPE(v);
    return t == &PyUnicode_Type || t == &PyBytes_Type || t == &PyLong_Type || t == &PyFloat_Type ||
           t == &PyBool_Type || v == Py_None;
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PyObject *mapping, *mm, *sizes, *decode, *decode_all, *on_stale, *on_publish, *access = Py_None;
    Py_ssize_t cap;
    if (!PyArg_ParseTuple(args, "O!OO!OOOOn|O", &MappingType, &mapping, &mm, &PyTuple_Type, &sizes, &decode,
                          &decode_all, &on_stale, &on_publish, &cap, &access))
        return NULL;
    if (cap < 0) {
        PyErr_SetString(PyExc_ValueError, "read_cache must be >= 0");
        return NULL;
    }
    Reader *r = (Reader *)type->tp_alloc(type, 0);
    if (!r)
        return NULL;
    if (export_segment(mm, &r->buf, &r->s, sizes) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    r->open = 1;
    if (access != Py_None) {
        if (PyObject_GetBuffer(access, &r->acc_buf, PyBUF_WRITABLE) < 0) {
            Py_DECREF(r);
            return NULL;
        }
        r->acc = (uint8_t *)r->acc_buf.buf;
        if ((uint64_t)r->acc_buf.len <= ((r->s.nslots - 1) >> 2)) {
            PyErr_SetString(PyExc_ValueError, "the access segment is smaller than the pages need");
            Py_DECREF(r);
            return NULL;
        }
    }
    Py_INCREF(mapping);
    r->mapping = (Mapping *)mapping;
    Py_INCREF(decode);
    r->decode = decode;
    Py_INCREF(decode_all);
    r->decode_all = decode_all;
    Py_INCREF(on_stale);
    r->on_stale = on_stale;
    if (on_publish != Py_None) {
        Py_INCREF(on_publish);
        r->on_publish = on_publish;
    }
    r->cap = cap;
    if (cap) {
        r->cache = PyDict_New();
        if (!r->cache) {
            Py_DECREF(r);
            return NULL;
        }
    }
    return (PyObject *)r;
}

static int Reader_traverse(Reader *r, visitproc visit, void *arg)
{
    Py_VISIT(r->mapping);
    Py_VISIT(r->decode);
    Py_VISIT(r->decode_all);
    Py_VISIT(r->on_stale);
    Py_VISIT(r->on_publish);
    Py_VISIT(r->cache);
    return 0;
}

static int Reader_clear(Reader *r)
{
    Py_CLEAR(r->mapping);
    Py_CLEAR(r->decode);
    Py_CLEAR(r->decode_all);
    Py_CLEAR(r->on_stale);
    Py_CLEAR(r->on_publish);
    Py_CLEAR(r->cache);
    return 0;
}

static void Reader_dealloc(Reader *r)
{
    PyObject_GC_UnTrack(r);
    if (r->open) {
        r->open = 0;
        PyBuffer_Release(&r->buf);
    }
    if (r->acc) {
        r->acc = NULL;
        PyBuffer_Release(&r->acc_buf);
    }
    Reader_clear(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *call_stale(Reader *r, PyObject *key, PyObject *dflt)
{
    PyObject *args[2] = {key, dflt};
    return PyObject_Vectorcall(r->on_stale, args, 2, NULL);
}

static PyObject *call_decode(Reader *r, PyObject *b)
{
    PyObject *args[1] = {b};
    return PyObject_Vectorcall(r->decode, args, 1, NULL);
}

/* The cache is full: add nothing until 8x cap further uncached reads, then start over. */
static void cache_full(Reader *r)
{
    if (++r->full_misses > 8 * r->cap) {
        r->full_misses = 0;
        PyDict_Clear(r->cache);
    }
}

static int cache_put(Reader *r, PyObject *key, Entry *e)
{
    if (!e)
        return -1;
    int rc = PyDict_SetItem(r->cache, key, (PyObject *)e);
    Py_DECREF(e);
    return rc;
}

/* get(key, default=None) */
static PyObject *Reader_get(Reader *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "get() takes 1 or 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *key = args[0];
    PyObject *dflt = nargs == 2 ? args[1] : Py_None;
    const shm_seg *s = &r->s;
    uint64_t *w = s->w;
    if (!(++r->reads & PUBLISH_MASK) && r->on_publish) {
        PyObject *x = PyObject_CallNoArgs(r->on_publish);
        if (!x)
            return NULL;
        Py_DECREF(x);
    }
    if (r->cache) {
        PyObject *eo = PyDict_GetItemWithError(r->cache, key);
        if (eo) {
            Entry *e = (Entry *)eo;
            if (shm_load_acquire(w + SHM_H_STATE) == SHM_STATE_READY && shm_load_acquire(w + e->a) == e->av &&
                shm_load_acquire(w + e->b) == e->bv && shm_load_acquire(w + e->c) == e->cv &&
                (!e->expiry || e->expiry > now_ns())) {
                if (e->kind >= 0)
                    touch(r, e->ref);
                if (e->kind > 0) {
                    Py_INCREF(e->value);
                    return e->value;
                }
                if (e->kind < 0) {
                    Py_INCREF(dflt);
                    return dflt;
                }
                return call_decode(r, e->value);
            }
        } else if (PyErr_Occurred()) { /* unhashable: not a key */
            PyErr_Clear();
            return call_stale(r, key, dflt);
        }
    }
    r->uncached++;
    const uint8_t *kb;
    Py_ssize_t n;
    if (PyUnicode_CheckExact(key)) {
        kb = (const uint8_t *)PyUnicode_AsUTF8AndSize(key, &n);
        if (!kb) { /* a lone surrogate: the general path raises InvalidKeyError */
            PyErr_Clear();
            return call_stale(r, key, dflt);
        }
    } else if (PyBytes_CheckExact(key)) {
        kb = (const uint8_t *)PyBytes_AS_STRING(key);
        n = PyBytes_GET_SIZE(key);
    } else {
        return call_stale(r, key, dflt);
    }
    if (n < 1 || (uint64_t)n > s->key_size || shm_load_acquire(w + SHM_H_STATE) != SHM_STATE_READY)
        return call_stale(r, key, dflt);
    PyObject *raw = NULL;
    shm_rec rec;
    shm_walk wk;
    uint32_t h = shm_key_hash(kb, (size_t)n);
    int a = attempt(s, kb, (size_t)n, h, &raw, &rec, &wk);
    if (a == A_RETRY) {
        r->mapping->retries++;
        a = lookup_full(r->mapping, s, kb, (size_t)n, &raw, &rec, &wk);
    }
    switch (a) {
    case A_ERROR:
        return NULL;
    case A_DAMAGED:
        return raise_damaged("an index bucket points past the slots");
    case A_EXPIRED:
        Py_INCREF(dflt);
        return dflt;
    case A_MISS:
        if (r->cache) {
            if (PyDict_GET_SIZE(r->cache) < r->cap) {
                if (cache_put(r, key, entry_new(SHM_H_INDEX_GEN, wk.gen, s->idx0 + wk.pos, 0, SHM_H_INDEX_GEN, wk.gen, 0, 0, -1,
                                                  NULL)) < 0)
                    return NULL;
            } else {
                cache_full(r);
            }
        }
        Py_INCREF(dflt);
        return dflt;
    default:
        break;
    }
    uint64_t ref = (wk.bucket & 0xFFFFFFFFu) - 1;
    touch(r, ref);
    PyObject *value = call_decode(r, raw);
    if (!value) {
        Py_DECREF(raw);
        return NULL;
    }
    if (r->cache) {
        if (PyDict_GET_SIZE(r->cache) < r->cap) {
            uint64_t seqw = s->slot0 + ref * s->slot_words;
            int imm = is_immutable(value);
            if (cache_put(r, key, entry_new(s->idx0 + wk.pos, wk.bucket, seqw, rec.seq, s->pt0 + (ref >> s->ref_shift),
                                            wk.pte, ref, rec.expiry, imm, imm ? value : raw)) < 0) {
                Py_DECREF(raw);
                Py_DECREF(value);
                return NULL;
            }
        } else {
            cache_full(r);
        }
    }
    Py_DECREF(raw);
    return value;
}

/* -- get_many -------------------------------------------------------------------------- */

typedef struct {
    uint8_t *p;
    size_t len, cap;
} growbuf;

static int gb_reserve(growbuf *g, size_t more)
{
    if (g->len + more <= g->cap)
        return 0;
    size_t cap = g->cap ? g->cap : 4096;
    while (cap < g->len + more)
        cap *= 2;
    uint8_t *p = PyMem_Realloc(g->p, cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    g->p = p;
    g->cap = cap;
    return 0;
}

static size_t array_header(uint8_t *out, size_t n)
{
    if (n < 16) {
        out[0] = (uint8_t)(0x90 | n);
        return 1;
    }
    if (n < 65536) {
        out[0] = 0xdc;
        out[1] = (uint8_t)(n >> 8);
        out[2] = (uint8_t)n;
        return 3;
    }
    out[0] = 0xdd;
    out[1] = (uint8_t)(n >> 24);
    out[2] = (uint8_t)(n >> 16);
    out[3] = (uint8_t)(n >> 8);
    out[4] = (uint8_t)n;
    return 5;
}

/* shm_attempt's dst for get_many: the end of the values buffer (kept only if found). */
static uint8_t *dst_append(void *ctx, uint64_t vlen)
{
    growbuf *g = (growbuf *)ctx;
    return gb_reserve(g, vlen) < 0 ? NULL : g->p + g->len;
}

/* One key of get_many: its value appended to g. Returns A_FOUND, A_MISS (missing or
 * expired), A_ERROR or A_DAMAGED; *top is raised to the record's stamp. */
static int many_one(Reader *r, const uint8_t *kb, size_t n, uint32_t h, growbuf *g, uint64_t *top)
{
    const shm_seg *s = &r->s;
    backoff_t b = {0, 0, 0};
    for (;;) {
        shm_walk wk;
        shm_rec rec;
        int res = shm_attempt(s, kb, n, h, dst_append, g, &rec, &wk);
        switch (res) {
        case SHM_FOUND:
            if (rec.expiry && rec.expiry <= now_ns())
                return A_MISS;
            g->len += rec.vlen;
            if (rec.seq > *top)
                *top = rec.seq;
            touch(r, (wk.bucket & 0xFFFFFFFFu) - 1);
            return A_FOUND;
        case SHM_MISS:
            return A_MISS;
        case SHM_DAMAGED:
            return A_DAMAGED;
        case SHM_NOMEM:
            return A_ERROR;
        default:
            break;
        }
        r->mapping->retries++;
        if (backoff_wait(r->mapping, &b) < 0)
            return A_ERROR;
    }
}

/* get_many(keys, default) -> list, None (a write after the epoch read first spoiled
 * the answer: read again), or NotImplemented (a key that is not exact str/bytes of 1
 * to key_size bytes: the general path checks it and raises the typed error). */
static PyObject *Reader_get_many(Reader *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "get_many(list, default)");
        return NULL;
    }
    PyObject *keys = args[0], *dflt = args[1];
    const shm_seg *s = &r->s;
    Py_ssize_t count = PyList_GET_SIZE(keys);
    const uint8_t **kbs = PyMem_Malloc(sizeof(*kbs) * (count ? count : 1));
    size_t *lens = PyMem_Malloc(sizeof(*lens) * (count ? count : 1));
    uint32_t *hs = PyMem_Malloc(sizeof(*hs) * (count ? count : 1));
    uint8_t *miss = PyMem_Calloc(count ? count : 1, 1);
    growbuf g = {NULL, 0, 0};
    PyObject *result = NULL;
    if (!kbs || !lens || !hs || !miss) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *k = PyList_GET_ITEM(keys, i);
        Py_ssize_t n;
        if (PyUnicode_CheckExact(k)) {
            kbs[i] = (const uint8_t *)PyUnicode_AsUTF8AndSize(k, &n);
            if (!kbs[i]) {
                PyErr_Clear();
                result = Py_NewRef(Py_NotImplemented);
                goto done;
            }
        } else if (PyBytes_CheckExact(k)) {
            kbs[i] = (const uint8_t *)PyBytes_AS_STRING(k);
            n = PyBytes_GET_SIZE(k);
        } else {
            result = Py_NewRef(Py_NotImplemented);
            goto done;
        }
        if (n < 1 || (uint64_t)n > s->key_size) {
            result = Py_NewRef(Py_NotImplemented);
            goto done;
        }
        lens[i] = (size_t)n;
        hs[i] = shm_key_hash(kbs[i], (size_t)n);
    }
    uint64_t e1 = shm_load_acquire(s->w + SHM_H_EPOCH);
    if (gb_reserve(&g, 5 + (size_t)count * 16) < 0)
        goto done;
    g.len = array_header(g.p, (size_t)count); /* rewritten below if keys are missing */
    size_t head = g.len;
    uint64_t top = 0;
    Py_ssize_t missing = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        /* A pipeline of cache misses, the cost that dominates a batch: the home bucket
         * of the key 2 * PREFETCH_AHEAD ahead is fetched; the key PREFETCH_AHEAD ahead
         * loads its (by now fetched) bucket and fetches the lines of the slot it points
         * to; so the stamp, key and value loads of this key's attempt mostly hit. Only
         * hints: what the attempt reads is validated as always. */
        if (i + 2 * PREFETCH_AHEAD < count)
            __builtin_prefetch(s->w + s->idx0 + (hs[i + 2 * PREFETCH_AHEAD] & s->mask));
        else if (i == 0)
            for (Py_ssize_t j = 0; j < count && j < 2 * PREFETCH_AHEAD; j++)
                __builtin_prefetch(s->w + s->idx0 + (hs[j] & s->mask));
        if (i + PREFETCH_AHEAD < count) {
            uint64_t b = shm_load_relaxed(s->w + s->idx0 + (hs[i + PREFETCH_AHEAD] & s->mask));
            uint64_t ref = (b & 0xFFFFFFFFu) - 1;
            if (b && ref < s->nslots) {
                /* The slot's header and key, and the line after (a value past the first
                 * 64 bytes); the page entry is in a few hot lines already. A prefetch
                 * past the mapping's end cannot fault. */
                const char *sp = (const char *)shm_slot(s, ref);
                __builtin_prefetch(sp);
                if (shm_slot_need(s->key_size, s->value_size) > 64)
                    __builtin_prefetch(sp + 64);
            }
        }
        int a = many_one(r, kbs[i], lens[i], hs[i], &g, &top);
        if (a == A_ERROR)
            goto done;
        if (a == A_DAMAGED) {
            raise_damaged("an index bucket points past the slots");
            goto done;
        }
        if (a != A_FOUND) {
            miss[i] = 1;
            missing++;
        }
    }
    shm_fence_acquire();
    uint64_t last_delete = shm_load_relaxed(s->w + SHM_H_LAST_DELETE_EPOCH);
    /* Accept only if no record read was written after e1 (its stamp would exceed
     * 2*e1 + 2) and, when a key was missing, no key was deleted after e1. */
    if (top > 2 * e1 + 2 || (missing && last_delete > e1)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    r->reads += (unsigned long long)count; /* none of them from the read cache */
    r->uncached += (unsigned long long)count;
    uint8_t hdr[5];
    size_t hl = array_header(hdr, (size_t)(count - missing));
    PyObject *blob = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(hl + g.len - head));
    if (!blob)
        goto done;
    memcpy(PyBytes_AS_STRING(blob), hdr, hl);
    memcpy(PyBytes_AS_STRING(blob) + hl, g.p + head, g.len - head);
    PyObject *dargs[1] = {blob};
    PyObject *vals = PyObject_Vectorcall(r->decode_all, dargs, 1, NULL);
    Py_DECREF(blob);
    if (!vals)
        goto done;
    if (!missing) {
        result = vals;
        goto done;
    }
    if (!PyList_CheckExact(vals) || PyList_GET_SIZE(vals) != count - missing) {
        Py_DECREF(vals);
        PyErr_SetString(PyExc_RuntimeError, "get_many: the decoder returned the wrong number of values");
        goto done;
    }
    result = PyList_New(count);
    if (!result) {
        Py_DECREF(vals);
        goto done;
    }
    for (Py_ssize_t i = 0, j = 0; i < count; i++) {
        PyObject *v = miss[i] ? dflt : PyList_GET_ITEM(vals, j++);
        Py_INCREF(v);
        PyList_SET_ITEM(result, i, v);
    }
    Py_DECREF(vals);
done:
    PyMem_Free(kbs);
    PyMem_Free(lens);
    PyMem_Free(hs);
    PyMem_Free(miss);
    PyMem_Free(g.p);
    return result;
}

static PyObject *Reader_reads(Reader *r, PyObject *u) { return PyLong_FromUnsignedLongLong(r->reads); }
static PyObject *Reader_cache_hits(Reader *r, PyObject *u)
{
    return PyLong_FromUnsignedLongLong(r->reads - r->uncached);
}
static PyObject *Reader_cached(Reader *r, PyObject *u) { return PyLong_FromSsize_t(r->cache ? PyDict_GET_SIZE(r->cache) : 0); }

static PyMethodDef Reader_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Reader_get, METH_FASTCALL,
     "get(key, default=None): the value of key, or default if it is missing."},
    {"get_many", (PyCFunction)(void (*)(void))Reader_get_many, METH_FASTCALL,
     "get_many(keys, default) -> values as of one epoch; None to read again; NotImplemented for the general path."},
    {"reads", (PyCFunction)Reader_reads, METH_NOARGS, "gets and get_many keys read through this reader"},
    {"cache_hits", (PyCFunction)Reader_cache_hits, METH_NOARGS, "gets answered from the read cache"},
    {"cached", (PyCFunction)Reader_cached, METH_NOARGS, "entries in the read cache"},
    {NULL}};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmstore._native.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Reader(mapping, mm, sizes, decode, decode_all, on_stale, on_publish, read_cache, access=None): one "
              "handle's reads (access: the writable access segment whose byte ref >> 2 a hit sets).",
    .tp_new = Reader_new,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_methods = Reader_methods,
};

/* ---------------------------------------------------------------------------------- */
/* Module                                                                             */

static PyObject *mod_key_hash(PyObject *m, PyObject *key)
{
    const uint8_t *kb;
    Py_ssize_t n;
    if (key_bytes(key, &kb, &n) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(shm_key_hash(kb, (size_t)n));
}

static PyObject *mod_fence_acquire(PyObject *m, PyObject *u)
{
    shm_fence_acquire();
    Py_RETURN_NONE;
}

static PyObject *mod_fence_release(PyObject *m, PyObject *u)
{
    shm_fence_release();
    Py_RETURN_NONE;
}

static PyObject *mod_set_clock(PyObject *m, PyObject *fn)
{
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "set_clock(callable or None)");
        return NULL;
    }
    Py_XDECREF(clock_hook);
    clock_hook = NULL;
    if (fn != Py_None) {
        Py_INCREF(fn);
        clock_hook = fn;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_clock", (PyCFunction)mod_set_clock, METH_O,
     "set_clock(fn): expiry checks call fn() for the time in ns (shmstore._ttl's test clock); None: the wall clock"},
    {"key_hash", (PyCFunction)mod_key_hash, METH_O, "key_hash(kb) -> the 32-bit index hash (shmstore._layout.key_hash)"},
    {"fence_acquire", (PyCFunction)mod_fence_acquire, METH_NOARGS, "An acquire fence (loads before it are not moved after it)."},
    {"fence_release", (PyCFunction)mod_fence_release, METH_NOARGS, "A release fence (stores after it are not moved before it)."},
    {NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "shmstore._native",
    "shmstore's compiled read path: the seqlock protocol in C11 atomics (see protocol.h).", -1, module_methods};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&EntryType) < 0 || PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Mapping", (PyObject *)&MappingType) < 0 ||
        PyModule_AddObjectRef(m, "Reader", (PyObject *)&ReaderType) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_HEADER", SHM_SLOT_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "H_STATE", SHM_H_STATE) < 0 || PyModule_AddIntConstant(m, "H_EPOCH", SHM_H_EPOCH) < 0 ||
        PyModule_AddIntConstant(m, "H_INDEX_GEN", SHM_H_INDEX_GEN) < 0 ||
        PyModule_AddIntConstant(m, "H_LAST_DELETE_EPOCH", SHM_H_LAST_DELETE_EPOCH) < 0 ||
        PyModule_AddIntConstant(m, "H_BATCH_SEQ", SHM_H_BATCH_SEQ) < 0 ||
        PyModule_AddIntConstant(m, "H_COUNT", SHM_H_COUNT) < 0 ||
        PyModule_AddIntConstant(m, "STATE_READY", SHM_STATE_READY) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_FREE", SHM_FLAG_FREE) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_EVICTED", SHM_FLAG_EVICTED) < 0 ||
        PyModule_AddIntConstant(m, "H_NCLASSES", SHM_H_NCLASSES) < 0 ||
        PyModule_AddIntConstant(m, "H_CLASSES", SHM_H_CLASSES) < 0 ||
        PyModule_AddIntConstant(m, "CLASS_WORDS", SHM_CLASS_WORDS) < 0 ||
        PyModule_AddIntConstant(m, "C_SLOT_SIZE", SHM_C_SLOT_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "C_PAGES", SHM_C_PAGES) < 0 ||
        PyModule_AddIntConstant(m, "C_RECORDS", SHM_C_RECORDS) < 0 ||
        PyModule_AddIntConstant(m, "C_ASKED", SHM_C_ASKED) < 0 ||
        PyModule_AddIntConstant(m, "MAX_CLASSES", SHM_MAX_CLASSES) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_UNIT", SHM_SLOT_UNIT) < 0 ||
        PyModule_AddIntConstant(m, "MIN_SLOT", SHM_MIN_SLOT) < 0 ||
        PyModule_AddIntConstant(m, "PTE_CLASS_BITS", SHM_PTE_CLASS_BITS) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", SHM_HEADER_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
