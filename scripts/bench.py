#!/usr/bin/env python3
"""Benchmark shmstore against py-lmdb, Redis, diskcache, memcached, multiprocessing.Manager
and floors.

A thin wrapper: the benchmark lives in ``shmstore._tools._bench`` (also ``shmstore bench``).

    python scripts/bench.py                  # full run (several minutes), results in bench-results/
    python scripts/bench.py --quick          # smoke run (what CI runs)
    python scripts/bench.py --only get_many,put,writes_2proc
"""

import sys

from shmstore._tools._bench import main

if __name__ == "__main__":
    sys.exit(main())
