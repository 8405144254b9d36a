"""The reply side of the client blocks, and the replies sent outside the normal group path.

:class:`Replies` holds what the loop, ``_apply`` and these replies share about the
clients: the channel, each block's byte offset, its last ticket (``done``), the replies
it waits for later (``deferred``), the active blocks and the reply semaphores. The
server builds it once its channel exists; the lists are its ``ClientBlocks``' own
(``_clients``) and the dict the server's, shared, not copies.

- :meth:`Replies.refuse_group`: a group whose WAL write or fsync failed (disk full,
  read-only file system) gets :class:`StorageError` for every reply, none acknowledged.
- :meth:`Replies.reply_deferred`: a deferred op (:class:`Deferred`, a backup written
  by a helper thread) replies once its files are durable, while other clients were
  served meanwhile.

Coordinator thread only.
"""

from __future__ import annotations

import threading

import msgspec
import posix_ipc

from shmstore import _channel as C
from shmstore._errors import ShmStoreError, StorageError

_encode = msgspec.msgpack.Encoder().encode


class Deferred:
    """A reply the coordinator sends later: the backup being written by a helper thread."""

    def __init__(self) -> None:
        self.ticket = 0
        self.result: object = None
        self.error: ShmStoreError | None = None
        self.thread: threading.Thread | None = None

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def reply(self, ticket: int, ok: int, err: int) -> bytes:
        if self.error is not None:
            return _encode([ticket, err, [type(self.error).__name__, self.error.message]])
        return _encode([ticket, ok, self.result])


class Replies:
    """The clients' reply state, shared by the loop and ``_apply`` (coordinator thread)."""

    def __init__(self, chan: C.ChannelMap, blocks: list[int], done: list[int], deferred: dict[int, Deferred],
                 active: list[int], reply_sems: list[posix_ipc.Semaphore]) -> None:
        self.chan = chan
        #: byte offset of each client block
        self.blocks = blocks
        #: each client's last ticket applied
        self.done = done
        #: client -> a reply sent later (a backup being written); see :class:`Deferred`
        self.deferred = deferred
        self.active = active
        self.reply_sems = reply_sems

    def refuse_group(self, served: list, err: StorageError) -> list:
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

    def reply_deferred(self, *, block: bool) -> None:
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
            # Invariant: DONE is stored after the reply bytes it vouches for (a release
            # store when compiled, see shmstore._channel).
            cw = C.compiled_writer()
            if cw is not None:
                cw.reply_publish(ch.mm, w, o, lay.reply_size, blob, self.done[i])
            else:
                ch.mv[o : o + len(blob)] = blob
                ch.q[w + C.C_REPLY_LEN] = len(blob)
                ch.q[w + C.C_DONE] = self.done[i]
            self.reply_sems[i].release()
