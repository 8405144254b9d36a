"""Time to live: the clock and ``ttl=`` validation (:meth:`Store.ttl` reads the expiry word).

Design
------
A record written with ``ttl=seconds`` carries an absolute expiry in its slot's expiry
word: the writer's wall clock (``time.time_ns()``) plus the ttl, computed by the client.
The WAL logs the request as sent, so replaying it reproduces the same expiry. Readers
compare the word with their own clock and treat an expired record as missing without
asking anyone; the coordinator reclaims expired records in the background (a logged
delete at a new epoch, see ``coordinator/_expiry.py``).

What clears or keeps an expiry:

- ``put`` / ``compare_and_set`` / ``Batch.put`` without ``ttl=`` write a record with NO
  expiry, also over a record that had one (as Redis ``SET`` does).
- ``incr`` keeps the record's expiry (as Redis ``INCR`` does); an expired record counts
  from 0 again, with no expiry.

The test clock
--------------
For tests only: if the environment variable ``SHMSTORE_TEST_CLOCK_FILE`` names a file
when shmstore is imported (or after :func:`set_test_clock`), every clock reading of that
process (readers' expiry checks, ``ttl=`` computations, the
coordinator's reclaim) adds the number of seconds the file holds (a float; a missing or
empty file counts as 0). A coordinator started by ``shmstore.serve`` inherits the
variable, so a test moves time forward for every process at once by writing the file.
Do not set it in production.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from . import _compiled
from ._errors import InvalidTTLError

CLOCK_ENV = "SHMSTORE_TEST_CLOCK_FILE"
#: the longest ttl accepted: 100 years
MAX_TTL = 100 * 365.25 * 86400

_time_ns = time.time_ns
#: the test clock file of this process (read once at import; see set_test_clock)
_clock_path: str | None = os.environ.get(CLOCK_ENV) or None


def now_ns() -> int:
    """The wall clock in ns, shifted by the test clock file if one is configured."""
    if _clock_path is None:
        return _time_ns()
    return _time_ns() + _offset_ns(_clock_path)


def set_test_clock(path: str | None) -> None:
    """Tests only: use (or, with None, stop using) a clock file in THIS process.

    The environment variable is read at import; a test that sets it later (for the
    processes it starts) calls this for its own process. The compiled core's expiry
    checks then ask :func:`now_ns` too (otherwise they read the wall clock in C).
    """
    global _clock_path
    _clock_path = path
    if _compiled.native is not None:
        _compiled.native.set_clock(now_ns if path is not None else None)


if _clock_path is not None:
    set_test_clock(_clock_path)


def _offset_ns(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0
    return int(float(text) * 1e9) if text else 0


def expiry_ns(ttl: Any) -> int:
    """The expiry word for a write with ``ttl=`` (0 for None: no expiry).

    Raises:
        InvalidTTLError: ``ttl`` is not a positive, finite number of seconds up to
            ``MAX_TTL``.
    """
    if ttl is None:
        return 0
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidTTLError(f"ttl must be a number of seconds, got {type(ttl).__name__}")
    if not 0 < ttl <= MAX_TTL:  # False for NaN; no float() of a huge int (OverflowError)
        raise InvalidTTLError(
            f"ttl must be a finite number of seconds > 0 and at most {MAX_TTL:.0f} "
            f"(100 years), got {ttl!r}; to keep a record forever, leave ttl out"
        )
    return now_ns() + max(1, math.ceil(ttl * 1e9))
