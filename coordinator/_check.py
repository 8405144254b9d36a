"""The library's door to ``shmstore.check()`` (``shmstore._data``, imported when called).

The checks themselves are in ``_durable/_check.py``; this module only names what the
library may call, so the library's seams into the coordinator stay few and fixed
(tests/test_layers.py, ``LIBRARY_SEAMS``).
"""

from ._durable._check import check_path, check_segment

__all__ = ["check_path", "check_segment"]
