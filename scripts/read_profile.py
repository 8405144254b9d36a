"""Where a read's time goes: read loops to run under py-spy, and a per-line summary.

    pip install py-spy
    py-spy record -r 2000 -f raw -o get.txt -- python scripts/read_profile.py get --cache 0
    python scripts/read_profile.py summary get.txt          # the lines that cost most
    python scripts/read_profile.py summary many.txt --within get_many

Loops (each serves a memory-only store of 10,000 keys ``a:0000000``.. with 64-byte
msgpack str values, as the benchmark's data set "a", then runs for ``--seconds``):

- ``get``: ``store.get`` over the keys in a random order (``--cache 0`` turns the
  read cache off; ``--hot`` reads one key);
- ``get_many``: ``store.get_many`` of 1,000 random keys.

``summary`` adds up the samples of py-spy's raw output (one line per stack, then its
count) that pass through ``--within`` (setup is left out), by the innermost frame's
function and line, and prints each line's share with its text.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import Counter


def _store(cache: int):
    import shmstore

    name = f"readprof-{os.getpid()}"
    coord = shmstore.serve(name, capacity=10_000 + 10_000 // 8 + 8192, key_size=16, value_size=80)
    store = shmstore.connect(name, read_cache=cache)
    keys = [f"a:{i:07d}" for i in range(10_000)]
    for i, k in enumerate(keys):
        store.put(k, f"{i:08d}".ljust(62, "v"), wait=False)
    store.flush()
    return name, coord, store, keys


def run(what: str, seconds: float, cache: int, hot: bool) -> None:
    import shmstore

    name, coord, store, keys = _store(cache)
    try:
        rng = random.Random(1)
        end = time.monotonic() + seconds
        n = 0
        if what == "get":
            order = [keys[5000]] * 10_000 if hot else rng.sample(keys, len(keys))
            get = store.get
            while time.monotonic() < end:
                for k in order:
                    get(k)
                n += len(order)
        else:
            batch = rng.sample(keys, 1000)
            get_many = store.get_many
            while time.monotonic() < end:
                for _ in range(100):
                    get_many(batch)
                n += 100
        print(f"{what}: {n} calls, {seconds * 1e9 / n:.0f} ns per call (includes the profiler's cost)")
    finally:
        store.close()
        coord.stop()
        shmstore.destroy(name)


def _source_line(frame: str) -> str:
    """The text of a py-spy frame's line, ``func (path:line)``, when the file is found."""
    import linecache
    import re

    import shmstore

    m = re.search(r"\((.+):(\d+)\)$", frame)
    if not m:
        return ""
    path, lineno = m.group(1), int(m.group(2))
    root = os.path.dirname(os.path.dirname(shmstore.__file__))
    for cand in (path, os.path.join(root, path), os.path.join(root, "coordinator", path.split("/", 1)[-1])):
        text = linecache.getline(cand, lineno).strip()
        if text:
            return text
    return ""


def summary(path: str, top: int, within: str, by_callee: bool = False) -> None:
    by_line: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit() or within not in stack:
                continue
            frames = stack.split(";")
            total += int(count)
            if by_callee:  # the function `within` called (or `within` itself), no line
                at = next(i for i, fr in enumerate(frames) if within in fr)
                frame = frames[min(at + 1, len(frames) - 1)]
                by_line[frame.rsplit(":", 1)[0] + ")" if ":" in frame else frame] += int(count)
            else:
                by_line[frames[-1]] += int(count)
    for frame, count in by_line.most_common(top):
        print(f"{100 * count / total:5.1f}%  {frame}  {'' if by_callee else _source_line(frame)[:70]}")
    print(f"{total} samples whose stack holds {within!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for what in ("get", "get_many"):
        sp = sub.add_parser(what, help=f"run the {what} loop")
        sp.add_argument("--seconds", type=float, default=5.0)
        sp.add_argument("--cache", type=int, default=16384, help="read_cache of the handle")
        sp.add_argument("--hot", action="store_true", help="get: one key, again and again")
    sp = sub.add_parser("summary", help="per-line shares of a py-spy raw profile")
    sp.add_argument("path")
    sp.add_argument("--top", type=int, default=25)
    sp.add_argument("--within", default="make_readers.<locals>.get",
                    help="count only stacks holding this text (default: the fast get)")
    sp.add_argument("--callees", action="store_true",
                    help="add up by the function --within called, not by line")
    args = p.parse_args(argv)
    if args.cmd == "summary":
        summary(args.path, args.top, args.within, args.callees)
    else:
        run(args.cmd, args.seconds, args.cache, getattr(args, "hot", False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
