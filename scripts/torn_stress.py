"""Torn-read stress: writer processes rewrite self-checking records while reader
processes verify every value they read (DESIGN.md section 2, the seqlock).

A thin wrapper: the scenario is ``shmstore stress --scenario torn``
(shmstore/_tools/_stress_torn.py, whose docstring says what it proves); this runs the
same code with its own defaults.

    python scripts/torn_stress.py --seconds 5
    python scripts/torn_stress.py --readers 3 --writers 2 --seconds 30 --start-method spawn

It exits 0 when no torn read was accepted, 1 otherwise, and prints the numbers.
"""

from __future__ import annotations

import sys

from shmstore._tools._stress_torn import main

if __name__ == "__main__":
    sys.exit(main())
