"""Waking clients that watch the store: the coordinator's side of ``store.watch()``.

Design
------
A client that wants to be woken writes a nonzero token into its block's ``C_WATCH``
word and rings the doorbell. The coordinator then creates the semaphore
``/shmstore.NAME@wN`` (N: the client block, mode 0600) and echoes the token into
``C_WATCH_ACK``; the client opens it and sleeps on it. After every loop iteration
in which the commit epoch moved (a group of writes, a background reclaim), the
coordinator posts each watching client's semaphore once (not again while it is still
posted, so an idle watcher finds at most one pending wake-up). The client then reads
what changed itself, with ``store.changes()``: the semaphore carries no data.

The coordinator unlinks a client's semaphore when the client clears ``C_WATCH``, when
it reclaims the client's block (the process died or closed its channel), and at close.
``shmstore.destroy`` unlinks any a dead coordinator left.
"""

from __future__ import annotations

import time

import numpy as np
import posix_ipc

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._shm import unlink_quietly

#: while busy, the longest a watch registration waits to be noticed, seconds
SCAN_EVERY = 0.05


class WatchHub:
    """The watch semaphores of one coordinator run (its thread only)."""

    def __init__(self, name: str, chan: C.ChannelMap, seg_q: memoryview, active: list[int]) -> None:
        self.name = name
        self.chan = chan
        self.seg_q = seg_q
        self.active = active  # the handshaken client blocks (ClientBlocks.active, shared)
        self.req = chan.words(C.C_WATCH)
        self.ack = chan.words(C.C_WATCH_ACK)
        self.sems: dict[int, posix_ipc.Semaphore] = {}
        self.last_epoch = seg_q[L.H_EPOCH]
        self.last_groups = -1
        self.next_scan = 0.0

    def service(self) -> None:
        """Register/unregister watchers, then post them if the epoch moved.

        Called every loop iteration. The scan for (un)registrations (a few us of
        numpy) runs when the iteration served no group (a client that registers rings
        the doorbell without sending a frame) or at most every ``SCAN_EVERY`` seconds
        while the coordinator is busy.
        """
        groups = self.seg_q[L.H_GROUPS]
        now = time.monotonic()
        if groups == self.last_groups or now >= self.next_scan:
            self.next_scan = now + SCAN_EVERY
            # Only the handshaken blocks: reading an unclaimed block would allocate its
            # pages (see shmstore._channel: memory).
            if self.active:
                act = np.array(self.active, dtype=np.intp)
                for i in act[self.req[act] != self.ack[act]].tolist():
                    self._update(i)
        self.last_groups = groups
        e = self.seg_q[L.H_EPOCH]
        if e != self.last_epoch:
            self.last_epoch = e
            if self.sems:
                posted = 0
                for sem in self.sems.values():
                    if sem.value == 0:
                        sem.release()
                        posted += 1
                self.seg_q[L.H_WATCH_POSTS] += posted

    def _update(self, i: int) -> None:
        token = int(self.req[i])
        self._drop(i)
        if token:
            name = L.watch_sem_name(self.name, i)
            unlink_quietly(posix_ipc.Semaphore, name)
            self.sems[i] = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
        # Invariant: the semaphore exists before the client sees its token echoed.
        self.ack[i] = token

    def _drop(self, i: int) -> None:
        sem = self.sems.pop(i, None)
        if sem is not None:
            sem.close()
            unlink_quietly(posix_ipc.Semaphore, L.watch_sem_name(self.name, i))

    def forget(self, i: int) -> None:
        """The client of block ``i`` is gone (the caller holds the block's lock)."""
        self._drop(i)
        self.req[i] = 0  # the dead client's word: nobody else writes it while we hold the lock
        self.ack[i] = 0

    def close(self) -> None:
        for i in list(self.sems):
            self._drop(i)
        self.req = self.ack = None
