"""The refusal of a data directory written for an older segment format.

Format 4 (size classes in pages, ``shmstore._layout``) changed what a checkpoint holds
and what a record's place in the segment is, so the files of format 3 (manifest format
1, checkpoint and WAL format 1) cannot be recovered into a format-4 segment. They are
refused, never half read, with the way to carry the records over: the ``shmstore``
command of the release that wrote them prints every record (``scan``), and this one
writes them into a new store (``load``).
"""

from __future__ import annotations

from shmstore._errors import IncompatibleStoreError

#: what to do with a data directory of an older format
MIGRATE_HINT = (
    "To carry its records over: with the shmstore release that wrote it, serve the store "
    "and run `shmstore scan NAME > FILE`; then, with this one, serve the store on a new "
    "data directory and run `shmstore load NAME FILE`"
)


def old_format_error(what: str, found: int, reads: int) -> IncompatibleStoreError:
    """The error for ``what`` (a file, named) of format ``found`` where this shmstore
    reads format ``reads``."""
    if found < reads:
        return IncompatibleStoreError(
            f"{what}: format {found}, written by an older shmstore (segment format 3 or "
            f"before); this one reads format {reads} (segment format 4) only. {MIGRATE_HINT}"
        )
    return IncompatibleStoreError(
        f"{what}: format {found}, written by a newer shmstore; this one reads format {reads}. "
        f"Serve it with that release"
    )
