"""Fixtures of the framework tests: Django backends on stores the test serves."""

from __future__ import annotations

import pytest


@pytest.fixture
def django_cache(served, names):
    """A function making ``ShmStoreCache`` instances on one fresh store (the backend's
    default store settings): ``make(**params)`` with Django's alias params (KEY_PREFIX,
    VERSION, TIMEOUT, OPTIONS...). The store's name is ``make.store_name``. This
    process's handles on the stores the test used are closed at teardown."""
    pytest.importorskip("django", reason="Django is a dev dependency: pip install -e '.[dev]'")
    from shmstore import django as backend

    store, _ = served("dj", **{k: v for k, v in backend.DEFAULT_OPTIONS.items() if k != "detach"})

    def make(location: str = store, **params):
        return backend.ShmStoreCache(location, params)

    make.store_name = store
    try:
        yield make
    finally:
        close_handles(names.names)


def close_handles(store_names) -> None:
    """Stop the coordinators this process's backends started on these stores, and close
    its handles on them."""
    from shmstore import django as backend

    for n in store_names:
        for coord in backend.started.pop(n, []):
            coord.stop(timeout=10)
    for store in [s for s in backend._inherited if s.name in store_names]:
        backend._inherited.remove(store)
        store.close()
    for n in store_names:
        have = backend._handles.pop(n, None)
        if have is not None:
            have[1].close()
