"""The write channel's client blocks, from the coordinator's side.

Design
------
:class:`ClientBlocks` holds what one coordinator run keeps per client block (see
``shmstore._channel`` for the blocks themselves):

- the channel, its doorbell and a fresh incarnation, made by :meth:`ClientBlocks.open`;
- one reply semaphore per claimed block, made at the handshake (``_NO_SEM`` until then);
- what the loop reads per block: the byte offsets (``blocks``), the ``SESSION``,
  ``HEAD`` and ``TAIL`` words as numpy views, each client's last ticket (``done``),
  the handshaken blocks (``active``), the sessions answered (``acked``) and those
  closed as out of sync (``refused``).

Its duties, all on the tick or on a wake-up that brought no frames:

- :meth:`ClientBlocks.scan_handshakes`: answer every block claimed with a new SESSION.
- :meth:`ClientBlocks.reclaim_dead_clients`: free the blocks whose process is gone.
- :meth:`ClientBlocks.close_refused`: close a client the loop refused (``_server``).

The loop's hot path (``serve_group``, ``_drain_client`` in ``_server``) reads the lists
and views held here directly. The lists and the ``deferred`` dict are shared with
``Replies``, ``WatchHub`` and the server: the same objects, never copies.

Coordinator thread only.
"""

from __future__ import annotations

import os

import numpy as np
import posix_ipc

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._compiled import acquire, release
from shmstore._shm import unlink_quietly

from ._metrics import ServerMetrics
from ._replies import Deferred
from ._watch import WatchHub


class _NoSem:
    """The reply semaphore of a block nobody has claimed yet (made at the handshake)."""

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


_NO_SEM = _NoSem()


class ClientBlocks:
    """The client blocks of one coordinator run (its thread only).

    Construction makes nothing; :meth:`open` makes the channel, :meth:`bind` hands over
    the metrics and watch hub (both built on that channel) before serving starts, and
    :meth:`close` removes what :meth:`open` made, however far it got.
    """

    def __init__(self, name: str, layout: C.ChannelLayout, seg_q: memoryview,
                 deferred: dict[int, Deferred]) -> None:
        self.name = name
        self.layout = layout
        self.seg_q = seg_q
        #: client -> a reply sent later (a backup being written); the server's dict
        self.deferred = deferred
        self.incarnation = 0
        self.chan: C.ChannelMap | None = None
        self.bell: posix_ipc.Semaphore | None = None
        self.reply_sems: list[posix_ipc.Semaphore] = []
        self.refused: dict[int, int] = {}  # client -> the session logged as out of sync
        self.metrics: ServerMetrics | None = None
        self.watch: WatchHub | None = None

    def open(self) -> None:
        """Make a fresh write channel, doorbell and reply semaphore placeholders."""
        n = self.name
        max_clients = self.layout.max_clients
        self.incarnation = int.from_bytes(os.urandom(8), "little") | 1
        # Reply semaphores are made on demand, one per claimed block (see shmstore._channel):
        # clear any a previous run left, and hold a placeholder until the handshake.
        for i in range(max_clients):
            unlink_quietly(posix_ipc.Semaphore, L.reply_sem_name(n, i))
        self.reply_sems[:] = [_NO_SEM] * max_clients
        unlink_quietly(posix_ipc.Semaphore, L.bell_name(n))
        self.bell = posix_ipc.Semaphore(L.bell_name(n), posix_ipc.O_CREX, mode=0o600, initial_value=0)
        ch = self.chan = C.create_channel(n, self.layout, self.incarnation)
        self.claims = ch.claims()
        # Invariant: acked[i] is the SESSION this run acknowledged in block i (0: none).
        self.acked = np.zeros(max_clients, dtype=np.uint64)
        self.sessions = ch.words(C.C_SESSION)
        self.acks = ch.words(C.C_ACK)
        self.heads = ch.words(C.C_HEAD)
        self.tails = ch.words(C.C_TAIL)
        self.done = [0] * max_clients
        self.active: list[int] = []
        # Byte offsets of each client block, computed once (ChannelLayout.stride is a
        # property: recomputing it twice per served client cost ~4% of a put).
        self.blocks = [ch.layout.block(i) for i in range(max_clients)]
        self.ring_size = ch.layout.ring_size

    def bind(self, metrics: ServerMetrics, watch: WatchHub) -> None:
        """The per-client state kept elsewhere, retired with a client's block."""
        self.metrics = metrics
        self.watch = watch

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
                self.seg_q[L.H_CLIENTS_RECLAIMED] += 1

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
        acquire()  # the claim word before the block words the client wrote ahead of it
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
        release()  # the zeroed block before the ACK that hands it to the client
        q[w + C.C_ACK] = session
        if i not in self.active:
            self.active.append(i)
        self.reply_sems[i].release()

    def scan_handshakes(self) -> None:
        """Answer every client that claimed a block with a new SESSION (a numpy scan of
        the channel header's claim table: the blocks themselves are not touched)."""
        claims = self.claims
        new = np.flatnonzero((claims != self.acked) & (claims != 0))
        for i in new.tolist():
            if self.refused.get(i) != self.sessions[i]:  # not a session closed as out of sync
                self._handshake(i)

    def close_refused(self, i: int) -> None:
        """Close the channel of client ``i``, refused as out of sync (``_server``'s
        ``_refuse_client``, once its frames are answered).

        Closed like :meth:`_forget_client` does, except that SESSION (the client's word)
        is left alone: a new client may be writing it this very moment. The refused
        session is not answered again; a new one is (see :meth:`scan_handshakes`).
        """
        self.metrics.retire(i)
        self.chan.q[self.blocks[i] // 8 + C.C_ACK] = 0
        self.deferred.pop(i, None)
        self.watch.forget(i)
        if i in self.active:
            self.active.remove(i)

    def close(self) -> None:
        """Remove the channel, the doorbell and the reply semaphores (idempotent)."""
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
        for attr in ("sessions", "acks", "heads", "tails"):
            self.__dict__.pop(attr, None)
