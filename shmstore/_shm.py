"""The POSIX objects behind a store: mapping its data segment (:func:`open_segment`),
creating it (:func:`create_segment`, the coordinator), and unlinking shm segments and
semaphores (:func:`unlink_quietly`). What a mapping is read through:
``_segment.Segment``.
"""

from __future__ import annotations

import mmap
import os
import time

import posix_ipc

from . import _layout as L
from ._errors import StoreNotFoundError, StoreTimeoutError
from ._segment import Segment


def _map(shm: posix_ipc.SharedMemory, writable: bool) -> mmap.mmap:
    try:
        size = os.fstat(shm.fd).st_size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=prot)
    finally:
        shm.close_fd()


def open_segment(name: str, *, writable: bool = False, timeout: float = 5.0) -> Segment:
    """Map an existing store's data segment.

    Clients map it read-only; only the coordinator passes ``writable=True``.

    Raises:
        StoreNotFoundError: no segment of that name.
        IncompatibleStoreError: another format or a damaged header.
        StoreTimeoutError: the segment stayed half-initialized for ``timeout`` seconds.
    """
    L.check_platform()
    L.check_name(name)
    deadline = time.monotonic() + timeout
    while True:
        try:
            shm = posix_ipc.SharedMemory(L.data_name(name), read_only=not writable)
        except posix_ipc.ExistentialError:
            raise StoreNotFoundError(
                f"no store named {name!r} on this host; start one with "
                f"shmstore.serve({name!r}) or shmstore.open({name!r})"
            ) from None
        if os.fstat(shm.fd).st_size < L.HEADER_SIZE:
            # Between its creator's shm_open and ftruncate: not ready, like STATE_INIT.
            shm.close_fd()
        else:
            mm = _map(shm, writable)
            # Invariant: the creator writes STATE_READY last, after every header field.
            state = memoryview(mm).cast("Q")[L.H_STATE]
            if state != L.STATE_INIT:
                return Segment(name, mm, writable, timeout)
            mm.close()
        if time.monotonic() > deadline:
            raise StoreTimeoutError(
                f"store {name!r}: its segment is still being created after {timeout} s; "
                f"the creating coordinator may have died (shmstore cleanup)"
            )
        time.sleep(0.005)


def create_segment(name: str, layout: L.Layout, schema_fp: int) -> Segment:
    """Create a new data segment, mode 0600 (coordinator only).

    Raises:
        posix_ipc.ExistentialError: it exists already.
    """
    shm = posix_ipc.SharedMemory(
        L.data_name(name), posix_ipc.O_CREX, mode=0o600, size=layout.size
    )
    mm = _map(shm, True)
    q = memoryview(mm).cast("Q")
    q[L.H_FORMAT] = L.FORMAT_VERSION
    q[L.H_LAYOUT_FP] = layout.fingerprint
    q[L.H_SCHEMA_FP] = schema_fp
    q[L.H_CAPACITY] = layout.capacity
    q[L.H_NSLOTS] = layout.nslots
    q[L.H_SLOT_SIZE] = layout.largest_slot
    q[L.H_KEY_SIZE] = layout.key_size
    q[L.H_VALUE_SIZE] = layout.value_size
    q[L.H_NBUCKETS] = layout.nbuckets
    q[L.H_MEMORY] = layout.memory
    q[L.H_GROWTH] = round(layout.growth * 1e6)
    q[L.H_NPAGES] = layout.npages
    q[L.H_PAGE_SIZE] = layout.page_size
    q[L.H_PAGES_OFFSET] = layout.pages_offset
    q[L.H_NCLASSES] = len(layout.classes)
    for c, size in enumerate(layout.classes):
        q[L.class_word(c, L.C_SLOT_SIZE)] = size
    if not layout.memory:  # a single-class store: every page is its class's from the start
        pt0 = layout.pt_offset // 8
        for page in range(layout.npages):
            q[pt0 + page] = 1  # (epoch 0 << 8) | (class 0 + 1)
        q[L.class_word(0, L.C_PAGES)] = layout.npages
    else:
        q[L.H_FREE_PAGES] = layout.npages
    q[L.H_INSTANCE] = int.from_bytes(os.urandom(8), "little") | 1
    q[L.H_MAGIC] = L.MAGIC
    q.release()
    return Segment(name, mm, True)


def unlink_quietly(kind: type, name: str) -> bool:
    """Unlink a POSIX shm segment or semaphore; False if it did not exist."""
    try:
        if kind is posix_ipc.Semaphore:
            posix_ipc.unlink_semaphore(name)
        else:
            posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False
