"""The benchmark's outputs: Markdown tables, the JSON document, the PNG chart."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from typing import Any

from .._format import figure, per_second
from ._core import log
from ._specs import GROUPS, SPECS


def md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def group_text(group: str, cfg: Any) -> str:
    return GROUPS[group][0].format(small=f"{cfg.small_keys:,} keys", big=f"{cfg.big_keys:,} keys")


def best_peer(bench: Any, group: str, system: str = "shmstore") -> tuple[str, float] | None:
    """The best non-floor peer row of a measure and the speedup over it of shmstore's
    row ``system`` (``shmstore``, or a variant such as ``shmstore_nocache``)."""
    best = None
    for spec in SPECS:
        if spec.group != group or spec.peer in ("shmstore", "floor") or spec.unit == "bytes":
            continue
        r = bench.speedup(spec, f"{group}.{system}")
        if r is not None and (best is None or r < best[1]):
            best = (spec.system, r)
    return best


def markdown(bench: Any, meta: dict[str, Any]) -> str:
    cfg = bench.cfg
    targets_by_baseline: dict[str, list[dict[str, Any]]] = {}
    for t in bench.target_rows():
        targets_by_baseline.setdefault(t["baseline"], []).append(t)
    header = ["measure", "what", "system", "decoded", "median", "ops/s", "shmstore speedup",
              "target", "status"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + [":---:"] + ["---:"] * 3 + ["---", ":---:"]) + "|",
    ]
    for spec in SPECS:
        res = bench.results.get(spec.id)
        if res is None:
            continue
        if res.skipped:
            median, rate, ratio = f"skipped: {res.skipped.split(';')[0]}", "-", "-"
        else:
            median = figure(res.median, spec.unit)
            rate = ("-" if spec.unit == "bytes" else
                    per_second(1e9 / res.median if spec.unit == "ns/op" else res.median))
            r = bench.speedup(spec)
            ratio = "-" if r is None else f"{r:.2f}x"
            if spec.peer == "shmstore" and spec.unit != "bytes":
                bp = best_peer(bench, spec.group, spec.system)
                ratio = "-" if bp is None else f"{bp[1]:.2f}x vs best peer ({bp[0]})"
        ts = targets_by_baseline.get(spec.id, [])
        target = "; ".join(f">= {t['min_speedup']:.3g}x ({t['target']})" for t in ts) or "-"
        status = "; ".join(t["status"].upper() for t in ts) or "-"
        cells = [f"`{spec.id}`", group_text(spec.group, cfg), spec.label, spec.decoded, median,
                 rate, ratio, target, status]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")

    out = [
        f"# shmstore benchmark{' (--quick)' if cfg.quick else ''}",
        "",
        f"{meta['cpu_model']}, {meta['nproc']} CPUs, Python {meta['python']}, "
        f"shmstore {meta['packages'].get('shmstore')}, {meta['date_utc']}, load average "
        f"{meta['loadavg_at_start'][0]:.2f} at the start. Medians of {cfg.repeats} runs of "
        f"~{cfg.target_s:g} s each (multi-process measures: {cfg.writer_s:g} s rounds), "
        f"warm-up excluded; memory rows are one measurement. Values: str, 64 B or 1 KiB as "
        f"msgpack. 'shmstore speedup' = how many times better shmstore is than that row "
        f"(peer time / shmstore time, shmstore ops/s / peer ops/s, peer bytes / shmstore "
        f"bytes); on shmstore's rows, against the best peer of the measure.",
        "",
        *lines,
        "",
    ]
    if bench.redis_skip:
        out += [f"Redis rows skipped: {bench.redis_skip}", ""]
    if bench.lmdb_skip:
        out += [f"py-lmdb rows skipped: {bench.lmdb_skip}", ""]
    if bench.diskcache_skip:
        out += [f"diskcache rows skipped: {bench.diskcache_skip}", ""]
    if bench.memcached_skip:
        out += [f"memcached rows skipped: {bench.memcached_skip}", ""]
    trows = bench.target_rows()
    if trows:
        out += ["## Targets", "",
                "| target | shmstore | peer | speedup | needs | status |",
                "|---|---:|---:|---:|---:|:---:|"]
        for t in trows:
            r = "-" if t["speedup"] is None else f"{t['speedup']:.2f}x"
            out.append("| " + " | ".join(md_cell(c) for c in [
                t["target"], figure(t["shmstore"], t["unit"]), figure(t["peer"], t["unit"]),
                r, f">= {t['min_speedup']:.3g}x", t["status"].upper()]) + " |")
        out.append("")
    return "\n".join(out)


def chart(bench: Any, path: str) -> str | None:
    """A PNG: shmstore's speedup over each peer row, one panel. None, or why not."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "matplotlib is not installed (pip install 'shmstore[chart]'): no chart"
    rows = []
    for spec in SPECS:
        r = bench.speedup(spec)
        if r is not None:
            rows.append((f"{spec.group}: {spec.system}", r))
    if not rows:
        return "nothing to chart"
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.5))
    labels = [r[0] for r in rows][::-1]
    vals = [r[1] for r in rows][::-1]
    colors = ["tab:green" if v >= 1 else "tab:red" for v in vals]
    ax.barh(labels, vals, color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("shmstore speedup over the row (log scale; > 1: shmstore better)")
    ax.set_title("shmstore vs peers" + (" (--quick)" if bench.cfg.quick else ""))
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def machine_info(bench: Any) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    pkgs = {}
    for p in ("shmstore", "msgspec", "numpy", "posix_ipc", "lmdb", "redis", "diskcache", "pymemcache",
              "psutil", "matplotlib"):
        try:
            pkgs[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pkgs[p] = None
    try:
        import lmdb  # noqa: PLC0415

        lmdb_lib = ".".join(map(str, lmdb.version()))
    except ImportError:
        lmdb_lib = None
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "packages": pkgs,
        "lmdb_library": lmdb_lib,
        "redis_server": bench.redis_version or None,
        "memcached_server": bench.memcached_version or None,
        "git_commit": commit,
        "loadavg_at_start": list(os.getloadavg()),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def warn_load(meta: dict[str, Any]) -> None:
    load = meta["loadavg_at_start"][0]
    if load > 0.5 * (os.cpu_count() or 1):
        log(f"WARNING: load average {load:.2f} on {os.cpu_count()} CPUs: other work competes "
            f"with the benchmark, figures will be noisy")
