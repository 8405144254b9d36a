"""protocol.h under real threads: the C harness tests/native/seqlock_stress.c, built
with ThreadSanitizer, at -O2, and for aarch64.

What each test can catch (the harness's header comment has the detail):

- the TSan build: a data race, i.e. a shared word that protocol.h touches with a plain
  load or store; and, in every build, a torn read (a validated copy whose words
  disagree, by a lookup or by a page scan while pages move between size classes), a
  wrong miss of a key never deleted, a find of a key never inserted.
- the broken builds show those checks can fail: with copy_out a plain memcpy TSan
  reports the race; with the stamp, page and bucket checks gone the torn counter
  counts; with only the page-entry re-check gone, the page scans count torn reads as
  pages move (the stamp alone cannot see a slot's geometry change).
- aarch64: the barriers the protocol's argument needs are in the code (ldar, dmb
  ishld, stlr, dmb ish), and the harness runs clean under qemu-aarch64. qemu runs on a
  TSO host, so that run checks the aarch64 build, not weak-memory reorderings.

TSan does not model atomic_thread_fence: it checks that every shared access is atomic,
not the ordering argument; the torn counter and the aarch64 code check that.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from scripts.tsan_stress import build, qemu, run

TSAN_WARNING = "WARNING: ThreadSanitizer"


@functools.cache
def _tsan_missing() -> str | None:
    """Why a TSan build cannot run here (gcc or libtsan missing), or None."""
    if not shutil.which("gcc"):
        return "gcc is not installed"
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "empty.c", Path(d) / "empty"
        src.write_text("int main(void) { return 0; }\n")
        done = subprocess.run(
            ["gcc", "-fsanitize=thread", str(src), "-o", str(exe)], capture_output=True, text=True, timeout=60
        )
        if done.returncode:
            return f"gcc -fsanitize=thread fails (libtsan missing?): {done.stderr.strip()[-300:]}"
        done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
        if done.returncode:
            return f"a -fsanitize=thread program does not run here: {done.stderr.strip()[-300:]}"
    return None


def _need_tsan() -> None:
    reason = _tsan_missing()
    if reason:
        pytest.skip(reason)


def _need_gcc() -> None:
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")


def _need_cross() -> None:
    if not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("no aarch64 cross compiler (Debian: apt-get install gcc-aarch64-linux-gnu)")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """build(kind, *defines), each compiled once per module (and per xdist worker)."""
    out = tmp_path_factory.mktemp("seqlock_stress")
    cache: dict = {}

    def get(kind: str, *defines: str, asm: bool = False) -> Path:
        key = (kind, defines, asm)
        if key not in cache:
            cache[key] = build(out, kind, defines, asm=asm)
        return cache[key]

    return get


def _assert_clean(rc: int, counts: dict, out: str, err: str, min_reads: int) -> None:
    assert TSAN_WARNING not in err, err[-6000:]
    assert rc == 0, f"exit {rc}\n{out}\n{err[-3000:]}"
    assert counts["torn"] == 0, out
    assert counts["wrong"] == 0, out
    assert counts["idle_readers"] == 0, out
    assert counts["reads"] >= min_reads, out
    assert counts["found"] > 0 and counts["misses"] > 0, out


@pytest.mark.parametrize("mode", ["cow", "inplace"])
def test_tsan_reports_nothing_and_no_read_is_torn(builds, mode):
    _need_tsan()
    exe = builds("tsan")
    rc, counts, out, err = run(exe, 0.8, 3, mode)
    _assert_clean(rc, counts, out, err, min_reads=2000)
    assert counts["moves"] > 0 and counts["scanned"] > 0, out  # pages moved under the scans
    if mode == "inplace":
        # Readers met a slot mid-write (the stamp check was exercised, not idle).
        assert counts["retries"] > 0, out


def test_tsan_reports_a_plain_memcpy_of_a_live_slot(builds):
    """The check can fail: the same harness with copy_out a plain memcpy."""
    _need_tsan()
    exe = builds("tsan", "SHM_BROKEN_ORDER")
    rc, counts, out, err = run(exe, 0.5, 2, "inplace")
    assert f"{TSAN_WARNING}: data race" in err, f"{out}\n{err[-3000:]}"
    assert "broken_copy_out" in err, err[-3000:]  # the race is the planted one
    assert rc != 0


@pytest.mark.parametrize(
    ("mode", "defines"), [("cow", ()), ("inplace", ()), ("inplace", ("VALUE_SIZE=509",))],
    ids=["cow", "inplace", "inplace-long-values"],
)
def test_o2_no_read_is_torn(builds, mode, defines):
    _need_gcc()
    exe = builds("o2", *defines)
    rc, counts, out, err = run(exe, 0.7, 2, mode)
    _assert_clean(rc, counts, out, err, min_reads=20000)
    assert counts["moves"] > 100 and counts["page_moved"] > 0, out  # scans met moving pages


def test_torn_counter_counts_when_the_page_entry_is_not_rechecked(builds):
    """The page check is needed: with the stamp and bucket checks kept and only the
    re-check of the page entry gone, scans read slots of a page's old geometry whose
    words a move (and the writes after it) replaced under an unchanged stamp word."""
    _need_gcc()
    exe = builds("o2", "SHM_BROKEN_PAGE")
    runs = []
    for _ in range(3):
        rc, counts, out, _ = run(exe, 1.0, 1, "cow")
        runs.append(out)
        if counts["torn"]:
            assert rc == 1 and counts["moves"] > 0, out
            return
    pytest.fail("no torn read counted with the page check off:\n" + "".join(runs))


def test_torn_counter_counts_when_validation_is_skipped(builds):
    """The check can fail: readers that trust every copy see torn values."""
    _need_gcc()
    exe = builds("o2", "SHM_BROKEN_VALIDATE")
    runs = []
    for _ in range(3):  # one second is plenty unless the machine starves a thread
        rc, counts, out, _ = run(exe, 1.0, 1, "inplace")
        runs.append(out)
        if counts["torn"]:
            assert rc == 1, out
            return
    pytest.fail("no torn read counted with validation off:\n" + "".join(runs))


# -- aarch64 ---------------------------------------------------------------------------

#: Each protocol step's function in the harness (shm_probe_*), and the instructions its
#: aarch64 code must contain, in this order (protocol.h's W1-W4, R1-R7).
BARRIERS = {
    "shm_probe_pte_load": ["ldar"],  # R0 load_acquire(pt[p])
    "shm_probe_read_begin": ["ldar"],  # R1 load_acquire(seq)
    "shm_probe_read_end": ["dmb\tishld", "ldr"],  # R5 fence(acquire), R6 load seq
    "shm_probe_page_same": ["ldr"],  # R7 load_relaxed(pt[p]) (after read_end's fence)
    "shm_probe_miss_valid": ["dmb\tishld", "ldr"],  # fence(acquire), load gen
    "shm_probe_write_begin": ["str", "dmb\tish\n"],  # W1 store seq, W2 fence(release)
    "shm_probe_write_end": ["stlr"],  # W4 store_release(seq)
    # P0 entry 0, then per new slot W1 + W2 fence .. W4, then P2 store_release(entry)
    "shm_probe_page_assign": ["str", "str", "dmb\tish\n", "stlr", "stlr"],
    "shm_probe_set_bucket": ["stlr"],  # the bucket's release store
    "shm_probe_walk_from": ["ldar"],  # each bucket's acquire load
}


def _function_asm(asm: str, name: str) -> str:
    m = re.search(rf"^{name}:\n(.*?)^\t\.size\t{name},", asm, re.M | re.S)
    assert m, f"{name} not in the assembly"
    return "\n".join(line for line in m.group(1).splitlines() if not line.lstrip().startswith(".cfi")) + "\n"


def test_aarch64_code_has_the_protocols_barriers(builds):
    _need_cross()
    asm = builds("aarch64", asm=True).read_text()
    for name, wanted in BARRIERS.items():
        body = _function_asm(asm, name)
        at = 0
        for insn in wanted:
            found = re.search(rf"^\t{re.escape(insn.rstrip())}(\t|\n)", body[at:], re.M)
            assert found, f"{name}: no {insn!r} after offset {at}:\n{body}"
            at += found.end()
    # The relaxed steps stay plain: no barrier in the body copy or the page re-check.
    assert "dmb" not in _function_asm(asm, "shm_probe_read_begin")
    assert "dmb" not in _function_asm(asm, "shm_probe_page_same")
    assert "ldar" not in _function_asm(asm, "shm_probe_page_same")


def test_aarch64_build_runs_clean_under_qemu(builds):
    _need_cross()
    if not qemu():
        pytest.skip("no qemu-aarch64 (Debian: apt-get install qemu-user-static)")
    exe = builds("aarch64")  # both modes in one test: one static cross build, not two
    for mode in ("cow", "inplace"):
        rc, counts, out, err = run(exe, 0.7, 2, mode)
        _assert_clean(rc, counts, out, err, min_reads=2000)
