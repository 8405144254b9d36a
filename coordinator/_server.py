"""The coordinator: the one process that writes a store.

Design
------
``CoordinatorServer(...)`` only records its settings; :meth:`CoordinatorServer.run`
takes over the process (gunicorn's ``Worker.__init__`` / ``run`` split):

1. Take the store's lock: ``flock`` on ``/shmstore.NAME@lock``. The kernel drops it when
   the holder dies, so a second coordinator is refused while one lives, and a dead one's
   lock never needs cleaning. Steps 1 and 2's lock, checks and segment: ``_startup``.
2. Adopt the existing data segment (its previous coordinator is dead: we hold the lock),
   repairing what a death mid-write can leave (see ``_recovery``), or create a new one.
   A durable store (``path=``) first locks and checks its data directory; a new
   segment is rebuilt from it (checkpoint + WAL replay), an adopted one brought in
   line with it (see ``_durable/_journal.py``).
3. Make a fresh write channel, doorbell and reply semaphores (``_clients``, which keeps
   the client blocks), then publish our pid, start time and a new incarnation in the
   header. Clients of the previous incarnation notice and re-register.
4. Loop: wait on the doorbell (a short spin first, then block with a tick timeout);
   drain every client's ring; apply everything as one group (each request through
   ``Applier``); make it durable (the journal seam); then publish replies and ``DONE``
   counters and post each served client's reply semaphore. Every tick: heartbeat, reclaim dead clients
   (``_clients``), parent check.

Signals (handlers only record the signal; the loop acts on it):

=======  ===================================================================
SIGTERM  graceful: finish the group in hand, sync, checkpoint (durable stores), close
         the channel, exit 0
SIGINT   the same, sooner: stop after the group in hand
SIGHUP   ignored for now (no reloadable settings yet)
=======  ===================================================================

On any exit the header's incarnation and pid go to 0, so clients fail fast with
``CoordinatorUnavailableError`` while readers keep reading the segment.

Where the write path's time goes
--------------------------------
Measured with ``scripts/write_profile.py`` (py-spy on the coordinator and one client;
CPU per put from /proc) on 2 cores shared with other work, so rates are ranges:

- Before the compiled write core: pipelined puts from 1 client 32.1-32.7k/s, the
  coordinator ~16.5 us of CPU a put (two thirds in applying it: decode, dispatch,
  checks, ``Engine.put`` in Python ~8 us), the client ~14.5 us (a doorbell post per
  frame that woke a sleeping coordinator, a ``getpid()`` per request, the counters
  published per request). Sync puts from 2 clients 7.6-10.3k/s: the coordinator's wall
  time was 60% in posting reply semaphores and 20% asleep on the doorbell, each client
  73% asleep on its reply semaphore: wake-ups, with both sides' spins competing for
  the 2 cores.
- Now: a plain put frame is applied by one C call (``_apply``); the ring walk, TAIL,
  replies and DONE are C with release/acquire ordering (``shmstore._channel``); the
  coordinator spins on the rings' HEADs in C (yielding) and a client posts the doorbell
  once per coordinator sleep, not per frame. Pipelined 65-79k/s (102-103k/s once the
host quietened; ``shmstore bench``: 2.65-3.09x Redis's pipeline), the client ~10-11 us a
  put (Store.put's checks and encoding, the frame, the lock; it is the bottleneck), the
  coordinator under 1 us of work a put plus its waiting. Sync from 2 clients
  14.6-18.2k/s (19.9-20.9k/s quieter; ``shmstore bench``: 2.0-2.2x Redis, below one
  client's 30.7k/s: three processes on two cores): still wake-ups: the coordinator's time is its spin and the reply
  semaphore posts (~23% of its wall time, a futex wake of a sleeping client), each
  client's is ~55% asleep on its reply semaphore, ~17% spinning (yielding).
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import time
from typing import Callable

import msgspec
import posix_ipc

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import CoordinatorRunningError, ShmStoreError, StorageError
from shmstore._liveness import process_start_ms
from shmstore._segment import Segment
from shmstore._shm import unlink_quietly

from ._apply import Applier
from ._clients import ClientBlocks
from ._config import (  # noqa: F401  (ServerConfig and the defaults were defined here)
    DEFAULT_CAPACITY,
    DEFAULT_KEY_SIZE,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_REPLY_SIZE,
    DEFAULT_RING_SIZE,
    DEFAULT_VALUE_SIZE,
    ServerConfig,
    validate,
)
from ._engine import Engine
from ._expiry import Expirer
from ._watch import WatchHub
from ._journal import Journal, NullJournal
from ._metrics import ServerMetrics
from ._recovery import RedoArea, repair
from ._replies import Deferred, Replies
from ._startup import Startup
from ._table import tables_of, unlink_tables
from shmstore._handover import Handovers

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REFUSED = 75  # another coordinator serves the store (EX_TEMPFAIL; 3 is gunicorn's WORKER_BOOT_ERROR)

TICK = 0.1  # seconds between heartbeats / reclaim scans
_FRAME_HEAD = struct.Struct("<II")  # a ring frame's length and its zero word


def walk_ring(mv: memoryview, ring: int, R: int, head: int, tail: int) -> tuple[list, int, str | None]:
    """The pure-Python walk of one client's ring (``_cwrite.ring_take`` is the compiled one).

    Every word the client wrote is bounded before use: ``0 <= HEAD - TAIL <= R``, both
    8-aligned, each frame's length within the ring and within ``HEAD``, a padding mark
    only where a frame could not fit (never at offset 0), the frame header's second word
    0. So a walk covers at most ``R`` bytes and reads only the ring's.

    Returns:
        ``(frames, tail, bad)``: copies of the whole frames, where the walk stopped, and
        what was impossible (None: nothing; ``frames`` then holds the frames before it).
    """
    frames: list = []
    if head < tail or head - tail > R or tail % R & 7:
        return frames, tail, f"HEAD={head} TAIL={tail} (ring of {R} bytes)"
    unpack = _FRAME_HEAD.unpack_from
    while tail < head:
        off = tail % R
        n, zero = unpack(mv, ring + off) if off + 8 <= R else (C.PAD_MARK, 0)
        if n == C.PAD_MARK:
            if off == 0 or tail + R - off > head:
                return frames, tail, f"a padding mark at ring offset {off}"
            tail += R - off
            continue
        need = 8 + ((n + 7) & ~7)
        if zero or n > R - off - 8 or tail + need > head:
            return frames, tail, f"a frame of {n} bytes at ring offset {off}"
        frames.append(bytes(mv[ring + off + 8 : ring + off + 8 + n]))
        tail += need
    return frames, tail, None


class CoordinatorServer:
    """Serve one store until stopped. Construction changes no process-wide state."""

    def __init__(self, config: ServerConfig, *, journal: Journal | None = None,
                 ready: Callable[[], None] | None = None) -> None:
        self.config = config
        self.name = L.check_name(config.name)
        self.journal = journal or NullJournal()
        self._ready = ready
        self._signal: int | None = None
        self.startup: Startup | None = None  # the store's lock; its segment made or adopted
        self.seg: Segment | None = None
        self.clients: ClientBlocks | None = None  # the channel and its client blocks
        self.stopping = False
        self.durable = False
        #: client -> a reply sent later (a backup being written); see ``_replies``
        self.deferred: dict[int, Deferred] = {}
        self._sleeps = 0  # blocking waits on the doorbell (the SLEEPING values)
        self.replica = None  # a replica's upstream side (coordinator/_replica.py)
        self.replica_dir = None  # a replica's data directory (a checkpoint only), locked

    # -- signals ---------------------------------------------------------------------

    def _record_signal(self, signum: int, frame: object) -> None:
        self._signal = signum

    def _handle_signal(self) -> None:
        sig, self._signal = self._signal, None
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True

    # -- startup ---------------------------------------------------------------------

    def _undo_start(self) -> None:
        """After a failed start: close a segment this start created, then remove what it
        made (see ``Startup.undo``)."""
        start = self.startup
        if start is None:
            return  # failed before anything was made
        if start.created and self.seg is not None:
            self.seg.close()
            self.seg = None
        start.undo()

    def setup(self) -> None:
        """Everything up to serving: lock, segment, repair, channel, header."""
        cfg = self.config = validate(self.config)  # the one check of the settings (_config)
        L.check_platform()
        start = self.startup = Startup(self.name, cfg)
        start.check_space_first()
        start.take_lock()
        if cfg.path is not None and cfg.upstream is not None:
            # A replica's directory holds only a checkpoint to restart fast (_replica_ckpt).
            from ._durable._datadir import DataDir  # noqa: PLC0415

            self.replica_dir = DataDir(cfg.path)
            self.replica_dir.open_and_lock()
        elif cfg.path is not None and isinstance(self.journal, NullJournal):
            from ._durable import DurableJournal  # noqa: PLC0415

            self.journal = DurableJournal(cfg)
        self.durable = hasattr(self.journal, "checkpoint")
        if self.durable:
            self.journal.prepare()  # lock the data directory, check its parameters
        self.seg = start.open_segment(getattr(self.journal, "manifest", None))  # a durable store's data directory
        seg = self.seg
        # A client's queue holds at least the largest put the store takes (a memory
        # store's values go up to a megabyte; the default queue is 256 KiB).
        ring = max(cfg.ring_size, L.align(seg.value_size + seg.key_size + 64, L.PAGE))
        if ring != cfg.ring_size:
            cfg = self.config = msgspec.structs.replace(cfg, ring_size=ring)
            start.channel_layout = C.ChannelLayout(max_clients=cfg.max_clients, ring_size=ring,
                                                   reply_size=cfg.reply_size)
        q = seg.q
        q[L.H_COORD_INCARNATION] = 0
        if start.created and self.durable:
            # No segment survived (a reboot, or destroy()): rebuild it from the data
            # directory while it is still STATE_INIT, so nobody reads it half-built and
            # a death here leaves a segment the next coordinator discards.
            try:
                self.journal.restore(seg)
            except BaseException:
                seg.close()
                self.seg = None
                unlink_quietly(posix_ipc.SharedMemory, L.data_name(self.name))
                unlink_tables(self.name)  # a checkpoint's tables, made before the replay failed
                raise
        if start.created and self.replica_dir is not None:
            from . import _replica_ckpt  # noqa: PLC0415

            _replica_ckpt.load(seg, cfg.path, cfg.upstream_name or cfg.name, self.name)
        self.engine = Engine(seg)
        self.redo = RedoArea(self.name, cfg.ring_size)
        tables = tables_of(self.engine)  # snapshots/tables: adopt the table segments
        table_redo = tables.pending_redo(self.redo)  # read before repair() clears it
        self.repair_report = repair(seg, self.engine, self.redo)
        self.repair_report["table_redone"] = tables.finish_repair(table_redo)
        self.handovers = Handovers(self.name)
        self.engine.redo = self.redo
        self.journal.open(seg, self.engine)
        self._setup_eviction()
        if start.created:
            # No change records older than this segment exist (a rebuild from disk
            # keeps no freed slots): feeds from before it must resync.
            q[L.H_FEED_HORIZON] = self.engine.epoch
        clients = self.clients = ClientBlocks(self.name, start.channel_layout, q, self.deferred)
        clients.open()
        self.replica = None
        if cfg.upstream is not None:
            from ._replica import Replica, ReplicaExpirer  # noqa: PLC0415

            self.replica = Replica(cfg, seg, self.engine, clients.bell)
            self.replica.start()  # the cursor checked (a resync if needed), the follower started
            self.expirer = ReplicaExpirer(self.engine, self.journal, self.replica)
        else:
            q[L.H_UP_STATE] = 0
            self.expirer = Expirer(self.engine, self.journal)
        ch = clients.chan
        #: the compiled ring reader and reply writer (None: the Python loads and stores)
        self.cw = C.compiled_writer()
        if self.cw is not None:
            ch.q[C.CH_W_ELIDE] = 1  # we keep SLEEPING: clients may skip doorbell posts
        self.watch = WatchHub(self.name, ch, q, clients.active)
        self.metrics = ServerMetrics(q, ch)
        clients.bind(self.metrics, self.watch)
        self.replies = Replies(ch, clients.blocks, clients.done, self.deferred, clients.active, clients.reply_sems)
        kw = dict(seg=seg, engine=self.engine, journal=self.journal, expirer=self.expirer,
                  handovers=self.handovers, replies=self.replies, durable=self.durable)
        if self.replica is not None:
            from ._replica import ReplicaApplier  # noqa: PLC0415

            self.applier = ReplicaApplier(replica=self.replica, **kw)
        else:
            self.applier = Applier(**kw)
        q[L.H_MAX_CLIENTS] = cfg.max_clients
        q[L.H_RING_SIZE] = cfg.ring_size
        q[L.H_REPLY_SIZE] = cfg.reply_size
        q[L.H_COORD_PID] = os.getpid()
        q[L.H_COORD_START] = process_start_ms(os.getpid()) or 0
        q[L.H_HEARTBEAT] = time.time_ns()
        q[L.H_STATE] = L.STATE_READY
        q[L.H_COORD_INCARNATION] = clients.incarnation

    def _setup_eviction(self) -> None:
        """What a full class does (``eviction=``), from here on (replay never evicts on
        its own: its evictions are the logged ones). LRU: the access bytes segment,
        made if missing (mode 0600; clients map it read-write, see coordinator/_evict.py)."""
        import mmap  # noqa: PLC0415

        import numpy as np  # noqa: PLC0415

        from ._evict import make_evictor  # noqa: PLC0415

        policy = L.EVICTION_NAMES[self.config.eviction]
        eng = self.engine
        access = None
        if policy == L.EVICT_LRU:
            size = self.seg.layout.access_size
            shm = posix_ipc.SharedMemory(L.access_name(self.name), posix_ipc.O_CREAT, mode=0o600, size=size)
            try:
                if os.fstat(shm.fd).st_size < size:
                    os.ftruncate(shm.fd, size)
                self.access_mm = mmap.mmap(shm.fd, size)
            finally:
                shm.close_fd()
            access = np.frombuffer(self.access_mm, dtype=np.uint8)
            eng.access = access
            if eng.core is not None:
                eng.core.set_access(self.access_mm)
        else:
            unlink_quietly(posix_ipc.SharedMemory, L.access_name(self.name))
        eng.evictor = make_evictor(policy, eng, access)
        eng.log = self.journal.append
        self.seg.q[L.H_EVICTION] = policy

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a signal, ``stop()`` or the parent's death. Returns an exit code."""
        old = {s: signal.signal(s, self._record_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            try:
                self.setup()
            except BaseException:
                self._undo_start()
                raise
            if self._ready:
                self._ready()
            self.loop()
            return EXIT_OK
        finally:
            self.close()
            for s, h in old.items():
                signal.signal(s, h)

    def stop(self) -> None:
        self.stopping = True

    def _wait_compiled(self, bell: posix_ipc.Semaphore, spin_ns: int) -> None:
        """Wait for frames with the compiled core: spin on the active rings' HEADs (no
        GIL), then block on the doorbell inside SLEEPING (see ``shmstore._channel``,
        Wake-ups): a client posts only while SLEEPING is nonzero, once per value."""
        cw = self.cw
        cl = self.clients
        mm = cl.chan.mm
        deferred = self.deferred
        blocks = cl.blocks
        words = [blocks[i] // 8 for i in cl.active if i not in deferred]  # a deferred client waits
        if bell.value > 0 or cw.wait_pending(mm, words, spin_ns):
            return
        self._sleeps += 1
        cw.set_sleeping(mm, self._sleeps)  # a new value per sleep: clients post once each
        try:
            if bell.value > 0 or cw.wait_pending(mm, words, 0):
                return
            bell.acquire(TICK)
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            pass
        finally:
            cw.set_sleeping(mm, 0)

    def loop(self) -> None:
        bell = self.clients.bell
        # A fixed spin, unlike the clients' adaptive one: if both sides backed off,
        # neither side's spin could ever win again (each waits for the other to spin).
        spin_ns = int(self.config.spin_us * 1000)
        next_tick = 0.0
        backlog = getattr(self.applier, "backlog", None)  # a replica's frames taken but not settled
        while not self.stopping:
            # Wait for the doorbell: spin briefly (a wake-up costs ~80 us), then block.
            if backlog:
                pass  # frames are waiting already
            elif self.cw is not None:
                self._wait_compiled(bell, spin_ns)
            else:
                got = bell.value > 0
                if not got and spin_ns:
                    t_end = time.perf_counter_ns() + spin_ns
                    while time.perf_counter_ns() < t_end:
                        if bell.value > 0:
                            got = True
                            break
                if not got:
                    try:
                        bell.acquire(TICK)
                    except posix_ipc.BusyError:
                        pass
                    except posix_ipc.SignalError:
                        pass
            # Swallow every pending ring: the drain below sees all published frames.
            while bell.value > 0:
                try:
                    bell.acquire(0)
                except posix_ipc.BusyError:
                    break
            if self._signal is not None:
                self._handle_signal()
            self.serve_group()
            if self.replica is not None:
                self.replica.service()  # the stream's entries the follower read
            if self.deferred:
                self.replies.reply_deferred(block=False)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self.tick()
            self.watch.service()
        # Drain what is already queued before going away (graceful stop), a replica's
        # frames taken but not settled included (256 a client a group).
        self.serve_group()
        for _ in range(100_000):
            if not backlog or not self.applier.pending_backlog():
                break
            self.serve_group()
        self.replies.reply_deferred(block=True)
        if self.durable:
            self.journal.checkpoint()  # a clean stop leaves nothing to replay

    def tick(self) -> None:
        q = self.seg.q
        q[L.H_HEARTBEAT] = time.time_ns()
        self.clients.scan_handshakes()
        self.journal.tick()
        self.expirer.tick()
        self.clients.reclaim_dead_clients()
        self.handovers.sweep()
        ppid = self.config.parent_pid
        if ppid and os.getppid() != ppid:
            self.stopping = True

    def serve_group(self) -> None:
        """Drain every client's ring, apply as one group, sync, then reply.

        New clients are answered when a wake-up brings no frames (a handshake rings the
        doorbell and sends nothing until answered) and on every tick; the scan costs
        ~5 us, so it is not paid per group while clients keep writing.
        """
        cl = self.clients
        heads = cl.heads
        tails = cl.tails
        served: list[tuple[int, bytes | None, tuple[int, bytes] | None]] = []
        nframes = 0
        waiting = set(self.applier.pending_backlog()) if self.replica is not None else ()
        for i in list(cl.active):  # a client refused by _drain_client leaves it
            if (heads[i] != tails[i] or i in waiting) and i not in self.deferred:  # a deferred client waits
                reply, err, n = self._drain_client(i)
                served.append((i, reply, err))
                nframes += n
        if not served:
            cl.scan_handshakes()
            return
        served = self.applier.settle(served)  # a replica's writes go upstream here
        try:
            self.journal.commit()
        except StorageError as e:
            # Nothing of this group is acknowledged; see ``shmstore.serve`` (disk trouble).
            served = self.replies.refuse_group(served, e)
        q = self.seg.q
        q[L.H_GROUPS] += 1
        q[L.H_FRAMES] += nframes
        if nframes > q[L.H_MAX_GROUP]:
            q[L.H_MAX_GROUP] = nframes
        self.metrics.group(nframes, served)
        ch = cl.chan
        cq = ch.q
        mv = ch.mv
        lay = ch.layout
        blocks = cl.blocks
        done = cl.done
        reply_sems = cl.reply_sems
        cw = self.cw
        for i, reply, err in served:
            base = blocks[i]
            w = base // 8
            if err is not None:
                ticket, blob = err
                o = base + C.CONTROL + lay.ring_size + lay.reply_size
                mv[o : o + len(blob)] = blob
                cq[w + C.C_ERR_LEN] = len(blob)
                cq[w + C.C_ERR_TICKET] = ticket
            # Invariant: DONE is stored after the reply bytes it vouches for (a release
            # store when compiled; x86-64's store order when pure).
            d = self.deferred.get(i)
            done_i = done[i] if d is None else d.ticket - 1
            if cw is not None:
                cw.reply_publish(ch.mm, w, base + C.CONTROL + lay.ring_size, lay.reply_size, reply, done_i)
            else:
                if reply is not None:
                    o = base + C.CONTROL + lay.ring_size
                    mv[o : o + len(reply)] = reply
                    cq[w + C.C_REPLY_LEN] = len(reply)
                cq[w + C.C_DONE] = done_i
            reply_sems[i].release()

    def _drain_client(self, i: int) -> tuple[bytes | None, tuple[int, bytes] | None, int]:
        """Copy client ``i``'s published frames out of its ring and apply them.

        Every word the client wrote is bounded before use (:func:`walk_ring`, or
        ``_cwrite.ring_take``, its compiled twin: tests/test_cwrite.py compares them
        on hostile rings). So one drain walks at most ``ring_size`` bytes: one client
        costs at most its own ring's worth per wake-up. A client
        whose words are impossible is out of sync with us: its waiting frame (if any)
        gets a ``ProtocolError`` and its channel is closed (see :meth:`_refuse_client`).
        """
        cl = self.clients
        ch = cl.chan
        cq = ch.q
        mv = ch.mv
        R = cl.ring_size
        base = cl.blocks[i]
        w = base // 8
        ring = base + C.CONTROL
        cw = self.cw
        if self.replica is not None and i in self.applier.backlog:
            # Its frames taken before go first; its ring waits (and fills: backpressure).
            has_err = cq[w + C.C_ERR_TICKET] > cq[w + C.C_ERR_ACK]
            reply, err = self.applier.apply_frames(i, [], has_err)
            return reply, err, 0
        if cw is not None:
            # The same walk and checks in C, from an acquire load of HEAD.
            frames, tail, bad = cw.ring_take(ch.mm, w, ring, R, cq[w + C.C_TAIL])
        else:
            frames, tail, bad = walk_ring(mv, ring, R, cq[w + C.C_HEAD], cq[w + C.C_TAIL])
        if bad is not None:
            return self._refuse_client(i, bad, frames)
        # The client may reuse the space now: we hold copies (a release store: our
        # loads of the ring come before it).
        if cw is not None:
            cw.store_release(ch.mm, w + C.C_TAIL, tail)
        else:
            cq[w + C.C_TAIL] = tail
        has_err = cq[w + C.C_ERR_TICKET] > cq[w + C.C_ERR_ACK]
        reply, err = self.applier.apply_frames(i, frames, has_err)  # coordinator/_apply.py
        return reply, err, len(frames)

    def _refuse_client(self, i: int, what: str, frames: list | None = None,
                       ) -> tuple[bytes | None, tuple[int, bytes] | None, int]:
        """Client ``i`` wrote impossible control words or framing: apply the whole
        frames before the bad spot, answer the bad one with a ``ProtocolError``, and
        close its channel (ACK cleared: it must register again). Logged once per session."""
        cl = self.clients
        cq = cl.chan.q
        w = cl.blocks[i] // 8
        session = cq[w + C.C_SESSION]
        if session != cq[w + C.C_ACK] and not frames:
            # The block's client closed and a new one claimed it (it zeroed HEAD) before
            # a tick reclaimed it: nothing to drain, the handshake resets the words.
            return None, None, 0
        if cl.refused.get(i) != session:
            cl.refused[i] = session
            print(f"shmstore coordinator: store {self.name!r}: client block {i} (pid "
                  f"{cq[w + C.C_PID]}) is out of sync: {what}; its channel is closed",
                  file=sys.stderr, flush=True)
        frames = list(frames or ())
        frames.append(None)  # apply_frames answers it with a ProtocolError
        cq[w + C.C_TAIL] = cq[w + C.C_HEAD]  # nothing more is read from it
        has_err = cq[w + C.C_ERR_TICKET] > cq[w + C.C_ERR_ACK]
        reply, err = self.applier.apply_frames(i, frames, has_err)
        cl.close_refused(i)  # ACK cleared; the refused session is not answered again
        return reply, err, len(frames)

    # -- shutdown ----------------------------------------------------------------------

    def close(self) -> None:
        """Leave the segment for readers; remove the channel; release the lock."""
        if self.seg is not None and not self.seg.closed:
            q = self.seg.q
            if q[L.H_COORD_PID] == os.getpid():
                q[L.H_COORD_INCARNATION] = 0
                q[L.H_COORD_PID] = 0
        replica, self.replica = self.replica, None
        if replica is not None:
            replica.close()  # its last checkpoint, if it keeps one
        if self.replica_dir is not None:
            self.replica_dir.unlock()
            self.replica_dir = None
        watch = self.__dict__.pop("watch", None)
        if watch is not None:
            watch.close()
        self.journal.close()
        redo = self.__dict__.pop("redo", None)
        if redo is not None:
            redo.close()
        handovers = self.__dict__.pop("handovers", None)
        if handovers is not None:
            handovers.sweep(everything=True)
        tables = getattr(self.__dict__.get("engine"), "tables", None)
        if tables is not None:
            tables.close()
        if self.clients is not None:
            self.clients.close()
        if self.seg is not None:
            engine = self.__dict__.pop("engine", None)
            if engine is not None:
                engine.evictor = None
                engine.access = None
                if engine.core is not None and "access_mm" in self.__dict__:
                    engine.core.set_access(None)
                engine.close()  # its compiled writer holds a buffer of the mapping
            access_mm = self.__dict__.pop("access_mm", None)
            if access_mm is not None:
                try:
                    access_mm.close()
                except BufferError:  # a view still exports it; the GC unmaps it later
                    pass
            self.engine = None
            self.seg.close()
            self.seg = None
        if self.startup is not None:
            self.startup.release()  # drops the flock


def main_serve(config: ServerConfig, *, ready_fd: int = -1, stderr_fd: int = -1) -> int:
    """Run a coordinator in this process; report readiness by writing to ``ready_fd``.

    ``stderr_fd``: while starting, stderr is a pipe that ``serve()`` reads (and relays),
    so a coordinator dying at start is reported with its last words; once serving,
    stderr becomes ``stderr_fd`` (the caller's own stderr), which the pipe's reader
    sees as EOF.
    """

    def ready() -> None:
        if stderr_fd >= 0:
            sys.stderr.flush()
            os.dup2(stderr_fd, 2)
            os.close(stderr_fd)
        if ready_fd >= 0:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    server = CoordinatorServer(config, ready=ready)
    try:
        return server.run()
    except CoordinatorRunningError as e:
        _report(ready_fd, e)
        return EXIT_REFUSED
    except ShmStoreError as e:
        _report(ready_fd, e)
        return EXIT_ERROR


def _report(ready_fd: int, e: ShmStoreError) -> None:
    msg = f"{type(e).__name__}: {e.message}"
    print(f"shmstore coordinator: {msg}", file=sys.stderr)
    if ready_fd >= 0:
        try:
            os.write(ready_fd, ("error " + msg + "\n").encode())
        except OSError:
            pass
