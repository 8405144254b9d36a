"""A tmpfs a test mounts for itself (a disk it can fill), unmounted even on failure."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager

import pytest


@contextmanager
def tmpfs(path, opts: str):
    """Mount a tmpfs with mount options ``opts`` (e.g. ``"size=8m"``) at the new dir ``path``.

    Skips the test, saying why, where mounting is not permitted.
    """
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{opts},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)
