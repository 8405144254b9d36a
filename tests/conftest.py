"""Fixtures: unique store names, a served store, a leak check per test, the test clock.

Every test gets names of its own (xdist-safe); whatever a test creates is destroyed in
teardown even when the test fails, and the teardown fails the test if anything of its
stores is left in /dev/shm.
"""

from __future__ import annotations

import os

import pytest

import shmstore
from shmstore import _compiled, _ttl
from shmstore._ttl import CLOCK_ENV
from tests.helpers.processes import shm_objects, unique_name


CORES = ["native", "python"]


def _use_core(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if which == "native":
        if _compiled.native is None:
            pytest.skip("the compiled core is turned off (SHMSTORE_NO_EXTENSIONS) or not built")
        monkeypatch.delenv(_compiled.ENV, raising=False)
    else:
        # This process binds its readers to the pure-Python core from here on, and every
        # process the test starts (coordinators, clients) inherits the variable.
        monkeypatch.setattr(_compiled, "native", None)
        monkeypatch.setenv(_compiled.ENV, "1")


@pytest.fixture(params=CORES)
def core(request, monkeypatch):
    """Run the test once on each core: the compiled one and pure Python. Modules whose
    protocol tests must hold on both say ``pytestmark = pytest.mark.usefixtures("core")``
    (it comes before the store fixtures, so the coordinators it starts use it too)."""
    _use_core(request.param, monkeypatch)
    return request.param


@pytest.fixture
def python_core(monkeypatch):
    """The pure-Python core only: for tests of the Python read path itself (spied
    interleavings, the numpy get_many)."""
    _use_core("python", monkeypatch)
    return "python"


class Names:
    """Hands out unique store names and destroys them all at teardown."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.coordinators: list[shmstore.Coordinator] = []

    def __call__(self, tag: str = "") -> str:
        name = unique_name(tag)
        self.names.append(name)
        return name

    def cleanup(self) -> list[str]:
        for c in self.coordinators:
            c.stop(timeout=5)
        leaks = []
        for name in self.names:
            try:
                shmstore.destroy(name)
            except shmstore.CoordinatorRunningError:
                leaks.append(f"{name}: a coordinator still runs")
            left = shm_objects(name)
            if left:
                leaks.append(f"{name}: {left}")
        return leaks


@pytest.fixture
def names():
    n = Names()
    try:
        yield n
    finally:
        leaks = n.cleanup()
    assert not leaks, f"shared-memory objects leaked: {leaks}"


@pytest.fixture
def name(names):
    return names()


@pytest.fixture
def served(names):
    """Start a coordinator for a fresh store; returns a function taking serve() kwargs."""

    def start(tag: str = "", **kwargs) -> tuple[str, shmstore.Coordinator]:
        n = names(tag)
        coord = shmstore.serve(n, **kwargs)
        names.coordinators.append(coord)
        return n, coord

    return start


@pytest.fixture
def store(served):
    """A connected handle on a fresh memory-only store (capacity 1000)."""
    n, coord = served(capacity=1000)
    s = shmstore.connect(n)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def clock(tmp_path, monkeypatch):
    """Set the test clock for this process and every process started from it.

    Returns a function ``advance(seconds)`` that moves every process's clock forward.
    """
    path = tmp_path / "clock"
    path.write_text("0")
    monkeypatch.setenv(CLOCK_ENV, str(path))  # for the processes the test starts
    monkeypatch.setattr(_ttl, "_clock_path", None)  # restored to this at teardown
    _ttl.set_test_clock(str(path))  # for this process (the compiled core's clock too)
    offset = [0.0]

    def advance(seconds: float) -> None:
        offset[0] += seconds
        tmp = tmp_path / "clock.tmp"
        tmp.write_text(repr(offset[0]))
        os.replace(tmp, path)  # readers see the old or the new offset, never a torn one

    yield advance
    _ttl.set_test_clock(None)
