"""The torn-read stress test (DESIGN.md section 2, the epoch-stamped seqlock).

Writer processes rewrite self-checking records through their own Store handles while
reader processes verify every value they read; see shmstore/_tools/_stress_torn.py
(``shmstore stress --scenario torn``), which this file drives in-process, and
``scripts/torn_stress.py``, its wrapper (which runs standalone with ``--help``). The short
version runs in CI under both start methods; the long one is ``@pytest.mark.slow``.
The last tests show the checker itself can fail, so a green stress run means
something.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from shmstore._tools import _selfcheck as selfcheck
from shmstore._tools import _stress_torn as torn_stress

#: Every test here runs on both cores: the compiled one and pure Python (conftest.core).
pytestmark = pytest.mark.usefixtures("core")

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_no_torn_read_is_accepted_short(names, method):
    """Seqlock (torn reads): 2 writers x 5000 writes vs 2 verifying reader processes.

    Checked two ways: every read passes the record's self-check and each key's
    counter never goes back (readers), and the final store equals the last counter
    each writer wrote (parent). The deadline only guards against hangs.
    """
    report = torn_stress.run(names("torn"), readers=2, writers=2, keys=24, value_size=200,
                             ops=5000, seconds=0, method=method, deadline=90)
    assert report.ok, report.text()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_no_torn_read_is_accepted_while_records_hop_between_classes(names, method):
    """Format 4: a memory store (6 pages) whose records change size class with their
    counters, in waves, so every rewrite moves a record to a slot of another size in
    another page and pages are handed from one class to another (a page move) under
    the readers. Same two checks as above; the run must have moved a page."""
    report = torn_stress.run(names("tornhop"), readers=2, writers=2, keys=56, value_size=60000,
                             ops=800, seconds=0, method=method, deadline=120, memory=6 << 20)
    assert report.ok, report.text()
    assert report.page_moves >= 1, f"no page moved: the run did not exercise it\n{report.text()}"


def test_sizes_hop_between_classes_and_torn_values_still_fail():
    """The class-hopping sizes: a key's payload size follows its counter in runs of
    HOP_RUN, over four sizes; a value is verified against its own counter's size, and
    a record whose payload has another counter's size (the length of one write, the
    bytes of another) is still refused."""
    size = 60000
    sizes = [torn_stress.size_of(c, size, 1) for c in range(4 * torn_stress.HOP_RUN)]
    assert len(set(sizes)) == 4 and sizes[0] == size
    assert torn_stress.size_of(5, size, 0) == size
    rec = selfcheck.make_record("k000001", 5, torn_stress.size_of(5, size, 1))
    assert selfcheck.check_record("k000001", rec, torn_stress.size_seen(rec, size, 1)) == 5
    other = selfcheck.make_record("k000001", 5, torn_stress.size_of(0, size, 1))
    with pytest.raises(selfcheck.TornRead):
        selfcheck.check_record("k000001", other, torn_stress.size_seen(other, size, 1))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_no_torn_read_is_accepted_long(names, method):
    """Seqlock (torn reads), long run: 3 readers, 2 writers, 20 s of writes."""
    report = torn_stress.run(names("tornlong"), readers=3, writers=2, keys=64, value_size=512,
                             ops=0, seconds=20, method=method, deadline=100)
    assert report.ok, report.text()


def _encoded(key: str, counter: int, size: int) -> bytes:
    return msgspec.msgpack.encode(selfcheck.make_record(key, counter, size))


def test_checker_detects_torn_values():
    """The stress test's checker can fail: values glued from two writes, of another
    key, with a bad checksum or undecodable bytes are all reported as torn."""
    size = 200
    a, b = _encoded("k000001", 5, size), _encoded("k000001", 21, size)
    assert len(a) == len(b)  # same length: only the bytes differ
    assert selfcheck.check_encoded("k000001", a, size) == 5
    assert selfcheck.check_encoded("k000001", b, size) == 21
    # The length of one write with the bytes of another (its length differs).
    c = _encoded("k000001", 6, size)
    assert len(c) != len(a)
    with pytest.raises(selfcheck.TornRead):
        selfcheck.check_encoded("k000001", c[: len(a)] if len(c) > len(a) else c + a[len(c):], size)
    half = len(a) // 2
    spliced = [a[:half] + b[half:], b[:half] + a[half:], a[:40] + b[40:]]
    other_key = _encoded("k000002", 5, size)
    rec = selfcheck.make_record("k000001", 5, size)
    bad_crc = msgspec.msgpack.encode([rec[0], rec[1], rec[2], rec[3] ^ 1])
    truncated = a[: len(a) - 30]
    for raw in [*spliced, other_key, bad_crc, truncated]:
        with pytest.raises(selfcheck.TornRead):
            selfcheck.check_encoded("k000001", raw, size)


def test_reader_counts_torn_values_and_counters_going_back(store):
    """The readers' bookkeeping can fail: a torn record, an undecodable value and a
    counter that goes back are each counted, through every read path."""
    size = 50
    keys = [selfcheck.key_of(i) for i in range(40)]  # >= 32: get_many's numpy pass
    for k in keys:
        store.put(k, selfcheck.make_record(k, 3, size))
    good = selfcheck.make_record(keys[1], 3, size)
    store.put(keys[1], [good[0], good[1], good[2][:-1] + b"?", good[3]])  # torn payload
    for mode in (0, 1, 2):
        stats = selfcheck.ReadStats()
        last = {keys[2]: 7}  # this reader saw counter 7 before: 3 is going back
        torn_stress.read_round(store, keys, mode, size, stats, last)
        assert (stats.reads, stats.torn, stats.violations, stats.missing, stats.errors) == (
            40, 1, 1, 0, 0), (mode, stats)
    # A key that reads as missing is counted too (readers' keys are never deleted).
    store.delete(keys[3])
    stats = selfcheck.ReadStats()
    torn_stress.read_round(store, keys, 0, size, stats, {})
    assert stats.missing == 1
    # Bytes the decoder cannot take, accepted by the store, count as torn.
    store._decode = lambda raw: (_ for _ in ()).throw(msgspec.DecodeError("truncated"))
    stats = selfcheck.ReadStats()
    torn_stress.read_round(store, keys, 2, size, stats, {})
    assert stats.torn == 1, stats


def test_final_state_check_detects_a_lost_or_stale_write(store):
    """The parent's second check can fail: a store that does not hold the last
    counter a writer wrote is reported."""
    size = 30
    for i in range(3):
        k = selfcheck.key_of(i)
        store.put(k, selfcheck.make_record(k, 4, size))
    k0, k1, k2 = (selfcheck.key_of(i) for i in range(3))
    assert torn_stress.check_final(store, {k0: 4, k1: 4, k2: 4}, size) == []
    problems = torn_stress.check_final(store, {k0: 4, k1: 5, k2: 4}, size)
    assert len(problems) == 1 and k1 in problems[0]


def test_script_runs_standalone_and_has_help():
    """scripts/torn_stress.py is runnable on its own: --help documents the options."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "torn_stress.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--readers", "--writers", "--seconds", "--keys", "--value-size"):
        assert option in out.stdout


def test_stress_report_fails_on_torn_reads():
    """The verdict can fail: a report with a torn read, or with no reads, is not ok."""
    base = dict(method="fork", readers=1, writers=1, keys=1, value_size=1, reads=10, writes=10)
    assert torn_stress.Report(**base).ok
    assert not torn_stress.Report(**{**base, "torn": 1}).ok
    assert not torn_stress.Report(**{**base, "violations": 1}).ok
    assert not torn_stress.Report(**{**base, "reads": 0}).ok
    assert not torn_stress.Report(**base, problems=["hang"]).ok
