"""Apply: what each request does to the store, and the reply it earns.

Design
------
The server builds one :class:`Applier` once its segment, engine, journal and channel
exist: it holds what applying needs and nothing else. The loop (``_server``) copies a
client's frames out of its ring and hands them to :meth:`Applier.apply_frames`, which
runs them in ring order, one at a time, in the coordinator thread:

1. decode the frame (msgpack ``[op, wait, *args]``, see ``shmstore._channel``) into a
   typed op (``_ops``): depth, arity, types and integer ranges are checked there, and a
   frame that fails becomes a ``ProtocolError`` for its sender, nothing else;
2. :meth:`Applier.apply` dispatches on the op. A write is validated fully before its first
   store, so a malformed request changes nothing and becomes a typed error; it
   is applied through the :class:`Engine`, counted in the header and appended to the
   journal with the epoch before it. Reads, ping, checkpoint and backup are not
   logged; ops 24-31 go to ``_table.apply_extra``;
3. the result, or the ``ShmStoreError`` raised, becomes a reply: the latest waited-for
   reply of the drain is the one published (a client waits for one reply at a time);
   a pipelined write's (``wait=False``) error is counted, and the first one is kept
   for the error area while the client has not taken the previous one. A deferred
   result (a backup) replies later, see ``_replies``.

Nothing applied here is acknowledged until the loop has committed the group
(``journal.commit``).

The fast path: with the compiled core, a frame that is exactly a plain put (no TTL) as
clients encode it is applied by one C call, ``_cwrite.Core.put_frame``, before any
decoding; everything else (and a plain put that would fail: a bad length, a full store)
takes steps 1-3. The C check accepts a subset of the bytes ``decode_request`` accepts
and applies them as ``Engine.put`` does, so a frame's result does not depend on the
path; the counters, the journal and the reply are the same. Measured before it
(``scripts/write_profile.py``, pipelined puts): decode, dispatch, the checks and
``Engine.put`` cost the coordinator ~5 us a put in Python; the C call ~0.5 us.
"""

from __future__ import annotations

import msgspec

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import DurabilityUnavailableError, ProtocolError, ShmStoreError
from shmstore._handover import Handovers
from shmstore._segment import Segment

from ._durable._backup import start_backup
from ._engine import Engine
from . import _ops as O
from ._expiry import Expirer
from ._journal import Journal
from ._replies import Deferred, Replies
from ._table import apply_extra

#: ops that change the store: refused before they are applied while the WAL cannot be written
_WRITES = frozenset(O.WRITES)
decode_request = O.decode_request
_encode = msgspec.msgpack.Encoder().encode


def decode_frame(payload: bytes | None) -> O.Request:
    """A drained frame as a typed op (``None``: a frame that overran the ring).

    Raises:
        ProtocolError: the frame is not a request (its client is answered with it).
    """
    if payload is None:
        raise ProtocolError("this client's ring words are out of sync with the coordinator (an impossible "
                            "HEAD, TAIL or frame length); its channel is closed")
    try:
        return decode_request(payload)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed request: {str(e)[:200]}") from None


class Applier:
    """What each request does to the store (coordinator thread only).

    Args:
        seg: the store's segment (header counters).
        engine: its writer.
        journal: where applied writes are appended (a durable store's refuses writes
            while its disk fails).
        expirer: the TTL index, purged of a key a write replaces.
        handovers: where snapshots and whole-table reads are handed over.
        replies: the clients' tickets and deferred replies, shared with the loop.
        durable: the store was served with a data directory.
    """

    def __init__(self, *, seg: Segment, engine: Engine, journal: Journal, expirer: Expirer,
                 handovers: Handovers, replies: Replies, durable: bool) -> None:
        self.seg = seg
        self.engine = engine
        self.journal = journal
        self.expirer = expirer
        self.handovers = handovers
        self.replies = replies
        self.durable = durable

    def apply_frames(self, i: int, frames: list, has_err: bool) -> tuple[bytes | None, tuple[int, bytes] | None]:
        """Apply client ``i``'s drained frames in order (``None``: a frame that overran the ring).

        Args:
            i: the client block.
            frames: the request payloads, copied out of the ring.
            has_err: the client's error area still holds an error it has not taken.

        Returns:
            ``(reply, err)``: the reply blob to publish, if a frame waits for one, and
            ``(ticket, blob)`` for the error area, if a pipelined write failed.
        """
        replies = self.replies
        done = replies.done
        reply = None
        err = None
        eng = self.engine
        core = eng.core
        put_frame = None
        if core is not None and (not self.durable or getattr(self.journal, "failed", None) is None):
            put_frame = core.put_frame
            q = self.seg.q
            append = self.journal.append
        for payload in frames:
            done[i] += 1
            ticket = done[i]
            if put_frame is not None and payload is not None:
                v = put_frame(payload, eng.epoch + 1, eng.frees, eng.capacity)
                if v:  # a plain put, applied (see the module docstring)
                    eng.epoch = v
                    q[L.H_PUTS] += 1
                    q[L.H_OPS] += 1
                    append(v - 1, payload)
                    if payload[2] & 1:  # wait: 1 or true
                        reply = _encode([ticket, C.ST_OK, v])
                    continue
            wait = True
            try:
                op = decode_frame(payload)
                wait = bool(op.wait)
                result = self.apply(op, payload)
                status = C.ST_OK
            except ShmStoreError as e:
                status = C.ST_ERROR
                result = [type(e).__name__, e.message]
                self.seg.q[L.H_ERRORS] += 1
            reply, err = self.answer(i, ticket, wait, status, result, reply, err, has_err)
        return reply, err

    def answer(self, i: int, ticket: int, wait: bool, status: int, result: object, reply: bytes | None,
               err: tuple[int, bytes] | None, has_err: bool) -> tuple[bytes | None, tuple[int, bytes] | None]:
        """Fold one frame's outcome into client ``i``'s ``(reply, err)`` of this drain:
        a waited-for frame's reply replaces the previous one, a pipelined write's error
        is counted and kept if the error area is free, a deferred result waits."""
        replies = self.replies
        if status == C.ST_OK and isinstance(result, Deferred):
            # The client waits for this reply; it sends nothing more until it comes.
            result.ticket = ticket
            replies.deferred[i] = result
            return reply, err
        if wait:
            lay = replies.chan.layout
            blob = _encode([ticket, status, result])
            if len(blob) > lay.reply_size:
                blob = _encode([ticket, C.ST_ERROR, ["RequestTooLargeError",
                               f"the reply is {len(blob)} bytes, more than reply_size={lay.reply_size}; "
                               f"ask for fewer keys at once or serve with a larger reply_size"]])
            return blob, err
        if status == C.ST_ERROR:
            replies.chan.q[replies.blocks[i] // 8 + C.C_ERR_COUNT] += 1
            if not has_err and err is None:
                # Cut the message, never the encoding: the client must decode it.
                err = (ticket, _encode([result[0][:100], result[1][: C.ERR_AREA - 200]]))
        return reply, err

    def settle(self, served: list) -> list:
        """The group's replies once everything in it is applied: here, as drained (a
        replica's applier first sends the group's writes upstream: ``_replica``)."""
        return served


    def apply(self, op: O.Request, payload: bytes) -> object:
        """Apply one decoded, shape-checked request (``_ops``); returns its result or
        raises a ShmStoreError. Nothing is stored before every field is checked."""
        e = self.engine
        q = self.seg.q
        t = type(op)
        if self.durable and t in _WRITES:
            self.journal.check_writable()  # raises StorageError while the disk fails
        if t is O.Put:
            kb = e.check_key(op.key)
            vb = e.check_value(op.value)
            result = e.put(kb, vb, op.expiry)
            epoch0 = e.epoch - 1  # after any evictions made for it (logged before it)
            q[L.H_PUTS] += 1
        elif t is O.Delete:
            kb = e.check_key(op.key)
            self.expirer.purge(kb)
            epoch0 = e.epoch
            result = e.delete(kb)
            q[L.H_DELETES] += 1
            if not result:
                return result
        elif t is O.Cas:
            kb = e.check_key(op.key)
            vb = e.check_value(op.value)
            self.expirer.purge(kb)
            result = e.cas(kb, vb, op.version, op.expiry)
            epoch0 = e.epoch - 1
            q[L.H_CAS] += 1
        elif t is O.Incr:
            kb = e.check_key(op.key)
            self.expirer.purge(kb)
            result = e.incr(kb, op.delta)
            epoch0 = e.epoch - 1
            q[L.H_INCRS] += 1
        elif t is O.Batch:
            if not op.ops:
                return []  # takes no epoch, so it is not logged (records' epochs must rise)
            result = e.batch(op.ops, payload)
            epoch0 = e.epoch - len(op.ops)
            q[L.H_BATCHES] += 1
        elif t is O.GetMany:
            q[L.H_FALLBACK_READS] += 1
            return [e.get(e.check_key(kb)) for kb in op.keys], e.epoch
        elif t is O.Ping:
            return e.epoch
        elif t is O.Backup:
            return start_backup([C.OP_BACKUP, op.wait, op.dest], self.seg, e, self.journal)
        elif t is O.Checkpoint:
            if not self.durable:
                raise DurabilityUnavailableError(
                    f"store {self.seg.name!r} is memory-only (served without path=); there is "
                    f"nothing to checkpoint to"
                )
            self.journal.commit()  # this group's earlier ops go before the checkpoint
            return self.journal.checkpoint()
        else:  # snapshots and tables: coordinator/_table.py
            result, epoch0 = apply_extra(e, self.handovers, op, payload)
            if epoch0 is None:
                return result
        q[L.H_OPS] += 1
        self.journal.append(epoch0, payload)
        return result
