"""``shmstore cleanup``: find and remove what dead coordinators left in /dev/shm.

Every object of store NAME is named ``shmstore.NAME`` or ``shmstore.NAME@...`` (POSIX
semaphores show as ``sem.shmstore.NAME@...``), so the entries group by store. A store
is *removable* when all of these hold:

1. no coordinator serves it: its lock (``flock`` on ``shmstore.NAME@lock``, which the
   kernel drops when the holder dies) is free, and the pid + start time the header
   names is not a live process;
2. no process maps any of its objects: no line of ``/proc/PID/maps`` of any process
   this user may read names them (a live reader maps the data segment; a reader's
   mapping survives the unlink, so removing it would not break the reader, but it
   would throw away the records it still uses);
3. and it is garbage, for one of these reasons:

   - its coordinator died without stopping (the header still names it, or its write
     channel or semaphores, which a clean stop removes, are still there);
   - it was destroyed (``STATE_DESTROYED``) but a piece survived;
   - it was never finished (a creator died before the header was written);
   - pieces without a data segment (a channel, semaphores, a lock, a redo area).

A store whose coordinator stopped cleanly is kept: its records stay readable until
``shmstore destroy NAME`` by design. Removal goes through :func:`shmstore.destroy`,
which takes the store's lock first, so a coordinator starting meanwhile makes the
removal fail rather than race it; then any entry of the store still left is unlinked.
"""

from __future__ import annotations

import fcntl
import mmap
import os

import msgspec
import posix_ipc

from shmstore import _layout as L
from shmstore._api import destroy
from shmstore._errors import CoordinatorRunningError, ShmStoreError
from shmstore._liveness import pid_alive

SHM_DIR = L.SHM_DIR


class StoreLeftovers(msgspec.Struct):
    """One store's entries in /dev/shm and what cleanup decided about them."""

    name: str
    entries: list[str]
    removable: bool
    reason: str


def _group(prefix: str, names: list[str] | None) -> dict[str, list[str]]:
    return {name: entries for name, entries in L.shm_entries().items()
            if name.startswith(prefix) and not (names and name not in names)}


def _mappers(me: int) -> dict[str, set[int]]:
    """``{/dev/shm entry: pids mapping it}`` over the processes whose maps we may read."""
    out: dict[str, set[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/maps", "rb") as f:
                data = f.read()
        except OSError:  # gone, or another user's: it cannot map our 0600 objects
            continue
        for line in data.split(b"\n"):
            i = line.find(b"/dev/shm/")
            if i >= 0:
                path = line[i + 9:].decode(errors="replace").removesuffix(" (deleted)")
                out.setdefault(path, set()).add(int(d))
    return out


def _lock_held(name: str) -> bool:
    """True if a coordinator holds the store's lock (tested without keeping it)."""
    try:
        shm = posix_ipc.SharedMemory(L.lock_name(name))
    except posix_ipc.ExistentialError:
        return False
    try:
        fcntl.flock(shm.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        shm.close_fd()  # closing the only fd releases the test lock
    return False


def _header(name: str) -> tuple[str, list[int] | None]:
    """('ok', words 0..40) of a store's segment, or the reason it has none."""
    try:
        shm = posix_ipc.SharedMemory(L.data_name(name), read_only=True)
    except posix_ipc.ExistentialError:
        return "missing", None
    try:
        size = os.fstat(shm.fd).st_size
        if size < L.HEADER_SIZE:
            return "unfinished", None
        mm = mmap.mmap(shm.fd, L.HEADER_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        shm.close_fd()
    try:
        q = memoryview(mm).cast("Q")
        words = q[:L.H_COORD_INCARNATION + 1].tolist()
        q.release()
    finally:
        mm.close()
    if words[L.H_MAGIC] != L.MAGIC:
        return "unfinished", None  # the creator writes the magic last
    if words[L.H_FORMAT] != L.FORMAT_VERSION:
        return "foreign", None
    if words[L.H_STATE] == L.STATE_INIT:
        return "unfinished", None
    return "ok", words


def examine(prefix: str = "", names: list[str] | None = None) -> list[StoreLeftovers]:
    """Every store in /dev/shm whose name starts with ``prefix`` (or is in ``names``),
    with the decision cleanup would take."""
    groups = _group(prefix, names)
    if not groups:
        return []
    mapped = _mappers(os.getpid())
    out = []
    for name, entries in groups.items():
        out.append(StoreLeftovers(name, entries, *_decide(name, entries, mapped)))
    return out


def _decide(name: str, entries: list[str], mapped: dict[str, set[int]]) -> tuple[bool, str]:
    if _lock_held(name):
        return False, "served by a live coordinator"
    kind, h = _header(name)
    if h is not None and h[L.H_COORD_INCARNATION] and pid_alive(h[L.H_COORD_PID], h[L.H_COORD_START]):
        return False, f"its coordinator (pid {h[L.H_COORD_PID]}) is alive"
    pids = sorted(set().union(*(mapped.get(e, set()) for e in entries)))
    if pids:
        shown = ", ".join(map(str, pids[:8])) + (" ..." if len(pids) > 8 else "")
        return False, f"mapped by live process(es) {shown}"
    ipc_left = any(e.endswith("@ch") or e.startswith("sem.") for e in entries)
    if kind == "missing":
        return True, "pieces of a store whose data segment is gone"
    if kind == "unfinished":
        return True, "a segment whose creator died before finishing it"
    if kind == "foreign":
        return False, "not a segment this shmstore can read (another version?); destroy it by name"
    if h[L.H_STATE] == L.STATE_DESTROYED:
        return True, "destroyed"
    if h[L.H_COORD_INCARNATION]:
        return True, f"its coordinator (pid {h[L.H_COORD_PID]}) died without stopping"
    if ipc_left:
        return True, "its coordinator died without stopping (its write channel is left)"
    return False, f"stopped cleanly; its records stay readable (`shmstore destroy {name}` removes it)"


def remove(item: StoreLeftovers) -> list[str]:
    """Remove one removable store; returns the entries still left (empty: all gone).

    Raises:
        CoordinatorRunningError: a coordinator started serving it meanwhile.
    """
    try:
        destroy(item.name)
    except CoordinatorRunningError:
        raise
    except ShmStoreError:
        pass  # a damaged piece: unlinked by name below
    # destroy() knows the store's own objects; anything else under the store's name
    # (e.g. a tool's stop semaphore) goes here. Not the known names: a coordinator that
    # started after destroy() may have made them anew.
    for entry in item.entries:
        parsed = L.parse_entry(entry)
        if parsed is not None and L.entry_kind(parsed[1]) is None:
            try:
                os.unlink(os.path.join(SHM_DIR, entry))
            except FileNotFoundError:
                pass
    return sorted(set(item.entries) & set(L.store_entries(item.name)))
