"""Replies the coordinator publishes outside the normal group path.

- :func:`refuse_group`: a group whose WAL write or fsync failed (disk full, read-only
  file system) gets :class:`StorageError` for every reply, none acknowledged.
- :func:`reply_deferred`: a deferred op (a backup written by a helper thread) replies
  once its files are durable, while other clients were served meanwhile.

Both take the :class:`CoordinatorServer` as ``self`` (coordinator thread only).
"""

from __future__ import annotations

import msgspec

from shmstore import _channel as C
from shmstore._errors import StorageError

_encode = msgspec.msgpack.Encoder().encode


def refuse_group(self: object, served: list, err: StorageError) -> list:
    """The group could not be made durable: turn every reply into ``err``."""
    out = []
    cq = self.chan.q
    blob = [type(err).__name__, err.message]
    for i, reply, e in served:
        if i in self.deferred:
            # Its backup replies later; pipelined writes drained before it in this
            # group stay in memory and are made durable with the retried group.
            out.append((i, reply, e))
            continue
        ticket = self.done[i]
        if reply is not None:
            reply = _encode([ticket, C.ST_ERROR, blob])
        else:  # pipelined writes: the handle's next flush() raises it
            w = self.chan.layout.block(i) // 8
            cq[w + C.C_ERR_COUNT] += 1
            if e is None and cq[w + C.C_ERR_TICKET] <= cq[w + C.C_ERR_ACK]:
                e = (ticket, _encode([blob[0], blob[1][: C.ERR_AREA - 200]]))
        out.append((i, reply, e))
    return out


def reply_deferred(self: object, *, block: bool) -> None:
    """Send the replies of finished deferred ops (backups)."""
    ch = self.chan
    lay = ch.layout
    for i, d in list(self.deferred.items()):
        if not block and not d.done():
            continue
        d.wait()
        del self.deferred[i]
        if i not in self.active:
            continue  # the client died meanwhile
        blob = d.reply(d.ticket, C.ST_OK, C.ST_ERROR)
        base = lay.block(i)
        w = base // 8
        o = base + C.CONTROL + lay.ring_size
        ch.mv[o : o + len(blob)] = blob
        ch.q[w + C.C_REPLY_LEN] = len(blob)
        # Invariant: DONE is stored after the reply bytes it vouches for.
        ch.q[w + C.C_DONE] = self.done[i]
        self.reply_sems[i].release()
