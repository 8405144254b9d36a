"""The programs the ``shmstore`` command and scripts/ run: demo, stress, cleanup, bench.

They sit on top of the library and beside it: nothing in the library imports them,
and they import nothing from ``shmstore._cli``. ``_format`` is the one home of their
number formatting.
"""
