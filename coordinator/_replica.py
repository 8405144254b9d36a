"""A replica: a store whose writes an upstream orders, and which applies the upstream's
change stream (``serve(name, upstream="redis://...")``).

Design
------
The upstream (``coordinator/_upstream``: the seam, Redis behind it) keeps the dataset:
its records, a global version, and a change stream in which every entry names the one
before it and carries the ops of one global step, already decided (an incr's new value,
a CAS that won). Every host's coordinator is a replica of it:

- **Writes.** The loop drains every client's ring as usual, but :class:`ReplicaApplier`
  only decodes and checks each frame; the group's writes, from all clients, go to the
  upstream in one round trip (:meth:`Replica.submit`), where each is one atomic step
  that takes the next global version(s). The replica then applies the stream up to the
  newest version those steps took (:meth:`Replica.catch_up`), and only then are the
  replies published: a write is acknowledged after the upstream accepted it **and**
  this host's store holds it, so a process reads its own writes. Reads and pings in
  the group are answered after that, in ring order.
- **The stream.** A follower thread blocks on the upstream's stream with its own
  connection until an entry past the cursor exists, and then wakes the loop (posting
  the doorbell), which reads and applies the entries in order
  (:meth:`Replica.catch_up`, :meth:`Replica.apply_entries`). The thread reads only
  ids: it was a quarter of a sync write's cost when it parsed every entry, this host's
  own included (1,386 against 2,078 sync puts/s without it). Each entry must continue
  the cursor: its predecessor's id is the cursor and its epoch-before is the local
  epoch. So the local epoch and each record's version are the global ones, on every
  host. The cursor is the id of the last applied entry, ``"<H_EPOCH>-<H_UP_NONCE>"``,
  kept in the segment's header: a restarted coordinator continues from it.
- **Never silently diverging.** At start, and after every failure to reach the
  upstream, the cursor is looked up in the stream. If it is not there (the stream was
  trimmed past it, Redis restarted without it, a failover lost entries: the ids carry a
  random nonce per step, so a history that reached the same version again has other
  ids), or an entry does not continue the cursor, or does not apply here, the replica
  **resyncs** (:meth:`Replica.resync`): it reads all the upstream's records, fences the
  global version past its own epoch (a jump entry every replica applies, so versions
  never go back), folds in the entries written meanwhile, and rewrites what differs
  (records keep their global versions). It says so on stderr and in ``stats()``
  (``upstream_resyncs``). Change feeds started before a resync raise
  ``FeedTruncatedError`` (its horizon is raised): they must resync too.
- **The replica takes no epoch of its own.** Nothing local may take an epoch: no
  eviction (refused at serve()), no page moves between classes (``Engine.page_moves``
  off), expiries are steps in the upstream (:class:`ReplicaExpirer`). A record that does
  not fit this store (it is too small for the dataset) stalls the replica: reads go on
  from what it has, writes fail with ``UpstreamError``, and a resync is tried every
  few seconds.
- **Upstream unreachable.** Reads go on from the store (they never involve the
  coordinator). A write whose round trip cannot start fails with
  ``UpstreamUnavailableError`` (it was applied nowhere); one whose answer does not come
  within ``upstream_timeout`` with ``UpstreamTimeoutError`` (it may have been applied;
  if so every replica applies it, once: a step is never resent). When the upstream is
  back, the cursor is checked and following resumes; ``stats()`` shows
  ``upstream_state``.
"""

from __future__ import annotations

import sys
import threading
import time

from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._errors import (
    ReplicaUnsupportedError,
    ShmStoreError,
    StoreFullError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from shmstore._ttl import now_ns

from . import _ops as O
from ._apply import Applier, decode_frame
from ._expiry import Expirer

import msgspec

_encode = msgspec.msgpack.Encoder().encode
#: seconds between attempts to reach an unreachable upstream, or to resync a stalled replica
RETRY_S = 0.5
RETRY_MAX_S = 4.0
STALLED_RETRY_S = 5.0
#: entries read per round trip
READ_COUNT = 1000
_WRITES = (O.Put, O.Delete, O.Cas, O.Incr, O.Batch)
_REFUSED = (O.TableCreate, O.TableWrite)


class Diverged(Exception):
    """The stream does not continue this replica's state: resync."""


class Stalled(Exception):
    """An entry cannot be applied to this store (too small for the dataset)."""


def _version_of(entry_id: str) -> tuple[int, int]:
    v, _, n = entry_id.partition("-")
    return int(v), int(n or 0)


class Replica:
    """The upstream side of one replica's coordinator (its thread, but the follower).

    Args:
        cfg: the coordinator's settings (``upstream`` and friends).
        seg: the store's segment.
        engine: its writer.
        bell: the coordinator's doorbell (the follower posts it when entries arrive).
        upstream: the seam's implementation (default: ``RedisUpstream`` of ``cfg``).
    """

    def __init__(self, cfg: object, seg: object, engine: object, bell: object, upstream: object = None) -> None:
        if upstream is None:
            from ._upstream._redis import RedisUpstream  # noqa: PLC0415

            upstream = RedisUpstream(cfg.upstream, cfg.upstream_name or cfg.name,
                                     timeout=cfg.upstream_timeout, stream_max=cfg.upstream_stream_max)
        self.up = upstream
        self.name = cfg.name
        self.seg = seg
        self.q = seg.q
        self.engine = engine
        engine.page_moves = False
        self.bell = bell
        self.behind = 0  # the version of an entry past the cursor the follower saw
        self.consumed = threading.Event()
        self.stop_event = threading.Event()
        self.follower_failed = False
        self.need_check = True  # the cursor must be looked up in the upstream first
        self.next_try = 0.0
        self.retry_delay = 0.0  # seconds to the next check while the upstream is unreachable
        self.stall_reason: str | None = None
        self.thread: threading.Thread | None = None
        #: where the follower reads from (the loop moves it as it applies)
        self.follow_from = self.cursor
        #: a checkpoint to restart fast (served with path=: coordinator/_replica_ckpt.py)
        self.ckpt_path = cfg.path
        self.dataset = cfg.upstream_name or cfg.name
        self.ckpt_interval = cfg.checkpoint_interval
        self.next_save = time.monotonic() + self.ckpt_interval
        self.saved_epoch = self.engine.epoch
        self.saver: threading.Thread | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def cursor(self) -> str:
        e = self.engine.epoch
        return f"{e}-{self.q[L.H_UP_NONCE]}" if e else "0-0"

    def _state(self, s: int) -> None:
        self.q[L.H_UP_STATE] = s

    def _say(self, what: str) -> None:
        print(f"shmstore coordinator: store {self.name!r} (replica): {what}", file=sys.stderr, flush=True)

    def start(self) -> None:
        """Check the cursor against the upstream (resyncing if needed), then follow."""
        self._state(L.UP_SYNCING)
        self.check()
        self.thread = threading.Thread(target=self._follow, name="shmstore-upstream", daemon=True)
        self.thread.start()

    def _save(self, *, background: bool) -> None:
        """Take the checkpoint (the records now, between entries) and write it, in a
        thread of its own unless ``background`` is False."""
        from . import _replica_ckpt  # noqa: PLC0415

        if self.saver is not None:
            self.saver.join()
            self.saver = None
        epoch = self.engine.epoch
        if epoch == self.saved_epoch or self.q[L.H_UP_STATE] != L.UP_OK:
            return
        snap = _replica_ckpt.snapshot(self.seg, epoch)
        nonce = self.q[L.H_UP_NONCE]
        self.saved_epoch = epoch

        def write() -> None:
            try:
                _replica_ckpt.write(self.ckpt_path, self.dataset, snap, nonce)
            except OSError as e:
                self._say(f"its checkpoint in {self.ckpt_path!r} could not be written ({e}); it "
                          f"resyncs from the upstream after a reboot")

        if background:
            self.saver = threading.Thread(target=write, name="shmstore-replica-checkpoint", daemon=True)
            self.saver.start()
        else:
            write()

    def close(self) -> None:
        if self.ckpt_path is not None:
            self._save(background=False)  # a clean stop: the next start reads only what came after
        self.stop_event.set()
        self.consumed.set()
        t = self.thread
        if t is not None:
            t.join(timeout=3 * self._timeout() + 1)
        _close_quietly(self.up)

    def _timeout(self) -> float:
        return float(getattr(self.up, "timeout", 2.0))

    def check(self) -> bool:
        """Bring the replica in line with the upstream: look the cursor up, resync if
        the upstream's history does not hold it, catch up. False if unreachable."""
        try:
            if self.stall_reason is not None:
                self.resync(f"retrying after a stall ({self.stall_reason})")
            else:
                v, last = self.up.head()
                self._head(v)
                cur = self.cursor
                if cur != last:
                    if cur == "0-0" and self.engine.epoch == 0 and self.q[L.H_COUNT] == 0 and v == 0:
                        pass  # both new
                    elif cur == "0-0" and self.engine.epoch == 0 and self.q[L.H_COUNT] == 0:
                        self.resync(f"a new replica: loading the dataset's records (version {v})")
                    elif cur == "0-0" or self.up.entry(cur) is None:
                        self.resync(f"the upstream's stream does not hold this replica's cursor {cur} "
                                    f"(its newest is {last}): trimmed past it, or Redis lost or replaced "
                                    f"its history")
                    else:
                        self.catch_up(v)
            self.need_check = False
            self.retry_delay = 0.0
            if self.stall_reason is None:
                self._state(L.UP_OK)
            return True
        except (ShmStoreError, Stalled) as e:
            self._trouble(e)
            return False

    def _trouble(self, e: Exception) -> None:
        """What a failure means for the state: the upstream unreachable (UpstreamError),
        an entry that does not fit (Stalled), or the upstream's data unusable (another
        ShmStoreError: a CorruptionError). Never raised on: the loop must live."""
        if isinstance(e, UpstreamError):
            self._unreachable(e)
        elif isinstance(e, Stalled):
            self._stall(str(e))
        else:
            self._stall(f"the upstream's data cannot be used ({type(e).__name__}: {e.message})")

    def _unreachable(self, e: Exception) -> None:
        self.q[L.H_UP_FAILURES] += 1
        self.need_check = True
        # Each check waits up to upstream_timeout when Redis is frozen (not refusing):
        # back off so the loop (ticks, pings, get_many fallbacks) is not held by it.
        self.retry_delay = min(RETRY_MAX_S, 2 * self.retry_delay) if self.retry_delay else RETRY_S
        self.next_try = time.monotonic() + self.retry_delay
        if self.q[L.H_UP_STATE] != L.UP_UNREACHABLE and self.stall_reason is None:
            self._say(f"the upstream cannot be reached ({type(e).__name__}: {e}); reads go on, writes fail")
            self._state(L.UP_UNREACHABLE)

    def _stall(self, why: str) -> None:
        if self.stall_reason != why:
            self._say(f"stalled: {why}; reads go on from what this store holds, writes fail; "
                      f"a resync is tried every {STALLED_RETRY_S:g} s")
        self.stall_reason = why
        self.need_check = True
        self.next_try = time.monotonic() + STALLED_RETRY_S
        self._state(L.UP_STALLED)

    def _head(self, v: int) -> None:
        if v > self.q[L.H_UP_HEAD]:
            self.q[L.H_UP_HEAD] = v

    # -- the loop's hooks --------------------------------------------------------------

    def service(self) -> None:
        """Called every loop turn: apply what the follower read, retry what failed."""
        if self.follower_failed:
            self.follower_failed = False
            if self.q[L.H_UP_STATE] == L.UP_OK:
                self._unreachable(UpstreamUnavailableError("the stream could not be read"))
        if self.need_check:
            if time.monotonic() < self.next_try or not self.check():
                self.behind = 0
                self.consumed.set()
                return
        if self.ckpt_path is not None and time.monotonic() >= self.next_save:
            self.next_save = time.monotonic() + self.ckpt_interval
            self._save(background=True)
        if self.behind:
            newest, self.behind = self.behind, 0
            try:
                if newest > self.engine.epoch:  # not this host's own write, applied meanwhile
                    self.catch_up(None)
            except (ShmStoreError, Stalled) as e:
                self._trouble(e)
        self.consumed.set()

    def write_refusal(self) -> ShmStoreError | None:
        """Why writes are refused before any is sent (a stalled replica could not apply
        its own write, so could not acknowledge it), or None."""
        if self.stall_reason is not None:
            return UpstreamError(f"replica {self.name!r} is stalled: {self.stall_reason}; writes are "
                                 f"refused until it resyncs (reads go on)")
        return None

    def submit(self, ops: list[tuple]) -> list[tuple[str | None, object]]:
        """Send the group's writes in one round trip; apply the stream up to the newest
        version they took. Raises UpstreamError (nothing acknowledged)."""
        q = self.q
        q[L.H_UP_ROUNDTRIPS] += 1
        if self.need_check and not self.check():
            raise UpstreamUnavailableError(
                f"replica {self.name!r}: the upstream cannot be reached; the write was not applied")
        try:
            results = self.up.submit(ops, now_ns())
        except UpstreamError as e:
            self._unreachable(e)
            raise
        top = 0
        for entry_id, _ in results:
            if entry_id:
                top = max(top, _version_of(entry_id)[0])
        if top:
            self._head(top)
            try:
                # Caught up when it was sent: its own entries follow the cursor, applied
                # from what was sent without reading them back (else: read).
                appended = getattr(self.up, "appended", None)
                if appended and getattr(self.up, "appended_after", None) == self.cursor:
                    self.apply_entries(appended)
                self.catch_up(top)
            except UpstreamError as e:
                self._unreachable(e)
                raise UpstreamTimeoutError(
                    f"replica {self.name!r}: the upstream took the write (version {top}) but this "
                    f"replica could not read it back ({e.message}); it is applied here once the "
                    f"upstream is reachable") from None
            except (ShmStoreError, Stalled) as e:
                self._trouble(e)
            if self.engine.epoch < top:
                raise (UpstreamError if self.stall_reason else UpstreamTimeoutError)(
                    f"replica {self.name!r}: the upstream took the write (version {top}) but this "
                    f"replica has not applied it ({self.stall_reason or 'not read back yet'})")
        return results

    # -- applying the stream -----------------------------------------------------------

    def catch_up(self, target: int | None) -> None:
        """Read and apply the stream from the cursor until ``target`` (None: its end)."""
        for _ in range(1_000_000):
            if target is not None and self.engine.epoch >= target:
                return
            entries = self.up.read(self.cursor, READ_COUNT)
            if not entries:
                if target is not None and self.engine.epoch < target:
                    self.resync(f"the stream ends before version {target}")
                return
            if not self.apply_entries(entries):
                self.resync(f"entry {entries[0].id} does not follow this replica's cursor {self.cursor}")
            if target is None and len(entries) < READ_COUNT:
                return

    def apply_entries(self, entries: list) -> bool:
        """Apply entries in order, skipping those already applied. False at a gap (the
        first new entry does not name the cursor as its predecessor)."""
        eng = self.engine
        q = self.q
        applied = 0
        last = None
        try:
            for e in entries:
                if e.version <= eng.epoch:
                    continue  # read before the cursor moved (the follower's, or a resync's)
                if e.prev != self.cursor:
                    return False
                self._apply(e)
                applied += 1
                last = e
        except Diverged as d:
            self.resync(str(d))
            return True
        finally:
            if applied:
                q[L.H_UP_APPLIED] += applied
                q[L.H_OPS] += applied
                self._head(last.version)
                lag = max(0, int(time.time() * 1000) - last.time_ms)  # the two hosts' clocks
                q[L.H_UP_LAG_MS] = lag
                if lag > q[L.H_UP_LAG_MS_MAX]:
                    q[L.H_UP_LAG_MS_MAX] = lag
                self.follow_from = self.cursor
        return True

    def _apply(self, e: object) -> None:
        """Apply one entry at exactly its global versions."""
        eng = self.engine
        if eng.epoch != e.epoch_before:
            raise Diverged(f"entry {e.id} starts at version {e.epoch_before}; this replica is at {eng.epoch}")
        op = e.op
        t = type(op)
        try:
            if op is None:  # a jump: the global version moves on, nothing else changes
                eng.epoch = e.version
            elif t is O.Put:
                eng.put(eng.check_key(op.key), eng.check_value(op.value), op.expiry)
            elif t is O.Delete:
                if not eng.delete(eng.check_key(op.key)):
                    raise Diverged(f"entry {e.id} deletes a key this replica does not hold")
            elif t is O.Batch:
                eng.batch(op.ops, _encode(op))  # the redo copy: a death mid-batch rolls forward
            elif t is O.Expire:
                for kb in [eng.check_key(kb) for kb in op.keys]:
                    if not eng.delete(kb):
                        raise Diverged(f"entry {e.id} expires a key this replica does not hold")
                self.q[L.H_EXPIRED] += len(op.keys)
            else:
                raise Diverged(f"entry {e.id} holds an op ({t.__name__}) a replica does not apply")
        except (ShmStoreError, ValueError, TypeError, IndexError, OverflowError) as x:
            # A key or value beyond this store's sizes, or no room: the store is too small
            # (or the entry is forged: it parsed, but makes no sense here).
            x = x if isinstance(x, ShmStoreError) else ShmStoreError(str(x))
            raise Stalled(f"entry {e.id} does not fit this store ({type(x).__name__}: {x.message})") from None
        if eng.epoch != e.version:
            raise Diverged(f"entry {e.id} should end at version {e.version}; applying it here ended at {eng.epoch}")
        self.q[L.H_UP_NONCE] = _version_of(e.id)[1]
        eng.publish()
        self.stall_reason = None

    # -- resync ------------------------------------------------------------------------

    def _local(self) -> dict[bytes, tuple[int, int, bytes]]:
        """Every record this store holds: key -> (version, expiry, value)."""
        eng = self.engine
        seg = self.seg
        q = self.q
        out: dict[bytes, tuple[int, int, bytes]] = {}
        refs, _ = seg.slot_refs()
        for ref in refs.tolist():
            kb = eng._key_at(ref)
            if not kb or eng.find(kb, L.key_hash(kb))[1] != ref:
                continue
            w = eng._slot_word(ref)
            out[kb] = (q[w + L.S_VERSION], q[w + L.S_EXPIRY], bytes(eng._value_at(w)))
        return out

    def _read_range(self, after: str, until: int) -> list:
        """The entries after ``after`` up to version ``until``, continuing each other."""
        out: list = []
        cur = after
        while True:
            got = self.up.read(cur, READ_COUNT)
            if not got:
                return out
            for e in got:
                if e.prev != cur:
                    raise Diverged(f"the stream broke at entry {e.id} while resyncing")
                out.append(e)
                cur = e.id
                if e.version >= until:
                    return out

    def resync(self, why: str) -> None:
        """Make this store equal to the upstream's records (see the module docstring)."""
        self._say(f"resyncing from the upstream's records: {why}")
        self._state(L.UP_SYNCING)
        eng = self.engine
        q = self.q
        margin = 16  # versions to spare; a window that adds more keys retries with more
        for attempt in range(8):
            v0, last0 = self.up.head()
            snap: dict[bytes, tuple[int, int, bytes]] = {}
            for kb, version, expiry, value in self.up.scan():
                snap[kb] = (version, expiry, value)
            local = self._local()
            vf, idf = self.up.fence(eng.epoch + len(local) + len(snap) + margin)
            try:
                entries = self._read_range(last0, vf)
            except Diverged:
                continue
            if not entries or entries[-1].id != idf:
                continue  # trimmed meanwhile, or the fence is not where it should be: again
            for e in entries[:-1]:
                _fold(snap, e)
            changes = [kb for kb in local if kb not in snap]
            writes = [kb for kb, rec in snap.items() if local.get(kb) != rec]
            if eng.epoch + len(changes) + len(writes) >= vf:
                margin *= 4
                continue
            try:
                for kb in changes:
                    eng.delete(kb)
                for kb in writes:
                    version, expiry, value = snap[kb]
                    eng.restore(eng.check_key(kb), eng.check_value(value), version, expiry)
            except ShmStoreError as x:
                eng.publish()
                raise Stalled(f"the dataset does not fit this store while resyncing "
                              f"({type(x).__name__}: {x.message})") from None
            eng.epoch = vf
            # Feeds from before the resync cannot be continued: their changes were not
            # all recorded as changes (see the module docstring).
            q[L.H_FEED_HORIZON] = vf
            q[L.H_LAST_DELETE_EPOCH] = vf
            q[L.H_UP_NONCE] = _version_of(idf)[1]
            eng.publish()
            q[L.H_UP_RESYNCS] += 1
            self._head(vf)
            self.follow_from = self.cursor
            self.stall_reason = None
            self._say(f"resynced: {len(snap)} records at version {vf} ({len(writes)} written, "
                      f"{len(changes)} removed)")
            return
        raise UpstreamTimeoutError(f"replica {self.name!r}: the resync did not settle in 8 attempts "
                                   f"(the stream moves faster than the records can be read)")

    # -- the follower thread -----------------------------------------------------------

    def _follow(self) -> None:
        """Block on the stream with a connection of its own until there is an entry past
        the cursor; then wake the loop, which reads and applies it, and wait until it
        has. Only the entry's id is read here: this host's own writes (already applied
        when their entries arrive) cost the thread one short wake-up each."""
        up = None
        delay = 0.05
        while not self.stop_event.is_set():
            try:
                if up is None:
                    up = self.up.clone()
                newest = up.newest_after(self.follow_from, 500)
                delay = 0.05
            except ShmStoreError:  # unreachable, or an id that does not parse: the loop finds out
                self.follower_failed = True
                self._post()
                _close_quietly(up)
                up = None
                self.stop_event.wait(delay)
                delay = min(1.0, delay * 2)
                continue
            if newest > self.engine.epoch and not self.stop_event.is_set():
                self.consumed.clear()
                self.behind = newest
                self._post()
                self.consumed.wait(1.0)
        _close_quietly(up)

    def _post(self) -> None:
        try:
            self.bell.release()
        except Exception:  # noqa: BLE001  (the channel is being closed)
            pass


def _close_quietly(up: object) -> None:
    """Close an upstream connection that may be dead already (or None)."""
    if up is None:
        return
    try:
        up.close()
    except Exception:  # noqa: BLE001  (closing a dead connection)
        pass


def _fold(snap: dict, e: object) -> None:
    """Fold one entry into a fuzzy copy of the records: each change applies only over an
    older version (the copy may already hold the entry's effect, or a later one)."""
    op = e.op
    t = type(op)
    v = e.epoch_before
    if op is None:
        return
    if t is O.Put:
        _fold_put(snap, op.key, op.value, op.expiry, v + 1)
    elif t is O.Delete:
        _fold_delete(snap, op.key, v + 1)
    elif t is O.Expire:
        for j, kb in enumerate(op.keys):
            _fold_delete(snap, kb, v + 1 + j)
    elif t is O.Batch:
        for j, b in enumerate(op.ops):
            if type(b) is O.BatchPut:
                _fold_put(snap, b.key, b.value, b.expiry, v + 1 + j)
            else:
                _fold_delete(snap, b.key, v + 1 + j)


def _fold_put(snap: dict, kb: bytes, vb: bytes, expiry: int, version: int) -> None:
    cur = snap.get(kb)
    if cur is None or cur[0] < version:
        snap[kb] = (version, expiry, vb)


def _fold_delete(snap: dict, kb: bytes, version: int) -> None:
    cur = snap.get(kb)
    if cur is not None and cur[0] < version:
        del snap[kb]


# -- the applier and the expirer of a replica ----------------------------------------------


class _Pending:
    """One client's drained frames, answered once the group's writes are settled:
    per frame ``[ticket, wait, kind, data]``, kind "up" (data: index into the group's
    upstream ops), "local" (data: ``(op, payload)``, applied after the writes) or
    "done" (data: ``(status, result)``)."""

    __slots__ = ("frames", "has_err")

    def __init__(self, frames: list, has_err: bool) -> None:
        self.frames = frames
        self.has_err = has_err


#: frames of one client settled per group; the rest wait for the next groups, so that a
#: client pipelining thousands of writes does not hold another's sync write behind one
#: huge round trip (measured with scripts/replica_bench.py: see the README)
MAX_FRAMES = 256


class ReplicaApplier(Applier):
    """The applier of a replica: writes go upstream as one round trip per group."""

    def __init__(self, *, replica: Replica, **kw: object) -> None:
        super().__init__(**kw)
        self.replica = replica
        self.ops: list[tuple] = []  # the group's upstream ops, in drain order
        #: keys this group's writes add (counted only once the store is half full)
        self.new_keys: set[bytes] = set()
        #: client -> (its session, frames taken from its ring but not settled yet)
        self.backlog: dict[int, tuple[int, list]] = {}

    def _session(self, i: int) -> int:
        r = self.replies
        return r.chan.q[r.blocks[i] // 8 + C.C_SESSION]

    def pending_backlog(self) -> list[int]:
        """Clients with frames waiting (a client whose session ended loses them: it is
        gone, and they were never acknowledged nor sent)."""
        for i, (session, _) in list(self.backlog.items()):
            if self._session(i) != session:
                del self.backlog[i]
        return list(self.backlog)

    def apply_frames(self, i: int, frames: list, has_err: bool) -> tuple[object, None]:
        back = self.backlog.pop(i, None)
        if back is not None:
            frames = back[1] + frames
        if len(frames) > MAX_FRAMES and None not in frames:
            self.backlog[i] = (self._session(i), frames[MAX_FRAMES:])
            frames = frames[:MAX_FRAMES]
        done = self.replies.done
        out = []
        for payload in frames:
            done[i] += 1
            out.append(self._prepare(done[i], payload))
        return _Pending(out, has_err), None

    def _error(self, e: ShmStoreError) -> tuple[int, list]:
        self.seg.q[L.H_ERRORS] += 1
        return C.ST_ERROR, [type(e).__name__, e.message]

    def _prepare(self, ticket: int, payload: bytes | None) -> list:
        wait = True
        try:
            op = decode_frame(payload)
            wait = bool(op.wait)
            t = type(op)
            if t in _REFUSED:
                raise ReplicaUnsupportedError(
                    "tables are not replicated: a replica store's writes are the upstream's "
                    "record ops (put, delete, compare_and_set, incr, batch)")
            if t not in _WRITES:
                return [ticket, wait, "local", (op, payload)]
            up = self._upstream_op(op)
            if up is None:
                return [ticket, wait, "done", (C.ST_OK, [])]  # an empty batch: nothing to do
            refusal = self.replica.write_refusal()
            if refusal is not None:
                raise refusal
            self.ops.append(up)
            return [ticket, wait, "up", len(self.ops) - 1]
        except ShmStoreError as e:
            return [ticket, wait, "done", self._error(e)]

    def _upstream_op(self, op: object) -> tuple | None:
        """A write as the upstream takes it, checked here as the engine would."""
        e = self.engine
        t = type(op)
        if t is not O.Delete:
            self._check_room(op)
        if t is O.Put:
            return ("put", e.check_key(op.key), e.check_value(op.value), op.expiry)
        if t is O.Delete:
            return ("delete", e.check_key(op.key))
        if t is O.Cas:
            return ("cas", e.check_key(op.key), e.check_value(op.value), op.expiry, op.version)
        if t is O.Incr:
            return ("incr", e.check_key(op.key), op.delta)
        if not op.ops:
            return None
        for b in op.ops:
            e.check_key(b.key)
            if type(b) is O.BatchPut:
                e.check_value(b.value)
        return ("batch", list(op.ops))

    def _check_room(self, op: object) -> None:
        """Refuse a write that would add records to a store already at its capacity,
        counting the group's earlier inserts (StoreFullError, as a store of its own): the
        upstream would take it, and this replica could not apply it (a stall). Room in a memory store's size classes is
        not foreseen here: a record that finds none stalls the replica (see the module
        docstring)."""
        e = self.engine
        q = self.seg.q
        pending = self.new_keys  # inserts of this group not applied yet
        if q[L.H_COUNT] + len(pending) < e.capacity - 64:
            if q[L.H_COUNT] + len(pending) >= e.capacity // 2:
                pending.update(k for k in self._keys(op) if e.find(k, L.key_hash(k))[1] < 0)
            return
        new = {k for k in self._keys(op) if k not in pending and e.find(k, L.key_hash(k))[1] < 0}
        if new and q[L.H_COUNT] + len(pending) + len(new) > e.capacity:
            raise StoreFullError(
                f"store is full: {e.capacity} records, its capacity (a replica holds the whole "
                f"dataset: serve every replica with a larger capacity=); nothing was written")

    @staticmethod
    def _keys(op: object) -> set[bytes]:
        keys = [b.key for b in op.ops if type(b) is O.BatchPut] if type(op) is O.Batch else [op.key]
        return {kb for kb in keys if isinstance(kb, bytes) and kb}

    _COUNTERS = {"put": L.H_PUTS, "delete": L.H_DELETES, "cas": L.H_CAS, "incr": L.H_INCRS, "batch": L.H_BATCHES}

    def settle(self, served: list) -> list:
        """Send the group's writes upstream, apply the stream up to them, then answer
        every client's frames in ring order."""
        ops, self.ops = self.ops, []
        self.new_keys.clear()
        results: list = []
        failure: ShmStoreError | None = None
        if ops:
            try:
                results = self.replica.submit(ops)
            except ShmStoreError as e:  # unreachable, timed out, or the upstream's data is damaged
                failure = e
        q = self.seg.q
        out = []
        for i, pending, err in served:
            if not isinstance(pending, _Pending):
                out.append((i, pending, err))
                continue
            reply = None
            err = None
            for ticket, wait, kind, data in pending.frames:
                if kind == "up":
                    if failure is not None:
                        status, result = self._error(failure)
                    else:
                        entry_id, result = results[data]
                        if isinstance(result, ShmStoreError):
                            status, result = self._error(result)
                        else:
                            status = C.ST_OK
                            q[self._COUNTERS[ops[data][0]]] += 1
                elif kind == "local":
                    op, payload = data
                    try:
                        status, result = C.ST_OK, self.apply(op, payload)
                    except ShmStoreError as e:
                        status, result = self._error(e)
                else:
                    status, result = data
                reply, err = self.answer(i, ticket, wait, status, result, reply, err, pending.has_err)
            out.append((i, reply, err))
        return out


class ReplicaExpirer(Expirer):
    """A replica's expiries are steps in the upstream (each replica may find a record due;
    the upstream removes it once, if it is still due), applied here from the stream."""

    def __init__(self, engine: object, journal: object, replica: Replica) -> None:
        super().__init__(engine, journal)
        self.replica = replica

    def purge(self, kb: bytes) -> None:  # the upstream decides liveness for writes
        pass

    def _reclaim(self, keys: list[bytes], now: int) -> None:
        r = self.replica
        if r.need_check or r.stall_reason is not None:
            return
        try:
            r.submit([("expire", kb, now) for kb in keys])
        except ShmStoreError:  # tried again at a later tick
            return
