"""Finding the framework sdists (their own test suites) without downloading anything.

``scripts/fetch_sdists.py build/sdists`` puts them in build/sdists; ``$SHMSTORE_SDISTS``
names another directory. A test that needs one skips, saying how to get it, when it
is missing.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def find_sdist(prefix: str) -> Path:
    """The newest ``<prefix>-*.tar.gz`` in $SHMSTORE_SDISTS or build/sdists, else skip."""
    where = Path(os.environ.get("SHMSTORE_SDISTS") or ROOT / "build" / "sdists")
    found = sorted(where.glob(f"{prefix}-*.tar.gz"))
    if not found:
        pytest.skip(f"no {prefix}-*.tar.gz in {where}: run `python scripts/fetch_sdists.py "
                    f"build/sdists` (or set $SHMSTORE_SDISTS) to run the framework's own tests")
    return found[-1]


def extract(sdist: Path, member_prefix: str, dest: Path) -> Path:
    """Extract the members under ``<top>/<member_prefix>`` of ``sdist`` into ``dest``;
    returns ``dest / <top>``."""
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        want = f"{top}/{member_prefix}"
        members = [m for m in tar.getmembers() if m.name.startswith(want)]
        if not members:
            pytest.fail(f"{sdist.name} has no {member_prefix}: not the sdist expected")
        tar.extractall(dest, members=members, filter="data")
    return dest / top
