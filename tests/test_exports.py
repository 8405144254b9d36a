"""The public surface is exactly __all__ (trio's test_exports idea)."""

import shmstore
import shmstore.coordinator


def test_public_names_equal_all():
    public = {n for n in dir(shmstore) if not n.startswith("_")}
    # submodules imported as a side effect are not part of the surface
    public -= {"coordinator", "workers", "django", "flask"}  # integrations: imported by name
    assert public == set(shmstore.__all__) - {"__version__"}
    assert shmstore.__all__ == sorted(shmstore.__all__)


def test_every_error_derives_from_the_base_and_ends_in_error():
    for n in shmstore.__all__:
        obj = getattr(shmstore, n)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, shmstore.ShmStoreError) and n.endswith("Error"), n


def test_coordinator_exports():
    assert set(shmstore.coordinator.__all__) <= set(dir(shmstore.coordinator))
