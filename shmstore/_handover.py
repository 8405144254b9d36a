"""Handing a large, consistent copy from the coordinator to one client.

Design
------
Some answers are too large for a client's reply area: a whole-store snapshot, or
100,000 table rows. For those the coordinator writes the answer into a fresh POSIX
shared-memory segment of its own, ``/shmstore.NAME@x<16 hex>`` (mode 0600), and
replies with its name. The client maps it read-only and unlinks the name at once, so
the memory goes away when the client unmaps it (or dies). A client that dies between
the reply and the unlink leaves the segment behind only until the coordinator's sweep
(:class:`Handovers`, every tick: names older than ``HANDOVER_TTL`` seconds), its
clean stop, or ``shmstore.destroy``.

A handover segment::

    0   u64  HANDOVER_MAGIC
    8   u64  length of the payload
    16  ...  the payload (8-aligned from byte 64)
"""

from __future__ import annotations

import mmap
import os
import time

import posix_ipc

from . import _layout as L
from ._compiled import acquire, release
from ._errors import CoordinatorUnavailableError, StoreFullError

HANDOVER_MAGIC = 0x31_56_4F_48_53_4D_48_53  # b"SHMSHOV1"
HANDOVER_HEADER = 64
#: seconds a handed-over segment may stay linked before the coordinator unlinks it
HANDOVER_TTL = 30.0


def handover_prefix(name: str) -> str:
    return L.handover_prefix(name)


def open_handover(seg_name: str) -> tuple[mmap.mmap, int]:
    """Map a handover segment read-only and unlink its name (client side).

    Returns:
        ``(mapping, payload length)``; the payload starts at ``HANDOVER_HEADER``.

    Raises:
        CoordinatorUnavailableError: it is gone (the coordinator swept it: the client
            took longer than ``HANDOVER_TTL`` to pick it up) or is not a handover.
    """
    try:
        shm = posix_ipc.SharedMemory(seg_name, read_only=True)
    except posix_ipc.ExistentialError:
        raise CoordinatorUnavailableError(
            f"the coordinator's answer {seg_name} vanished before it was picked up; retry"
        ) from None
    try:
        size = os.fstat(shm.fd).st_size
        mm = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        shm.close_fd()
        try:
            posix_ipc.unlink_shared_memory(seg_name)
        except posix_ipc.ExistentialError:
            pass  # the coordinator's sweep got there first; our mapping stays valid
    q = memoryview(mm).cast("Q")
    magic = q[0]
    acquire()  # the magic before the size and payload it vouches for
    n = q[1]
    q.release()
    if magic != HANDOVER_MAGIC or n > size - HANDOVER_HEADER:
        mm.close()
        raise CoordinatorUnavailableError(f"{seg_name} is not a complete coordinator answer; retry")
    return mm, n


class Handovers:
    """The coordinator's side: creates handover segments and sweeps stale ones."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.live: dict[str, float] = {}

    def create(self, size: int) -> tuple[str, mmap.mmap]:
        """A new segment with room for ``size`` payload bytes, mapped writable.

        The caller fills ``mm[HANDOVER_HEADER:]`` and then calls :meth:`seal`.
        """
        seg_name = f"{handover_prefix(self.name)}{os.urandom(8).hex()}"
        total = L.align(HANDOVER_HEADER + max(size, 1), L.PAGE)
        try:
            st = os.statvfs("/dev/shm")
            if total > st.f_bavail * st.f_frsize:
                raise OSError(f"/dev/shm has {st.f_bavail * st.f_frsize} bytes free")
            shm = posix_ipc.SharedMemory(seg_name, posix_ipc.O_CREX, mode=0o600, size=total)
            try:
                mm = mmap.mmap(shm.fd, total, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                shm.close_fd()
        except (OSError, posix_ipc.Error) as e:
            try:
                posix_ipc.unlink_shared_memory(seg_name)
            except posix_ipc.ExistentialError:
                pass
            raise StoreFullError(f"no room in shared memory for a copy of {total} bytes ({e}); free "
                                 f"shared memory, or read fewer records at once") from None
        self.live[seg_name] = time.monotonic()
        return seg_name, mm

    @staticmethod
    def seal(mm: mmap.mmap, size: int) -> None:
        q = memoryview(mm).cast("Q")
        q[1] = size
        release()  # the payload and its size before the magic that says it is whole
        q[0] = HANDOVER_MAGIC
        q.release()
        mm.close()

    def sweep(self, everything: bool = False) -> None:
        """Unlink handovers older than ``HANDOVER_TTL`` (all of them at shutdown)."""
        now = time.monotonic()
        for seg_name, t in list(self.live.items()):
            if everything or now - t > HANDOVER_TTL:
                del self.live[seg_name]
                try:
                    posix_ipc.unlink_shared_memory(seg_name)
                except posix_ipc.ExistentialError:
                    pass  # the client unlinked it, as it should
