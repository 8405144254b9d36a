"""The C seqlock harness (tests/native/seqlock_stress.c) by hand: build it, run it longer.

protocol.h under real threads, without Python: one writer thread rewrites
self-checking records the way the coordinator does and moves pages between two size
classes, reader threads look them up the way reader.c's attempt() does and scan pages
the way its changed_keys does, and the harness counts torn reads (the harness's
header comment says what each build proves). tests/test_native_tsan.py runs the same
builds briefly, through build() and run() below.

    python scripts/tsan_stress.py --seconds 30                     # ThreadSanitizer build
    python scripts/tsan_stress.py --build o2 --mode inplace --readers 1 --seconds 60
    python scripts/tsan_stress.py --build aarch64 --seconds 10     # under qemu-aarch64

It prints the harness's counts (and TSan's reports) and exits with the harness's code:
0 when no torn read, wrong miss or idle reader was seen and TSan reported nothing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "native" / "seqlock_stress.c"
CSRC = ROOT / "shmstore" / "_csrc"

#: Compiler flags per build. -Wno-tsan: GCC warns that TSan does not model
#: atomic_thread_fence; the harness's header comment says what that means here.
BUILDS = {
    "tsan": ("gcc", ["-fsanitize=thread", "-O1", "-g", "-Wno-tsan"]),
    "o2": ("gcc", ["-O2"]),
    "aarch64": ("aarch64-linux-gnu-gcc", ["-O2", "-static"]),
}
QEMU = ("qemu-aarch64", "qemu-aarch64-static")


def build(out_dir: Path, kind: str = "tsan", defines: tuple[str, ...] = (), asm: bool = False) -> Path:
    """Compile the harness into out_dir; returns the executable (or the .s with asm=True)."""
    cc, flags = BUILDS[kind]
    tag = "-".join([kind, *(d.lower() for d in defines)])
    out = Path(out_dir) / (f"seqlock_stress-{tag}" + (".s" if asm else ""))
    cmd = [cc, *flags, "-pthread", "-I", str(CSRC), *(f"-D{d}" for d in defines)]
    cmd += ["-S", str(HARNESS), "-o", str(out)] if asm else [str(HARNESS), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return out


def qemu() -> str | None:
    """The qemu-aarch64 user-mode emulator on PATH, if any."""
    return next((q for q in map(shutil.which, QEMU) if q), None)


def run(exe: Path, seconds: float, readers: int, mode: str = "cow", timeout: float = 120):
    """Run a build; returns (exit code, counts dict, stdout, stderr)."""
    cmd = [str(exe), str(seconds), str(readers), mode]
    if "aarch64" in Path(exe).name:
        q = qemu()
        if not q:
            raise RuntimeError("no qemu-aarch64 to run an aarch64 build")
        cmd.insert(0, q)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    counts = {}
    for k, v in re.findall(r"(\w+)=(\S+)", lines[-1] if lines else ""):
        counts[k] = int(v) if v.isdigit() else v
    return done.returncode, counts, done.stdout, done.stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", choices=sorted(BUILDS), default="tsan")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--readers", type=int, default=3)
    p.add_argument("--mode", choices=("cow", "inplace"), default="cow",
                   help="cow: the engine's copy-on-write; inplace: rewrite live slots (only the stamp defends)")
    p.add_argument("-D", dest="defines", action="append", default=[],
                   help="a harness macro: SHM_BROKEN_ORDER, SHM_BROKEN_VALIDATE, SHM_BROKEN_PAGE, VALUE_SIZE=509")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        exe = build(Path(d), a.build, tuple(a.defines))
        rc, _, out, err = run(exe, a.seconds, a.readers, a.mode, timeout=a.seconds * 20 + 60)
    sys.stderr.write(err)
    sys.stdout.write(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
