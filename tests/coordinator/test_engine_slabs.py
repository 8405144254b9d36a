"""The engine's size classes, page moves and evictions replay to the same store.

Random puts, updates, deletes, batches and incrs of random sizes into a small memory
store with eviction: every op the engine decides on its own (an Evict, a MovePage) is
logged before the op that needed it, and replaying the whole log (``replay_record``)
into a fresh segment, with no evictor, gives the same records with the same versions
and the same class counters. A live class-level state that replay could not reach
(a page move with no page to give, a put with no room) would raise instead.
"""

from __future__ import annotations

import os
import random

import msgspec
import numpy as np
import posix_ipc
import pytest

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import StoreFullError
from shmstore._shm import create_segment, unlink_quietly
from shmstore.coordinator import _ops as O
from shmstore.coordinator._durable._rebuild import replay_record
from shmstore.coordinator._engine import Engine
from shmstore.coordinator._evict import Clock, Volatile

pytestmark = pytest.mark.usefixtures("core")

_enc = msgspec.msgpack.encode


def _records(e: Engine) -> dict[bytes, tuple[int, bytes, int]]:
    seg = e.seg
    refs, _ = seg.slot_refs()
    hdr = seg.headers(refs)
    idx = seg.index_view()
    live = set(((idx[idx != 0] & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1).tolist())
    out = {}
    for r, h in zip(refs.tolist(), hdr.tolist()):
        if r in live:
            kb = e._key_at(r)
            version, value = e.get(kb)
            out[kb] = (version, value, h[L.S_EXPIRY])
    return out


def _counters(e: Engine) -> list[int]:
    q = e.q
    return [q[L.H_COUNT]] + [q[L.class_word(c, f)] for c in range(len(e.classes))
                             for f in (L.C_RECORDS, L.C_ASKED)]


@pytest.fixture
def segs(names):
    made = []

    def make(lay: L.Layout):
        n = names("eng")
        seg = create_segment(n, lay, 0)
        made.append((n, seg))
        return seg

    yield make
    for n, seg in made:
        seg.close()
        unlink_quietly(posix_ipc.SharedMemory, L.data_name(n))


@pytest.mark.parametrize("policy", ["lru", "volatile-ttl", None])
@pytest.mark.parametrize("seed", [1, 2])
def test_a_log_with_evictions_and_page_moves_replays_to_the_same_store(segs, policy, seed):
    lay = L.Layout(capacity=3000, key_size=16, value_size=200_000, memory=8 << 20, growth=4.0).validate()
    live = Engine(segs(lay))
    live.rebuild_free_list()
    log: list[tuple[int, bytes]] = []
    live.log = lambda epoch, payload: log.append((epoch, payload))
    if policy is not None:
        acc = np.zeros(lay.access_size, np.uint8)
        live.access = acc
        live.evictor = (Clock if policy == "lru" else Volatile)(live, acc)
    rng = random.Random(seed)
    full = 0
    for i in range(3000):
        r = rng.random()
        k = f"k{rng.randrange(600)}".encode()
        size = rng.choice([10, 100, 1000, 5000, 30_000, 150_000]) if rng.random() < 0.2 else rng.randint(1, 3000)
        expiry = (1 << 62) + rng.randrange(1000) if policy == "volatile-ttl" and rng.random() < 0.7 else 0
        e0 = live.epoch
        try:
            if r < 0.6:
                op = O.Put(0, k, os.urandom(size), expiry)
                live.put(op.key, op.value, op.expiry)
            elif r < 0.75:
                op = O.Delete(0, k)
                if not live.delete(k):
                    continue
            elif r < 0.85:
                op = O.Incr(0, b"n" + k, rng.randint(-5, 5))
                live.incr(op.key, op.delta)
            else:
                ops = [O.BatchPut(f"b{rng.randrange(600)}".encode(), os.urandom(rng.randint(1, 4000)))
                       for _ in range(rng.randint(1, 6))]
                op = O.Batch(0, ops)
                live.batch(ops)
        except StoreFullError:
            full += 1
            continue
        # the op itself goes to the log after what the engine logged for it
        log.append((live.epoch - O.epochs_of(op), _enc(op)))
        for kb in (rng.choice([b"k1", b"k2", b"k3"]),):
            slot = live.find(kb, L.key_hash(kb))[1]
            if slot >= 0 and live.access is not None:
                live.access[slot >> 2] = 1  # a reader's touch
    q = live.q
    if policy == "lru":
        assert q[L.H_EVICTIONS] > 0 and full == 0
    if policy is None:
        assert full > 0 and q[L.H_EVICTIONS] == 0
    epochs = [e for e, _ in log]
    assert epochs == sorted(epochs)

    again = Engine(segs(lay))
    again.rebuild_free_list()
    for epoch, payload in log:
        assert again.epoch == epoch
        replay_record(again, O.decode_logged(payload))
    assert again.epoch == live.epoch
    assert _records(again) == _records(live)
    assert _counters(again) == _counters(live)
    assert again.q[L.H_PAGE_MOVES] == live.q[L.H_PAGE_MOVES]
