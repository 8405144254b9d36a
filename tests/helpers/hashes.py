"""Keys that collide on the index hash, for tests of the probe paths."""

from __future__ import annotations

from shmstore import _layout as L


def same_hash_keys(count: int, seed: bytes = b"s-collide") -> list[bytes]:
    """``count`` different keys with one and the same ``key_hash``.

    ``key_hash`` reads a key as a little-endian integer X and hashes ``X mod
    (2**61 - 1)``, so X, X + P, X + 2P, ... all collide. Keys with a NUL byte are
    skipped (keys may hold NULs, but these are meant to look like ordinary keys).
    """
    base = int.from_bytes(seed, "little")
    keys = []
    i = 0
    while len(keys) < count:
        x = base + i * L.HASH_PRIME
        kb = x.to_bytes((x.bit_length() + 7) // 8, "little")
        if 0 not in kb:
            keys.append(kb)
        i += 1
    assert len({L.key_hash(k) for k in keys}) == 1 and len(set(keys)) == count
    return keys
