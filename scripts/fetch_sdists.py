"""Download the source distributions of the installed Django and Flask-Caching into DIR.

    python scripts/fetch_sdists.py build/sdists

The framework backends are tested against those projects' own test suites, which ship
only in their sdists (tests/frameworks/ looks for them in build/sdists, or in
$SHMSTORE_SDISTS). Run by .ci/run after the install; the tests themselves never
download anything and skip, saying why, when a file is missing.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata


def main() -> int:
    dest = sys.argv[1] if len(sys.argv) > 1 else "build/sdists"
    reqs = []
    for dist in ("django", "flask-caching"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"{dist} is not installed: its sdist is not fetched", file=sys.stderr)
    if not reqs:
        return 1
    return subprocess.call([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary", ":all:", "-d", dest, *reqs])


if __name__ == "__main__":
    raise SystemExit(main())
