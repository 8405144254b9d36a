"""The coordinator: the one process that writes a store.

Design
------
``CoordinatorServer(...)`` only records its settings; :meth:`CoordinatorServer.run`
takes over the process (gunicorn's ``Worker.__init__`` / ``run`` split):

1. Take the store's lock: ``flock`` on ``/shmstore.NAME@lock``. The kernel drops it when
   the holder dies, so a second coordinator is refused while one lives, and a dead one's
   lock never needs cleaning.
2. Adopt the existing data segment (its previous coordinator is dead: we hold the lock),
   repairing what a death mid-write can leave (see ``_recovery``), or create a new one.
   A durable store (``path=``) first locks and checks its data directory; a new
   segment is rebuilt from it (checkpoint + WAL replay), an adopted one brought in
   line with it (see ``_durable/_journal.py``).
3. Make a fresh write channel, doorbell and reply semaphores, then publish our pid,
   start time and a new incarnation in the header. Clients of the previous incarnation
   notice and re-register.
4. Loop: wait on the doorbell (a short spin first, then block with a tick timeout);
   drain every client's ring; apply everything as one group (each request through
   ``Applier``); make it durable (the journal seam); then publish replies and ``DONE``
   counters and post each served client's reply semaphore. Every tick: heartbeat, reclaim dead clients, parent check.

Signals (handlers only record the signal; the loop acts on it):

=======  ===================================================================
SIGTERM  graceful: finish the group in hand, sync, checkpoint (durable stores), close
         the channel, exit 0
SIGINT   the same, sooner: stop after the group in hand
SIGHUP   ignored for now (no reloadable settings yet)
=======  ===================================================================

On any exit the header's incarnation and pid go to 0, so clients fail fast with
``CoordinatorUnavailableError`` while readers keep reading the segment.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import sys
import time
from typing import Callable

import posix_ipc

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import (
    CoordinatorRunningError,
    IncompatibleStoreError,
    InvalidLayoutError,
    SchemaMismatchError,
    ShmStoreError,
    StorageError,
)
from shmstore._liveness import process_start_ms
from shmstore._segment import Segment
from shmstore._shm import create_segment, open_segment, unlink_quietly

from ._apply import Applier
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
from ._table import tables_of, unlink_tables
from shmstore._handover import Handovers

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REFUSED = 75  # another coordinator serves the store (EX_TEMPFAIL; 3 is gunicorn's WORKER_BOOT_ERROR)

TICK = 0.1  # seconds between heartbeats / reclaim scans
_FRAME_HEAD = struct.Struct("<II")  # a ring frame's length and its zero word


class _NoSem:
    """The reply semaphore of a block nobody has claimed yet (made at the handshake)."""

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


_NO_SEM = _NoSem()


class CoordinatorServer:
    """Serve one store until stopped. Construction changes no process-wide state."""

    def __init__(self, config: ServerConfig, *, journal: Journal | None = None,
                 ready: Callable[[], None] | None = None) -> None:
        self.config = config
        self.name = L.check_name(config.name)
        self.journal = journal or NullJournal()
        self._ready = ready
        self._signal: int | None = None
        self.lock_fd = -1
        self.seg: Segment | None = None
        self.chan: C.ChannelMap | None = None
        self.bell: posix_ipc.Semaphore | None = None
        self.reply_sems: list[posix_ipc.Semaphore] = []
        self.stopping = False
        self.durable = False
        self.created = False
        #: client -> a reply sent later (a backup being written); see ``_replies``
        self.deferred: dict[int, Deferred] = {}

    # -- signals ---------------------------------------------------------------------

    def _record_signal(self, signum: int, frame: object) -> None:
        self._signal = signum

    def _handle_signal(self) -> None:
        sig, self._signal = self._signal, None
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True

    # -- startup ---------------------------------------------------------------------

    def _segment_exists(self) -> bool:
        try:
            posix_ipc.SharedMemory(L.data_name(self.name), read_only=True).close_fd()
        except posix_ipc.ExistentialError:
            return False
        return True

    def _take_lock(self) -> None:
        shm = posix_ipc.SharedMemory(L.lock_name(self.name), posix_ipc.O_CREAT, mode=0o600, size=0)
        fd = shm.fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = "unknown"
            try:
                seg = open_segment(self.name, timeout=0.5)
                pid = seg.q[L.H_COORD_PID] or "starting"
                seg.close()
            except ShmStoreError:
                pass
            raise CoordinatorRunningError(
                f"store {self.name!r} is already served by a coordinator (pid {pid}); "
                f"connect to it with shmstore.connect({self.name!r}) or stop it first"
            ) from None
        self.lock_fd = fd

    def _open_segment(self) -> Segment:
        cfg = self.config
        try:
            seg = open_segment(self.name, writable=True, timeout=0.2)
        except ShmStoreError as e:
            if type(e).__name__ == "StoreNotFoundError":
                seg = None
            elif type(e).__name__ == "StoreTimeoutError":
                # A creator died before finishing the header: nothing was ever published.
                unlink_quietly(posix_ipc.SharedMemory, L.data_name(self.name))
                seg = None
            else:
                raise
        if seg is not None:
            lay = seg.layout
            want = (cfg.capacity, cfg.key_size, cfg.value_size)
            have = (lay.capacity, lay.key_size, lay.value_size)
            if any(w is not None and w != h for w, h in zip(want, have)):
                seg.close()
                raise IncompatibleStoreError(
                    f"store {self.name!r} exists with capacity={have[0]}, key_size={have[1]}, "
                    f"value_size={have[2]}; serve it with those sizes (or none), or destroy it "
                    f"first with shmstore.destroy({self.name!r})"
                )
            if cfg.schema_given and seg.q[L.H_SCHEMA_FP] != cfg.schema_fp:
                seg.close()
                raise SchemaMismatchError(
                    f"store {self.name!r} was created with another value_type (schema "
                    f"fingerprint differs); serve it with the same value_type or destroy it"
                )
            return seg
        manifest = getattr(self.journal, "manifest", None)  # a durable store's data directory
        layout = L.Layout(
            capacity=cfg.capacity or (manifest.capacity if manifest else DEFAULT_CAPACITY),
            key_size=cfg.key_size or (manifest.key_size if manifest else DEFAULT_KEY_SIZE),
            value_size=cfg.value_size or (manifest.value_size if manifest else DEFAULT_VALUE_SIZE),
        ).validate()
        schema_fp = manifest.schema_fp if manifest and not cfg.schema_given else cfg.schema_fp
        self._check_shm_space(layout)
        self.created = True
        return create_segment(self.name, layout, schema_fp)

    def _channel_layout(self) -> C.ChannelLayout:
        cfg = self.config
        return C.ChannelLayout(max_clients=cfg.max_clients, ring_size=cfg.ring_size, reply_size=cfg.reply_size)

    def _check_shm_space(self, layout: L.Layout | None) -> None:
        """Refuse sizes that /dev/shm cannot hold, before creating anything.

        Counted: the data segment (``layout``; None when an existing one is adopted),
        the write channel and the redo area, at their full sizes. A POSIX shared memory
        object is sparse, so an oversized one is created without complaint and the
        coordinator dies of SIGBUS the first time a page does not fit, after it filled
        /dev/shm for every process on the host; hence the full sizes, not what is used
        at first.

        Raises:
            InvalidLayoutError: the sizes exceed /dev/shm's free space; the message gives
                the numbers and what to change.
        """
        cfg = self.config
        parts = []
        if layout is not None:
            parts.append(("data segment", layout.size))
        parts.append(("write channel", self._channel_layout().size))
        parts.append(("redo area", L.align(cfg.ring_size + 16, L.PAGE)))
        need = sum(n for _, n in parts)
        try:
            st = os.statvfs(L.SHM_DIR)
        except OSError:
            return  # no such directory to measure (not Linux): the creation itself decides
        free = st.f_bavail * st.f_frsize
        if need > free:
            mib = 1 << 20
            detail = ", ".join(f"{what} {n / mib:,.1f} MiB" for what, n in parts)
            raise InvalidLayoutError(
                f"store {self.name!r} needs {need / mib:,.1f} MiB of shared memory ({detail}) but "
                f"{L.SHM_DIR} has {free / mib:,.1f} MiB free of {st.f_blocks * st.f_frsize / mib:,.1f} MiB; "
                f"nothing was created. Serve it with a smaller capacity or value_size (or fewer "
                f"max_clients / a smaller ring_size), or give {L.SHM_DIR} more room (e.g. "
                f"mount -o remount,size=... {L.SHM_DIR}, or docker run --shm-size)"
            )

    def _undo_start(self) -> None:
        """After a failed start: remove what this start made, so no half-made store is
        left (a later connect() gets StoreNotFoundError at once, not a wait for a
        segment "still being created"). A segment that existed before is kept (it is
        still readable), and so are its lock and redo area. Called holding the lock: the
        lock's name is unlinked before the lock is dropped, so no other coordinator can
        have made a new one meanwhile."""
        if self.created:
            if self.seg is not None:
                self.seg.close()
                self.seg = None
            unlink_quietly(posix_ipc.SharedMemory, L.data_name(self.name))
            unlink_tables(self.name)
        if self.lock_fd < 0:
            return  # not ours to clean: we never held the store's lock
        try:
            posix_ipc.SharedMemory(L.data_name(self.name), read_only=True).close_fd()
            return  # a segment is there (adopted, or we failed before looking at it)
        except posix_ipc.ExistentialError:
            pass
        unlink_quietly(posix_ipc.SharedMemory, L.redo_name(self.name))
        unlink_quietly(posix_ipc.SharedMemory, L.lock_name(self.name))

    def _open_ipc(self) -> None:
        cfg = self.config
        n = self.name
        self.incarnation = int.from_bytes(os.urandom(8), "little") | 1
        # Reply semaphores are made on demand, one per claimed block (see shmstore._channel):
        # clear any a previous run left, and hold a placeholder until the handshake.
        for i in range(cfg.max_clients):
            unlink_quietly(posix_ipc.Semaphore, L.reply_sem_name(n, i))
        self.reply_sems[:] = [_NO_SEM] * cfg.max_clients
        unlink_quietly(posix_ipc.Semaphore, L.bell_name(n))
        self.bell = posix_ipc.Semaphore(L.bell_name(n), posix_ipc.O_CREX, mode=0o600, initial_value=0)
        self.chan = C.create_channel(n, self._channel_layout(), self.incarnation)
        import numpy as np

        self.claims = self.chan.claims()
        # Invariant: acked[i] is the SESSION this run acknowledged in block i (0: none).
        self.acked = np.zeros(cfg.max_clients, dtype=np.uint64)

    def setup(self) -> None:
        """Everything up to serving: lock, segment, repair, channel, header."""
        cfg = self.config = validate(self.config)  # the one check of the settings (_config)
        L.check_platform()
        if not self._segment_exists() and (cfg.path is None or None not in (cfg.capacity, cfg.key_size, cfg.value_size)):
            # Sizes known before the lock: refuse at once, having made nothing at all
            # (with a data directory and sizes left to its manifest: in _open_segment).
            self._check_shm_space(L.Layout(capacity=cfg.capacity or DEFAULT_CAPACITY,
                                           key_size=cfg.key_size or DEFAULT_KEY_SIZE,
                                           value_size=cfg.value_size or DEFAULT_VALUE_SIZE).validate())
        self._take_lock()
        if cfg.path is not None and isinstance(self.journal, NullJournal):
            from ._durable import DurableJournal  # noqa: PLC0415

            self.journal = DurableJournal(cfg)
        self.durable = hasattr(self.journal, "checkpoint")
        if self.durable:
            self.journal.prepare()  # lock the data directory, check its parameters
        self.seg = self._open_segment()
        seg = self.seg
        q = seg.q
        q[L.H_COORD_INCARNATION] = 0
        if self.created and self.durable:
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
        self.engine = Engine(seg)
        self.redo = RedoArea(self.name, cfg.ring_size)
        tables = tables_of(self.engine)  # snapshots/tables: adopt the table segments
        table_redo = tables.pending_redo(self.redo)  # read before repair() clears it
        self.repair_report = repair(seg, self.engine, self.redo)
        self.repair_report["table_redone"] = tables.finish_repair(table_redo)
        self.handovers = Handovers(self.name)
        self.engine.redo = self.redo
        self.journal.open(seg, self.engine)
        if self.created:
            # No change records older than this segment exist (a rebuild from disk
            # keeps no freed slots): feeds from before it must resync.
            q[L.H_FEED_HORIZON] = self.engine.epoch
        self.expirer = Expirer(self.engine, self.journal)
        self._open_ipc()
        ch = self.chan
        self.sessions = ch.words(C.C_SESSION)
        self.acks = ch.words(C.C_ACK)
        self.heads = ch.words(C.C_HEAD)
        self.tails = ch.words(C.C_TAIL)
        self.done = [0] * cfg.max_clients
        self.active: list[int] = []
        self.watch = WatchHub(self.name, ch, q, self.active)
        self.metrics = ServerMetrics(q, ch)
        # Byte offsets of each client block, computed once (ChannelLayout.stride is a
        # property: recomputing it twice per served client cost ~4% of a put).
        self.blocks = [ch.layout.block(i) for i in range(cfg.max_clients)]
        self.ring_size = ch.layout.ring_size
        self._refused: dict[int, int] = {}  # client -> the session logged as out of sync
        self.replies = Replies(ch, self.blocks, self.done, self.deferred, self.active, self.reply_sems)
        self.applier = Applier(seg=seg, engine=self.engine, journal=self.journal, expirer=self.expirer,
                               handovers=self.handovers, replies=self.replies, durable=self.durable)
        q[L.H_MAX_CLIENTS] = cfg.max_clients
        q[L.H_RING_SIZE] = cfg.ring_size
        q[L.H_REPLY_SIZE] = cfg.reply_size
        q[L.H_COORD_PID] = os.getpid()
        q[L.H_COORD_START] = process_start_ms(os.getpid()) or 0
        q[L.H_HEARTBEAT] = time.time_ns()
        q[L.H_STATE] = L.STATE_READY
        q[L.H_COORD_INCARNATION] = self.incarnation

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

    def loop(self) -> None:
        bell = self.bell
        # A fixed spin, unlike the clients' adaptive one: if both sides backed off,
        # neither side's spin could ever win again (each waits for the other to spin).
        spin_ns = int(self.config.spin_us * 1000)
        next_tick = 0.0
        while not self.stopping:
            # Wait for the doorbell: spin briefly (a wake-up costs ~80 us), then block.
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
            if self.deferred:
                self.replies.reply_deferred(block=False)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self.tick()
            self.watch.service()
        # Drain what is already queued before going away (graceful stop).
        self.serve_group()
        self.replies.reply_deferred(block=True)
        if self.durable:
            self.journal.checkpoint()  # a clean stop leaves nothing to replay

    def tick(self) -> None:
        q = self.seg.q
        q[L.H_HEARTBEAT] = time.time_ns()
        self._scan_handshakes()
        self.journal.tick()
        self.expirer.tick()
        self.reclaim_dead_clients()
        self.handovers.sweep()
        ppid = self.config.parent_pid
        if ppid and os.getppid() != ppid:
            self.stopping = True

    def reclaim_dead_clients(self) -> None:
        """Free the blocks of clients whose process is gone (their OFD lock dropped) and
        give their pages back (see ``shmstore._channel``: memory)."""
        ch = self.chan
        for i in list(self.active):
            if C.lock_byte(ch.fd, i):
                # We hold the lock: nobody can claim the block while we reset it.
                self.metrics.retire(i)
                self._forget_client(i)
                ch.release_block(i)
                sem, self.reply_sems[i] = self.reply_sems[i], _NO_SEM
                sem.close()  # the next claimant makes it anew
                unlink_quietly(posix_ipc.Semaphore, L.reply_sem_name(self.name, i))
                C.unlock_byte(ch.fd, i)
                self.seg.q[L.H_CLIENTS_RECLAIMED] += 1

    def _forget_client(self, i: int) -> None:
        q = self.chan.q
        w = self.chan.layout.block(i) // 8
        q[w + C.C_ACK] = 0
        q[w + C.C_SESSION] = 0
        q[w + C.C_TAIL] = q[w + C.C_HEAD]
        q[C.CH_W_CLAIMS + i] = 0  # the claimant's word: nobody writes it while we hold the lock
        self.acked[i] = 0
        self.deferred.pop(i, None)
        self.watch.forget(i)
        if i in self.active:
            self.active.remove(i)

    def _handshake(self, i: int) -> None:
        q = self.chan.q
        w = self.chan.layout.block(i) // 8
        session = q[C.CH_W_CLAIMS + i]
        if q[w + C.C_ACK]:
            # The block's previous client closed (or died) and this one claimed it before
            # a tick could reclaim it: retire what the old client left, as a reclaim does.
            self.metrics.retire(i)
            self.deferred.pop(i, None)
            self.watch.forget(i)
        # Invariant: zeroed before ACK, the client's first publish comes after it (and
        # not by the client itself at claim time: the old client's counts were there).
        for word in C.C_COUNTERS:
            q[w + word] = 0
        q[w + C.C_TAIL] = 0
        q[w + C.C_DONE] = 0
        q[w + C.C_REPLY_LEN] = 0
        q[w + C.C_ERR_TICKET] = 0
        q[w + C.C_ERR_LEN] = 0
        q[w + C.C_ERR_COUNT] = 0
        self.done[i] = 0
        if self.reply_sems[i] is _NO_SEM:
            try:  # the claimant made it; O_CREAT in case a reclaim raced its removal
                self.reply_sems[i] = posix_ipc.Semaphore(L.reply_sem_name(self.name, i), posix_ipc.O_CREAT,
                                                         mode=0o600, initial_value=0)
            except posix_ipc.Error:
                return  # not answered: the client retries until its timeout
        self.acked[i] = session
        q[w + C.C_ACK] = session
        if i not in self.active:
            self.active.append(i)
        self.reply_sems[i].release()

    def _scan_handshakes(self) -> None:
        """Answer every client that claimed a block with a new SESSION (a numpy scan of
        the channel header's claim table: the blocks themselves are not touched)."""
        import numpy as np

        claims = self.claims
        new = np.flatnonzero((claims != self.acked) & (claims != 0))
        for i in new.tolist():
            if self._refused.get(i) != self.sessions[i]:  # not a session closed as out of sync
                self._handshake(i)

    def serve_group(self) -> None:
        """Drain every client's ring, apply as one group, sync, then reply.

        New clients are answered when a wake-up brings no frames (a handshake rings the
        doorbell and sends nothing until answered) and on every tick; the scan costs
        ~5 us, so it is not paid per group while clients keep writing.
        """
        heads = self.heads
        tails = self.tails
        served: list[tuple[int, bytes | None, tuple[int, bytes] | None]] = []
        nframes = 0
        for i in list(self.active):  # a client refused by _drain_client leaves it
            if heads[i] != tails[i] and i not in self.deferred:  # a deferred client waits
                reply, err, n = self._drain_client(i)
                served.append((i, reply, err))
                nframes += n
        if not served:
            self._scan_handshakes()
            return
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
        ch = self.chan
        cq = ch.q
        mv = ch.mv
        lay = ch.layout
        blocks = self.blocks
        for i, reply, err in served:
            base = blocks[i]
            w = base // 8
            if reply is not None:
                o = base + C.CONTROL + lay.ring_size
                mv[o : o + len(reply)] = reply
                cq[w + C.C_REPLY_LEN] = len(reply)
            if err is not None:
                ticket, blob = err
                o = base + C.CONTROL + lay.ring_size + lay.reply_size
                mv[o : o + len(blob)] = blob
                cq[w + C.C_ERR_LEN] = len(blob)
                cq[w + C.C_ERR_TICKET] = ticket
            # Invariant: DONE is stored after the reply bytes it vouches for.
            d = self.deferred.get(i)
            cq[w + C.C_DONE] = self.done[i] if d is None else d.ticket - 1
            self.reply_sems[i].release()

    def _drain_client(self, i: int) -> tuple[bytes | None, tuple[int, bytes] | None, int]:
        """Copy client ``i``'s published frames out of its ring and apply them.

        Every word the client wrote is bounded before use: ``0 <= HEAD - TAIL <=
        ring_size``, both 8-aligned, each frame's length within the ring and within
        ``HEAD``, a padding mark only where a frame could not fit (never at offset 0),
        the frame header's second word 0. So one drain walks at most ``ring_size``
        bytes: one client costs at most its own ring's worth per wake-up. A client
        whose words are impossible is out of sync with us: its waiting frame (if any)
        gets a ``ProtocolError`` and its channel is closed (see :meth:`_refuse_client`).
        """
        ch = self.chan
        cq = ch.q
        mv = ch.mv
        R = self.ring_size
        base = self.blocks[i]
        w = base // 8
        ring = base + C.CONTROL
        head = cq[w + C.C_HEAD]
        tail = cq[w + C.C_TAIL]
        if head < tail or head - tail > R or tail % R & 7:
            return self._refuse_client(i, f"HEAD={head} TAIL={tail} (ring of {R} bytes)")
        frames = []
        unpack = _FRAME_HEAD.unpack_from
        while tail < head:
            off = tail % R
            n, zero = unpack(mv, ring + off) if off + 8 <= R else (C.PAD_MARK, 0)
            if n == C.PAD_MARK:
                if off == 0 or tail + R - off > head:
                    return self._refuse_client(i, f"a padding mark at ring offset {off}", frames)
                tail += R - off
                continue
            need = 8 + ((n + 7) & ~7)
            if zero or n > R - off - 8 or tail + need > head:
                return self._refuse_client(i, f"a frame of {n} bytes at ring offset {off}", frames)
            frames.append(bytes(mv[ring + off + 8 : ring + off + 8 + n]))
            tail += need
        cq[w + C.C_TAIL] = tail  # the client may reuse the space now: we hold copies
        has_err = cq[w + C.C_ERR_TICKET] > cq[w + C.C_ERR_ACK]
        reply, err = self.applier.apply_frames(i, frames, has_err)  # coordinator/_apply.py
        return reply, err, len(frames)

    def _refuse_client(self, i: int, what: str, frames: list | None = None,
                       ) -> tuple[bytes | None, tuple[int, bytes] | None, int]:
        """Client ``i`` wrote impossible control words or framing: apply the whole
        frames before the bad spot, answer the bad one with a ``ProtocolError``, and
        close its channel (ACK cleared: it must register again). Logged once per session."""
        cq = self.chan.q
        w = self.blocks[i] // 8
        session = cq[w + C.C_SESSION]
        if session != cq[w + C.C_ACK] and not frames:
            # The block's client closed and a new one claimed it (it zeroed HEAD) before
            # a tick reclaimed it: nothing to drain, the handshake resets the words.
            return None, None, 0
        if self._refused.get(i) != session:
            self._refused[i] = session
            print(f"shmstore coordinator: store {self.name!r}: client block {i} (pid "
                  f"{cq[w + C.C_PID]}) is out of sync: {what}; its channel is closed",
                  file=sys.stderr, flush=True)
        frames = list(frames or ())
        frames.append(None)  # apply_frames answers it with a ProtocolError
        cq[w + C.C_TAIL] = cq[w + C.C_HEAD]  # nothing more is read from it
        has_err = cq[w + C.C_ERR_TICKET] > cq[w + C.C_ERR_ACK]
        reply, err = self.applier.apply_frames(i, frames, has_err)
        # Closed like _forget_client does, except that SESSION (the client's word) is
        # left alone: a new client may be writing it this very moment. The refused
        # session is not answered again; a new one is (see _scan_handshakes).
        self.metrics.retire(i)
        cq[w + C.C_ACK] = 0
        self.deferred.pop(i, None)
        self.watch.forget(i)
        if i in self.active:
            self.active.remove(i)
        return reply, err, len(frames)

    # -- shutdown ----------------------------------------------------------------------

    def close(self) -> None:
        """Leave the segment for readers; remove the channel; release the lock."""
        if self.seg is not None and not self.seg.closed:
            q = self.seg.q
            if q[L.H_COORD_PID] == os.getpid():
                q[L.H_COORD_INCARNATION] = 0
                q[L.H_COORD_PID] = 0
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
        if self.chan is not None:
            self.chan.close()
            unlink_quietly(posix_ipc.SharedMemory, L.channel_name(self.name))
            self.chan = None
        if self.bell is not None:
            self.bell.close()
            unlink_quietly(posix_ipc.Semaphore, L.bell_name(self.name))
            self.bell = None
        for i, s in enumerate(self.reply_sems):
            s.close()
            unlink_quietly(posix_ipc.Semaphore, L.reply_sem_name(self.name, i))
        self.reply_sems = []
        if self.seg is not None:
            for attr in ("sessions", "acks", "heads", "tails"):
                self.__dict__.pop(attr, None)
            self.engine = None
            self.seg.close()
            self.seg = None
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # drops the flock
            self.lock_fd = -1


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
