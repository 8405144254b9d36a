"""A client that speaks the write channel by hand: arbitrary bytes into its own ring.

It claims a client block exactly as a real handle does (``shmstore._channel``: the
OFD lock, the handshake), then lets a test publish any payload as a frame, set its
own control words (``HEAD``) to any value, and read what the coordinator answered.
Every internal it touches is imported here, so a refactoring that moves them changes
this one file.

Also: forging WAL records with a valid checksum (``coordinator._wal``).
"""

from __future__ import annotations

import os
import struct
import time

import msgspec

from shmstore import _channel as C
from shmstore._shm import open_segment

OP_PUT = C.OP_PUT
OP_DELETE = C.OP_DELETE
OP_BATCH = C.OP_BATCH
ST_OK = C.ST_OK
ST_ERROR = C.ST_ERROR
PAD_MARK = C.PAD_MARK

encode = msgspec.msgpack.Encoder().encode


class RawClient:
    """One claimed client block, written by hand.

    Args:
        name: the store.
        timeout: seconds to wait for the coordinator's handshake.
    """

    def __init__(self, name: str, timeout: float = 10.0) -> None:
        self.name = name
        self.seg = open_segment(name)
        self.ch = C.ClientChannel(name, self.seg.q, spin_us=0, timeout=timeout)

    @property
    def _q(self) -> memoryview:
        return self.ch.chan.q

    def send(self, payload: bytes, timeout: float = 10.0) -> int:
        """Publish ``payload`` as one frame (length word + bytes) and ring; its ticket."""
        return self.ch.publish(payload, time.monotonic() + timeout)

    def request(self, payload: bytes, timeout: float = 10.0) -> tuple[int, object]:
        """Publish ``payload`` and wait for its reply: ``(status, result)``.

        Raises:
            AssertionError: no reply within ``timeout`` (the coordinator died, hangs,
                or closed this client's channel without a reply).
        """
        ticket = self.send(payload, timeout)
        try:
            self.ch.wait_done(ticket, time.monotonic() + timeout, "raw frame")
        except (C.NotConsumed, Exception) as e:  # noqa: BLE001 - reported, not swallowed
            raise AssertionError(f"no reply to the raw frame: {type(e).__name__}: {e}") from e
        t, status, result = self.ch.reply()
        assert t == ticket, (t, ticket)
        return status, result

    def done(self) -> int:
        """The coordinator's DONE word for this client: frames it has completed."""
        return self._q[self.ch.w + C.C_DONE]

    def channel_closed(self) -> bool:
        """The coordinator dropped this client's block (its ACK no longer echoes us)."""
        return self._q[self.ch.w + C.C_ACK] != self.ch.session

    def set_head(self, value: int) -> None:
        """Write this client's HEAD word (the bytes it claims to have published)."""
        self._q[self.ch.w + C.C_HEAD] = value

    def fill_ring_with_padding(self) -> None:
        """Write a padding mark at every 8-byte frame start of the ring."""
        mv = self.ch.chan.mv
        for off in range(0, self.ch.ring_size, 8):
            struct.pack_into("<I", mv, self.ch.ring_ofs + off, PAD_MARK)

    def ring(self) -> None:
        """Post the coordinator's doorbell."""
        self.ch.bell.release()

    def close(self) -> None:
        ch = self.__dict__.pop("ch", None)
        if ch is not None:
            ch.close()
        seg = self.__dict__.pop("seg", None)
        if seg is not None:
            seg.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nested_array(depth: int) -> bytes:
    """msgpack: an array nested ``depth`` deep (``[[[...[nil]...]]]``)."""
    return b"\x91" * depth + b"\xc0"


# -- WAL ---------------------------------------------------------------------------


def wal_files(path: str) -> list[str]:
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.startswith("wal-") and n.endswith(".wal"))


def wal_chain_end(path: str) -> str:
    """The WAL file of data directory ``path`` that no other file continues (the newest)."""
    from shmstore.coordinator._durable._wal import HEADER_SIZE, WalHeader

    heads = {}
    for p in wal_files(path):
        with open(p, "rb") as f:
            heads[p] = WalHeader.unpack(p, f.read(HEADER_SIZE))
    prevs = {h.prev for h in heads.values()}
    ends = [p for p, h in heads.items() if h.id not in prevs]
    return max(ends, key=lambda p: heads[p].start)


def append_wal_record(wal_path: str, payload: bytes) -> int:
    """Append a record holding ``payload`` with a valid checksum, after every record
    the file holds, with an epoch after theirs; returns its offset."""
    from shmstore.coordinator._durable._wal import HEADER_SIZE, WalHeader, frame, scan_wal

    scan = scan_wal(wal_path, raw=True)
    last_eb = scan.records[-1][1] if scan.records else scan.header.start - 1
    with open(wal_path, "rb") as f:
        hdr = WalHeader.unpack(wal_path, f.read(HEADER_SIZE))
    off = scan.end
    rec = frame(hdr.salt, last_eb + 1, off, payload)
    with open(wal_path, "r+b") as f:
        f.truncate(off)
        f.seek(off)
        f.write(rec)
        f.flush()
        os.fsync(f.fileno())
    return off
