"""Flask-Caching's own tests, run against ``shmstore.flask.ShmStoreCache``.

The tests come from Flask-Caching's source distribution (``flask_caching-*.tar.gz`` in
$SHMSTORE_SDISTS or build/sdists, put there by scripts/fetch_sdists.py; nothing is
downloaded here), extracted to a temporary directory:

- ``tests/test_backend_cache.py``: ``GenericCacheTests``, the class every built-in
  backend's tests subclass (TestSimpleCache, TestRedisCache, ...), subclassed here the
  same way, with ``make_cache`` giving our backend on a fresh store.
- ``tests/test_cache.py``, ``tests/test_memoize.py``, ``tests/test_view.py``: the
  ``@cache.cached`` / ``@cache.memoize`` / cached-view tests, collected into this module
  with Flask-Caching's fixtures (``app``, ``cache``, ``clock``) redefined here so that
  ``CACHE_TYPE`` is ours and ``clock.advance`` moves shmstore's test clock (every
  process's, the coordinator's too) instead of cachelib's.

A few tests are left out, each with its reason in ``EXCLUDED``: they configure another
backend by name (Redis, a SimpleCache) and do not touch ours.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import shutil
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


#: where the sdists are (as tests/frameworks/sdists.py looks: $SHMSTORE_SDISTS, else build/sdists)
SDISTS = os.environ.get("SHMSTORE_SDISTS") or str(ROOT / "build" / "sdists")
_found = sorted(glob.glob(os.path.join(SDISTS, "flask_caching-*.tar.gz")))
if not _found:
    pytest.skip(f"no flask_caching-*.tar.gz in {SDISTS}: run `python scripts/fetch_sdists.py "
                f"build/sdists` (or set $SHMSTORE_SDISTS) to run Flask-Caching's own tests",
                allow_module_level=True)
SDIST = _found[-1]
flask = pytest.importorskip("flask")
flask_caching = pytest.importorskip("flask_caching")

from shmstore.flask import ShmStoreCache  # noqa: E402

#: Flask-Caching tests not run here, and why.
EXCLUDED = {
    "test_cache_unlink": "configures RedisCache (port 6360), not this backend",
    "test_cache_unlink_if_not": "configures SimpleCache by name, not this backend",
    "test_cache_delete_many_ignored": "configures SimpleCache by name, not this backend",
}


def _extract(sdist: str) -> Path:
    tmp = tempfile.mkdtemp(prefix="shmstore-flask-caching-")
    atexit.register(shutil.rmtree, tmp, True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
        tar.extractall(tmp, members=members, filter="data")
    (tests,) = Path(tmp).glob("*/tests")
    return tests


FC_TESTS = _extract(SDIST)


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"flask_caching_suite.{name}", FC_TESTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fc_backend = _load("test_backend_cache")
for _mod in (_load("test_cache"), _load("test_memoize"), _load("test_view")):
    for _name, _obj in vars(_mod).items():
        if _name.startswith("test_") and callable(_obj) and _name not in EXCLUDED:
            assert _name not in globals(), f"two Flask-Caching tests named {_name}"
            globals()[_name] = _obj


# -- Flask-Caching's fixtures, on this backend -----------------------------------------

STORE = {"memory": 16 << 20, "eviction": "lru", "key_size": 256}


@pytest.fixture
def clock(clock):
    """Flask-Caching's ``clock`` (``clock.advance(seconds)``), moving shmstore's test
    clock: readers' expiry checks and the coordinator's alike."""
    return types.SimpleNamespace(advance=clock)


@pytest.fixture
def app(clock, served):
    """Flask-Caching's ``app``, configured for this backend on a fresh store (served
    after the test clock is set, so the coordinator follows it)."""
    name, _ = served("fc", **STORE)
    a = flask.Flask(__name__, template_folder=str(FC_TESTS))
    a.testing = True
    a.config["CACHE_TYPE"] = "shmstore.flask.ShmStoreCache"
    a.config["CACHE_SHMSTORE_NAME"] = name
    try:
        yield a
    finally:
        for backend in a.extensions.get("cache", {}).values():
            if isinstance(backend, ShmStoreCache):
                backend.close()


@pytest.fixture
def cache(app):
    c = flask_caching.Cache(app)
    assert isinstance(app.extensions["cache"][c], ShmStoreCache)
    return c


@pytest.fixture(params=list(flask_caching.SUPPORTED_HASH_FUNCTIONS),
                ids=[m.__name__ for m in flask_caching.SUPPORTED_HASH_FUNCTIONS])
def hash_method(request):
    return request.param


class TestShmStoreCache(fc_backend.GenericCacheTests):
    """Flask-Caching's generic backend tests, as TestSimpleCache and TestRedisCache run
    them; ``sleep`` is ``clock.advance`` (``_can_use_fast_sleep``): shmstore's clock."""

    @pytest.fixture
    def make_cache(self, clock, served):
        name, _ = served("fcb", **STORE)
        made = []

        def make(**kwargs):
            c = ShmStoreCache(name, key_prefix="werkzeug-test-case:", **kwargs)
            made.append(c)
            return c

        try:
            yield make
        finally:
            for c in made:
                c.close()
