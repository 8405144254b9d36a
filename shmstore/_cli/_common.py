"""What every ``shmstore`` subcommand shares: exit codes, the one-line-error parser,
JSON values in and out, connecting by name, and argument types."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, NoReturn

import msgspec

import shmstore
from shmstore._errors import StoreNotFoundError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT

PROG = "shmstore"

#: a default no stored value equals (``get`` tells a missing key from a stored None)
MISSING = object()


class UsageError(Exception):
    """Bad input found after parsing (a JSON value that does not parse): exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: ``shmstore: error: <message>`` and exit 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}{hint}\n")


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# -- values in and out ---------------------------------------------------------------


def parse_json_value(text: str) -> Any:
    """A value given on the command line, as JSON.

    Raises:
        UsageError: not JSON; the message says how to pass a string.
    """
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        quoted = json.dumps(text)
        raise UsageError(
            f"JSON_VALUE {text!r:.60} is not valid JSON ({e.msg} at char {e.pos}); "
            f"a string must be quoted, e.g. '{quoted:.40}'"
        ) from None


def _no_constant(name: str) -> NoReturn:
    # Python's json takes NaN and Infinity; JSON does not, and they would print as null.
    raise UsageError(f"JSON_VALUE: {name} is not JSON (JSON has no NaN or Infinity)")


def _enc_hook(obj: Any) -> Any:
    return repr(obj)  # msgpack extension types and the like: shown, not lost


def to_json(value: Any) -> str:
    """One line of JSON for a stored value (msgpack bytes become base64 strings)."""
    return msgspec.json.encode(value, enc_hook=_enc_hook).decode()


def key_text(kb: bytes) -> str:
    return kb.decode("utf-8", errors="backslashreplace")


def arg_key(text: str) -> bytes:
    """A KEY (or prefix) from the command line, as the bytes the shell passed.

    ``os.fsencode`` undoes the ``surrogateescape`` decoding of ``sys.argv``: a UTF-8
    key gives its UTF-8 bytes (what ``store.put("user:42", ...)`` writes), and a key
    with non-UTF-8 bytes (``$'k\\xff'``) gives exactly those bytes, the key a program
    writes with ``store.put(b"k\\xff", ...)``, instead of a str no store can take.
    """
    return os.fsencode(text)


# -- connecting --------------------------------------------------------------------------


def connect(args: argparse.Namespace) -> shmstore.Store:
    try:
        return shmstore.connect(args.name, timeout=args.timeout)
    except StoreNotFoundError:
        raise StoreNotFoundError(
            f"no store named {args.name!r} on this host; start one with `{PROG} serve {args.name}`"
        ) from None


# -- argument types ----------------------------------------------------------------------


def positive_int(text: str, top: int | None = None) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1 or (top is not None and n > top):
        raise argparse.ArgumentTypeError(
            f"{text!r} must be at least 1" + (f" and at most {top}" if top is not None else ""))
    return n


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return x


def delta(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -(2**63) <= n < 2**64:  # what msgpack (and so incr) can carry
        raise argparse.ArgumentTypeError(f"{text!r} is outside the 64-bit range")
    return n
