"""Run Django's own ``BaseCacheTests`` against ShmStoreCache, in a process of its own.

Usage: ``python -m tests.frameworks._django_suite_runner TESTS_DIR STORE``: TESTS_DIR
is an extracted Django sdist's ``tests`` directory (it holds the ``cache`` test app),
STORE a served store. Prints one JSON line: counts and the failures' tracebacks.
Django is configured here and not in the pytest process, so no other test sees it.
"""

from __future__ import annotations

import json
import sys
import unittest


def main(tests_dir: str, store: str) -> int:
    sys.path.insert(0, tests_dir)
    import django
    from django.conf import settings

    backend = {"BACKEND": "shmstore.django.ShmStoreCache", "LOCATION": store}
    settings.configure(
        SECRET_KEY="shmstore-django-suite",
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "cache"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        CACHES={"default": backend},
        USE_TZ=True,
        MIDDLEWARE=[],
    )
    django.setup()
    from cache.tests import (
        BaseCacheTests,
        caches_setting_for_tests,
        redis_excluded_caches,
    )
    from django.test import TestCase, override_settings
    from django.test.runner import DiscoverRunner
    from django.test.utils import setup_test_environment, teardown_test_environment

    # As Django runs them for RedisCache: every alias on one store; the cull aliases
    # (MAX_ENTRIES, CULL_FREQUENCY) left out, so the cull tests skip.
    @override_settings(CACHES=caches_setting_for_tests(base=backend, exclude=redis_excluded_caches))
    class ShmStoreCacheTests(BaseCacheTests, TestCase):
        pass

    setup_test_environment()
    runner = DiscoverRunner(verbosity=0)
    old_db = runner.setup_databases()
    try:
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(ShmStoreCacheTests)
        result = unittest.TextTestRunner(stream=sys.stderr, verbosity=1).run(suite)
    finally:
        runner.teardown_databases(old_db)
        teardown_test_environment()
    print(json.dumps({
        "tests": suite.countTestCases(),
        "ran": result.testsRun,
        "skipped": [f"{t.id()}: {why}" for t, why in result.skipped],
        "failures": [f"{t.id()}\n{tb}" for t, tb in result.failures + result.errors],
        "unexpected_successes": len(result.unexpectedSuccesses),
    }))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
