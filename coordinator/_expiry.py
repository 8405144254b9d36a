"""Reclaiming expired records: the coordinator's side of TTL.

Design
------
Readers already treat an expired record as missing; this module gives its slot back.
Every tick in which the clock has passed the earliest expiry written since the last
scan (``engine.next_expiry``, so a store without due records costs nothing),
:meth:`Expirer.tick` scans the slots' expiry column with numpy (one strided pass),
takes at most ``RECLAIM_PER_TICK`` records whose expiry has passed, and deletes them
as ONE logged op::

    [OP_EXPIRE, 0, [key, ...], now_ns]

applied like a delete per key: a new epoch each (so the deletion shows up in change
feeds and versions never repeat), the index entry removed, the slot freed. The op
goes through the journal like any client op, so a durable store replays it: replay
deletes exactly those keys, which the log says were expired at ``now_ns``.

Determinism. ``compare_and_set``, ``incr`` and ``delete`` behave differently on an
expired record than on a live one, and a replay runs at another time. So before one of
them, :meth:`Expirer.purge` reclaims the key (a logged OP_EXPIRE) if it has expired,
and the engine judges expiries by the same instant (``engine.clock``). On replay the
engine's clock says nothing is expired, and the logged OP_EXPIRE records do the
reclaiming in the same order as the first time. ``put`` and batches do not look at
the old record's liveness, so they need no purge.
"""

from __future__ import annotations


import msgspec
import numpy as np

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import CorruptionError, StorageError
from shmstore._ttl import now_ns

#: most records reclaimed per coordinator tick (0.1 s): bounds the pause it adds
RECLAIM_PER_TICK = 2048
NO_EXPIRY = (1 << 64) - 1

_encode = msgspec.msgpack.Encoder().encode
key_hash = L.key_hash


class Expirer:
    """Background reclaim and purge-before-op for one coordinator (its thread only)."""

    def __init__(self, engine: object, journal: object) -> None:
        self.engine = engine
        self.journal = journal
        self.seg = engine.seg
        self.q = engine.q
        self.now = 0  # the instant the current op judges expiries by
        engine.clock = self._clock

    def _clock(self) -> int:
        return self.now

    def _expired_slot(self, kb: bytes, now: int) -> bool:
        e = self.engine
        _, slot = e.find(kb, key_hash(kb))
        if slot < 0:
            return False
        expiry = self.q[e._slot_word(slot) + L.S_EXPIRY]
        return bool(expiry) and expiry <= now

    def purge(self, kb: bytes) -> None:
        """Before an op that looks at ``kb``'s liveness: reclaim it if expired."""
        now = self.now = now_ns()
        if self._expired_slot(kb, now):
            self._reclaim([kb], now)

    def tick(self) -> int:
        """Reclaim up to ``RECLAIM_PER_TICK`` expired records. Returns how many."""
        seg = self.seg
        e = self.engine
        now = self.now = now_ns()
        if now < e.next_expiry:
            return 0  # nothing can be due: no scan (it touches every slot)
        if getattr(self.journal, "failed", None) is not None:
            return 0  # the WAL refuses writes (disk full): reclaim once it takes them again
        refs, _ = seg.slot_refs()
        expiry = seg.headers(refs)[:, L.S_EXPIRY]
        has = expiry != 0
        due = refs[has & (expiry <= np.uint64(now))]
        later = expiry[has & (expiry > np.uint64(now))]
        # Invariant: every expiry in the slots is >= next_expiry (writes lower it).
        e.next_expiry = NO_EXPIRY if not len(later) else int(later.min())
        del expiry, has
        if not len(due):
            return 0
        if len(due) > RECLAIM_PER_TICK:
            e.next_expiry = 0  # the rest is due already: scan again next tick
        keys = []
        for slot in due[:RECLAIM_PER_TICK].tolist():
            kb = e._key_at(slot)
            # Only the record the index points to (a slot with an expiry is live, but
            # check: nothing unverified goes into the log).
            if kb and e.find(kb, key_hash(kb))[1] == slot:
                keys.append(kb)
        if not keys:
            return 0
        self._reclaim(keys, now)
        try:
            self.journal.commit()
        except StorageError:
            # The disk failed under this very group. Nobody waits for a reclaim, and the
            # journal keeps the group and writes it again every tick (see its commit()),
            # refusing client writes meanwhile: the coordinator must not die of it.
            pass
        return len(keys)

    def _reclaim(self, keys: list[bytes], now: int) -> None:
        e = self.engine
        payload = _encode([C.OP_EXPIRE, 0, keys, now])
        epoch0 = e.epoch
        for kb in keys:
            e.delete(kb)
        self.q[L.H_EXPIRED] += len(keys)
        self.journal.append(epoch0, payload)


def replay_expire(engine: object, op: object) -> None:
    """Apply a logged OP_EXPIRE (an ``_ops.Expire``) again (recovery). Each key must be
    there, expired.

    Raises:
        CorruptionError: a key is missing or not expired at the logged instant: the
            log does not fit the state it is replayed onto.
    """
    keys, now = op.keys, op.now
    q = engine.q
    for kb in keys:
        _, slot = engine.find(engine.check_key(kb), key_hash(kb))
        if slot < 0:
            raise CorruptionError("a logged expiry found no record")
        expiry = q[engine._slot_word(slot) + L.S_EXPIRY]
        if not expiry or expiry > now:
            raise CorruptionError("a logged expiry found a record that had not expired")
        engine.delete(kb)
