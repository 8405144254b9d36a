"""asyncio writes: they never block the event loop, and behave like the sync calls."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

import shmstore


def test_async_writes_never_block_the_event_loop(served):
    """A heartbeat task keeps ticking while 200 aputs wait on a SIGSTOPped coordinator;
    once it continues, every aput completes in order."""
    n, coord = served(capacity=1000)
    s = shmstore.connect(n, timeout=30)

    async def main() -> tuple[int, int, list]:
        ticks = 0
        stop = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        hb = asyncio.create_task(heartbeat())
        await s.aput("warm", 0)  # the handle's channel and thread exist now
        os.kill(coord.pid, signal.SIGSTOP)
        try:
            puts = asyncio.gather(*(s.aput(f"k{i}", i) for i in range(200)))
            t0 = ticks
            await asyncio.sleep(0.5)
            ticks_stopped = ticks - t0
            done_while_stopped = puts.done()
        finally:
            os.kill(coord.pid, signal.SIGCONT)
        versions = await puts
        stop.set()
        await hb
        return ticks_stopped, done_while_stopped, versions

    try:
        ticks_stopped, done_while_stopped, versions = asyncio.run(main())
        assert not done_while_stopped  # they really waited on the coordinator ...
        assert ticks_stopped >= 10, ticks_stopped  # ... while the loop kept running
        assert versions == sorted(versions) and len(set(versions)) == 200
        assert s.get_many([f"k{i}" for i in range(200)]) == list(range(200))
    finally:
        s.close()


def test_async_variants_match_the_sync_calls(store):
    async def main() -> None:
        v = await store.aput("a", 1, ttl=60)
        assert store.get("a") == 1 and 0 < store.ttl("a") <= 60
        assert await store.aincr("n", 5) == 5
        assert await store.adelete("n") is True
        assert await store.adelete("n") is False
        v2 = await store.acompare_and_set("a", 2, version=v)
        with pytest.raises(shmstore.VersionConflictError):
            await store.acompare_and_set("a", 3, version=v)
        assert store.get("a") == 2 and store.version("a") == v2
        with pytest.raises(shmstore.InvalidTTLError):
            await store.aput("a", 1, ttl=-1)
        async with store.abatch() as b:
            b.put("x", 1)
            b.put("y", 2, ttl=10)
            b.delete("a")
        assert len(b) == 3 and b.results[2] is True
        assert store.get_many(["x", "y", "a"]) == [1, 2, None]
        with pytest.raises(RuntimeError):
            async with store.abatch() as b:
                b.put("never", 1)
                raise RuntimeError("nothing is sent")
        assert "never" not in store

    asyncio.run(main())


def test_awatch_yields_changes_made_elsewhere_and_ends_on_timeout(store):
    async def with_writer() -> list:
        since = store.epoch
        got = []
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(tick())
        timer = threading.Timer(0.3, lambda: (store.put("other", 1), store.put("cfg:a", 1)))
        timer.start()
        async for keys, _ in store.awatch(prefix="cfg:", timeout=30, since=since):
            got.append(keys)
            break
        timer.join()
        assert ticks >= 5  # the loop ran while awatch waited
        t.cancel()
        empty = [k async for k in store.awatch(timeout=0.2)]
        return got + [empty]

    assert asyncio.run(with_writer()) == [[b"cfg:a"], []]


def test_close_stops_the_async_thread(served):
    n, _ = served(capacity=10)
    s = shmstore.connect(n)
    asyncio.run(s.aput("a", 1))
    assert any(t.name.startswith("shmstore-aio") for t in threading.enumerate())
    s.close()
    assert not any(t.name.startswith("shmstore-aio") for t in threading.enumerate())
    with pytest.raises(shmstore.StoreClosedError):
        asyncio.run(s.aput("a", 2))
