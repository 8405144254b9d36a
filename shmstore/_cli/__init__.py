"""The ``shmstore`` command: parse, dispatch, print.

``_main`` holds the command table (:func:`build_parser`) and :func:`main`; ``_common``
what every subcommand shares; ``_store_cmds``, ``_data_cmds`` and ``_ops_cmds`` the
subcommands. The programs behind ``cleanup``, ``stress``, ``bench`` and ``demo`` live in
``shmstore._tools``, imported only when their command runs. The library never imports
this package.
"""

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
