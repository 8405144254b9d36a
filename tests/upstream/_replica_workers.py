"""Writer processes for the replica tests (each connects to its own host's replica)."""

from __future__ import annotations

import time

import shmstore


def writer(name: str, tag: str, seconds: float, out: object, pause: float = 0.0) -> None:
    """For ``seconds``: incr a shared counter, put keys of its own, and race a CAS on a
    shared key with the other hosts. Puts what was acknowledged into ``out``:
    ``{"incrs": n, "puts": {key: value}, "cas": [versions won], "errors": {type: n}}``.
    A write that raised is not counted; an incr whose outcome is unknown (an
    UpstreamTimeoutError, or the coordinator died after taking it) is counted apart."""
    s = shmstore.connect(name)
    incrs = 0
    puts: dict[str, int] = {}
    cas_won: list[int] = []
    errors: dict[str, int] = {}
    unknown_incrs = 0
    deadline = time.monotonic() + seconds
    i = 0
    try:
        while time.monotonic() < deadline:
            i += 1
            try:
                s.incr("counter")
                incrs += 1
            except (shmstore.UpstreamTimeoutError, shmstore.CoordinatorUnavailableError) as e:
                # May or may not have been applied: the upstream did not answer in time,
                # or this host's coordinator died after taking it (it may have sent it).
                unknown_incrs += 1
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            except shmstore.ShmStoreError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                time.sleep(0.01)
                continue
            key = f"{tag}-{i}"
            try:
                s.put(key, i)
                puts[key] = i
            except shmstore.ShmStoreError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            try:
                v = s.version("cas") or 0
                cur = s.get("cas", 0)
                cas_won.append(s.compare_and_set("cas", cur + 1, version=v))
            except shmstore.VersionConflictError:
                pass
            except shmstore.ShmStoreError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            if pause:
                time.sleep(pause)
    finally:
        s.close()
    out.put({"incrs": incrs, "unknown_incrs": unknown_incrs, "puts": puts, "cas": cas_won, "errors": errors})
