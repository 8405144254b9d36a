"""Applying ops to the data segment: the coordinator's only writer of slots and index.

Design
------
Every op takes the next epoch ``E`` and is applied copy-on-write (see
``shmstore._layout``)::

    insert   write a free slot (seq 2E+1 -> body -> 2E+2), then store its bucket
    update   write a free slot, repoint the bucket with one store, then free the old
             slot (also stamped 2E+1 -> 2E+2, key kept for change feeds)
    delete   remove the bucket (index generation odd -> backward shift -> even), then
             free the slot; record LAST_DELETE_EPOCH

``H_EPOCH`` is stored after each op, or once after a whole batch, so a reader that
read ``H_EPOCH = E`` knows every op up to E is fully applied and no later op is. A batch
also holds ``H_BATCH_SEQ`` odd while it is applied.

Invariant: a slot the index points to is never written; only free slots are.
Invariant: ops are validated completely before the first store into the segment, so a
rejected op leaves no trace. A batch is validated as a whole first.

The engine keeps no per-key Python objects: lookups probe the segment's own index and
free slots live in one deque, reused oldest first (see ``_freering``); its memory does
not grow with the records.

Two cores, one behaviour
------------------------
With the compiled core (``shmstore._compiled.native`` is not None) every store into the
slots and the index goes through ``shmstore._cwrite.Core`` (``shmstore/_csrc/writer.c``,
the writer side of ``protocol.h``): the stamp odd + release fence, relaxed body stores,
the stamp even with a release store; buckets with release stores; bucket moves inside an
odd index generation; ``H_EPOCH`` and ``H_BATCH_SEQ`` with release stores. That is
correct on aarch64 as well. ``put`` and ``delete`` are one C call each. Without it
(``SHMSTORE_NO_EXTENSIONS=1``) the same stores are made from Python through
memoryviews, in the same order, relying on x86-64's total store order (the pure core
refuses to run elsewhere). Both produce byte-identical segments for the same ops
(``tests/test_cwrite.py``).

Where a put's time went (``scripts/write_profile.py``, py-spy, pipelined puts from one
client, 2 shared cores): the coordinator spent ~17 us of CPU per put, about half of it
in ``Engine.put`` (Python ``key_hash`` ~1 us, ``find``/``_key_at`` ~2 us, ``_store`` and
``_write_slot`` ~4 us); the C ``put`` does all of that in well under 1 us.
"""

from __future__ import annotations


import msgspec
import numpy as np

from shmstore import _compiled
from shmstore import _layout as L
from shmstore._errors import (
    KeyTooLongError,
    StoreFullError,
    ValueEncodingError,
    ValueTooLargeError,
    VersionConflictError,
)
from shmstore._segment import Segment
from shmstore._ttl import now_ns

from ._freering import FreeRing

H_FEED_HORIZON = L.H_FEED_HORIZON

key_hash = L.key_hash
_int_decode = msgspec.msgpack.Decoder(int).decode
_encode = msgspec.msgpack.encode


def _never() -> int:
    return 0


def _core_for(seg: Segment) -> object | None:
    """The compiled writer of a writable segment, or None when the pure core runs."""
    if _compiled.native is None:
        return None
    from shmstore import _cwrite  # noqa: PLC0415 (built with _native; missing: a broken install)

    return _cwrite.Core(seg.mm, (seg.slot0, seg.slot_words, seg.nslots, seg.idx0, seg.mask,
                                 seg.key_size, seg.value_size, seg.layout.size))


def _show(kb: bytes) -> str:
    try:
        return repr(kb.decode())
    except UnicodeDecodeError:
        return repr(kb)


class Engine:
    """Slot and index mutations on a writable segment (coordinator process only).

    Args:
        seg: the writable segment.
        compiled: use the compiled writer (``shmstore._cwrite``); None (the default):
            exactly when the compiled core runs (``shmstore._compiled.native``). False
            forces the pure-Python stores (tests compare the two).
    """

    def __init__(self, seg: Segment, *, compiled: bool | None = None) -> None:
        assert seg.writable
        self.seg = seg
        #: the compiled writer, or None: the stores are made from Python (x86-64 only)
        self.core = _core_for(seg) if compiled is None or compiled else None
        if compiled and self.core is None:
            raise RuntimeError("the compiled core is not loaded (SHMSTORE_NO_EXTENSIONS is set)")
        if self.core is not None:
            self.find = self.core.find  # same signature and result, one C call
        self.q = seg.q
        self.mv = seg.mv
        self.epoch = seg.q[L.H_EPOCH]
        self.free = FreeRing()
        self.capacity = seg.layout.capacity
        self.redo = None  # a RedoArea once serving: holds the batch being applied
        self._zeros = memoryview(bytes(seg.key_size))  # a key's padding (see _write_slot)
        #: The clock cas/incr judge expiries by. The default (0: nothing is expired)
        #: keeps replay deterministic: the live coordinator reclaims an expired record
        #: with a logged op before an op that looks at it, and sets this to the time it
        #: judged by (coordinator/_expiry.py).
        self.clock = _never
        #: A lower bound of every expiry in the slots (0: unknown). The background
        #: reclaim scans the slots only once the clock passes it (coordinator/_expiry.py).
        self.next_expiry = 0

    # -- setup -----------------------------------------------------------------------

    def rebuild_free_list(self) -> None:
        """Free slots = slots no bucket points to. Stamps unreferenced, unfree slots free."""
        seg = self.seg
        idx = seg.index_view()
        used = np.zeros(seg.nslots, dtype=bool)
        live = idx[idx != 0]
        used[(live & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1] = True
        words = seg.slot_words_view()
        free_flag = ((words[:, L.S_META] >> np.uint64(16)) & np.uint64(L.FLAG_FREE)) != 0
        orphans = np.flatnonzero(~used & ~free_flag & (words[:, L.S_SEQ] != 0))
        for slot in orphans.tolist():
            self._free_slot(int(slot), self.next_epoch())
        if len(orphans):
            self.publish()
        # Oldest freed first (never-written slots, stamp 0, before all): see _freering.
        free = np.flatnonzero(~used)
        free = free[np.argsort(words[free, L.S_SEQ], kind="stable")].astype(np.int64)
        self.free = FreeRing(free.tolist())
        self.q[L.H_COUNT] = int(used.sum())

    def close(self) -> None:
        """Release the compiled writer's hold on the mapping (the engine is unusable after)."""
        if self.core is not None:
            self.core.close()

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def publish(self) -> None:
        if self.core is not None:
            self.core.publish_epoch(self.epoch)
        else:
            self.q[L.H_EPOCH] = self.epoch

    # -- low level -------------------------------------------------------------------

    def _slot_word(self, slot: int) -> int:
        return self.seg.slot0 + slot * self.seg.slot_words

    def _key_at(self, slot: int) -> bytes:
        w = self._slot_word(slot)
        klen = self.q[w + L.S_META] & 0xFFFF
        o = w * 8 + L.SLOT_HEADER
        return bytes(self.mv[o : o + klen])

    def find(self, kb: bytes, h: int) -> tuple[int, int]:
        """Probe for a key: ``(pos, slot)`` if present, else ``(first empty pos, -1)``."""
        q = self.q
        seg = self.seg
        mask = seg.mask
        idx0 = seg.idx0
        pos = h & mask
        while True:
            b = q[idx0 + pos]
            if b == 0:
                return pos, -1
            if b >> 32 == h:
                slot = (b & 0xFFFFFFFF) - 1
                if self._key_at(slot) == kb:
                    return pos, slot
            pos = (pos + 1) & mask

    def _write_slot(self, slot: int, epoch: int, kb: bytes, vb: bytes, version: int, expiry: int, flags: int) -> None:
        if expiry and expiry < self.next_expiry:
            self.next_expiry = expiry
        if self.core is not None:
            self.core.write_record(slot, epoch, kb, vb, version, expiry, flags)
            return
        q = self.q
        mv = self.mv
        w = self._slot_word(slot)
        # Invariant: seq is odd from the first byte written to the last (x86-64 keeps
        # the order of these stores as issued).
        q[w] = 2 * epoch + 1
        old_kl = q[w + L.S_META] & 0xFFFF  # the key this slot held (0: never written)
        q[w + L.S_VERSION] = version
        q[w + L.S_EXPIRY] = expiry
        q[w + L.S_META] = len(kb) | (flags << 16) | (len(vb) << 32)
        o = w * 8 + L.SLOT_HEADER
        kl = len(kb)
        mv[o : o + kl] = kb
        # The key area is zero-padded (get_many compares keys as whole u64 words): it
        # is zero past the old key, so only a longer old key's tail needs clearing.
        if old_kl > kl:
            mv[o + kl : o + old_kl] = self._zeros[kl:old_kl]
        if vb:
            vo = o + self.seg.key_size
            mv[vo : vo + len(vb)] = vb
        q[w] = 2 * epoch + 2

    def _free_slot(self, slot: int, epoch: int) -> None:
        if self.core is not None:
            self.core.free_record(slot, epoch)
            self.free.append(slot)
            return
        q = self.q
        w = self._slot_word(slot)
        q[w] = 2 * epoch + 1
        meta = q[w + L.S_META]
        q[w + L.S_META] = (meta & 0xFFFF) | (L.FLAG_FREE << 16)  # key kept, value gone
        q[w + L.S_EXPIRY] = 0
        q[w] = 2 * epoch + 2
        self.free.append(slot)

    def _remove_bucket(self, pos: int) -> None:
        """Backward-shift deletion; the index generation is odd throughout."""
        if self.core is not None:
            self.core.remove_bucket(pos)
            return
        q = self.q
        seg = self.seg
        mask = seg.mask
        idx0 = seg.idx0
        q[L.H_INDEX_GEN] += 1
        i = pos
        j = pos
        while True:
            j = (j + 1) & mask
            b = q[idx0 + j]
            if b == 0:
                break
            home = (b >> 32) & mask
            # Move b back to the hole at i unless its home lies cyclically in (i, j].
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                q[idx0 + i] = b
                i = j
        q[idx0 + i] = 0
        q[L.H_INDEX_GEN] += 1

    # -- checks ----------------------------------------------------------------------

    def check_key(self, kb: object) -> bytes:
        if not isinstance(kb, bytes) or not kb:
            raise ValueEncodingError("a key must be non-empty bytes on the wire")
        if len(kb) > self.seg.key_size:
            raise KeyTooLongError(
                f"key {_show(kb)[:80]} is {len(kb)} bytes; this store's key_size is {self.seg.key_size}"
            )
        return kb

    def check_value(self, vb: object) -> bytes:
        if not isinstance(vb, bytes):
            raise ValueEncodingError("a value must be msgpack bytes on the wire")
        if len(vb) > self.seg.value_size:
            raise ValueTooLargeError(
                f"value of {len(vb)} encoded bytes exceeds value_size={self.seg.value_size}"
            )
        return vb

    # -- ops -------------------------------------------------------------------------

    def get(self, kb: bytes) -> tuple[int, bytes] | None:
        """The live record of a key, ``(version, value)``, from the writer's side."""
        pos, slot = self.find(kb, key_hash(kb))
        if slot < 0:
            return None
        w = self._slot_word(slot)
        q = self.q
        expiry = q[w + L.S_EXPIRY]
        if expiry and expiry <= now_ns():
            return None
        vlen = q[w + L.S_META] >> 32
        vo = w * 8 + L.SLOT_HEADER + self.seg.key_size
        return q[w + L.S_VERSION], bytes(self.mv[vo : vo + vlen])

    def _store(self, kb: bytes, h: int, pos: int, old: int, vb: bytes, expiry: int, epoch: int) -> int:
        """Write a record copy-on-write at ``epoch``; the caller checked capacity."""
        new = self.free.pop()
        q = self.q
        # Invariant: the feed horizon is raised before the reused slot's old change
        # record is overwritten (note_reuse, inlined: this is the hot path).
        seq = q[self.seg.slot0 + new * self.seg.slot_words]
        if seq >= 2 and (seq - 1) >> 1 > q[H_FEED_HORIZON]:
            q[H_FEED_HORIZON] = (seq - 1) >> 1
        self._write_slot(new, epoch, kb, vb, epoch, expiry, 0)
        if self.core is not None:
            self.core.set_bucket(pos, h, new)
        else:
            q[self.seg.idx0 + pos] = (h << 32) | (new + 1)
        if old >= 0:
            self._free_slot(old, epoch)
        else:
            q[L.H_COUNT] += 1
        return epoch

    def _need_room(self, kb: bytes) -> None:
        if self.q[L.H_COUNT] >= self.capacity:
            raise StoreFullError(
                f"store is full ({self.capacity} records); delete records or recreate the "
                f"store with a larger capacity= (key {_show(kb)[:80]} not written)"
            )

    def put(self, kb: bytes, vb: bytes, expiry: int = 0) -> int:
        core = self.core
        if core is not None:
            v = core.put(kb, vb, expiry, self.epoch + 1, self.free, self.capacity)
            if v < 0:
                self._need_room(kb)  # raises StoreFullError (nothing was stored)
            self.epoch = v
            if expiry and expiry < self.next_expiry:
                self.next_expiry = expiry
            return v
        h = key_hash(kb)
        pos, old = self.find(kb, h)
        if old < 0:
            self._need_room(kb)
        v = self._store(kb, h, pos, old, vb, expiry, self.next_epoch())
        self.publish()
        return v

    def delete(self, kb: bytes) -> bool:
        if self.core is not None:
            if not self.core.delete(kb, self.epoch + 1, self.free):
                return False
            self.epoch += 1
            return True
        pos, slot = self.find(kb, key_hash(kb))
        if slot < 0:
            return False
        epoch = self.next_epoch()
        self._unlink(pos, slot, epoch)
        self.publish()
        return True

    def _unlink(self, pos: int, slot: int, epoch: int) -> None:
        if self.core is not None:
            self.core.unlink(pos, slot, epoch, self.free)
            return
        q = self.q
        # Invariant: LAST_DELETE_EPOCH is stored BEFORE the bucket goes, so a reader
        # that saw the miss and then reads it sees this delete's epoch (a consistent
        # read accepts a miss only if no delete happened after its epoch).
        q[L.H_LAST_DELETE_EPOCH] = epoch
        self._remove_bucket(pos)
        self._free_slot(slot, epoch)
        q[L.H_COUNT] -= 1

    def _current_version(self, slot: int) -> int:
        if slot < 0:
            return 0
        w = self._slot_word(slot)
        expiry = self.q[w + L.S_EXPIRY]
        if expiry and expiry <= self.clock():
            return 0
        return self.q[w + L.S_VERSION]

    def cas(self, kb: bytes, vb: bytes, expect: int, expiry: int = 0) -> int:
        h = key_hash(kb)
        pos, old = self.find(kb, h)
        cur = self._current_version(old)
        if cur != expect:
            raise VersionConflictError(
                f"compare_and_set on key {_show(kb)[:80]}: expected version {expect}, "
                f"found {cur if cur else 'no record (version 0)'}; read it again and retry"
            )
        if old < 0:
            self._need_room(kb)
        v = self._store(kb, h, pos, old, vb, expiry, self.next_epoch())
        self.publish()
        return v

    def incr(self, kb: bytes, delta: int) -> int:
        h = key_hash(kb)
        pos, old = self.find(kb, h)
        cur = 0
        expiry = 0
        if self._current_version(old):
            w = self._slot_word(old)
            expiry = self.q[w + L.S_EXPIRY]
            vlen = self.q[w + L.S_META] >> 32
            vo = w * 8 + L.SLOT_HEADER + self.seg.key_size
            try:
                cur = _int_decode(self.mv[vo : vo + vlen])
            except msgspec.DecodeError:  # not an int, or not msgpack at all (a raw frame's value)
                raise ValueEncodingError(
                    f"incr on key {_show(kb)[:80]}: the stored value is not an integer"
                ) from None
        else:
            if old >= 0:  # an expired record counts from 0
                expiry = 0
            else:
                self._need_room(kb)
        new_value = cur + delta
        if not -(1 << 63) <= new_value < (1 << 64):
            raise ValueEncodingError(
                f"incr on key {_show(kb)[:80]}: {cur} + {delta} leaves the 64-bit range msgpack stores"
            )
        vb = _encode(new_value)
        self._store(kb, h, pos, old, vb, expiry, self.next_epoch())
        self.publish()
        return new_value

    def batch(self, ops: list, payload: bytes | None = None) -> list:
        """Apply a batch's ops (``_ops.BatchPut`` / ``_ops.BatchDelete``) atomically.

        Validation (key and value sizes, capacity) happens for the whole batch before
        the first store; then the ops apply in order inside one odd ``H_BATCH_SEQ``.
        The ops' types and integer ranges were checked when they were decoded.

        Returns:
            Per op: the new version for a put, whether it existed for a delete.
        """
        from ._ops import BatchDelete, BatchPut, batch_from_lists

        if ops and type(ops[0]) is list:  # the wire form, from a caller other than apply
            try:
                ops = batch_from_lists(ops)
            except msgspec.ValidationError as e:
                raise ValueEncodingError(f"malformed batch: {e}") from None
        # Pass 1: validate everything and simulate the count of records.
        present: dict[bytes, bool] = {}
        count = self.q[L.H_COUNT]
        for op in ops:
            t = type(op)
            if t is not BatchPut and t is not BatchDelete:
                raise ValueEncodingError(f"unknown op {op!r:.80} in a batch")
            kb = self.check_key(op.key)
            if kb not in present:
                present[kb] = self.find(kb, key_hash(kb))[1] >= 0
            if t is BatchPut:
                self.check_value(op.value)
                if not present[kb]:
                    count += 1
                    if count > self.capacity:
                        raise StoreFullError(
                            f"batch needs room for {count - self.q[L.H_COUNT]} new records; the "
                            f"store holds {self.q[L.H_COUNT]} of capacity {self.capacity}. "
                            f"Nothing in the batch was written."
                        )
                present[kb] = True
            else:
                if present[kb]:
                    count -= 1
                present[kb] = False
        # Pass 2: apply. The redo copy goes first, so a death mid-batch rolls forward.
        q = self.q
        if self.redo is not None and payload is not None:
            self.redo.write(payload)
        core = self.core
        if core is not None:
            core.batch_begin()
        else:
            q[L.H_BATCH_SEQ] += 1
        results = []
        try:
            for op in ops:
                kb = op.key
                h = key_hash(kb)
                pos, slot = self.find(kb, h)
                epoch = self.next_epoch()
                if type(op) is BatchPut:
                    results.append(self._store(kb, h, pos, slot, op.value, op.expiry, epoch))
                elif slot >= 0:
                    self._unlink(pos, slot, epoch)
                    results.append(True)
                else:
                    results.append(False)
        finally:
            self.publish()
            if core is not None:
                core.batch_end()
            else:
                q[L.H_BATCH_SEQ] += 1
        if self.redo is not None and payload is not None:
            self.redo.clear()
        return results
