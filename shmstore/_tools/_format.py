"""Numbers as the tools print them: the one home of the tools' number formatting.

Rates, durations, sizes and quantiles of ``shmstore stats``, ``demo``, ``stress`` and
``bench``. Each output shape that a tool prints is one function here, so two tools
that show the same kind of number show it the same way, and a tool that shows it its
own way (the demo's fixed-point microseconds, the bench's ``M/s`` column) says so by
the function it calls.
"""

from __future__ import annotations

from shmstore._stats import hist_quantile


# -- rates ---------------------------------------------------------------------------


def human(n: float) -> str:
    """1234 -> '1.23k', 4_560_000 -> '4.56M': rates in a narrow column."""
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}" if n >= 10 or n == int(n) else f"{n:.1f}"


def per_second(v: float) -> str:
    """A throughput with its unit, for a table column: '1.23 M/s', '45.6 k/s', '7 /s'."""
    if v >= 1e6:
        return f"{v / 1e6:.2f} M/s"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k/s"
    return f"{v:.0f} /s"


# -- durations -----------------------------------------------------------------------


def duration_ns(x: float | None) -> str:
    """Nanoseconds as a short duration, 3 digits: '-', '850 ns', '12.3 us', '4.56 ms', '1.2 s'."""
    if x is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} ns"


def duration(x: float | None) -> str:
    """Seconds as a short duration, 3 digits: '-', '850 ns', '12.3 us', '4.56 ms', '1.2 s'."""
    if x is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x * 1e9:.0f} ns"


def micros(ns: float) -> str:
    """Nanoseconds in fixed-point microseconds or milliseconds: '12.3 us', '4.56 ms'."""
    return f"{ns / 1e6:.2f} ms" if ns >= 1e6 else f"{ns / 1e3:.1f} us"


def per_op(ns: float) -> str:
    """A time per call, fixed-point: '850 ns', '1.23 us', '4.56 ms'."""
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.2f} us"
    return f"{ns / 1e6:.2f} ms"


# -- sizes ---------------------------------------------------------------------------


def size(n: float | None) -> str:
    """Bytes in binary units, one decimal: '-', '512 B', '1.5 KiB', '2.0 GiB'."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# -- quantiles -----------------------------------------------------------------------


def group_quantile(hist: list[int], q: float) -> int | None:
    """The largest group size of the log2 bucket holding quantile ``q`` of the
    coordinator's group-size histogram (``StoreStats.group_hist``)."""
    x = hist_quantile(hist, q, 1.0)
    return None if x is None else int(x) - 1


# -- a benchmark figure --------------------------------------------------------------


def figure(v: float | None, unit: str) -> str:
    """A benchmark median in its unit ('ns/op', 'bytes' or 'ops/s'); '-' if none."""
    if v is None:
        return "-"
    if unit == "ns/op":
        return per_op(v)
    if unit == "bytes":
        return size(v)
    return per_second(v)
