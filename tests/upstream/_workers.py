"""Worker processes for the upstream stress test (importable by spawned children)."""

from __future__ import annotations

import random

import msgspec

from shmstore._errors import VersionConflictError
from shmstore.coordinator._upstream._redis import RedisUpstream


def incr_and_cas(url: str, name: str, wid: int, n: int, seed: int, barrier, out) -> None:
    """``n`` ops: even ones incr the shared counter, odd ones try a CAS on the shared key.

    Puts ``(wid, sum of deltas, [versions won], [error strings])`` on ``out``.
    """
    rng = random.Random(seed + wid)
    total, won, errors = 0, [], []
    up = RedisUpstream(url, name, timeout=10)
    try:
        barrier.wait(30)
        for i in range(n):
            if i % 2 == 0:
                delta = rng.randrange(-1000, 1000)
                (_, res), = up.submit([("incr", b"counter", delta)], 0)
                if isinstance(res, Exception):
                    errors.append(repr(res))
                else:
                    total += delta
            else:
                cur = next((v for k, v, _, _ in up.scan() if k == b"cas"), 0)
                value = msgspec.msgpack.encode([wid, i])
                (_, res), = up.submit([("cas", b"cas", value, 0, cur)], 0)
                if isinstance(res, VersionConflictError):
                    continue
                if isinstance(res, Exception):
                    errors.append(repr(res))
                else:
                    won.append(res)
    except Exception as e:  # reported to the parent, which fails the test with it
        errors.append(repr(e))
    finally:
        up.close()
        out.put((wid, total, won, errors))
