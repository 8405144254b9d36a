"""Apply: what each request does to the store, and the reply it earns.

Design
------
The server builds one :class:`Applier` once its segment, engine, journal and channel
exist: it holds what applying needs and nothing else. The loop (``_server``) copies a
client's frames out of its ring and hands them to :meth:`Applier.apply_frames`, which
runs them in ring order, one at a time, in the coordinator thread:

1. decode the frame (msgpack ``[op, wait, *args]``, see ``shmstore._channel``);
2. :meth:`Applier.apply` dispatches on the op. A write is validated fully before its first
   store, so a malformed request changes nothing and becomes a ``ProtocolError``; it
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
from ._expiry import Expirer
from ._journal import Journal
from ._replies import Deferred, Replies
from ._table import apply_extra

#: ops that change the store: refused before they are applied while the WAL cannot be written
WRITE_OPS = frozenset((C.OP_PUT, C.OP_DELETE, C.OP_CAS, C.OP_INCR, C.OP_BATCH,
                       C.OP_TABLE_CREATE, C.OP_TABLE_WRITE))
_decode = msgspec.msgpack.Decoder().decode
_encode = msgspec.msgpack.Encoder().encode


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
        ch = replies.chan
        cq = ch.q
        lay = ch.layout
        w = replies.blocks[i] // 8
        reply = None
        err = None
        for payload in frames:
            done[i] += 1
            ticket = done[i]
            wait = True
            try:
                if payload is None:
                    raise ProtocolError("a frame overruns the client ring; the client is out of sync")
                try:
                    op = _decode(payload)
                    wait = bool(op[1])
                except (msgspec.DecodeError, IndexError, TypeError) as e:
                    raise ProtocolError(f"undecodable request: {e}") from None
                result = self.apply(op, payload)
                status = C.ST_OK
            except ShmStoreError as e:
                status = C.ST_ERROR
                result = [type(e).__name__, e.message]
                self.seg.q[L.H_ERRORS] += 1
            if status == C.ST_OK and isinstance(result, Deferred):
                # The client waits for this reply; it sends nothing more until it comes.
                result.ticket = ticket
                replies.deferred[i] = result
                continue
            if wait:
                blob = _encode([ticket, status, result])
                if len(blob) > lay.reply_size:
                    blob = _encode([ticket, C.ST_ERROR, ["RequestTooLargeError",
                                   f"the reply is {len(blob)} bytes, more than reply_size={lay.reply_size}; "
                                   f"ask for fewer keys at once or serve with a larger reply_size"]])
                reply = blob
            elif status == C.ST_ERROR:
                cq[w + C.C_ERR_COUNT] += 1
                if not has_err and err is None:
                    # Cut the message, never the encoding: the client must decode it.
                    err = (ticket, _encode([result[0][:100], result[1][: C.ERR_AREA - 200]]))
        return reply, err


    def apply(self, op: list, payload: bytes) -> object:
        """Apply one decoded request; returns its result or raises a ShmStoreError."""
        e = self.engine
        q = self.seg.q
        kind = op[0]
        if self.durable and kind in WRITE_OPS:
            self.journal.check_writable()  # raises StorageError while the disk fails
        try:
            if kind == C.OP_PUT:
                _, _, kb, vb, expiry = op
                e.check_key(kb)
                e.check_value(vb)
                epoch0 = e.epoch
                result = e.put(kb, vb, expiry)
                q[L.H_PUTS] += 1
            elif kind == C.OP_DELETE:
                _, _, kb = op
                e.check_key(kb)
                self.expirer.purge(kb)
                epoch0 = e.epoch
                result = e.delete(kb)
                q[L.H_DELETES] += 1
                if not result:
                    return result
            elif kind == C.OP_CAS:
                _, _, kb, vb, version, expiry = op
                e.check_key(kb)
                e.check_value(vb)
                self.expirer.purge(kb)
                epoch0 = e.epoch
                result = e.cas(kb, vb, version, expiry)
                q[L.H_CAS] += 1
            elif kind == C.OP_INCR:
                _, _, kb, delta = op
                e.check_key(kb)
                if not isinstance(delta, int):
                    raise ProtocolError("incr needs an integer delta")
                self.expirer.purge(kb)
                epoch0 = e.epoch
                result = e.incr(kb, delta)
                q[L.H_INCRS] += 1
            elif kind == C.OP_BATCH:
                _, _, ops = op
                epoch0 = e.epoch
                result = e.batch(ops, payload)
                q[L.H_BATCHES] += 1
            elif kind == C.OP_GET_MANY:
                _, _, keys = op
                q[L.H_FALLBACK_READS] += 1
                return [e.get(kb) for kb in keys], e.epoch
            elif kind == C.OP_PING:
                return e.epoch
            elif kind == C.OP_BACKUP:
                return start_backup(op, self.seg, e, self.journal)
            elif kind == C.OP_CHECKPOINT:
                if not self.durable:
                    raise DurabilityUnavailableError(
                        f"store {self.seg.name!r} is memory-only (served without path=); there is "
                        f"nothing to checkpoint to"
                    )
                self.journal.commit()  # this group's earlier ops go before the checkpoint
                return self.journal.checkpoint()
            elif C.OP_SNAPSHOT <= kind <= 31:
                result, epoch0 = apply_extra(e, self.handovers, op, payload)  # coordinator/_table.py
                if epoch0 is None:
                    return result
            else:
                raise ProtocolError(f"unknown op {kind!r}")
        except (ValueError, IndexError, TypeError) as err:  # a malformed request
            # Ops validate fully before their first store, so nothing was written.
            if isinstance(err, ShmStoreError):
                raise
            raise ProtocolError(f"malformed {C.OP_NAMES.get(kind, kind)} request: {err}") from None
        q[L.H_OPS] += 1
        self.journal.append(epoch0, payload)
        return result
