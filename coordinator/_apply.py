"""Apply: what each request does to the store, and the reply it earns.

Design
------
The loop (``_server``) copies a client's frames out of its ring and hands them to
:func:`apply_frames`, which runs them in ring order, one at a time, in the coordinator
thread:

1. decode the frame (msgpack ``[op, wait, *args]``, see ``shmstore._channel``);
2. :func:`apply` dispatches on the op. A write is validated fully before its first
   store, so a malformed request changes nothing and becomes a ``ProtocolError``; it
   is applied through the :class:`Engine`, counted in the header and appended to the
   journal with the epoch before it. Reads, ping, checkpoint and backup are not
   logged; ops 24-31 go to ``_table.apply_extra``;
3. the result, or the ``ShmStoreError`` raised, becomes a reply: the latest waited-for
   reply of the drain is the one published (a client waits for one reply at a time);
   a pipelined write's (``wait=False``) error is counted, and the first one is kept
   for the error area while the client has not taken the previous one. A deferred
   result (a backup) replies later, see ``_replies``.

Both take the :class:`CoordinatorServer` as ``server``. Nothing applied here is
acknowledged until the loop has committed the group (``journal.commit``).
"""

from __future__ import annotations

import msgspec

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import ProtocolError, ShmStoreError

from ._backup import Deferred, start_backup
from ._table import apply_extra

#: ops that change the store: refused before they are applied while the WAL cannot be written
WRITE_OPS = frozenset((C.OP_PUT, C.OP_DELETE, C.OP_CAS, C.OP_INCR, C.OP_BATCH,
                       C.OP_TABLE_CREATE, C.OP_TABLE_WRITE))
_decode = msgspec.msgpack.Decoder().decode
_encode = msgspec.msgpack.Encoder().encode


def apply_frames(server: object, i: int, frames: list, has_err: bool) -> tuple[bytes | None, tuple[int, bytes] | None]:
    """Apply client ``i``'s drained frames in order (``None``: a frame that overran the ring).

    Args:
        server: the :class:`CoordinatorServer`.
        i: the client block.
        frames: the request payloads, copied out of the ring.
        has_err: the client's error area still holds an error it has not taken.

    Returns:
        ``(reply, err)``: the reply blob to publish, if a frame waits for one, and
        ``(ticket, blob)`` for the error area, if a pipelined write failed.
    """
    ch = server.chan
    cq = ch.q
    lay = ch.layout
    w = server.blocks[i] // 8
    reply = None
    err = None
    for payload in frames:
        server.done[i] += 1
        ticket = server.done[i]
        wait = True
        try:
            if payload is None:
                raise ProtocolError("a frame overruns the client ring; the client is out of sync")
            try:
                op = _decode(payload)
                wait = bool(op[1])
            except (msgspec.DecodeError, IndexError, TypeError) as e:
                raise ProtocolError(f"undecodable request: {e}") from None
            result = apply(server, op, payload)
            status = C.ST_OK
        except ShmStoreError as e:
            status = C.ST_ERROR
            result = [type(e).__name__, e.message]
            server.seg.q[L.H_ERRORS] += 1
        if status == C.ST_OK and isinstance(result, Deferred):
            # The client waits for this reply; it sends nothing more until it comes.
            result.ticket = ticket
            server.deferred[i] = result
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


def apply(server: object, op: list, payload: bytes) -> object:
    """Apply one decoded request; returns its result or raises a ShmStoreError."""
    e = server.engine
    q = server.seg.q
    kind = op[0]
    if server.durable and kind in WRITE_OPS:
        server.journal.check_writable()  # raises StorageError while the disk fails
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
            server.expirer.purge(kb)
            epoch0 = e.epoch
            result = e.delete(kb)
            q[L.H_DELETES] += 1
            if not result:
                return result
        elif kind == C.OP_CAS:
            _, _, kb, vb, version, expiry = op
            e.check_key(kb)
            e.check_value(vb)
            server.expirer.purge(kb)
            epoch0 = e.epoch
            result = e.cas(kb, vb, version, expiry)
            q[L.H_CAS] += 1
        elif kind == C.OP_INCR:
            _, _, kb, delta = op
            e.check_key(kb)
            if not isinstance(delta, int):
                raise ProtocolError("incr needs an integer delta")
            server.expirer.purge(kb)
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
            return start_backup(server, op)
        elif kind == C.OP_CHECKPOINT:
            if not server.durable:
                from shmstore._api import DurabilityUnavailableError  # noqa: PLC0415

                raise DurabilityUnavailableError(
                    f"store {server.name!r} is memory-only (served without path=); there is "
                    f"nothing to checkpoint to"
                )
            server.journal.commit()  # this group's earlier ops go before the checkpoint
            return server.journal.checkpoint()
        elif C.OP_SNAPSHOT <= kind <= 31:
            result, epoch0 = apply_extra(server, op, payload)  # coordinator/_table.py
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
    server.journal.append(epoch0, payload)
    return result
