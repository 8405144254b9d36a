"""Profile the write path: the coordinator and a client, under py-spy.

Usage::

    .venv/bin/python scripts/write_profile.py sync  [--seconds 8] [--out DIR]
    .venv/bin/python scripts/write_profile.py pipelined [--seconds 8] [--out DIR]
    .venv/bin/python scripts/write_profile.py rate  [--seconds 3]   # no profiler: ops/s

``sync``: 2 client processes doing synchronous puts (the bench's writes_2proc shape:
16-byte keys, 80-byte values, 4096 keys per client). ``pipelined``: 1 client doing
``put(wait=False)`` x 1000 then ``flush()`` (the bench's put_pipelined shape).
With py-spy (``pip install py-spy``) on PATH next to this interpreter, records a
``--format raw`` (collapsed stacks) profile of the coordinator and of client 0 into
``--out``, and prints the top self and inclusive frames of each. Needs ptrace rights
(root, or kernel.yama.ptrace_scope=0). ``rate`` runs both shapes without a profiler
and prints ops/s (several rounds: the host is shared, read the range).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

import shmstore

HERE = os.path.dirname(os.path.abspath(__file__))


def _client(name: str, mode: str, seconds: float, wid: int, spin_us: float) -> None:
    s = shmstore.connect(name, spin_us=spin_us)
    keys = [f"w{wid}-{n}" for n in range(4096)]
    value = f"value-{wid}-" + "x" * 40
    for k in keys[:64]:
        s.put(k, value)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    count = 0
    t0 = clock()
    if mode == "sync":
        put = s.put
        while clock() < end:
            for k in keys:
                put(k, value)
                count += 1
                if clock() >= end:
                    break
    else:
        put, flush = s.put, s.flush
        while clock() < end:
            for i in range(0, 4096, 1000):
                for k in keys[i:i + 1000]:
                    put(k, value, wait=False)
                flush()
                count += len(keys[i:i + 1000])
    el = clock() - t0
    sys.stdout.write(f"{count} {el}\n")
    sys.stdout.flush()
    s.close()


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _top(path: str, n: int = 25) -> str:
    """Self and inclusive sample shares of the functions in a py-spy raw profile."""
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, cnt = line.rstrip("\n").rpartition(" ")
            c = int(cnt)
            total += c
            frames = stack.split(";")
            self_c[frames[-1]] += c
            for fr in set(frames):
                incl[fr] += c
    out = [f"{path}: {total} samples", "  self:"]
    for fr, c in self_c.most_common(n):
        out.append(f"    {100 * c / total:5.1f}%  {fr}")
    out.append("  inclusive:")
    for fr, c in incl.most_common(n):
        out.append(f"    {100 * c / total:5.1f}%  {fr}")
    return "\n".join(out)


def run(mode: str, seconds: float, out: str | None, nclients: int, client_spin: float = 50.0,
        coord_spin: float = 50.0) -> float:
    name = f"wprof{os.getpid()}"
    coord = shmstore.serve(name, capacity=16_384, key_size=16, value_size=80, spin_us=coord_spin)
    procs = []
    spies = []
    try:
        for wid in range(nclients):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "_client", name, mode, str(seconds), str(wid), str(client_spin)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        if out:
            os.makedirs(out, exist_ok=True)
            spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
            for who, pid in (("coordinator", coord.pid), ("client", procs[0].pid)):
                spies.append(subprocess.Popen(
                    [spy, "record", "-r", "500", "-d", str(int(seconds)), "-p", str(pid), "--format",
                     "raw", "-o", os.path.join(out, f"{mode}-{who}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        cpu0 = [_cpu(coord.pid)] + [_cpu(p.pid) for p in procs]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        rate = 0.0
        count = 0
        for p in procs:
            c, e = p.stdout.readline().split()
            rate += int(c) / int(e) * 1e9
            count += int(c)
        cpu1 = [_cpu(coord.pid)] + [_cpu(p.pid) for p in procs]
        used = [(b - a) / count * 1e6 for a, b in zip(cpu0, cpu1)]
        print(f"  {mode}: {rate / 1e3:.1f}k ops/s; CPU per op: coordinator {used[0]:.1f} us, "
              f"clients {sum(used[1:]) :.1f} us", file=sys.stderr)
        for sp in spies:
            sp.wait(timeout=60)
        return rate
    finally:
        for p in procs:
            try:
                p.stdin.close()
            except OSError:
                pass
            p.wait(timeout=30)
        coord.stop()
        shmstore.destroy(name)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        _, _, name, mode, seconds, wid, spin = sys.argv
        _client(name, mode, float(seconds), int(wid), float(spin))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["sync", "pipelined", "rate"])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="/tmp/shmstore-write-profile")
    ap.add_argument("--client-spin", type=float, default=50.0, help="connect(spin_us=)")
    ap.add_argument("--coord-spin", type=float, default=50.0, help="serve(spin_us=)")
    ap.add_argument("--only", choices=["sync", "pipelined"], help="rate: one shape only")
    a = ap.parse_args()
    if a.mode == "rate":
        for mode, n in (("sync", 2), ("pipelined", 1)):
            if a.only and mode != a.only:
                continue
            rates = [run(mode, a.seconds, None, n, a.client_spin, a.coord_spin) for _ in range(a.rounds)]
            print(f"{mode} ({n} client{'s' * (n > 1)}): " + " ".join(f"{r / 1e3:.1f}k" for r in rates)
                  + f"  ops/s (median {sorted(rates)[len(rates) // 2] / 1e3:.1f}k)")
        return
    n = 2 if a.mode == "sync" else 1
    rate = run(a.mode, a.seconds, a.out, n, a.client_spin, a.coord_spin)
    print(f"{a.mode}: {rate / 1e3:.1f}k ops/s under the profiler")
    for who in ("coordinator", "client"):
        print(_top(os.path.join(a.out, f"{a.mode}-{who}.txt")))


if __name__ == "__main__":
    main()
