"""Stress a store with reader and writer processes, with optional crash injection.

A thin wrapper: the tool is ``shmstore stress`` (shmstore/_tools/_stress.py); this runs the
same code with the same options.

    python scripts/stress.py --seconds 30 --readers 4 --writers 2
    python scripts/stress.py --sync always --kill-coordinator 2 --kill-clients 1 --seconds 60
"""

from __future__ import annotations

import sys

from shmstore._tools._stress import main

if __name__ == "__main__":
    sys.exit(main())
