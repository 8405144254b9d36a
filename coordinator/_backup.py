"""The library's door to backups and restores (imported when called).

``shmstore._data.restore`` runs :func:`restore_dir` in the caller's process, and
``Store.backup`` checks its destination with :func:`check_dest` before it asks the
coordinator. The work is in ``_durable/_backup.py``; this module only names what the
library may call (tests/test_layers.py, ``LIBRARY_SEAMS``).
"""

from ._durable._backup import check_dest, restore_dir

__all__ = ["check_dest", "restore_dir"]
