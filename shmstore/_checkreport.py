"""What ``shmstore.check()`` reports: :class:`CheckReport` and its :class:`CheckProblem` list.

Its own module, below both ``_data`` (which returns it) and the coordinator's checker
(``coordinator/_durable/_check.py``, which fills it in), so neither imports the other
for it.
"""

from __future__ import annotations

import msgspec


class CheckProblem(msgspec.Struct, frozen=True):
    """One thing :func:`check` found wrong."""

    #: the file (data directory) or ``"segment NAME"`` it is in
    source: str
    #: byte offset in the file, when it is about one place; None otherwise
    offset: int | None
    #: what is wrong, in plain words
    message: str

    def __str__(self) -> str:
        at = f" at offset {self.offset}" if self.offset is not None else ""
        return f"{self.source}{at}: {self.message}"


class CheckReport(msgspec.Struct, kw_only=True):
    """What :func:`check` found. ``ok`` is True when ``problems`` is empty."""

    path: str | None = None
    name: str | None = None
    problems: list[CheckProblem] = msgspec.field(default_factory=list)
    #: things worth knowing that are not damage (a torn WAL tail recovery will cut, ...)
    notes: list[str] = msgspec.field(default_factory=list)
    checkpoints: int = 0
    wal_files: int = 0
    wal_records: int = 0
    #: epoch of the newest checkpoint that passed (data directory)
    newest_checkpoint: int | None = None
    #: records in the segment (live segment)
    records: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, source: str, message: str, offset: int | None = None) -> None:
        self.problems.append(CheckProblem(source, offset, message))

    def __str__(self) -> str:
        what = " and ".join(x for x in (f"data directory {self.path!r}" if self.path else "",
                                        f"segment of store {self.name!r}" if self.name and self.records is not None
                                        else "") if x)
        lines = [f"{'OK' if self.ok else 'DAMAGED'}: {what}"]
        if self.path:
            lines.append(f"  {self.checkpoints} checkpoint(s), {self.wal_files} WAL file(s), "
                         f"{self.wal_records} WAL record(s) checked; newest good checkpoint at epoch "
                         f"{self.newest_checkpoint}")
        if self.records is not None:
            lines.append(f"  {self.records} record(s) in the segment checked")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
