"""Crash and corruption tests of durable stores.

- The crash loop of ``shmstore stress --scenario crash`` (shmstore/_tools/_stress_crash.py)
  with a few kills: writer processes record
  every acknowledged write while the coordinator is SIGKILLed at random moments and
  restarted, keeping the segment (adopt) or destroying it first (the reboot case:
  rebuild from the data directory). Every acknowledged write must be there with its
  version, and nothing nobody wrote. ``python scripts/crash_test.py --kills 500`` runs
  hundreds.
- Corruption: WAL files, checkpoints and the manifest truncated or bit-flipped at
  seeded random offsets. Each case must recover exactly the state after some prefix
  of the acknowledged writes (the whole history wherever the damage leaves a complete
  path to it), or refuse with CorruptionError / IncompatibleStoreError. Never garbage.

Set SEED=... to replay a failing run; every test prints its seed.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

import shmstore
from shmstore._tools import _stress_crash as crash_test
from shmstore.coordinator import CoordinatorServer, ServerConfig
from shmstore.coordinator._durable._wal import HEADER_SIZE, REC_SIZE, scan_wal

#: Every test here runs on both cores: the compiled one and pure Python (conftest.core).
pytestmark = pytest.mark.usefixtures("core")


def _seed() -> int:
    seed = int(os.environ.get("SEED", time.time_ns() % 10**9))
    print(f"seed {seed}")
    return seed


#: SIGKILLs of the coordinator per case and core
KILLS = 6


@pytest.mark.parametrize("destroy", [0.0, 1.0, 0.5], ids=["adopt", "rebuild", "mixed"])
def test_acknowledged_writes_survive_sigkill_of_the_coordinator(names, tmp_path, destroy):
    """6 kills per case and core, 36 in all (both cores, conftest.core); writers of 3
    processes; sync='always'. (`python scripts/crash_test.py --kills 300` runs long.)"""
    seed = _seed()
    n = names("crash")
    summary = crash_test.crash_loop(n, str(tmp_path / "data"), kills=KILLS, writers=3, seed=seed,
                                    destroy=destroy, on_serve=names.coordinators.append)
    print(summary)
    assert not summary.problems, f"{summary}\n" + "\n".join(summary.problems)
    assert summary.kills == KILLS and summary.checks == KILLS + 1 and summary.acks > 0


# -- corruption ----------------------------------------------------------------------


def _state(name: str) -> dict:
    with shmstore.connect(name) as s:
        return {k.decode(): (s.version(k), v) for k, v in s.items()}


def _history(name: str, data: Path, rng: random.Random, names) -> tuple[list[dict], int]:
    """Write a history with every kind of op; an explicit checkpoint in the middle.

    Returns:
        The state after each acknowledged write (states[0]: empty), and the index of
        the state the middle checkpoint holds.
    """
    coord = shmstore.serve(name, path=data, capacity=100, key_size=16, value_size=48,
                           checkpoint_ops=10**6)
    names.coordinators.append(coord)
    states = [{}]
    mid = None
    with shmstore.connect(name) as s:
        live: set[str] = set()
        for i in range(70):
            if i == 30:
                s.checkpoint()
                mid = len(states) - 1
            r = rng.random()
            key = f"k{rng.randrange(25)}"
            if r < 0.4 or not live:
                s.put(key, [i, "v" * rng.randrange(20)])
                live.add(key)
            elif r < 0.55:
                k = rng.choice(sorted(live))
                s.delete(k)
                live.discard(k)
            elif r < 0.7:
                s.incr("ctr", rng.randrange(1, 9))
            elif r < 0.85:
                k = rng.choice(sorted(live))
                s.compare_and_set(k, i, version=s.version(k))
            else:
                with s.batch() as b:
                    for j in range(3):
                        b.put(f"b{rng.randrange(10)}", [i, j])
                        live.add(key)
                    b.put(key, i)
            states.append(_state(name))
    coord.kill()
    shmstore.destroy(name)
    return states, mid


def _recover(name: str, data: Path) -> dict | shmstore.ShmStoreError:
    """Recover in this process (the real coordinator code, without the process)."""
    server = CoordinatorServer(ServerConfig(name=name, path=str(data), sync="always", max_clients=1))
    try:
        server.setup()
        return _state(name)
    except (shmstore.CorruptionError, shmstore.IncompatibleStoreError) as e:
        return e
    finally:
        server.close()
        shmstore.destroy(name)


def _expected_wal_damage(path: Path, offset: int, truncate: bool, states: list, first: int):
    """What recovery must give when the newest WAL file is damaged at ``offset``."""
    recs = [(o, len(p)) for o, _, p in scan_wal(str(path)).records]
    if offset < HEADER_SIZE:
        return "error"
    if truncate:
        whole = sum(1 for o, n in recs if o + REC_SIZE + n <= offset)
        return states[first + whole]
    for i, (o, n) in enumerate(recs):
        if o <= offset < o + REC_SIZE + n:
            # A damaged last record looks exactly like a write torn by a crash.
            return states[-2] if i == len(recs) - 1 else "error"
    return states[-1]  # the padding between records is not part of any record


def test_damaged_files_recover_a_true_state_or_refuse(names, tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    n = names("corrupt")
    pristine = tmp_path / "pristine"
    states, mid = _history(n, pristine, rng, names)
    ckpts = sorted(pristine.glob("ckpt-*"))
    wals = sorted(pristine.glob("wal-*"))
    assert len(ckpts) == 2 and len(wals) == 2, os.listdir(pristine)
    assert _recover(n, pristine.parent / _copy(pristine, tmp_path / "check")) == states[-1]
    targets = [("ckpt-old", ckpts[0]), ("ckpt-new", ckpts[1]), ("wal-old", wals[0]),
               ("wal-new", wals[1]), ("manifest", pristine / "MANIFEST")]
    outcomes: dict[str, int] = {}
    for case in range(40):
        what, src = targets[case % len(targets)]
        truncate = rng.random() < 0.4
        size = src.stat().st_size
        offset = rng.randrange(size)
        bit = rng.randrange(8)
        work = tmp_path / f"case{case}"
        _copy(pristine, work)
        target = work / src.name
        raw = bytearray(target.read_bytes())
        if truncate:
            del raw[offset:]
        else:
            raw[offset] ^= 1 << bit
        target.write_bytes(bytes(raw))
        got = _recover(n, work)
        label = f"case {case} (seed {seed}): {what} {'cut at' if truncate else f'bit {bit} flipped at'} {offset} of {size}"
        if what in ("ckpt-old", "ckpt-new", "wal-old"):
            # The other checkpoint, or the older one plus the complete WAL, holds it all.
            expected = states[-1]
        elif what == "wal-new":
            expected = _expected_wal_damage(src, offset, truncate, states, mid)
        else:
            expected = "any"
        if expected == "error":
            assert isinstance(got, shmstore.CorruptionError), f"{label}: expected CorruptionError, got {got!r:.300}"
            assert src.name in str(got), label  # it names the file
        elif expected == "any":
            assert isinstance(got, shmstore.ShmStoreError) or got == states[-1], f"{label}: {got!r:.300}"
        else:
            assert got == expected, f"{label}: recovered {got!r:.300}"
        kind = type(got).__name__ if isinstance(got, Exception) else (
            "full" if got == states[-1] else "prefix")
        outcomes[kind] = outcomes.get(kind, 0) + 1
        shutil.rmtree(work)
    print(f"seed {seed}: outcomes {outcomes}")


def _copy(src: Path, dst: Path) -> str:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        if f.name.endswith(".corrupt"):
            f.unlink()
    return dst.name


def test_a_damaged_record_in_the_middle_is_named_with_its_offset(names, tmp_path):
    data = tmp_path / "data"
    n = names("corrupt")
    coord = shmstore.serve(n, path=data, capacity=50)
    names.coordinators.append(coord)
    with shmstore.connect(n) as s:
        for i in range(10):
            s.put(f"k{i}", i)
    coord.kill()
    shmstore.destroy(n)
    wal = max(data.glob("wal-*"), key=lambda p: p.stat().st_size)
    recs = scan_wal(str(wal)).records
    off = recs[4][0]
    raw = bytearray(wal.read_bytes())
    raw[off + REC_SIZE] ^= 0xFF
    wal.write_bytes(bytes(raw))
    with pytest.raises(shmstore.CorruptionError) as e:
        shmstore.serve(n, path=data)
    assert wal.name in str(e.value) and f"offset {off}" in str(e.value)
    assert not list(data.glob("*.corrupt"))  # nothing was given up on disk
