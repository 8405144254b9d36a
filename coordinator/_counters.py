"""The coordinator's operations counters (header words 96-127, see ``_layout``).

The server calls into this module at :meth:`Metrics.group` per group served,
:meth:`Metrics.retire` per client block reclaimed (by a tick, or at the handshake of a
client that claimed the block before a tick could), and the constructor at start. Everything else (ops by kind, groups, requests, errors) the
server counts inline, as before.

Invariant: only the coordinator writes these words, one word per store, so readers
need no lock (they may see one counter a group ahead of another).
"""

from __future__ import annotations

from shmstore import _channel as C
from shmstore import _layout as L

_TOP = L.GROUP_HIST_BUCKETS - 1


class Metrics:
    """Counters of one coordinator run over its segment header and channel."""

    def __init__(self, seg_q: memoryview, chan: C.ChannelMap) -> None:
        self.q = seg_q
        self.chan = chan
        self.stride_words = chan.layout.stride // 8
        self.block0 = C.CH_HEADER // 8
        n = chan.layout.max_clients
        # Per block: the session and TAIL this run last saw when serving it, so the
        # bytes a group drained are exact even across a handshake or a reclaim.
        self.seen_session = [0] * n
        self.seen_tail = [0] * n
        seg_q[L.H_COORD_RUNS] += 1

    def group(self, nframes: int, served: list) -> None:
        """Count one group of ``nframes`` requests drained from the ``served`` clients
        (the server's list of ``(client, reply, error)``)."""
        q = self.q
        b = nframes.bit_length() - 1
        q[L.H_GROUP_HIST + (b if b < _TOP else _TOP)] += 1
        cq = self.chan.q
        drained = 0
        sessions = self.seen_session
        tails = self.seen_tail
        for entry in served:
            i = entry[0]
            w = self.block0 + i * self.stride_words
            session = cq[w + C.C_SESSION]
            tail = cq[w + C.C_TAIL]
            if sessions[i] != session:  # a new client: its ring started at 0
                sessions[i] = session
                tails[i] = 0
            drained += tail - tails[i]
            tails[i] = tail
        q[L.H_QUEUE_BYTES] = drained
        if drained > q[L.H_QUEUE_BYTES_MAX]:
            q[L.H_QUEUE_BYTES_MAX] = drained

    def retire(self, i: int) -> None:
        """Add the counters of client block ``i`` (being reclaimed) to the header's."""
        cq = self.chan.q
        q = self.q
        w = self.block0 + i * self.stride_words
        if cq[w + C.C_ACK] == 0:
            return  # never registered, or already retired
        for word, h in ((C.C_READS, L.H_RETIRED_READS), (C.C_READ_RETRIES, L.H_RETIRED_READ_RETRIES),
                        (C.C_WRITES, L.H_RETIRED_WRITES), (C.C_TIMEOUTS, L.H_RETIRED_TIMEOUTS),
                        (C.C_WRITE_NS, L.H_RETIRED_WRITE_NS),
                        (C.C_WRITES_TIMED, L.H_RETIRED_WRITES_TIMED),
                        (C.C_WRITE_ERRORS, L.H_RETIRED_WRITE_ERRORS),
                        (C.C_CACHE_HITS, L.H_RETIRED_CACHE_HITS)):
            q[h] += cq[w + word]
        if cq[w + C.C_WRITE_NS_MAX] > q[L.H_RETIRED_WRITE_NS_MAX]:
            q[L.H_RETIRED_WRITE_NS_MAX] = cq[w + C.C_WRITE_NS_MAX]
        self.seen_session[i] = 0
