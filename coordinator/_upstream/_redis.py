"""A Redis primary as the upstream of replica stores (:class:`RedisUpstream`).

Design
------
A dataset ``NAME`` is three keys sharing the hash tag ``{NAME}`` (one cluster slot)::

    {NAME}:meta  hash    v = last global version, last = id of the last entry ("0-0"),
                         gen = random hex made when the dataset was created
    {NAME}:d     hash    key bytes -> b"<version> <expiry> " + value bytes
    {NAME}:s     stream  entry id "<V>-<nonce>", fields:
                           p  the previous entry's id ("0-0" for the first)
                           t  Redis TIME at the append, ms
                           and one of  o        a logged op (msgpack, made here in Python)
                                       k, v, x  an incr's result: Put(k, v, x)
                                       j = "1"  a jump: only the version moves

``V`` is the global version after the entry, ``V(p)`` the one before, and
``V - V(p) = epochs_of(op)`` (1 for an incr, > 0 for a jump). No Redis key TTL is used:
expiries are shmstore's (absolute wall-clock ns, 0 = none).

Every :meth:`RedisUpstream.submit` is ONE ``EVALSHA`` of ``redis_ops.lua`` (split only
past ``MAX_OPS_PER_CALL`` ops or ``MAX_ARGV_BYTES``): Redis runs a script atomically, so
the records, the version and the stream change together or not at all. The script checks
everything that can refuse the whole call before its first write (a script is not rolled
back by an error), and its ``#!lua`` line makes Redis refuse it up front when out of
memory; so it needs Redis 7.0 or later.

Errors (the contract the coordinator relies on):

- the connection cannot be made, or breaks while the request is being written (the
  server never holds the whole request, so never runs it): ``UpstreamUnavailableError``,
  nothing applied. So are Redis's refusals before running (OOM, READONLY, BUSY, ...).
- no answer within ``timeout`` once the request was written, or the connection lost
  then: ``UpstreamTimeoutError``, it may or may not have been applied. redis-py never
  retries a submit (``Retry(NoBackoff(), 0)``); reads reconnect and retry once on a lost
  connection (not on a timeout, so a frozen server costs one ``timeout``).
- bytes in Redis that do not parse (a forged record, entry or meta): ``CorruptionError``
  naming the key or entry id. Replies are read raw (no redis-py response callbacks) and
  checked field by field.

Durability is Redis's: with ``appendonly yes`` and ``appendfsync always`` an
acknowledged submit survives a crash of the primary; with ``everysec`` the last second
may be lost, and with replication a failover may lose the tail. A replica notices both:
the next entry's ``p`` is not the id it applied last (ids carry a per-call nonce, so a
history that reached the same version again never reuses an id).

Versions are exact in the script below 2**53 (Lua numbers are doubles): a fence above
``MAX_VERSION`` is refused, and so is a compare-and-set that expects one.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import urllib.parse
from importlib import resources
from typing import Iterator

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.retry import Retry

from shmstore._errors import (
    CorruptionError,
    InvalidArgumentError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    ValueEncodingError,
    VersionConflictError,
)

from .. import _ops
from .._config import shown_url
from . import Entry

__all__ = ["RedisUpstream"]

#: versions stay below this (exact as Lua doubles; fences above it are refused)
MAX_VERSION = 1 << 53
#: one EVALSHA carries at most this many ops / this many argument bytes
MAX_OPS_PER_CALL = 10_000
MAX_ARGV_BYTES = 64 << 20
#: names of datasets: they go inside the hash tag, so no braces
NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
SCHEMES = ("redis", "rediss", "unix")
#: Redis refusals made before a script runs (nothing applied)
_REFUSALS = ("OOM", "READONLY", "BUSY", "LOADING", "NOREPLICAS", "MASTERDOWN", "NOPERM", "NOAUTH",
             "WRONGPASS", "MISCONF", "CLUSTERDOWN", "MOVED", "ASK", "TRYAGAIN")

_SCRIPT = resources.files(__package__).joinpath("redis_ops.lua").read_bytes()
_SHA = hashlib.sha1(_SCRIPT).hexdigest()
_int_decode = msgspec.msgpack.Decoder(int).decode
_encode = msgspec.msgpack.Encoder().encode
_LOGGED_IN_STREAM = (_ops.Put, _ops.Delete, _ops.Batch, _ops.Expire)


def _show(kb: bytes) -> str:
    try:
        return repr(kb.decode())[:80]
    except UnicodeDecodeError:
        return repr(kb)[:80]


def _dec(b: object, what: str) -> int:
    """A decimal field from Redis (1 to 20 ASCII digits, below 2**64)."""
    if type(b) is not bytes or not 0 < len(b) <= 20 or not b.isdigit():
        raise CorruptionError(f"{what} is not a decimal number: {b!r:.60}")
    n = int(b)
    if n >> 64:
        raise CorruptionError(f"{what} is out of range: {b!r:.60}")
    return n


def _id_version(b: object, what: str) -> int:
    """V of an entry id ``b"V-nonce"`` (0 for ``b"0-0"``)."""
    if type(b) is not bytes or b.count(b"-") != 1:
        raise CorruptionError(f"{what} is not a stream id: {b!r:.60}")
    v, n = b.split(b"-")
    version = _dec(v, what)
    _dec(n, what)
    return version


def _id_arg(entry_id: object, what: str) -> str:
    if type(entry_id) is not str or not re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}", entry_id):
        raise InvalidArgumentError(f"{what} must be a stream id 'V-nonce' (str), not {entry_id!r:.60}")
    return entry_id


def _record(kb: bytes, rec: object) -> tuple[int, int, bytes]:
    """``(version, expiry, value)`` of a record string ``b"<version> <expiry> <value>"``."""
    if type(rec) is not bytes:
        raise CorruptionError(f"the upstream record of key {_show(kb)} is not a string")
    parts = rec.split(b" ", 2)
    if len(parts) != 3:
        raise CorruptionError(f"the upstream record of key {_show(kb)} lacks its version and expiry")
    what = f"the upstream record of key {_show(kb)}"
    return _dec(parts[0], what), _dec(parts[1], what), parts[2]


def _check_url(url: object) -> None:
    if type(url) is not str:
        raise InvalidArgumentError(f"upstream must be a URL string, not {type(url).__name__}")
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError as e:
        raise InvalidArgumentError(f"upstream URL {url!r:.120} does not parse: {e}") from None
    if u.scheme not in SCHEMES:
        raise InvalidArgumentError(
            f"upstream URL {url!r:.120}: the scheme must be redis://, rediss:// or unix://"
        )
    if u.scheme == "unix" and not u.path:
        raise InvalidArgumentError(f"upstream URL {url!r:.120}: unix:// needs a socket path")
    if u.scheme != "unix" and not u.hostname:
        raise InvalidArgumentError(f"upstream URL {url!r:.120}: no host")
    db = [d for d in urllib.parse.parse_qs(u.query).get("db", [])]
    if u.scheme != "unix" and u.path not in ("", "/"):
        db.append(u.path[1:])
    if not all(d.isascii() and d.isdigit() for d in db):
        raise InvalidArgumentError(f"upstream URL {url!r:.120}: the database must be a number")
    del port


class RedisUpstream:
    """One connection to a Redis primary for the dataset ``name`` (see the module doc).

    Construction does no I/O; the first call connects. Not thread-safe: one instance per
    thread (:meth:`clone` for another). After ``os.fork`` redis-py's pool opens new
    connections in the child. ``close()`` is idempotent.

    Args:
        url: ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
            ``unix:///path/to/socket[?db=N]``.
        name: the dataset's name (``[A-Za-z0-9_.:-]``, 1 to 128 characters).
        timeout: seconds to connect and to wait for each reply.
        stream_max: the stream is trimmed to about this many entries (``MAXLEN ~``);
            a replica further behind than that resynchronizes from :meth:`scan`.

    Raises:
        InvalidArgumentError: a bad URL, name, timeout or stream_max.
    """

    def __init__(self, url: str, name: str, *, timeout: float = 2.0, stream_max: int = 100_000) -> None:
        _check_url(url)
        if type(name) is not str or not NAME_RE.fullmatch(name):
            raise InvalidArgumentError(
                f"upstream_name must be 1 to 128 characters of [A-Za-z0-9_.:-], not {name!r:.60}"
            )
        if type(timeout) not in (int, float) or not (math.isfinite(timeout) and timeout > 0):
            raise InvalidArgumentError(f"upstream timeout must be a positive number of seconds, not {timeout!r}")
        if type(stream_max) is not int or stream_max < 1:
            raise InvalidArgumentError(f"stream_max must be an int >= 1, not {stream_max!r}")
        self.url, self.name, self.timeout, self.stream_max = url, name, float(timeout), stream_max
        #: the URL as messages show it: a password in it is never shown
        self.shown_url = shown_url(url)
        #: the entries the last submit appended (see _appended), and the stream's tail before it
        self.appended: list[Entry] = []
        self.appended_after: str | None = None
        self.keys = (f"{{{name}}}:meta".encode(), f"{{{name}}}:d".encode(), f"{{{name}}}:s".encode())
        self._client = self._make_client(self.timeout)
        self._blocking: dict[int, redis.Redis] = {}
        self._sha = _SHA
        self.closed = False

    def _make_client(self, socket_timeout: float) -> redis.Redis:
        try:
            return redis.Redis.from_url(
                self.url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=self.timeout,
                decode_responses=False,
                protocol=2,  # raw replies as RESP2 arrays (RESP3 turns XREAD into a map)
                retry=Retry(NoBackoff(), 0),
            )
        except (ValueError, TypeError) as e:
            raise InvalidArgumentError(f"upstream URL {self.shown_url!r:.120}: {e}") from None

    def __repr__(self) -> str:
        return f"RedisUpstream({self.shown_url!r}, {self.name!r})"

    def __enter__(self) -> RedisUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the round trip --------------------------------------------------------------

    def _where(self) -> str:
        return f"the upstream {self.shown_url} (dataset {self.name!r})"

    def _once(self, client: redis.Redis, args: tuple, write: bool) -> object:
        """Send one command on a pooled connection and read its raw reply."""
        pool = client.connection_pool
        try:
            conn = pool.get_connection()
        except redis.TimeoutError as e:
            # TCP connected (a frozen server's kernel still accepts) but no answer to
            # redis-py's handshake: nothing of this request was sent
            raise UpstreamUnavailableError(
                f"{self._where()} did not answer the connection handshake within {self.timeout} s "
                f"(nothing was sent): {e}"
            ) from e
        except (redis.ConnectionError, AuthenticationError, OSError) as e:
            raise UpstreamUnavailableError(f"{self._where()} cannot be reached: {e}") from e
        try:
            try:
                conn.send_command(*args)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                # The server never holds the whole request, so never runs it.
                raise UpstreamUnavailableError(f"{self._where()} dropped the request: {e}") from e
            try:
                return conn.read_response()
            except NoScriptError:
                raise
            except ResponseError as e:
                msg = str(e)
                if msg.startswith("WRONGTYPE"):
                    raise CorruptionError(f"{self._where()}: a key of the dataset has another type: {msg}") from None
                if msg.split(" ", 1)[0] in _REFUSALS:
                    raise UpstreamUnavailableError(f"{self._where()} refused the request: {msg}") from None
                raise UpstreamTimeoutError(
                    f"{self._where()} answered with an error; the write may or may not have been "
                    f"applied: {msg}" if write else f"{self._where()} answered with an error: {msg}"
                ) from None
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                conn.disconnect()
                raise UpstreamTimeoutError(
                    f"{self._where()} did not answer within {self.timeout} s ({e}); the write may or "
                    f"may not have been applied" if write else
                    f"{self._where()} did not answer within {self.timeout} s: {e}"
                ) from e
        finally:
            pool.release(conn)

    def _read(self, *args: object, client: redis.Redis | None = None) -> object:
        """A read: reconnects and retries once when the connection was lost."""
        self._check_open()
        client = client or self._client
        try:
            return self._once(client, args, write=False)
        except UpstreamUnavailableError:
            return self._once(client, args, write=False)
        except UpstreamTimeoutError as e:
            if isinstance(e.__cause__, redis.ConnectionError):
                return self._once(client, args, write=False)
            raise

    def _eval(self, argv: list[bytes]) -> list:
        self._check_open()
        head = (3, *self.keys)
        try:
            return self._once(self._client, ("EVALSHA", self._sha, *head, *argv), write=True)
        except NoScriptError:
            # Not run; EVAL runs it and caches it for the next EVALSHA.
            return self._once(self._client, ("EVAL", _SCRIPT, *head, *argv), write=True)

    def _check_open(self) -> None:
        if self.closed:
            raise UpstreamUnavailableError(f"{self!r} was closed")

    # -- writes ----------------------------------------------------------------------

    def submit(self, ops: list[tuple], now_ns: int) -> list[tuple[str | None, object]]:
        """Apply ``ops`` atomically and in order (see the package doc for the tuples).

        Args:
            ops: the op tuples.
            now_ns: the wall clock (ns) that judges expiries for cas, incr and delete.

        Returns:
            Per op ``(entry id or None, result)``; result an exception instance for an
            op that failed alone (VersionConflictError, ValueEncodingError,
            CorruptionError of its record).

        Raises:
            UpstreamUnavailableError: nothing was applied.
            UpstreamTimeoutError: the ops may or may not have been applied.
            CorruptionError: the dataset's meta or stream does not parse; nothing applied.
            InvalidArgumentError: an op tuple of an unknown kind or shape.
        """
        if type(now_ns) is not int or not 0 <= now_ns < 1 << 64:
            raise InvalidArgumentError(f"now_ns must be an int from 0 to 2**64 - 1, not {now_ns!r:.40}")
        results: list = [None] * len(ops)
        now = b"%d" % now_ns
        calls: list[tuple[list[int], list[bytes]]] = []
        idx: list[int] = []
        argv: list[bytes] = []
        size = 0
        for i, op in enumerate(ops):
            group = self._argv(op, results, i)
            if group is None:
                continue
            n = sum(len(a) for a in group)
            if idx and (len(idx) >= MAX_OPS_PER_CALL or size + n > MAX_ARGV_BYTES):
                calls.append((idx, argv))
                idx, argv, size = [], [], 0
            idx.append(i)
            argv += group
            size += n
        if idx:
            calls.append((idx, argv))
        self.appended = []
        self.appended_after = None
        self._incr_expiry: dict[int, int] = {}
        for idx, argv in calls:
            nonce = b"%d" % secrets.randbelow(1 << 53)
            reply = self._eval([nonce, b"%d" % self.stream_max, now, *argv])
            if type(reply) is not list or len(reply) not in (len(idx), len(idx) + 1):
                raise CorruptionError(f"{self._where()}: the script's reply does not fit the request")
            for i, r in zip(idx, reply):
                if type(r) is list and len(r) == 4 and ops[i][0] == "incr":
                    self._incr_expiry[i] = _dec(r[3], "incr's expiry")
                    r = r[:3]
                results[i] = self._result(ops[i], r)
            if len(reply) == len(idx) + 1:
                self._appended(ops, results, idx, reply[-1])
        return results

    def _appended(self, ops: list[tuple], results: list, idx: list[int], tail: object) -> None:
        """The entries one script call appended, made here from the ops and the results
        (the same fields the stream holds), into ``appended``; ``appended_after`` is the
        stream's tail before the first call. A replica whose cursor is that tail applies
        them without reading the stream back."""
        if type(tail) is not list or len(tail) != 2:
            raise CorruptionError(f"{self._where()}: the script's reply does not fit the request")
        prev = tail[0].decode() if type(tail[0]) is bytes else "?"
        tms = _dec(tail[1], "the script's time")
        if self.appended_after is None:
            self.appended_after = prev
        elif not self.appended or self.appended[-1].id != prev:
            self.appended = []  # another writer came between two calls: read them back
            self.appended_after = "?"
            return
        eb = _id_version(prev.encode(), "the stream's tail") if prev != "0-0" else 0
        for i in idx:
            eid, res = results[i]
            if eid is None:
                continue
            op = ops[i]
            kind = op[0]
            if kind in ("put", "cas"):
                o = _ops.Put(0, op[1], op[2], op[3])
            elif kind == "delete":
                o = _ops.Delete(0, op[1])
            elif kind == "expire":
                o = _ops.Expire(0, [op[1]], op[2])
            elif kind == "batch":
                o = _ops.Batch(0, list(op[1]))
            elif kind == "incr":
                o = _ops.Put(0, op[1], _encode(res), self._incr_expiry.pop(i, 0))
            else:
                o = None
            v = _id_version(eid.encode(), "an entry id")
            self.appended.append(Entry(id=eid, prev=prev, version=v, epoch_before=eb, op=o, time_ms=tms))
            prev, eb = eid, v

    @staticmethod
    def _argv(op: tuple, results: list, i: int) -> list[bytes] | None:
        """The script's strings for one op, or None when it was decided here."""
        try:
            kind = op[0]
            if kind == "put":
                _, kb, vb, expiry = op
                return [b"P", kb, vb, b"%d" % expiry, _encode(_ops.Put(0, kb, vb, expiry)), b""]
            if kind == "cas":
                _, kb, vb, expiry, expected = op
                if expected >= MAX_VERSION:
                    results[i] = (None, VersionConflictError(
                        f"compare_and_set on key {_show(kb)}: expected version {expected}, which no "
                        f"record of a replica store has (versions stay below 2**53); read it again and retry"
                    ))
                    return None
                return [b"C", kb, vb, b"%d" % expiry, _encode(_ops.Put(0, kb, vb, expiry)), b"%d" % expected]
            if kind == "delete":
                _, kb = op
                return [b"D", kb, b"", b"", _encode(_ops.Delete(0, kb)), b""]
            if kind == "incr":
                _, kb, delta = op
                if type(delta) is not int:
                    raise TypeError("delta")
                if abs(delta) >= 1 << 80:
                    results[i] = (None, ValueEncodingError(
                        f"incr on key {_show(kb)}: a delta of {delta} leaves the 64-bit range msgpack stores"
                    ))
                    return None
                return [b"I", kb, b"%d" % (delta >> 32), b"%d" % (delta & 0xFFFFFFFF), b"", b""]
            if kind == "batch":
                _, bops = op
                if not bops:
                    raise ValueError("an empty batch")
                out = [b"B", b"", b"%d" % len(bops), _encode(_ops.Batch(0, list(bops))), b"", b""]
                for b in bops:
                    if type(b) is _ops.BatchPut:
                        out += [b"P", b.key, b.value, b"%d" % b.expiry]
                    elif type(b) is _ops.BatchDelete:
                        out += [b"D", b.key, b"", b""]
                    else:
                        raise TypeError("a batch op")
                return out
            if kind == "expire":
                _, kb, now = op
                return [b"E", kb, _encode(_ops.Expire(0, [kb], now)), b"%d" % now, b"", b""]
            if kind == "fence":  # internal: fence() uses it
                _, m = op
                return [b"J", b"", b"%d" % m, b"", b"", b""]
        except (TypeError, ValueError, IndexError, msgspec.ValidationError) as e:
            raise InvalidArgumentError(f"submit: malformed op {op!r:.120}: {e}") from None
        raise InvalidArgumentError(f"submit: unknown op {op!r:.120}")

    def _result(self, op: tuple, r: object) -> tuple[str | None, object]:
        """One op's ``{status, id, value}`` reply as ``(entry id or None, result)``."""
        if type(r) is not list or len(r) != 3 or type(r[0]) is not bytes or type(r[1]) is not bytes:
            raise CorruptionError(f"{self._where()}: the script's reply does not fit the request")
        status, eid, value = r
        entry_id = eid.decode() if eid else None
        kind = op[0]
        if status == b"ok":
            if kind in ("put", "cas", "fence"):
                return entry_id, value
            if kind in ("delete", "expire"):
                return entry_id, value == 1
            if kind == "incr":
                try:
                    return entry_id, _int_decode(value)
                except (msgspec.DecodeError, TypeError):
                    raise CorruptionError(f"{self._where()}: incr's result is not an integer") from None
            if kind == "batch":
                return entry_id, [v if type(b) is _ops.BatchPut else v == 1 for b, v in zip(op[1], value)]
        kb = op[1] if len(op) > 1 and type(op[1]) is bytes else b""
        if status == b"VersionConflictError":
            cur = _dec(value, f"the upstream record of key {_show(kb)}")
            return None, VersionConflictError(
                f"compare_and_set on key {_show(kb)}: expected version {op[4]}, "
                f"found {cur if cur else 'no record (version 0)'}; read it again and retry"
            )
        if status == b"ValueEncodingError":
            if value is None:
                return None, ValueEncodingError(f"incr on key {_show(kb)}: the stored value is not an integer")
            try:
                cur = _int_decode(value)
            except (msgspec.DecodeError, TypeError):
                cur = "?"
            return None, ValueEncodingError(
                f"incr on key {_show(kb)}: {cur} + {op[2]} leaves the 64-bit range msgpack stores"
            )
        if status == b"CorruptionError":
            if value == b"record" and kb:
                return None, CorruptionError(f"{self._where()}: the record of key {_show(kb)} does not parse")
            detail = value.decode("utf-8", "replace") if type(value) is bytes else ""
            raise CorruptionError(f"{self._where()}: {detail[:200]}")
        raise CorruptionError(f"{self._where()}: the script answered {status!r:.60}")

    def fence(self, min_version: int) -> tuple[int, str]:
        """Jump the global version to ``max(version + 1, min_version)`` (entry ``j``).

        Returns:
            ``(the new version, the jump entry's id)``.

        Raises:
            InvalidArgumentError: ``min_version`` is not an int from 0 to 2**53 - 2**32.
        """
        if type(min_version) is not int or not 0 <= min_version <= MAX_VERSION - (1 << 32):
            raise InvalidArgumentError(f"min_version must be an int from 0 to 2**53 - 2**32, not {min_version!r:.40}")
        (eid, v), = self.submit([("fence", min_version)], 0)
        return v, eid

    # -- reads -----------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """``(v, last)`` of the dataset's meta; ``(0, "0-0")`` when it was never written."""
        r = self._read(b"HMGET", self.keys[0], b"v", b"last")
        if type(r) is not list or len(r) != 2:
            raise CorruptionError(f"{self._where()}: HMGET of the meta answered {r!r:.80}")
        v, last = r
        if v is None and last is None:
            return 0, "0-0"
        what = f"the upstream meta {self.keys[0].decode()}"
        version = _dec(v, what)
        if _id_version(last, what) != version:
            raise CorruptionError(f"{what}: v {v!r:.40} and last {last!r:.60} disagree")
        return version, last.decode()

    def entry(self, entry_id: str) -> Entry | None:
        """The stream entry ``entry_id`` (XRANGE id id), or None when not held."""
        eid = _id_arg(entry_id, "entry_id")
        r = self._read(b"XRANGE", self.keys[2], eid, eid)
        if type(r) is not list or len(r) > 1:
            raise CorruptionError(f"{self._where()}: XRANGE answered {r!r:.80}")
        return self._entry(r[0]) if r else None

    def read(self, after: str, count: int, block_ms: int | None = None) -> list[Entry]:
        """Up to ``count`` entries after the id ``after`` ("0-0": from the first held).

        Args:
            after: the id of the last entry applied.
            count: at most this many entries (1 or more).
            block_ms: when there is none yet, wait this long for one (None or 0: no wait).
                The wait does not count against ``timeout``.

        Returns:
            The entries in stream order (empty: none arrived). Their ``prev`` chain is
            not checked here: the caller compares the first ``prev`` with ``after``.
        """
        after = _id_arg(after, "after")
        if type(count) is not int or count < 1:
            raise InvalidArgumentError(f"count must be an int >= 1, not {count!r:.40}")
        args: tuple = (b"XREAD", b"COUNT", count)
        client = None
        if block_ms is not None:
            if type(block_ms) is not int or block_ms < 0:
                raise InvalidArgumentError(f"block_ms must be an int >= 0 or None, not {block_ms!r:.40}")
        if block_ms:  # (0 is no wait, as None: Redis's BLOCK 0 would wait forever)
            args += (b"BLOCK", block_ms)
            client = self._blocking.get(block_ms)
            if client is None:
                client = self._blocking[block_ms] = self._make_client(self.timeout + block_ms / 1000)
        r = self._read(*args, b"STREAMS", self.keys[2], after, client=client)
        if r is None:
            return []
        try:
            (stream, items), = r
            if type(items) is not list or len(items) > count:
                raise ValueError
        except (TypeError, ValueError):
            raise CorruptionError(f"{self._where()}: XREAD answered {r!r:.80}") from None
        return [self._entry(it) for it in items]

    def newest_after(self, after: str, block_ms: int) -> int:
        """Wait up to ``block_ms`` for an entry after ``after``; the version of the first
        one (0: none came). Only its id is read: the follower thread of a replica uses it
        to learn that there is something to apply (the loop reads the entries itself, so
        the thread costs next to nothing while this host's own writes arrive)."""
        after = _id_arg(after, "after")
        if type(block_ms) is not int or block_ms < 1:
            raise InvalidArgumentError(f"block_ms must be an int >= 1, not {block_ms!r:.40}")
        client = self._blocking.get(block_ms)
        if client is None:
            client = self._blocking[block_ms] = self._make_client(self.timeout + block_ms / 1000)
        r = self._read(b"XREAD", b"COUNT", 1, b"BLOCK", block_ms, b"STREAMS", self.keys[2], after, client=client)
        if r is None:
            return 0
        try:
            (stream, items), = r
            (eid, _), = items
        except (TypeError, ValueError):
            raise CorruptionError(f"{self._where()}: XREAD answered {r!r:.80}") from None
        return _id_version(eid, f"stream entry {eid!r:.60} of {self._where()}")

    def _entry(self, item: object) -> Entry:
        """A raw ``[id, [field, value, ...]]`` as a checked :class:`Entry`."""
        if type(item) is not list or len(item) != 2 or type(item[1]) is not list or len(item[1]) > 10:
            raise CorruptionError(f"{self._where()}: a stream entry has no id and fields: {item!r:.80}")
        eid, flat = item
        what = f"stream entry {eid!r:.60} of {self._where()}"
        version = _id_version(eid, what)
        if len(flat) % 2:
            raise CorruptionError(f"{what}: an odd number of field items")
        f = {}
        for k, v in zip(flat[::2], flat[1::2]):
            if type(k) is not bytes or type(v) is not bytes or k in f:
                raise CorruptionError(f"{what}: a field is repeated or not a string")
            f[k] = v
        names = set(f)
        if not {b"p", b"t"} <= names:
            raise CorruptionError(f"{what}: missing field p or t")
        prev = f[b"p"]
        before = _id_version(prev, f"{what}: field p")
        time_ms = _dec(f[b"t"], f"{what}: field t")
        names -= {b"p", b"t"}
        if names == {b"o"}:
            try:
                op = _ops.decode_logged(f[b"o"])
            except msgspec.DecodeError as e:
                raise CorruptionError(f"{what}: field o is not a logged op: {e}") from None
            if type(op) not in _LOGGED_IN_STREAM:
                raise CorruptionError(f"{what}: field o is a {type(op).__name__}, not a put, delete, batch or expire")
            span = _ops.epochs_of(op)
        elif names == {b"k", b"v", b"x"}:
            kb, vb = f[b"k"], f[b"v"]
            expiry = _dec(f[b"x"], f"{what}: field x")
            try:
                _int_decode(vb)
            except msgspec.DecodeError:
                raise CorruptionError(f"{what}: an incr's value is not an integer") from None
            if not kb:
                raise CorruptionError(f"{what}: an incr's key is empty")
            op, span = _ops.Put(0, kb, vb, expiry), 1
        elif names == {b"j"}:
            if f[b"j"] != b"1":
                raise CorruptionError(f"{what}: field j is not 1")
            op, span = None, max(1, version - before)
        else:
            raise CorruptionError(f"{what}: fields {sorted(names)!r:.80} are not o, k/v/x or j")
        if span < 1 or version != before + span:
            raise CorruptionError(f"{what}: its version is not its predecessor's ({before}) + {span}")
        return Entry(eid.decode(), prev.decode(), version, before, op, time_ms)

    def scan(self, count: int = 1000) -> Iterator[tuple[bytes, int, int, bytes]]:
        """Every record ``(key, version, expiry, value)``, by HSCAN.

        Expired records are included (their expiry says so). As with any Redis SCAN, a
        key present for the whole scan comes at least once, and may come twice if the
        hash is resized meanwhile; the records of keys written during the scan may be
        old or new. Read :meth:`head` before the scan and follow the stream from it.
        """
        if type(count) is not int or count < 1:
            raise InvalidArgumentError(f"count must be an int >= 1, not {count!r:.40}")
        cursor = b"0"
        while True:
            r = self._read(b"HSCAN", self.keys[1], cursor, b"COUNT", count)
            try:
                cursor, flat = r
                _dec(cursor, "HSCAN's cursor")
                if type(flat) is not list or len(flat) % 2:
                    raise ValueError
            except (TypeError, ValueError):
                raise CorruptionError(f"{self._where()}: HSCAN answered {r!r:.80}") from None
            for kb, rec in zip(flat[::2], flat[1::2]):
                if type(kb) is not bytes or not kb:
                    raise CorruptionError(f"{self._where()}: a record's key is empty or not a string")
                version, expiry, value = _record(kb, rec)
                yield kb, version, expiry, value
            if cursor == b"0":
                return

    # -- lifetime --------------------------------------------------------------------

    def clone(self) -> RedisUpstream:
        """Another connection to the same dataset (for another thread)."""
        return RedisUpstream(self.url, self.name, timeout=self.timeout, stream_max=self.stream_max)

    def close(self) -> None:
        """Close every connection; idempotent."""
        if self.closed:
            return
        self.closed = True
        for c in (self._client, *self._blocking.values()):
            c.close()
            c.connection_pool.disconnect()
        self._blocking.clear()
