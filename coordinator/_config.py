"""The coordinator's settings, declared once.

Design
------
:data:`SETTINGS` is the one table: each :class:`Setting` has a name, a type, a
default, a help text, its range or choices, and where it appears (a field of the
config struct, a keyword of :func:`shmstore.serve`, a flag of ``shmstore serve``).
Everything else is made from it (gunicorn's ``config.py`` ``Setting`` idea):

- :class:`ServerConfig`, the struct ``serve()`` encodes as JSON and the coordinator
  process decodes (``python -m shmstore.coordinator --config JSON``);
- :func:`validate`, the one check of a config: ``serve()`` and ``shmstore serve`` run
  it in the caller's process before any process starts, and ``CoordinatorServer.setup``
  runs it again on what it was given;
- :func:`from_serve`, ``serve()``'s keywords made into a checked config;
- :func:`add_arguments` / :func:`from_args`, the flags of ``shmstore serve``;
- :func:`markdown`, docs/settings.md (``python -m shmstore.coordinator._config
  --markdown docs/settings.md``; a test keeps the committed page current).

This module imports only the library's bottom (``shmstore._errors``, ``shmstore._layout``),
so ``serve()`` loads it, and not the coordinator's loop, into the caller's process.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from shmstore import _layout as L
from shmstore._errors import InvalidLayoutError

SECTIONS = ("store", "clients", "durability", "at-rest protection", "replica", "process")

#: where a setting appears
FIELD = "field"  # a field of ServerConfig (the coordinator process reads it)
SERVE = "serve"  # a keyword of shmstore.serve()
CLI = "cli"  # a flag of `shmstore serve`

_REQUIRED = object()


@dataclass(frozen=True)
class Setting:
    """One row of the table.

    ``type`` is the Python type of a value (``object``: anything, not checked); numbers
    must lie in ``[lo, hi]`` (``lo_open``: above ``lo``); ``choices`` lists the strings
    allowed; ``none`` allows None; ``path`` makes a string an absolute path; ``new`` is
    what None means for a new store. ``flag``/``metavar`` spell it on the command line.
    """

    name: str
    type: type
    default: Any
    help: str
    section: str
    where: tuple[str, ...] = (FIELD, SERVE, CLI)
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] = ()
    none: bool = False
    path: bool = False
    new: Any = None
    metavar: str | None = None
    default_text: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this setting, or None if it is fine."""
        if value is None:
            return None if self.none else f"must be given (not None){self._wants()}"
        t = self.type
        if t is object:
            return None
        if t is bool:
            return None if isinstance(value, bool) else f"must be True or False; got {value!r}"
        if t in (int, float):
            ok = isinstance(value, int) if t is int else isinstance(value, (int, float))
            if not ok or isinstance(value, bool) or (t is float and not _finite(value)):
                return f"must be {self._range()}; got {value!r}"
            low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            if low or (self.hi is not None and value > self.hi):
                return f"must be {self._range()}; got {value!r}"
            return None
        if self.path:
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            return None if isinstance(value, str) and value else f"must be a path; got {value!r}"
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            return f"must be one of {', '.join(self.choices)}{' (or None)' if self.none else ''}; got {value!r}"
        return None

    def _range(self) -> str:
        what = "an integer" if self.type is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{what} from {_num(self.lo)} to {_num(self.hi)}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        return what

    def _wants(self) -> str:
        return f" ({self.help.split('.')[0]})"

    def describe_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.default is None and self.new is not None:
            return f"the existing store's, or {_num(self.new)} for a new one"
        if self.default is None:
            return "none"
        return _num(self.default) if isinstance(self.default, (int, float)) else repr(self.default)


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return repr(x)
    if isinstance(x, int):
        return f"{x:_}" if abs(x) >= 10_000 else str(x)
    return repr(x)


S = Setting
#: The table. Order: as shown in the docs and in ``shmstore serve --help``.
SETTINGS: tuple[Setting, ...] = (
    S("name", str, _REQUIRED, "The store name: 1 to 64 characters of A-Z a-z 0-9 _ . -.",
      "store", where=(FIELD,), default_text="(required: serve()'s first argument, "
      "`shmstore serve NAME`)"),
    S("memory", int, None, "A budget of record memory in bytes: pages handed to size classes as "
      "records of each size need them, so one store holds values from a few bytes to "
      "value_size. None: a single-class store of capacity slots of key_size + value_size.",
      "store", lo=1, hi=L.MAX_MEMORY, none=True, metavar="BYTES",
      default_text="the existing store's; a new one: none (capacity x value_size)"),
    S("capacity", int, None, "The most records the store holds (with memory=: it sizes the "
      "index; default memory // 128).", "store", lo=1, hi=L.MAX_CAPACITY, none=True, new=100_000,
      metavar="N"),
    S("key_size", int, None, "The longest key, in bytes.", "store", lo=1, hi=L.MAX_KEY_SIZE,
      none=True, new=64, metavar="N"),
    S("value_size", int, None, "The largest msgpack-encoded value, in bytes (with memory=: "
      "default 1 MiB - 128 bytes, the largest that fills one 1 MiB page with 64-byte keys).", "store", lo=1, hi=L.MAX_VALUE_SIZE, none=True, new=1024, metavar="N"),
    S("growth", float, None, "With memory=: each size class's slot is about this factor larger "
      "than the one below (memcached's -f).", "store", lo=1.05, hi=4.0, none=True, new=L.GROWTH,
      metavar="F"),
    S("eviction", str, None, "What a full store does: None refuses the write (StoreFullError); "
      "'lru' evicts the least recently used records of the size class that needs room "
      "(approximate LRU, coordinator/_evict.py); 'volatile-ttl' evicts records with an expiry, "
      "soonest first. Evictions are logged ops, visible in changes(). Can change at any start.",
      "store", choices=("lru", "volatile-ttl"), none=True, default_text="None (refuse writes)"),
    S("value_type", object, None, "A msgspec Struct or type: values are validated on write and "
      "decoded to it. Its schema fingerprint is fixed in the segment.", "store", where=(SERVE,)),
    S("schema_fp", int, 0, "The value type's schema fingerprint (made from value_type).", "store",
      where=(FIELD,), lo=0, hi=2**64 - 1),
    S("schema_given", bool, False, "Whether a value_type was given (else the store's is kept).",
      "store", where=(FIELD,)),
    S("max_clients", int, 256, "Processes that can write at once (all handles of a process "
      "share one client block). Memory is spent per attached process, not reserved: a "
      "block's pages (up to ring_size + reply_size) are allocated as it uses them and given "
      "back when its process goes.", "clients", lo=1, metavar="N"),
    S("ring_size", int, 256 * 1024, "Bytes of each client's request queue; bounds the largest "
      "batch. Raised to hold the largest put the store takes (value_size + key_size + 64, in "
      "whole pages).", "clients", lo=4096, metavar="BYTES"),
    S("reply_size", int, 1024 * 1024, "Bytes of each client's reply area; bounds a get_many "
      "fallback.", "clients", lo=4096, metavar="BYTES"),
    S("spin_us", float, 50.0, "Microseconds the coordinator spins on its doorbell before it "
      "blocks (0: never spin); a wake-up costs tens of microseconds.", "clients", lo=0,
      metavar="US"),
    S("path", str, None, "A data directory of its own for a durable store (created if missing, "
      "mode 0700): manifest, checkpoints, write-ahead log. None: memory only. A replica's "
      "(upstream=) keeps only a checkpoint there, to restart fast.", "durability",
      none=True, path=True, metavar="DIR"),
    S("sync", str, None, "What a crash can lose: 'always' (each group of writes is fsynced before "
      "it is acknowledged), 'periodic' (fsync at least every sync_interval) or 'never' (memory "
      "only; checkpoints at a clean stop). See shmstore.serve's table.", "durability",
      choices=("always", "periodic", "never"), none=True,
      default_text="'always' with path, else 'never' (a memory-only store's only mode)"),
    S("sync_interval", float, 0.1, "'periodic': the longest, in seconds, an acknowledged write "
      "waits for its fsync (checked every group and every 0.1 s tick).", "durability", lo=0,
      lo_open=True, metavar="S"),
    S("checkpoint_ops", int, 200_000, "A checkpoint after this many logged writes ...",
      "durability", lo=1, metavar="N"),
    S("checkpoint_interval", float, 300.0, "... or this many seconds after the last one, if "
      "anything was written since ...", "durability", lo=0, lo_open=True, metavar="S"),
    S("checkpoint_bytes", int, 256 << 20, "... or once the current WAL file holds this many bytes. "
      "Checkpoints are also taken by store.checkpoint(), at a clean stop, and at start when the "
      "segment is ahead of the directory.", "durability", lo=1, metavar="BYTES"),
    S("checkpoint_keep", int, 2, "Checkpoints kept: a damaged newest one falls back to an older "
      "one plus the WAL.", "durability", lo=1, metavar="N"),
    S("compression", str, None, "Compression of checkpoints and WAL files: 'zstd' (extra "
      "shmstore[zstd]) or 'none'. Can change at any start.", "at-rest protection", choices=("none", "zstd"),
      none=True, default_text="the data directory's; a new one: 'none'"),
    S("encryption", str, None, "Encryption of checkpoints and WAL files: 'aes-256-gcm' (extra "
      "shmstore[crypto]) or 'none'. Cannot change for a directory holding data.", "at-rest protection",
      choices=("none", "aes-256-gcm"), none=True,
      default_text="the data directory's; a new one: 'none'"),
    S("key_file", str, None, "The file holding the 32-byte encryption key (raw or 64 hex digits). "
      "Never the key itself.", "at-rest protection", none=True, path=True, metavar="FILE",
      default_text="$SHMSTORE_KEY_FILE, else $SHMSTORE_KEY (64 hex digits)"),
    S("upstream", str, None, "Make this store a replica of a dataset kept by a Redis primary: "
      "a redis://, rediss:// or unix:// URL. Every write goes to Redis as one atomic step "
      "that takes the next global version; every replica applies Redis's change stream in "
      "order (docs/replicas.md). None: a store of its own.", "replica", none=True, metavar="URL"),
    S("upstream_name", str, None, "The dataset's name in Redis (its keys are {NAME}:meta, "
      "{NAME}:d and {NAME}:s). Several replicas of one dataset on one machine take different "
      "store names and the same upstream_name.", "replica", none=True, metavar="NAME",
      default_text="the store name"),
    S("upstream_timeout", float, 2.0, "Seconds a write waits for Redis before it fails with "
      "UpstreamTimeoutError (its outcome then unknown); also bounds connecting.", "replica",
      lo=0, lo_open=True, hi=60, metavar="S"),
    S("upstream_stream_max", int, 100_000, "Entries the dataset's change stream keeps (trimmed "
      "approximately at each write). A replica that falls further behind resyncs from Redis's "
      "records.", "replica", lo=100, hi=2**40, metavar="N"),
    S("detach", bool, False, "Keep serving after the calling process exits (else the coordinator "
      "stops with it).", "process", where=(SERVE,)),
    S("parent_pid", int, 0, "Stop when this process is gone (0: never); serve() sets it unless "
      "detach.", "process", where=(FIELD,), lo=0),
    S("timeout", float, 10.0, "Seconds serve() waits for the coordinator to come up.", "process",
      where=(SERVE,), lo=0, lo_open=True),
)
del S

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def _new(name: str) -> int:
    return BY_NAME[name].new


def _default(name: str) -> Any:
    return BY_NAME[name].default


#: What None sizes mean for a new store, and the other defaults older code imports.
DEFAULT_CAPACITY = _new("capacity")
DEFAULT_KEY_SIZE = _new("key_size")
DEFAULT_VALUE_SIZE = _new("value_size")
#: a memory store's largest value unless value_size= says otherwise: 1 MiB less 128
#: bytes, so that the largest record (with the default 64-byte keys) fills one 1 MiB page
DEFAULT_MEMORY_VALUE_SIZE = (1 << 20) - 128
#: a memory store's record bound unless capacity= says otherwise: memory // this
MEMORY_PER_RECORD = 128


def new_layout(cfg: Any, manifest: Any | None = None) -> L.Layout:
    """The layout of a new store from a config's sizes (None: the data directory's
    manifest's, else the defaults), checked."""

    def pick(name: str, default: Any) -> Any:
        value = getattr(cfg, name)
        if value is None and manifest is not None:
            value = getattr(manifest, name, None)
        return default if value is None else value

    memory = pick("memory", 0)
    if memory:
        value_size = pick("value_size", DEFAULT_MEMORY_VALUE_SIZE)
        capacity = pick("capacity", max(1, min(memory // MEMORY_PER_RECORD, L.MAX_CAPACITY)))
    else:
        value_size = pick("value_size", DEFAULT_VALUE_SIZE)
        capacity = pick("capacity", DEFAULT_CAPACITY)
    return L.Layout(capacity=capacity, key_size=pick("key_size", DEFAULT_KEY_SIZE),
                    value_size=value_size, memory=memory, growth=float(pick("growth", L.GROWTH))).validate()
DEFAULT_MAX_CLIENTS = _default("max_clients")
DEFAULT_RING_SIZE = _default("ring_size")
DEFAULT_REPLY_SIZE = _default("reply_size")


def _annotation(s: Setting) -> Any:
    return s.type | None if s.none else s.type


ServerConfig = msgspec.defstruct(
    "ServerConfig",
    [(s.name, _annotation(s)) if s.default is _REQUIRED else (s.name, _annotation(s), s.default)
     for s in SETTINGS if FIELD in s.where],
    module=__name__, kw_only=True, frozen=True,
)
ServerConfig.__doc__ = (
    "Settings of one coordinator run, made from :data:`SETTINGS` (docs/settings.md). "
    "``None`` sizes mean: the existing segment's, or the defaults for a new store."
)

# -- checking --------------------------------------------------------------------------

#: How a setting is spelled in a message: as a keyword of serve() or as a flag.
Spell = Callable[[str, Any], str]


def _py(name: str, value: Any = _REQUIRED) -> str:
    return f"{name}=" if value is _REQUIRED else f"{name}={value!r}"


def _cli(name: str, value: Any = _REQUIRED) -> str:
    flag = BY_NAME[name].flag
    return flag if value is _REQUIRED else f"{flag} {value}"


def validate(config: Any, *, cli: bool = False) -> Any:
    """Check a :class:`ServerConfig` and return it normalized.

    Normalized: ``sync`` None becomes ``"always"`` with a path and ``"never"`` without,
    paths become absolute, numbers of a float setting become floats.

    Args:
        config: the settings.
        cli: name settings by their ``shmstore serve`` flags in messages (else as
            ``serve()`` keywords).

    Returns:
        The config, normalized.

    Raises:
        InvalidNameError: the store name is not valid.
        InvalidLayoutError: a setting is of the wrong type (a bool or a string where a
            number goes, 1.5 where an integer goes), out of its range, NaN or infinite,
            or the settings do not go together (``sync="always"`` without ``path``).
    """
    spell: Spell = _cli if cli else _py
    L.check_name(config.name)
    _check_replica(config, spell)
    changes: dict[str, Any] = {}
    for s in SETTINGS:
        if FIELD not in s.where or s.name == "name":
            continue
        value = getattr(config, s.name)
        problem = s.problem(value)
        if problem is not None:
            raise InvalidLayoutError(f"{spell(s.name) if cli else s.name} {problem}")
        if value is not None and s.type is float and not isinstance(value, float):
            changes[s.name] = float(value)
        if value is not None and s.path:
            changes[s.name] = os.path.abspath(os.fspath(value))
    path = config.path
    sync = config.sync or ("never" if path is None or config.upstream is not None else "always")
    if path is None and sync != "never":
        raise InvalidLayoutError(
            f"{spell('sync', sync)} needs {spell('path')} (a data directory); a memory-only store "
            f"has only {spell('sync', 'never')}"
        )
    changes["sync"] = sync
    if config.memory is not None:
        new_layout(config)  # a budget under one page, too many classes: refused here
    for name in ("compression", "encryption", "key_file"):
        value = getattr(config, name)
        if path is None and value not in (None, "none"):
            raise InvalidLayoutError(
                f"{spell(name, value)} needs {spell('path')}: it protects the data directory's files"
            )
    return msgspec.structs.replace(config, **changes)


def shown_url(url: str) -> str:
    """An upstream URL as messages show it: a password in it becomes ``***``."""
    import re  # noqa: PLC0415

    return re.sub(r"//([^@/]*):([^@/]*)@", r"//\1:***@", url)


def _check_replica(config: Any, spell: Spell) -> None:
    """A replica's settings: a URL of a scheme redis-py speaks, a valid dataset name, and
    none of what a replica cannot do (its data is the upstream's)."""
    from shmstore._errors import ReplicaUnsupportedError  # noqa: PLC0415

    url = config.upstream
    if url is None:
        for name in ("upstream_name",):
            if getattr(config, name) is not None:
                raise InvalidLayoutError(f"{spell(name, getattr(config, name))} needs {spell('upstream')}")
        return
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")) or len(url) > 4096:
        raise InvalidLayoutError(f"{spell('upstream')} must be a redis://, rediss:// or unix:// URL; "
                                 f"got {str(url)[:60]!r}")
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("redis") is None:
        raise ReplicaUnsupportedError(
            f"{spell('upstream')} needs the redis package: pip install 'shmstore[replica]'")
    up_name = config.upstream_name
    if up_name is not None:
        if not isinstance(up_name, str):
            raise InvalidLayoutError(f"{spell('upstream_name')} must be a string; got {up_name!r}")
        L.check_name(up_name)
    if config.sync not in (None, "never"):
        raise ReplicaUnsupportedError(
            f"{spell('sync', config.sync)} with {spell('upstream')}: a replica's durability is "
            f"Redis's (docs/replicas.md); its {spell('path')} only keeps a checkpoint to restart fast")
    for name in ("compression", "encryption", "key_file"):
        if getattr(config, name) not in (None, "none"):
            raise ReplicaUnsupportedError(
                f"{spell(name, getattr(config, name))} with {spell('upstream')}: a replica's "
                f"checkpoint is kept plain (the data is Redis's; protect Redis and the directory)")
    if config.eviction is not None:
        raise ReplicaUnsupportedError(
            f"{spell('eviction', config.eviction)} with {spell('upstream')}: every replica holds "
            f"the whole dataset (a record evicted here would read as missing while it exists); "
            f"give it memory= for the whole dataset")


def check(name: str, value: Any) -> None:
    """Check one setting's value on its own (used for serve()'s own keywords).

    Raises:
        InvalidLayoutError: it is not a valid value of that setting.
    """
    problem = BY_NAME[name].problem(value)
    if problem is not None:
        raise InvalidLayoutError(f"{name} {problem}")


def from_serve(name: Any, **given: Any) -> Any:
    """``serve()``'s arguments as a validated :class:`ServerConfig`, in the caller's process.

    ``value_type`` becomes the schema fingerprint, ``detach`` the parent pid (this
    process's, unless detached); ``timeout`` is checked and left to the caller.

    Raises:
        TypeError: a keyword that is not a setting of ``serve()``.
        InvalidNameError, InvalidLayoutError: see :func:`validate`.
    """
    for key in given:
        if key not in BY_NAME or SERVE not in BY_NAME[key].where:
            raise TypeError(f"serve() got an unexpected keyword argument {key!r}")
    values = {s.name: given.get(s.name, s.default) for s in SETTINGS if SERVE in s.where}
    L.check_name(name)
    for key in ("detach", "timeout"):
        check(key, values[key])
    value_type = values.pop("value_type")
    detach = values.pop("detach")
    del values["timeout"]
    config = ServerConfig(
        name=name, schema_fp=L.schema_fingerprint(value_type), schema_given=value_type is not None,
        parent_pid=0 if detach else os.getpid(), **values,
    )
    return validate(config)


def decode(text: str | bytes) -> Any:
    """A :class:`ServerConfig` from its JSON (the coordinator process's ``--config``), validated.

    Raises:
        InvalidLayoutError: not a ServerConfig (a field of the wrong type, an unknown one).
    """
    try:
        config = msgspec.json.decode(text, type=ServerConfig)
    except msgspec.ValidationError as e:
        raise InvalidLayoutError(f"bad coordinator settings: {e}") from None
    return validate(config)


# -- the command line ----------------------------------------------------------------------


def _arg_type(s: Setting) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = s.type(text) if s.type in (int, float) else text
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {s._range()}") from None
        problem = s.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = s.type.__name__  # argparse names the type in its messages
    return parse


def cli_settings() -> list[Setting]:
    return [s for s in SETTINGS if CLI in s.where]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every command-line setting, in groups by section."""
    groups: dict[str, Any] = {}
    for s in cli_settings():
        if s.section not in groups:
            groups[s.section] = parser.add_argument_group(s.section)
        kwargs: dict[str, Any] = {"default": None if s.none else s.default, "dest": s.name,
                                  "help": f"{s.help} (default: {s.describe_default()})".replace("%", "%%")}
        if s.choices:
            kwargs["choices"] = s.choices
        else:
            kwargs["type"] = _arg_type(s)
            kwargs["metavar"] = s.metavar
        groups[s.section].add_argument(s.flag, **kwargs)


def from_args(args: argparse.Namespace) -> Any:
    """The validated :class:`ServerConfig` of ``shmstore serve``'s parsed arguments.

    The coordinator runs in the foreground, so it watches no parent.

    Raises:
        InvalidNameError: the store name is not valid.
        InvalidLayoutError: the flags do not go together; the message names them.
    """
    values = {s.name: getattr(args, s.name) for s in cli_settings()}
    return validate(ServerConfig(name=args.name, **values), cli=True)


# -- the docs ------------------------------------------------------------------------------


def markdown() -> str:
    """docs/settings.md: every setting of ``serve()`` and ``shmstore serve``."""
    out = [
        "# Coordinator settings",
        "",
        "Generated from the table in `coordinator/_config.py` by",
        "`python -m shmstore.coordinator._config --markdown docs/settings.md`; do not edit by hand.",
        "",
        "Each setting is a keyword of `shmstore.serve()` (and of `shmstore.open()`), and where",
        "it makes sense a flag of `shmstore serve`. Bad values are refused in the calling",
        "process, before a coordinator starts: `InvalidLayoutError` (a `ValueError`), or",
        "`InvalidNameError` for the name; the command line exits 2.",
    ]
    for section in SECTIONS:
        rows = [s for s in SETTINGS if s.section == section and (SERVE in s.where or s.name == "name")]
        if not rows:
            continue
        out += ["", f"## {section.capitalize()}", "",
                "| setting | `shmstore serve` | value | default | what it does |",
                "| --- | --- | --- | --- | --- |"]
        for s in rows:
            flag = f"`{s.flag}{' ' + s.metavar if s.metavar else ''}`" if CLI in s.where else "-"
            out.append(f"| `{s.name}` | {flag} | {_value_text(s)} | {s.describe_default()} | "
                       f"{s.help} |")
    return "\n".join(out) + "\n"


def _value_text(s: Setting) -> str:
    if s.choices:
        text = ", ".join(f"`{c!r}`" for c in s.choices)
    elif s.type is object:
        text = "a type"
    elif s.type is bool:
        text = "bool"
    elif s.path:
        text = "a path"
    elif s.type is str:
        text = "str"
    else:
        text = s._range()
    return text + (", or None" if s.none else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmstore.coordinator._config",
                                     description="Print or write docs/settings.md from the settings table.")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="FILE", required=True,
                        help="write the Markdown page to FILE (default: stdout)")
    args = parser.parse_args(argv)
    text = markdown()
    if args.markdown == "-":
        print(text, end="")
    else:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
