"""Whether a process still runs: a pid plus its start time, so a reused pid is not
mistaken for the process that recorded it.

The coordinator publishes its pid and start time in the data segment's header
(``_segment.coordinator_alive`` reads them), each client in its channel block.
"""

from __future__ import annotations


def process_start_ms(pid: int) -> int | None:
    """The start time of a live, non-zombie process in ms, or None if there is none."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(p.create_time() * 1000)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def pid_alive(pid: int, start_ms: int) -> bool:
    """True if ``pid`` runs and is the same process that started at ``start_ms``.

    A reused pid has another start time; a killed process still waiting for its parent
    to reap it (a zombie) counts as dead.
    """
    if pid <= 0:
        return False
    got = process_start_ms(pid)
    # psutil's create_time has ~10 ms resolution (clock ticks); allow for rounding.
    return got is not None and abs(got - start_ms) <= 20
