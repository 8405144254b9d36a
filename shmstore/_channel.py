"""The write channel between clients and the coordinator.

Design
------
A second shared-memory segment per store (``/shmstore.NAME@ch``, mode 0600), made new
by every coordinator run, holds one *client block* per attached process (a process's
handles on a store share one block: see ``shmstore._attach``)::

    channel header (ChannelLayout.header bytes, >= 4 KiB):
      words 0-7    magic, incarnation, max_clients, ring_size, reply_size, stride
      words 8-9    SLEEPING, ELIDE: the doorbell protocol (coordinator-written, below)
      words 16...  the claim table: one word per client block, the SESSION of the
                   process that claimed it (0: free), written by the claimant
    client block i (stride bytes each):
      +0     control words, client-written   SESSION HEAD PID START ERR_ACK ...
      +128   control words, coordinator-written  ACK TAIL DONE REPLY_LEN ERR_TICKET ...
      +256   request ring (ring_size bytes)  frames written by the client
      ...    reply area (reply_size bytes)   the reply to the client's latest waiting frame
      ...    error area (ERR_AREA bytes)     the first unacknowledged error of an async frame

Every control word has exactly one writer, so no read-modify-write atomics are needed;
each is one aligned u64 access. (The coordinator zeroes a claim word and a block's client
words only while it holds the block's lock, when no client can write them.)

Memory ordering: three publish/consume pairs cross the processes, each a release store
paired with an acquire load, as in protocol.h:

=====================  ==================================  ===============================
what                   the writer: bytes, then a RELEASE   the reader: an ACQUIRE load,
                       store of the word                   then the bytes
=====================  ==================================  ===============================
a frame                client: frame bytes, then ``HEAD``  coordinator: ``HEAD``, then the
                       (``_cwrite.ring_publish``)          frames (``_cwrite.ring_take``)
ring space reused      coordinator: its copies out of the  client: ``TAIL``, then new
                       ring, then ``TAIL``                 frame bytes (``ring_publish``)
                       (``_cwrite.store_release``)
a reply                coordinator: reply and error bytes  client: ``DONE``, then
                       and lengths, then ``DONE``          ``fence_acquire()``, then the
                       (``_cwrite.reply_publish``)         reply (``wait_done``)
=====================  ==================================  ===============================

With the compiled core these are C11 release stores and acquire loads/fences (correct on
aarch64). The pure-Python core makes plain stores and loads through
``memoryview.cast('Q')`` in the same program order, which x86-64's total store order
keeps (loads are not reordered with older loads, stores not with older stores or older
loads); it refuses to run anywhere else (``_layout.check_platform``).

Memory: spent on the processes attached, not reserved for ``max_clients``. The segment
is sized for every block, but /dev/shm is tmpfs, which allocates a page only when it is
first touched; and reading an untouched page of a shared mapping allocates it too. So
nothing scans the blocks: whoever needs to know which blocks are taken reads the claim
table in the header (8 bytes a block), and the coordinator reads only the blocks of its
handshaken clients. A client touches its control page, the ring pages its frames reach
and the reply pages its replies fill. When the coordinator reclaims a block (its process
closed its last handle or died) it gives the block's pages back to tmpfs
(``madvise(MADV_REMOVE)``, which punches a hole in the file) while it holds the block's
lock. One segment with holes was chosen over a segment per client: the coordinator's
loop keeps one mapping and its precomputed block offsets, a client's claim stays one
OFD lock on one fd, and ``destroy()`` has no new names to find. Reply semaphores, one
page of /dev/shm each, are made on demand too: a claimant creates its block's
(``O_CREAT``), the coordinator opens it at the handshake; both are removed with the
channel.

A frame in the ring::

    +--------+--------+-------------------------------+---------+
    | len u32| 0 u32  | payload: msgpack [op, wait, *args] | pad to 8 |
    +--------+--------+-------------------------------+---------+

``len = 0xFFFFFFFF`` marks the rest of the ring as padding: the next frame starts at
ring offset 0. ``HEAD`` and ``TAIL`` count bytes ever written / consumed, so
``HEAD - TAIL`` is the queue depth and a full ring blocks the client (backpressure).

Claiming a block: a client takes an OFD lock (``F_OFD_SETLK``) on byte ``LOCK_BASE + i``
of the channel segment. The kernel drops it when the process dies, however it dies, so a
SIGKILLed client holds nothing anyone waits for, and a reused pid is never mistaken for
it. Then the handshake: the client zeroes ``HEAD``, writes a fresh random ``SESSION``
into its block and then into the claim table, and rings; the coordinator (scanning the
claim table) resets its words for the block and echoes ``ACK = SESSION``. The
coordinator reclaims a block by taking the same lock itself, so it never races a new
claimant.

Wake-ups: the client posts the coordinator's doorbell semaphore after a publish and then
spins briefly on ``DONE`` before sleeping on its own reply semaphore, which the
coordinator posts after each group it served the client in. A compiled coordinator sets
``ELIDE`` and keeps ``SLEEPING`` nonzero (a new value per sleep) only around its
blocking wait on the doorbell (it spins on the rings' HEADs before that); a compiled
client then posts only when it sees a ``SLEEPING`` value after its HEAD store that it
has not posted for yet: once per sleep, not once per frame. Each side's store and the other's load are
separated by a sequentially consistent fence (a Dekker pair, see
``shmstore/_csrc/writer.c``), so either the client posts or the coordinator sees the
frame before it sleeps. A post wakes a sleeping coordinator: a futex system call and a
context switch on each side, ~10-80 us here, so while the coordinator is awake
(draining, or spinning after a group) pipelined frames cost no system call at all. The
pure-Python client cannot fence and always posts; a pure-Python coordinator leaves
``ELIDE`` 0, and every client posts.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

import msgspec
import numpy as np
import posix_ipc

from . import _layout as L
from ._errors import (
    CoordinatorUnavailableError,
    RequestTooLargeError,
    StoreTimeoutError,
    TooManyClientsError,
)

CH_MAGIC = 0x4843_5453_4D48_53  # b"SHMSTCH"
CH_HEADER = 4096
# channel header words
CH_W_MAGIC = 0
CH_W_INCARNATION = 1
CH_W_MAX_CLIENTS = 2
CH_W_RING = 3
CH_W_REPLY = 4
CH_W_STRIDE = 5
CH_W_SLEEPING = 8  # nonzero while the coordinator may block on the doorbell (see Wake-ups)
CH_W_ELIDE = 9  # 1: the coordinator keeps SLEEPING; clients may skip posts while it is 0
CH_W_CLAIMS = 16  # the claim table: word CH_W_CLAIMS + i is block i's claimant's SESSION

# client block words, client-written
C_SESSION = 0
C_HEAD = 1
C_PID = 2
C_START = 3
C_ERR_ACK = 4
C_WATCH = 5  # nonzero: this client wants watch wake-ups (a token the coordinator echoes)
C_CACHE_HITS = 6  # gets answered from the handle's read cache (a counter, see below)
# Per-client counters (one writer: the client; see shmstore/_stats.py). They hold the
# handle's running totals, published by the client (not incremented in place), so a
# handle that re-registers with a new coordinator carries its totals over.
C_READS = 8  # reads (get, get_many keys, store[key]) since the handle opened
C_READ_RETRIES = 9  # reads that met a change in progress and read again
C_WRITES = 10  # write requests sent (wait=False ones included)
C_TIMEOUTS = 11  # writes that raised StoreTimeoutError
C_WRITE_NS = 12  # summed latency of waited writes (send to reply), ns
C_WRITE_NS_MAX = 13  # the slowest waited write, ns
C_WRITES_TIMED = 14  # waited writes summed in C_WRITE_NS
C_WRITE_ERRORS = 15  # writes the coordinator refused with an error
C_COUNTERS = (C_READS, C_READ_RETRIES, C_WRITES, C_TIMEOUTS, C_WRITE_NS, C_WRITE_NS_MAX,
              C_WRITES_TIMED, C_WRITE_ERRORS, C_CACHE_HITS)
# client block words, coordinator-written
C_ACK = 16
C_TAIL = 17
C_DONE = 18
C_REPLY_LEN = 19
C_ERR_TICKET = 20
C_ERR_LEN = 21
C_ERR_COUNT = 22
C_WATCH_ACK = 23  # the C_WATCH token whose semaphore /shmstore.NAME@wN exists (0: none)
CONTROL = 256
ERR_AREA = 1024

PAD_MARK = 0xFFFFFFFF
LOCK_BASE = 1 << 40

# ops
OP_PUT = 1
OP_DELETE = 2
OP_CAS = 3
OP_INCR = 4
OP_BATCH = 5
OP_GET_MANY = 6
OP_PING = 7
OP_CHECKPOINT = 8  # durable stores: take a checkpoint now; replies with its epoch
# snapshots and tables (24-31): see shmstore._snapshot, shmstore._table
OP_SNAPSHOT = 24  # a consistent copy of the store, handed over in a temporary segment
OP_TABLE_CREATE = 25  # [op, wait, table, dtype descr, rows]
OP_TABLE_WRITE = 26  # [op, wait, table, rows as int64 bytes, values as raw dtype bytes]
OP_TABLE_READ = 27  # [op, wait, table]: the whole table, handed over (read fallback)
OP_NAMES = {OP_PUT: "put", OP_DELETE: "delete", OP_CAS: "compare_and_set", OP_INCR: "incr",
            OP_BATCH: "batch", OP_GET_MANY: "get_many", OP_PING: "ping", OP_CHECKPOINT: "checkpoint",
            OP_SNAPSHOT: "snapshot", OP_TABLE_CREATE: "table create", OP_TABLE_WRITE: "table write",
            OP_TABLE_READ: "table read"}
# Durability ops: codes 9-15.
OP_BACKUP = 9  # [op, 1, dest]: write a backup into dest; replies (later) with its epoch
OP_NAMES[OP_BACKUP] = "backup"
#: coordinator-made, WAL-logged only: [OP_EXPIRE, 0, [key, ...], now_ns] deletes those
#: records, each expired at now_ns, one epoch each (see coordinator/_expiry.py)
OP_EXPIRE = 16
OP_NAMES[OP_EXPIRE] = "expire"
#: coordinator-made, WAL-logged only: [OP_EVICT, 0, [key, ...]] evicts those records
#: to make room (eviction="lru" / "volatile-ttl"), one epoch each
OP_EVICT = 17
OP_NAMES[OP_EVICT] = "evict"
#: coordinator-made, WAL-logged only: [OP_MOVE_PAGE, 0, from_class, to_class] moves the
#: page of from_class holding the fewest records to to_class (coordinator/_engine.py)
OP_MOVE_PAGE = 18
OP_NAMES[OP_MOVE_PAGE] = "move page"

# reply status
ST_OK = 0
ST_ERROR = 1

_FLOCK = struct.Struct("hhqqi4x")
_yield = os.sched_yield


def _no_fence() -> None:
    pass


def _native_fence_acquire():
    """``shmstore._native.fence_acquire`` when the compiled core runs, else a no-op."""
    from . import _compiled  # noqa: PLC0415

    return _no_fence if _compiled.native is None else _compiled.native.fence_acquire


def compiled_writer():
    """``shmstore._cwrite`` when the compiled core runs, else None (looked up when a
    channel is made, as ``shmstore._compiled`` asks)."""
    from . import _compiled  # noqa: PLC0415

    if _compiled.native is None:
        return None
    from . import _cwrite  # noqa: PLC0415 (built with _native)

    return _cwrite


def lock_byte(fd: int, client: int, *, test: bool = False) -> bool:
    """Take (or, with ``test``, probe) the OFD write lock on a client block's byte.

    Returns:
        True if the lock was taken (or, when testing, is free).
    """
    arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, LOCK_BASE + client, 1, 0)
    if test:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg)
        return _FLOCK.unpack(got)[0] == fcntl.F_UNLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
        return True
    except OSError as e:
        import errno

        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def unlock_byte(fd: int, client: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, LOCK_BASE + client, 1, 0))


class Spinner:
    """An adaptive spin budget for waiting on another process.

    A wake-up through a semaphore costs tens of microseconds here, so a waiter spins
    first. Spinning pays only while a core is free for the other side; on a busy host
    (more spinners than cores) it steals the very CPU the other side needs. So the
    budget doubles after a spin that succeeded, halves after one that did not, and
    once at zero it is tried again (at the full budget) every ``RETRY`` waits; and the
    spin yields the CPU (``sched_yield``) between looks, as the compiled coordinator's
    does, so a spinner never keeps a core from a runnable coordinator. Measured with
    2 clients doing sync puts on 2 shared cores (``scripts/write_profile.py rate
    --only sync``, medians of 3): both sides spinning without yielding 10.3k puts/s,
    either side alone 14.3-14.6k/s, neither 13.8k/s; both spinning with yields 17.1k/s.
    """

    RETRY = 16
    __slots__ = ("max_ns", "cur_ns", "idle")

    def __init__(self, max_us: float) -> None:
        self.max_ns = int(max_us * 1000)
        self.cur_ns = self.max_ns
        self.idle = 0

    def budget(self) -> int:
        if self.cur_ns == 0 and self.max_ns:
            self.idle += 1
            if self.idle >= self.RETRY:
                self.idle = 0
                return self.max_ns
        return self.cur_ns

    def result(self, budget: int, won: bool) -> None:
        if won:
            self.cur_ns = min(self.max_ns, max(budget, self.max_ns // 8) * 2)
        elif budget:
            self.cur_ns = budget // 2 if budget >= self.max_ns // 4 else 0


class NotConsumed(Exception):
    """Internal: the coordinator died before reading the frame, so it was not applied."""


class ChannelLayout(msgspec.Struct, frozen=True):
    """Sizes of the channel segment (chosen by the coordinator at start)."""

    max_clients: int
    ring_size: int
    reply_size: int

    @property
    def stride(self) -> int:
        return L.align(CONTROL + self.ring_size + self.reply_size + ERR_AREA, L.PAGE)

    @property
    def header(self) -> int:
        """Bytes of the channel header: the fixed words and the claim table."""
        return max(CH_HEADER, L.align(8 * (CH_W_CLAIMS + self.max_clients), L.PAGE))

    @property
    def size(self) -> int:
        return self.header + self.max_clients * self.stride

    def block(self, client: int) -> int:
        """Byte offset of a client block."""
        return self.header + client * self.stride


class ChannelMap:
    """A mapping of the channel segment (both sides use it)."""

    def __init__(self, mm: mmap.mmap, fd: int) -> None:
        self.mm = mm
        self.fd = fd
        self.mv = memoryview(mm)
        self.q = self.mv.cast("Q")
        q = self.q
        if q[CH_W_MAGIC] != CH_MAGIC:
            self.close()
            raise CoordinatorUnavailableError("the write channel is not initialized yet")
        self.incarnation = q[CH_W_INCARNATION]
        self.layout = ChannelLayout(
            max_clients=q[CH_W_MAX_CLIENTS], ring_size=q[CH_W_RING], reply_size=q[CH_W_REPLY]
        )

    def words(self, word: int) -> np.ndarray:
        """A numpy view of one control word across every client block."""
        lay = self.layout
        return np.ndarray(
            (lay.max_clients,), dtype=np.uint64, buffer=self.mm, offset=lay.header + word * 8,
            strides=(lay.stride,),
        )

    def claims(self) -> np.ndarray:
        """A numpy view of the claim table: each block's claimant's SESSION, 0 if free.

        Read this, not the blocks' words: reading an untouched block allocates its pages.
        """
        return np.ndarray((self.layout.max_clients,), dtype=np.uint64, buffer=self.mm,
                          offset=CH_W_CLAIMS * 8)

    def release_block(self, client: int) -> None:
        """Give a reclaimed block's pages back to tmpfs (caller holds its lock); it reads
        as zeros afterwards."""
        lay = self.layout
        self.mm.madvise(mmap.MADV_REMOVE, lay.block(client), lay.stride)

    def close(self) -> None:
        for attr in ("q", "mv"):
            v = self.__dict__.pop(attr, None)
            if v is not None:
                v.release()
        mm = self.__dict__.pop("mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass
        fd = self.__dict__.pop("fd", -1)
        if fd >= 0:
            os.close(fd)

    def drop_after_fork(self) -> None:
        """In a forked child: let go of the parent's channel without touching it.

        Closing the child's copy of the fd does not release the parent's OFD lock; it
        only stops the child from keeping the parent's block alive after the parent dies.
        """
        fd = self.__dict__.pop("fd", -1)
        if fd >= 0:
            os.close(fd)
        for attr in ("q", "mv"):
            v = self.__dict__.pop(attr, None)
            if v is not None:
                v.release()
        self.__dict__.pop("mm", None)


def open_channel(name: str) -> ChannelMap:
    """Map the live channel segment read-write, keeping its fd open for OFD locks."""
    try:
        shm = posix_ipc.SharedMemory(L.channel_name(name))
    except posix_ipc.ExistentialError:
        raise CoordinatorUnavailableError(
            f"store {name!r} has no running coordinator; start one with shmstore serve {name}"
        ) from None
    fd = shm.fd
    size = os.fstat(fd).st_size
    if size < CH_HEADER:
        os.close(fd)
        raise CoordinatorUnavailableError("the write channel is not initialized yet")
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return ChannelMap(mm, fd)


def create_channel(name: str, layout: ChannelLayout, incarnation: int) -> ChannelMap:
    """Create a fresh channel segment (coordinator only), replacing any old one."""
    from ._shm import unlink_quietly

    unlink_quietly(posix_ipc.SharedMemory, L.channel_name(name))
    shm = posix_ipc.SharedMemory(L.channel_name(name), posix_ipc.O_CREX, mode=0o600, size=layout.size)
    fd = shm.fd
    mm = mmap.mmap(fd, layout.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    q = memoryview(mm).cast("Q")
    q[CH_W_INCARNATION] = incarnation
    q[CH_W_MAX_CLIENTS] = layout.max_clients
    q[CH_W_RING] = layout.ring_size
    q[CH_W_REPLY] = layout.reply_size
    q[CH_W_STRIDE] = layout.stride
    q[CH_W_MAGIC] = CH_MAGIC
    q.release()
    return ChannelMap(mm, fd)


_encode = msgspec.msgpack.Encoder().encode
_decode_reply = msgspec.msgpack.Decoder().decode


class ClientChannel:
    """One process's claimed client block: publishes frames and waits for replies.

    Not thread-safe by itself: the Store serializes callers with a process-local lock
    (writes only; reads take no lock).
    """

    def __init__(self, name: str, seg_q: memoryview, *, spin_us: float, timeout: float) -> None:
        self.name = name
        self.seg_q = seg_q
        self.spinner = Spinner(spin_us)
        self.chan = open_channel(name)
        ch = self.chan
        lay = ch.layout
        self.ring_size = lay.ring_size
        self.client = -1
        for i in range(lay.max_clients):
            if lock_byte(ch.fd, i):
                self.client = i
                break
        if self.client < 0:
            ch.close()
            raise TooManyClientsError(
                f"store {name!r}: all {lay.max_clients} client blocks stayed taken until the "
                f"timeout (each process writing to the store holds one); serve the store with a "
                f"larger max_clients, or end idle processes"
            )
        base = lay.block(self.client)
        self.w = base // 8  # first control word
        self.ring_ofs = base + CONTROL
        self.reply_ofs = self.ring_ofs + lay.ring_size
        self.err_ofs = self.reply_ofs + lay.reply_size
        self.bell = posix_ipc.Semaphore(L.bell_name(name))
        # Made on demand (see the module docstring); the coordinator opens it at the
        # handshake and removes it with the channel.
        self.reply_sem = posix_ipc.Semaphore(L.reply_sem_name(name, self.client), posix_ipc.O_CREAT,
                                             mode=0o600, initial_value=0)
        self.head = 0
        self.ticket = 0  # frames published
        self.incarnation = ch.incarnation
        #: the compiled ring writer (None: the pure-Python stores, x86-64 only)
        self.cw = compiled_writer()
        #: the coordinator's SLEEPING value this client last posted the doorbell for
        self.posted = 0
        #: an acquire fence after loading DONE (no-op when pure: x86-64 keeps load order)
        self.fence_acquire = _native_fence_acquire()
        q = ch.q
        w = self.w
        q[w + C_HEAD] = 0
        q[w + C_ERR_ACK] = 0
        q[w + C_WATCH] = 0  # no watch until shmstore._feed registers one
        # The counter words still hold the block's previous client's counts: the
        # coordinator retires and zeroes them at the handshake, before it acknowledges.
        from ._liveness import process_start_ms

        q[w + C_PID] = os.getpid()
        q[w + C_START] = process_start_ms(os.getpid()) or 0
        self.session = int.from_bytes(os.urandom(8), "little") | 1
        q[w + C_SESSION] = self.session
        # Invariant: the claim word is written last: the coordinator finds the block by it.
        from . import _compiled  # noqa: PLC0415

        _compiled.release()  # the block's words before the claim (off x86-64: a C11 fence)
        q[CH_W_CLAIMS + self.client] = self.session
        self.bell.release()
        deadline = time.monotonic() + timeout
        while q[w + C_ACK] != self.session:
            self._sleep_for_reply(0.01)
            if time.monotonic() > deadline:
                self.close()
                raise CoordinatorUnavailableError(
                    f"store {name!r}: the coordinator did not answer the client handshake "
                    f"within {timeout} s"
                )
        _compiled.acquire()  # the ACK before the block the coordinator zeroed for us

    def _sleep_for_reply(self, t: float) -> None:
        try:
            self.reply_sem.acquire(t)
        except posix_ipc.BusyError:
            pass

    def alive(self) -> bool:
        """The coordinator that made this channel still serves the store."""
        return self.seg_q[L.H_COORD_INCARNATION] == self.incarnation

    # -- publish ---------------------------------------------------------------------

    def publish(self, payload: bytes, deadline: float) -> int:
        """Append one frame and ring the doorbell; returns its ticket.

        Blocks while the ring is full (backpressure) until ``deadline``.

        Raises:
            RequestTooLargeError: the frame can never fit the ring.
            StoreTimeoutError: the ring stayed full until the deadline.
            CoordinatorUnavailableError: the coordinator went away while we waited.
        """
        n = len(payload)
        need = 8 + ((n + 7) & ~7)
        R = self.ring_size
        if need > R:
            raise RequestTooLargeError(
                f"a request of {n} bytes does not fit the client queue ({R} bytes); split "
                f"the batch or serve the store with a larger ring_size"
            )
        q = self.chan.q
        mv = self.chan.mv
        w = self.w
        head = self.head
        off = head % R
        pad = R - off if off + need > R else 0
        if pad and pad + need > R:
            # The frame overlaps its own padding (need > off): publish the padding alone,
            # so the coordinator passes it, then write the frame at offset 0. Without
            # this such a frame waited for room that never came, even in an empty ring.
            self._wait_room(head + pad, deadline)
            struct.pack_into("<I", mv, self.ring_ofs + off, PAD_MARK)
            head = self.head = head + pad
            if self.cw is not None:
                self.cw.store_release(self.chan.mm, w + C_HEAD, head)  # after the mark
            else:
                q[w + C_HEAD] = head
            off = pad = 0
        self._wait_room(head + pad + need, deadline)
        cw = self.cw
        if cw is not None:
            # The frame (after its padding mark), then HEAD with a release store.
            self.head = cw.ring_publish(self.chan.mm, w, self.ring_ofs, R, head, payload)
            if self.head < 0:  # _wait_room saw the room; TAIL only grows: impossible
                self.head = head
                raise CoordinatorUnavailableError(f"store {self.name!r}: the write queue's TAIL went back")
        else:
            if pad:
                struct.pack_into("<I", mv, self.ring_ofs + off, PAD_MARK)
                off = 0
            base = self.ring_ofs + off
            struct.pack_into("<II", mv, base, n, 0)
            mv[base + 8 : base + 8 + n] = payload
            self.head = head + pad + need
            # Invariant: HEAD is stored after the frame's bytes (x86-64 keeps store order).
            q[w + C_HEAD] = self.head
        self.ticket += 1
        if cw is None:
            self.bell.release()
        else:
            s = cw.must_ring(self.chan.mm, self.posted)
            if s:
                self.posted = s
                self.bell.release()
        return self.ticket

    def _wait_room(self, end: int, deadline: float) -> None:
        """Wait until the ring can hold bytes up to ``end`` (a HEAD value)."""
        q = self.chan.q
        i = self.w + C_TAIL
        R = self.ring_size
        if end - q[i] <= R:
            return
        self.bell.release()
        while end - q[i] > R:
            if not self.alive():
                raise CoordinatorUnavailableError(
                    f"store {self.name!r}: the coordinator stopped while this client's queue was full"
                )
            if time.monotonic() > deadline:
                raise StoreTimeoutError(
                    f"store {self.name!r}: the write queue stayed full until the timeout; "
                    f"the coordinator is behind (slow disk or too many writers) - retry, "
                    f"raise timeout=, or write less"
                )
            self._sleep_for_reply(0.005)

    def wait_done(self, ticket: int, deadline: float, what: str) -> None:
        """Wait until the coordinator has completed frame ``ticket``.

        Spins for ``spin_us`` first: a wake-up costs tens of microseconds here.
        """
        q = self.chan.q
        i = self.w + C_DONE
        if q[i] >= ticket:
            self.fence_acquire()  # DONE before the reply bytes it vouches for
            return
        spinner = self.spinner
        budget = spinner.budget()
        if budget:
            t_spin = time.perf_counter_ns() + budget
            while time.perf_counter_ns() < t_spin:
                if q[i] >= ticket:
                    spinner.result(budget, True)
                    self.fence_acquire()
                    return
                _yield()  # the coordinator may need this CPU (see Spinner)
            spinner.result(budget, False)
        next_check = time.monotonic() + 0.05
        while q[i] < ticket:
            self._sleep_for_reply(0.01)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.05
                if q[i] >= ticket:
                    break
                if not self.alive() or not _seg_alive(self.seg_q):
                    if q[self.w + C_TAIL] < self.head:
                        # It never read our frame: certainly not applied, safe to resend.
                        raise NotConsumed(what)
                    raise CoordinatorUnavailableError(
                        f"store {self.name!r}: the coordinator stopped with this {what} in "
                        f"flight; it may or may not have been applied - read the key to see"
                    )
            if now > deadline:
                raise StoreTimeoutError(
                    f"store {self.name!r}: no reply to {what} within the timeout; it may "
                    f"still be applied. The coordinator is alive but behind."
                )
        self.fence_acquire()

    def reply(self) -> object:
        """Decode the reply area (valid right after ``wait_done`` of a waiting frame)."""
        q = self.chan.q
        n = q[self.w + C_REPLY_LEN]
        raw = bytes(self.chan.mv[self.reply_ofs : self.reply_ofs + n])
        return _decode_reply(raw)

    def take_error(self) -> tuple[int, str, str] | None:
        """The first unacknowledged error of an async frame, acknowledged now."""
        q = self.chan.q
        w = self.w
        t = q[w + C_ERR_TICKET]
        if t <= q[w + C_ERR_ACK]:
            return None
        n = q[w + C_ERR_LEN]
        type_name, message = _decode_reply(bytes(self.chan.mv[self.err_ofs : self.err_ofs + n]))
        q[w + C_ERR_ACK] = t
        return t, type_name, message

    def close(self) -> None:
        """Give the block back: the coordinator reclaims it when the lock drops."""
        for sem in ("bell", "reply_sem"):
            s = self.__dict__.pop(sem, None)
            if s is not None:
                s.close()
        self.chan.close()

    def drop_after_fork(self) -> None:
        for sem in ("bell", "reply_sem"):
            self.__dict__.pop(sem, None)
        self.chan.drop_after_fork()


def _seg_alive(seg_q: memoryview) -> bool:
    from ._liveness import pid_alive

    return seg_q[L.H_COORD_INCARNATION] != 0 and pid_alive(seg_q[L.H_COORD_PID], seg_q[L.H_COORD_START])
