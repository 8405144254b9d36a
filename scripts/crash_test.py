"""Crash injection: SIGKILL a durable store's coordinator again and again, and check
that every acknowledged write survives.

A thin wrapper: the scenario is ``shmstore stress --scenario crash``
(shmstore/_tools/_stress_crash.py, whose docstring says what it checks); this runs the
same code with its own options.

    python scripts/crash_test.py --kills 300            # hundreds of kills
    python scripts/crash_test.py --seconds 120 --destroy 1.0 --sync periodic
"""

from __future__ import annotations

from shmstore._tools._stress_crash import main

if __name__ == "__main__":
    raise SystemExit(main())
