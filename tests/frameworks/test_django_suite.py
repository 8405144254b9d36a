"""Django's own cache tests (``BaseCacheTests`` of tests/cache/tests.py in Django's
sdist) against ShmStoreCache on a store this test serves.

Django's tests/cache/tests_async.py holds only DummyCache tests (the async API of the
other backends is BaseCache's, tested here through our own tests in
test_django_backend.py), so it is not run. The cull tests skip as they do for
RedisCache (its "cull" aliases are excluded): the store's memory budget and LRU
eviction replace MAX_ENTRIES / CULL_FREQUENCY.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("django", reason="Django is a dev dependency: pip install -e '.[dev]'")

from shmstore.django import DEFAULT_OPTIONS  # noqa: E402

from .sdists import ROOT, extract, find_sdist  # noqa: E402

#: the tests of BaseCacheTests that may skip, and why: the cull tests (see the docstring)
CULL_TESTS = {"test_cull", "test_zero_cull", "test_cull_delete_when_store_empty"}


@pytest.mark.timeout(600)
def test_django_base_cache_tests(served, tmp_path, record_property):
    sdist = find_sdist("django")
    top = extract(sdist, "tests/cache/", tmp_path)
    store, _ = served("dj-suite", **{k: v for k, v in DEFAULT_OPTIONS.items() if k != "detach"})
    proc = subprocess.run(
        [sys.executable, "-m", "tests.frameworks._django_suite_runner", str(top / "tests"), store],
        cwd=ROOT, capture_output=True, text=True, timeout=540, check=False,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"the runner printed nothing (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
    report = json.loads(lines[-1])
    skipped_names = {s.split(":")[0].rsplit(".", 1)[-1] for s in report["skipped"]}
    passed = report["ran"] - len(report["failures"]) - len(report["skipped"])
    print(f"\n{sdist.name}: BaseCacheTests: {report['ran']} ran, {passed} passed, "
          f"{len(report['skipped'])} skipped ({', '.join(sorted(skipped_names))}), "
          f"{len(report['failures'])} failed")
    record_property("django_base_cache_tests", {"ran": report["ran"], "passed": passed})
    assert not report["failures"], "\n\n".join(report["failures"])
    assert skipped_names <= CULL_TESTS, report["skipped"]
    # Django 5.2's BaseCacheTests holds 54 tests; fewer than 50 means they were not found
    assert report["ran"] == report["tests"] and report["ran"] >= 50, report
    assert proc.returncode == 0, proc.stderr[-5000:]
