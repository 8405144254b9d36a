"""Self-checking records for the stress tools (``shmstore stress``,
``scripts/torn_stress.py``).

Every record checks itself::

    value = [key, counter, payload, checksum]
    payload  = bytes derived from (key, counter), about ``size`` long
               (the length varies with the counter)
    checksum = crc32(key | counter | payload)

so a reader can recompute it from the value alone. A value glued from two writes (of
one key, or of two keys that shared a slot; or the length of one write with the bytes
of another) fails the check, and so does one whose bytes could not even be decoded.
"""

from __future__ import annotations

import zlib

import msgspec

#: Bytes of msgpack framing around the payload (array header, key, counter, bin
#: header, checksum); a store's value_size is the payload size plus this.
VALUE_OVERHEAD = 64


class TornRead(Exception):
    """A value that no writer wrote: the seqlock accepted a torn read."""


def key_of(i: int) -> str:
    """The name of key number ``i``."""
    return f"k{i:06d}"


def payload_for(key: str, counter: int, size: int) -> bytes:
    """Payload bytes derived from ``(key, counter)``: every 12 bytes repeat both.

    Its length varies with the counter (``size`` down to ``size - 15``), so a read
    that took the length of one write and the bytes of another cannot decode to a
    valid record.
    """
    head = counter.to_bytes(8, "little") + zlib.crc32(key.encode()).to_bytes(4, "little")
    n = max(1, size - counter % 16)
    return (head * (n // len(head) + 1))[:n]


def checksum(key: str, counter: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(f"{key}|{counter}|".encode()))


def make_record(key: str, counter: int, size: int) -> list:
    """The value written for ``key`` at ``counter``."""
    payload = payload_for(key, counter, size)
    return [key, counter, payload, checksum(key, counter, payload)]


def check_record(key: str, value: object, size: int) -> int:
    """Verify a value read for ``key``; return its counter.

    Raises:
        TornRead: the value is not one :func:`make_record` produces for ``key``.
    """
    if not isinstance(value, list) or len(value) != 4:
        raise TornRead(f"{key}: not a 4-item record: {value!r:.120}")
    k, counter, payload, crc = value
    if k != key:
        raise TornRead(f"{key}: record of another key {k!r:.40}")
    if not isinstance(counter, int) or counter < 0:
        raise TornRead(f"{key}: bad counter {counter!r:.40}")
    if not isinstance(payload, bytes) or payload != payload_for(key, counter, size):
        raise TornRead(f"{key}: payload does not match counter {counter}")
    if crc != checksum(key, counter, payload):
        raise TornRead(f"{key}: checksum mismatch at counter {counter}")
    return counter


def check_encoded(key: str, raw: bytes, size: int) -> int:
    """:func:`check_record` on raw msgpack bytes (an undecodable value is torn too)."""
    try:
        value = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError as e:
        raise TornRead(f"{key}: undecodable value ({e})") from None
    return check_record(key, value, size)


class ReadStats(msgspec.Struct):
    """What one reader counted."""

    reads: int = 0
    torn: int = 0  # values that failed check_record (torn reads accepted)
    violations: int = 0  # a key's counter went back
    missing: int = 0  # a key that is never deleted read as missing
    errors: int = 0  # any other exception from the read path
    examples: list[str] = []

    def note(self, what: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(what)


def verify(stats: ReadStats, last: dict[str, int], key: str, value: object, size: int) -> None:
    """Check one read value and the key's counter monotonicity, counting into ``stats``."""
    stats.reads += 1
    if value is None:
        stats.missing += 1
        stats.note(f"{key}: missing")
        return
    try:
        counter = check_record(key, value, size)
    except TornRead as e:
        stats.torn += 1
        stats.note(str(e))
        return
    if counter < last.get(key, 0):
        stats.violations += 1
        stats.note(f"{key}: counter went back from {last[key]} to {counter}")
    else:
        last[key] = counter
