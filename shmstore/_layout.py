"""Layout of the data segment, and the names of a store's IPC objects.

Design
------
One POSIX shared-memory segment per store holds four regions, each 4 KiB aligned::

    +--------------------+  0
    | header (4 KiB)     |  u64 words, see the H_* indices below; the class table at 160
    +--------------------+  pt_offset
    | page table         |  npages x u64: 0 free, else (epoch << 8) | (class + 1)
    +--------------------+  pages_offset
    | pages              |  npages x page_size bytes (a power of two, >= 1 MiB for a
    |                    |  memory store), each cut into the slots of one size class
    +--------------------+  index_offset
    | index              |  nbuckets x u64 (open addressing, linear probing)
    +--------------------+

Size classes (memcached's slabs, in shared memory): a class is a slot size, a multiple
of SLOT_UNIT (16) from MIN_SLOT (64) up, each about ``growth`` (1.25) times the one
below, the last one holding the largest record (header + key_size + value_size). A
record lives in a slot of the smallest class that holds it; slots are fixed-size within
a class, so everything below (the seqlock, copy-on-write into free slots, crash repair,
change feeds, snapshots) works per slot whatever its class. A store made with
``memory=`` starts with every page free and hands a page to a class when the class has
no free slot left (``coordinator/_engine.py``); a store made with ``capacity`` and
``value_size`` only is the single-class case, every page its one class's from creation.

A slot::

    0   seq      u64  the seqlock word: 2E+1 while epoch E writes it, 2E+2 after
    8   version  u64  the epoch that last wrote the record's value
    16  expiry   u64  0, or the wall-clock ns after which the record reads as missing
    24  meta     u64  key length (bits 0-15) | flags (16-31) | value length (32-63)
    32  key      key length bytes, zero-padded to a multiple of 8
    ..  value    value length bytes

A slot is named by its reference ``ref``: its byte offset from the first page divided
by SLOT_UNIT, so a slot's first word is ``pages_offset / 8 + 2 * ref`` whatever its
class, and its page is ``ref >> ref_shift``. An index bucket is one u64: 0 is empty,
otherwise ``(hash << 32) | (ref + 1)`` where ``hash`` is :func:`key_hash`: the key's
bytes read as a little-endian integer, times a constant, modulo the prime 2**61 - 1,
with the high bits folded into the low ones (stable across processes, unlike ``hash()``
of a str or bytes). A bucket is always written with one aligned 8-byte store, so a
reader sees either the old or the new bucket, never half of one.

Writes are copy-on-write: the coordinator writes a new or changed record into a free
slot, then points the bucket at it with one store, then frees the old slot. A slot that
the index points to is never written, so a coordinator that dies mid-write leaves the
published state intact; the torn slot is unreferenced and the next coordinator frees it.
Each class keeps one free slot in reserve for updates, so an update succeeds in a full
class (the single-class store has ``capacity + 1`` slots for that).

How a page moves between classes: only when a class needs a slot and no page is free,
from a class that can give one up keeping all its records (they move to its other
free slots) or, with eviction, after its records are evicted (``coordinator/_evict.py``
says which page, and what not rebalancing otherwise costs). The move stores the page's
new table entry and then stamps every new slot free (seqlock writes at the move's
epoch); a reader holding a reference from before loads the page's entry before the
slot and again after its copy, and retries if it changed (``shmstore/_csrc/protocol.h``).

Invariant: only the coordinator writes the segment; clients map it read-only (the
access bytes that LRU eviction reads are a separate segment, see ``access_name``).
Invariant: every write op takes the next epoch, so no slot ever carries the same even
seq twice (the ABA case of seqlocks).
"""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import TYPE_CHECKING

import msgspec

from ._errors import InvalidLayoutError, InvalidNameError, UnsupportedPlatformError

if TYPE_CHECKING:
    import numpy as np


def _sha256(data: bytes) -> bytes:
    """SHA-256 of ``data``, by CPython's own implementation when it has one.

    ``hashlib`` loads OpenSSL's libcrypto (~3.5 MiB of private memory per process) for
    the same digest; every reader computes one at connect (the layout fingerprint).
    """
    try:
        from _sha2 import sha256  # noqa: PLC0415  (CPython 3.12+)
    except ImportError:
        try:
            from _sha256 import sha256  # noqa: PLC0415  (CPython 3.11)
        except ImportError:  # a build without them (FIPS): OpenSSL's
            from hashlib import sha256  # noqa: PLC0415
    return sha256(data).digest()

MAGIC = 0x31_4D_54_53_4D_48_53  # b"SHMSTM1" little-endian, 7 bytes
#: 2: the index hash is key_hash() (CRC-32 + multiply-shift mix), no longer the bare CRC-32
#: 3: key_hash() is a multiply modulo 2**61 - 1 (+ xor-shift), which numpy computes from key words
#: 4: size classes: slots live in pages handed to classes; buckets name slots by offset
FORMAT_VERSION = 4
PAGE = 4096
HEADER_SIZE = PAGE

# Header word indices (u64 each).
H_MAGIC = 0
H_FORMAT = 1
H_LAYOUT_FP = 2  # fingerprint of Layout (sizes, classes, pages, buckets)
H_SCHEMA_FP = 3  # fingerprint of the value_type, 0 for untyped stores
H_CAPACITY = 4
H_NSLOTS = 5  # a single-class store's slots (capacity + 1); 0 for a memory store
H_SLOT_SIZE = 6  # the largest class's slot size
H_KEY_SIZE = 7
H_VALUE_SIZE = 8
H_NBUCKETS = 9
H_INSTANCE = 10  # random id of this segment; a recreated store gets a new one
H_STATE = 11  # STATE_* below
H_MEMORY = 12  # the page budget in bytes; 0: a single-class store (capacity x value_size)
H_NPAGES = 13
H_PAGE_SIZE = 14  # bytes, a power of two
H_NCLASSES = 15
H_EPOCH = 16  # the last epoch whose op (or whole batch) is fully applied
H_INDEX_GEN = 17  # odd while buckets move; bumped by every move or removal
H_COUNT = 18  # records in the store
H_LAST_DELETE_EPOCH = 19  # epoch of the newest removal of a key
H_BATCH_SEQ = 20  # odd while a multi-op batch is being applied
H_PAGES_OFFSET = 21  # byte offset of the first page (slot references count from it)
H_GROWTH = 22  # the class growth factor, in millionths
H_EVICTION = 23  # EVICT_* below: what the running coordinator does when a class is full
H_COORD_PID = 24
H_COORD_START = 25  # the coordinator's process start time, ms since the Unix epoch
H_HEARTBEAT = 26  # wall-clock ns of the coordinator's last tick
H_COORD_INCARNATION = 27  # random id of the running coordinator (0: none running)
H_LAST_CHECKPOINT_EPOCH = 28
H_MAX_CLIENTS = 29
H_RING_SIZE = 30
H_REPLY_SIZE = 31
# Coordinator counters (one writer: the coordinator).
H_OPS = 40
H_GROUPS = 41
H_FRAMES = 42
H_ERRORS = 43
H_CLIENTS_RECLAIMED = 44
H_MAX_GROUP = 45
H_PUTS = 46
H_DELETES = 47
H_CAS = 48
H_INCRS = 49
H_BATCHES = 50
H_FALLBACK_READS = 51
# Durability counters (one writer: the coordinator's journal), words 52-95.
H_FSYNCS = 52  # fsyncs of the WAL (or data files) the journal issued
H_FSYNC_NS_TOTAL = 53  # their summed latency, ns
H_FSYNC_NS_MIN = 54  # the fastest, ns (0 until the first)
H_FSYNC_NS_MAX = 55  # the slowest, ns
H_WAL_BYTES = 56  # bytes appended to the WAL by this segment's coordinators
H_CHECKPOINTS = 57  # checkpoints completed
H_CHECKPOINT_NS_LAST = 58  # how long the last checkpoint took to write, ns
H_FSYNC_HIST = 64  # FSYNC_HIST_BUCKETS words: bucket b counts fsyncs of [2**b, 2**(b+1)) us
FSYNC_HIST_BUCKETS = 32  # (bucket 0 also counts those under 1 us; the last, all longer)
# Data features (TTL, change feeds, watch), words 128-159 (one writer: the coordinator).
H_EXPIRED = 128  # records the coordinator reclaimed after their expiry
#: Invariant: no slot holding a change record of an epoch above this was ever reused;
#: changes(since) with since < H_FEED_HORIZON could miss a change and is refused.
H_FEED_HORIZON = 129
H_WATCH_POSTS = 130  # wake-ups posted to watching clients
# Operations counters (one writer: the coordinator), words 96-127; see coordinator/_metrics.py.
H_GROUP_HIST = 96  # GROUP_HIST_BUCKETS words: bucket b counts groups of [2**b, 2**(b+1)) requests
GROUP_HIST_BUCKETS = 16  # (the last bucket also counts all larger groups)
H_QUEUE_BYTES = 112  # bytes the last group drained from the rings: the queue depth it found
H_QUEUE_BYTES_MAX = 113  # the most any group drained
H_COORD_RUNS = 114  # coordinators that have served this segment (1 + restarts)
# Client counters of reclaimed client blocks (closed or dead clients), summed by the
# coordinator when it reclaims a block, so totals do not drop when a client goes.
H_RETIRED_READS = 116
H_RETIRED_READ_RETRIES = 117
H_RETIRED_WRITES = 118
H_RETIRED_TIMEOUTS = 119
H_RETIRED_WRITE_NS = 120
H_RETIRED_WRITES_TIMED = 121
H_RETIRED_WRITE_ERRORS = 122
H_RETIRED_WRITE_NS_MAX = 123
H_RETIRED_CACHE_HITS = 124
# Memory and eviction counters (one writer: the coordinator), words 32-39.
H_EVICTIONS = 32  # records evicted to make room
H_PAGE_MOVES = 33  # pages taken from one class (all its records evicted) for another
H_FREE_PAGES = 34  # pages not yet handed to any class
H_CLOCK_SCANS = 35  # slots the eviction clock looked at
# A replica's upstream (serve(..., upstream=)), words 36-39 and 59-63 (one writer: the
# coordinator). Its cursor is the id "H_EPOCH-H_UP_NONCE" of the last stream entry applied.
H_UP_STATE = 36  # UP_* below; 0: the store is not a replica
H_UP_NONCE = 37  # the nonce of the last applied entry's id (its version part is H_EPOCH)
H_UP_HEAD = 38  # the newest global version this replica has heard of
H_UP_LAG_MS = 39  # ms from the last applied entry's append in Redis to its apply here
H_UP_RESYNCS = 59  # times this replica reloaded the dataset from the upstream's records
H_UP_APPLIED = 60  # stream entries applied
H_UP_ROUNDTRIPS = 61  # write round trips to the upstream
H_UP_FAILURES = 62  # round trips and reads that failed (unreachable, timed out)
H_UP_LAG_MS_MAX = 63  # the largest H_UP_LAG_MS seen
UP_SYNCING = 1  # starting or resyncing: reads may see a mix of the old and new state
UP_OK = 2  # following the stream
UP_UNREACHABLE = 3  # the upstream cannot be reached: reads go on, writes fail
UP_STALLED = 4  # an entry cannot be applied here (the store is too small): see the log
UP_STATE_NAMES = {UP_SYNCING: "syncing", UP_OK: "ok", UP_UNREACHABLE: "unreachable", UP_STALLED: "stalled"}
# Size classes, words 160-415: CLASS_WORDS words per class c from H_CLASSES + 4c.
H_CLASSES = 160
CLASS_WORDS = 4
C_SLOT_SIZE = 0  # bytes of a slot of the class
C_PAGES = 1  # pages the class holds
C_RECORDS = 2  # live records in its slots
C_ASKED = 3  # bytes those records need (slot_need): fragmentation = 1 - asked / (records x slot)
H_WORDS = HEADER_SIZE // 8

STATE_INIT = 0
STATE_READY = 1
STATE_DESTROYED = 2

EVICT_NONE = 0  # a full class refuses writes (StoreFullError)
EVICT_LRU = 1  # approximate LRU (a CLOCK over each class's slots; see coordinator/_evict.py)
EVICT_VOLATILE_TTL = 2  # records with an expiry, soonest first; then none
EVICTION_NAMES = {None: EVICT_NONE, "lru": EVICT_LRU, "volatile-ttl": EVICT_VOLATILE_TTL}

# Slot word offsets (in u64 words from the slot start).
S_SEQ = 0
S_VERSION = 1
S_EXPIRY = 2
S_META = 3
SLOT_HEADER = 32

FLAG_FREE = 1  # the slot holds no record (its key is kept for change feeds)
FLAG_EVICTED = 2  # with FLAG_FREE: the record was evicted (not deleted, not expired)

# Size classes and pages (format 4).
SLOT_UNIT = 16  # slot sizes are multiples of this; a bucket names a slot by offset // SLOT_UNIT
MIN_SLOT = 64  # the smallest class
GROWTH = 1.25  # a class's slot size over the one below it (about)
MIN_PAGE = 1 << 20  # a memory store's page: a power of two >= this and the largest slot
MAX_CLASSES = 64
MAX_MEMORY = (1 << 36) - (1 << 20)  # buckets address 2**32 SLOT_UNITs of pages
ACCESS_GRAIN = MIN_SLOT  # one access byte per this many bytes of pages (each slot has its own)
PTE_CLASS_BITS = 8  # a page-table entry: (epoch of assignment << 8) | (class + 1); 0: free

MAX_KEY_SIZE = 4096
MAX_VALUE_SIZE = 64 * 1024 * 1024
MAX_CAPACITY = (1 << 31) - 2

#: key_hash's multiplier: odd, 2**64 / golden ratio.
HASH_MULT = 0x9E3779B97F4A7C15
#: key_hash's modulus, the Mersenne prime 2**61 - 1: CPython's own modulus for hashing
#: an int, so ``hash(x)`` of an int ``x >= 0`` is ``x % HASH_PRIME`` in one C call.
HASH_PRIME = (1 << 61) - 1
_mod_prime = hash if sys.hash_info.modulus == HASH_PRIME else (lambda x: x % HASH_PRIME)
_from_bytes = int.from_bytes


def key_hash(kb: bytes) -> int:
    """The 32-bit index hash of a key's bytes; its home bucket is ``hash & mask``.

    ``x = X * HASH_MULT mod (2**61 - 1)``, where ``X`` is the key read as a
    little-endian integer, then the low 32 bits of ``x ^ x >> 29``. In Python that is
    ``from_bytes``, a multiply and the int ``hash`` (one C call each) and two int ops:
    ~30 ns more than ``zlib.crc32`` plus a mix for a 12-byte key, less for keys over
    ~40 bytes. Because ``X`` is a sum of the key's 64-bit words times powers of two,
    numpy computes the same value for many keys at once from their zero-padded words
    (:func:`key_hash_words`): ``get_many`` needs that, and a CRC does not allow it.
    The modular multiply alone is linear, which left some structured key sets
    (``user:%d``) 30% more displaced than random keys; the xor-shift folds the high
    bits into the low bits that pick the home bucket, and every key set in
    tests/test_key_hash.py then spreads like random keys.

    Every user of the index (readers, the engine, recovery, tests that place keys)
    must hash through this function: the segment format depends on it.
    """
    x = _mod_prime(_from_bytes(kb, "little") * HASH_MULT)
    return x & 0xFFFFFFFF ^ x >> 29  # == (x ^ x >> 29) & 0xFFFFFFFF, as x < 2**61


def _chunks(kw: int) -> tuple[list[tuple[int, int]], bool]:
    """For :func:`key_hash_words`: runs of key words ``[a, b)`` whose rotated terms can
    be summed in u64 at once, and whether the total needs a last fold to be below
    2**63 (what the modular product needs).

    Word j's term (a rotation by ``s = 64j mod 61``, see there) is below
    ``2**61 + 2**(3 + s)``; the running sum is folded between runs, to below
    ``2**61 + 8``.
    """
    runs = []
    a = 0
    bound = 0
    for j in range(kw):
        term = (1 << 61) + (1 << (3 + (64 * j) % 61))
        if bound + term >= 1 << 64:
            runs.append((a, j))
            a, bound = j, (1 << 61) + 8
        bound += term
    runs.append((a, kw))
    return runs, bound >= 1 << 63


_HASH_CONSTS: dict[int, tuple] = {}


def key_hash_words(words: "np.ndarray") -> "np.ndarray":
    """:func:`key_hash` of many keys at once, as uint64.

    Args:
        words: uint64 ``(n, kw)``: each row a key's bytes, zero-padded to ``8 * kw``
            and read as little-endian words (zero padding leaves ``X`` unchanged).

    ``X mod P`` is the sum of word j times ``2**(64j) == 2**s (mod P)``, ``s = 64j
    mod 61``; a word ``w`` times ``2**s`` is ``(w << s) & P`` plus ``w >> (61 - s)``
    (mod P), for any u64 ``w``. Then one 61-by-61-bit product modulo P, in 32-bit
    halves since numpy has no 128-bit integers. About 30 numpy calls whatever kw is.
    """
    import numpy as np  # noqa: PLC0415 (the layout module itself needs no numpy)

    n, kw = words.shape
    c = _HASH_CONSTS.get(kw)
    if c is None:
        u = np.uint64
        s = np.array([(64 * j) % 61 for j in range(kw)], np.uint64)[:, None]
        m = HASH_MULT % HASH_PRIME
        c = _HASH_CONSTS[kw] = (s, u(61) - s, _chunks(kw), u(HASH_PRIME), u(61), u(32),
                                u(m & 0xFFFFFFFF), u(m >> 32), u(0xFFFFFFFF), u(29),
                                u((1 << 29) - 1), u(3))
    S, S_REV, chunks, P, S61, S32, M0, M1, M32, S29, M29, S3 = c
    wt = np.ascontiguousarray(words.T)  # (kw, n): word j of every key in row j
    terms = wt << S
    terms &= P
    terms += wt >> S_REV
    runs, fold_last = chunks
    acc = terms[0] if len(terms) == 1 else terms[: runs[0][1]].sum(axis=0, dtype=np.uint64)
    for a, b in runs[1:]:
        acc = (acc & P) + (acc >> S61)
        acc += terms[a:b].sum(axis=0, dtype=np.uint64)
    if fold_last:
        acc = (acc & P) + (acc >> S61)
    # acc < 2**63, == X (mod P). Times m, with a = acc = a1*2**32 + a0 (a1 < 2**31):
    # a*m = a1*m1*2**64 + (a1*m0 + a0*m1)*2**32 + a0*m0, with 2**64 == 8 (mod P) and
    # t*2**32 == (t >> 29) + ((t mod 2**29) << 32) (mod P) for the middle t < 2**64.
    a0 = acc & M32
    a1 = acc >> S32
    t = a1 * M0
    t += a0 * M1
    x = a0 * M0
    x = (x & P) + (x >> S61)
    a1 *= M1
    a1 <<= S3
    x += a1
    x += t >> S29
    t &= M29
    t <<= S32
    x += t  # < 2**61 + 8 + 2**63 + 2**35 + 2**61 < 2**64
    x = (x & P) + (x >> S61)
    x = (x & P) + (x >> S61)
    x[x == P] = 0  # x <= P here; Python's hash gives the canonical residue
    x ^= x >> S29
    x &= M32
    return x


NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_platform() -> None:
    """Refuse to run where the lock-free read protocol is not known to be safe.

    With the compiled core (``shmstore._native``) every load and store of the protocol
    carries its C11 ordering (``shmstore/_csrc/protocol.h``), so 64-bit Linux on x86-64
    and on aarch64 (Graviton, Ampere, Apple-silicon containers) is admitted. The
    pure-Python core relies on x86-64's total store order instead: aligned 8-byte loads
    and stores issued from Python are not reordered against each other there, while
    ARM64 and other weakly ordered CPUs can reorder them and Python cannot issue
    barriers; so without the compiled core only x86-64 is admitted.

    Raises:
        UnsupportedPlatformError: not 64-bit Linux on x86-64, or on aarch64 with the
            compiled core.
    """
    from . import _compiled  # noqa: PLC0415 (the layout module is below the loader)

    if not sys.platform.startswith("linux"):
        raise UnsupportedPlatformError(
            f"shmstore needs Linux (POSIX shared memory, OFD locks); this is {sys.platform!r}."
        )
    if sys.byteorder != "little":  # the hash reads keys as little-endian words, in C too
        raise UnsupportedPlatformError(f"shmstore needs a little-endian CPU; this one is {sys.byteorder}-endian.")
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return
    if machine in ("aarch64", "arm64"):
        if _compiled.native is not None:
            return
        raise UnsupportedPlatformError(
            f"shmstore's pure-Python core needs x86-64 memory ordering; on {platform.machine()!r} "
            f"only the compiled core orders its reads safely, and it is turned off "
            f"({_compiled.ENV} is set). Unset {_compiled.ENV} and install shmstore with a "
            f"C compiler present."
        )
    raise UnsupportedPlatformError(
        f"shmstore runs on 64-bit Linux on x86-64 or aarch64; this CPU is "
        f"{platform.machine()!r}, where its lock-free reads are not known to be safe."
    )


def check_name(name: object) -> str:
    """Validate a store name and return it.

    Raises:
        InvalidNameError: not a 1-64 character string of ``[A-Za-z0-9_.-]``.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidNameError(
            f"invalid store name {name!r}: use 1 to 64 characters from A-Z a-z 0-9 _ . -"
        )
    return name


# IPC object names. '@' cannot appear in a store name, so no store's objects can
# collide with another's.
def data_name(name: str) -> str:
    return f"/shmstore.{name}"


def channel_name(name: str) -> str:
    return f"/shmstore.{name}@ch"


def lock_name(name: str) -> str:
    return f"/shmstore.{name}@lock"


def bell_name(name: str) -> str:
    return f"/shmstore.{name}@bell"


def reply_sem_name(name: str, client: int) -> str:
    return f"/shmstore.{name}@r{client}"


def watch_sem_name(name: str, client: int) -> str:
    return f"/shmstore.{name}@w{client}"


def access_name(name: str) -> str:
    """The access bytes LRU eviction reads (``Layout.access_size``; clients map it writable)."""
    return f"/shmstore.{name}@acc"


def redo_name(name: str) -> str:
    return f"/shmstore.{name}@redo"


def table_prefix(name: str) -> str:
    """A table segment is this plus the table name (``shmstore._table``)."""
    return f"/shmstore.{name}@t."


def handover_prefix(name: str) -> str:
    """A handover segment is this plus 16 hex digits (``shmstore._handover``)."""
    return f"/shmstore.{name}@x"


# The same objects as entries of /dev/shm, where Linux shows them: a segment ``/X`` as
# ``X``, a semaphore ``/X`` as ``sem.X``. Every entry of store NAME is ``shmstore.NAME``
# or ``shmstore.NAME@<suffix>`` (``sem.`` before it for semaphores), so listing,
# grouping and removing a store's objects all go through the functions below.
SHM_DIR = "/dev/shm"
_ENTRY_RE = re.compile(r"^(sem\.)?shmstore\.([A-Za-z0-9_.-]{1,64})(@.*)?$")
#: suffix -> kind of every object the library and the coordinator make (a tool's own
#: objects under a store's name, e.g. a stop semaphore, are not among them)
_KIND_RE = re.compile(r"^(?:(?P<data>)|@(?P<channel>ch)|@(?P<lock>lock)|@(?P<redo>redo)|@(?P<bell>bell)|@(?P<access>acc)"
                      r"|@r(?P<reply>\d+)|@w(?P<watch>\d+)|@t\.(?P<table>.+)|@x(?P<handover>.+))$")


def parse_entry(entry: str) -> tuple[str, str, bool] | None:
    """``(store name, suffix, is a semaphore)`` of a /dev/shm entry, or None if it
    belongs to no store (``"shmstore.app@r3"`` -> ``("app", "@r3", False)``)."""
    m = _ENTRY_RE.match(entry)
    return None if m is None else (m.group(2), m.group(3) or "", m.group(1) is not None)


def entry_kind(suffix: str) -> str | None:
    """What the object of ``suffix`` is: ``data``, ``channel``, ``lock``, ``redo``,
    ``access``, ``bell``, ``reply``, ``watch``, ``table`` or ``handover``; None for an object the
    store itself never makes."""
    m = _KIND_RE.match(suffix)
    return None if m is None else m.lastgroup


def _listing() -> list[str]:
    try:
        return sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []


def shm_entries() -> dict[str, list[str]]:
    """``{store name: its /dev/shm entries, sorted}`` for every store with any entry."""
    groups: dict[str, list[str]] = {}
    for entry in _listing():
        parsed = parse_entry(entry)
        if parsed is not None:
            groups.setdefault(parsed[0], []).append(entry)
    return groups


def store_entries(name: str) -> list[str]:
    """Store ``name``'s entries in /dev/shm (segments and semaphores), sorted."""
    return [e for e in _listing() if (p := parse_entry(e)) is not None and p[0] == name]


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def slot_need(klen: int, vlen: int) -> int:
    """Bytes a record of a ``klen``-byte key and ``vlen``-byte value takes in a slot:
    the header, the key padded to 8 bytes, the value."""
    return SLOT_HEADER + ((klen + 7) & ~7) + vlen


class Layout(msgspec.Struct, frozen=True):
    """The sizes a store is created with; fixed for its lifetime.

    Two kinds of store share one format:

    - ``memory == 0``: the single-class store of ``capacity`` records of up to
      ``key_size`` + ``value_size`` bytes (one class; every page assigned to it at
      creation; ``capacity + 1`` slots, the spare lets an update succeed when full);
    - ``memory > 0``: a budget of ``memory`` bytes of pages, handed to size classes
      as they need them; ``value_size`` is the largest value; ``capacity`` bounds the
      records (it sizes the index).
    """

    capacity: int
    key_size: int
    value_size: int
    memory: int = 0
    growth: float = GROWTH

    # -- classes and pages ---------------------------------------------------------

    @property
    def largest_slot(self) -> int:
        return align(slot_need(self.key_size, self.value_size), SLOT_UNIT)

    @property
    def classes(self) -> tuple[int, ...]:
        """Slot sizes of the classes, ascending, each a multiple of SLOT_UNIT.

        A memory store's sizes are ``MIN_SLOT * growth**i`` rounded up to SLOT_UNIT
        (from the ideal sequence, not the rounded one, so small classes stay close
        together), then the largest slot.
        """
        big = self.largest_slot
        if not self.memory:
            return (big,)
        sizes: list[int] = []
        ideal = float(MIN_SLOT)
        while True:
            s = align(int(ideal + 0.5), SLOT_UNIT)
            if s >= big:
                break
            if not sizes or s > sizes[-1]:
                sizes.append(s)
            ideal *= self.growth
        sizes.append(big)
        return tuple(sizes)

    @property
    def nslots(self) -> int:
        """Single-class store: its slots (capacity + 1). A memory store: 0 (its slots
        are per page: ``page_size // classes[c]``)."""
        return 0 if self.memory else self.capacity + 1

    @property
    def page_size(self) -> int:
        """Bytes of a page: a power of two, at least MIN_PAGE and the largest slot
        (a single-class store small enough for one smaller page takes that)."""
        big = max(MIN_PAGE, _pow2_at_least(self.largest_slot))
        if self.memory:
            return big
        return min(big, _pow2_at_least(max(self.nslots * self.largest_slot, PAGE)))

    @property
    def npages(self) -> int:
        if self.memory:
            return self.memory // self.page_size
        per = self.page_size // self.largest_slot
        return -(-self.nslots // per)

    @property
    def nrefs(self) -> int:
        """Slot references: the pages' bytes in SLOT_UNITs (a bucket's slot field)."""
        return self.npages * self.page_size // SLOT_UNIT

    @property
    def nbuckets(self) -> int:
        n = 8
        need = 2 * self.nslots if not self.memory else -(-4 * self.capacity // 3) + 1
        while n < need:
            n <<= 1
        return n

    # -- offsets ---------------------------------------------------------------------

    @property
    def pt_offset(self) -> int:
        return HEADER_SIZE

    @property
    def pages_offset(self) -> int:
        return align(self.pt_offset + 8 * self.npages, PAGE)

    @property
    def index_offset(self) -> int:
        return self.pages_offset + self.npages * self.page_size

    @property
    def size(self) -> int:
        return align(self.index_offset + self.nbuckets * 8, PAGE)

    @property
    def access_size(self) -> int:
        """Bytes of the access segment (LRU eviction): one byte per ACCESS_GRAIN of pages."""
        return align(max(self.npages * self.page_size // ACCESS_GRAIN, 1), PAGE)

    @property
    def fingerprint(self) -> int:
        raw = (f"{FORMAT_VERSION}:{self.capacity}:{self.key_size}:{self.value_size}:{self.memory}:"
               f"{self.classes}:{self.page_size}:{self.npages}:{self.nbuckets}")
        return int.from_bytes(_sha256(raw.encode())[:8], "little") or 1

    def class_for(self, need: int) -> int:
        """The smallest class whose slot holds ``need`` bytes (see :func:`slot_need`),
        or -1 if none does."""
        import bisect  # noqa: PLC0415

        c = bisect.bisect_left(self.classes, need)
        return c if c < len(self.classes) else -1

    def validate(self) -> Layout:
        """Check the sizes and return self.

        Raises:
            InvalidLayoutError: a size is not an integer in its range, or the sizes make
                no store (a budget under one page, too many classes, too many pages).
        """
        for field, value, lo, hi in (
            ("capacity", self.capacity, 1, MAX_CAPACITY),
            ("key_size", self.key_size, 1, MAX_KEY_SIZE),
            ("value_size", self.value_size, 1, MAX_VALUE_SIZE),
            ("memory", self.memory, 0, MAX_MEMORY),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise InvalidLayoutError(f"{field} must be an integer from {lo} to {hi}, got {value!r}")
        g = self.growth
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (1.05 <= g <= 4.0):
            raise InvalidLayoutError(f"growth must be a number from 1.05 to 4, got {g!r}")
        if self.memory and self.memory < self.page_size:
            raise InvalidLayoutError(
                f"memory={self.memory} is less than one page ({self.page_size} bytes, set by the "
                f"largest record: key_size={self.key_size}, value_size={self.value_size}); give "
                f"more memory or a smaller value_size"
            )
        if len(self.classes) > MAX_CLASSES:
            raise InvalidLayoutError(
                f"growth={g} makes {len(self.classes)} size classes up to value_size="
                f"{self.value_size}; at most {MAX_CLASSES}: raise growth"
            )
        if self.nrefs >= (1 << 32) - 1:
            raise InvalidLayoutError(
                f"the store's pages ({self.npages * self.page_size} bytes) exceed the "
                f"{MAX_MEMORY} bytes a bucket can address"
            )
        return self


def class_word(c: int, field: int) -> int:
    """Header word of class ``c``'s field (``C_SLOT_SIZE`` .. ``C_ASKED``)."""
    return H_CLASSES + CLASS_WORDS * c + field


def schema_fingerprint(value_type: object) -> int:
    """A stable 64-bit fingerprint of a value type (0 for untyped stores).

    It is taken from msgspec's JSON schema of the type, so two processes that define
    the same Struct agree, and any change of fields or types changes it.
    """
    if value_type is None:
        return 0
    schema = msgspec.json.encode(msgspec.json.schema(value_type), order="sorted")
    return int.from_bytes(_sha256(schema)[:8], "little") or 1
