"""Fuzzing the coordinator's untrusted inputs (issue 13): client frames and data files.

1. Frames. Hypothesis builds valid frames of every op a client may send, mutates them
   (a field replaced by any msgpack value, fields dropped or added, the op code
   changed, bytes flipped, cut, inserted, spliced), adds random msgpack and deep
   nesting, and now and then writes impossible ring words (HEAD, a length word, a
   padding mark). All of it goes through :class:`RawClient` into a live durable
   coordinator while a well-behaved client keeps writing and reading back its own
   keys in a thread. Checked: the coordinator never dies, the good client's every
   write succeeds and reads back, during and after; then the coordinator is SIGKILLed,
   its segment destroyed, and the store rebuilt from its WAL (which now holds every
   fuzzed op that was accepted): every acknowledged write of the good client is there.
2. Files. A small data directory (records, a checkpoint, a table, WAL after it) is
   mutated at random: bit flips, cuts, appended garbage, WAL records forged with a
   valid checksum (their payloads from the frame strategies), checkpoint and manifest
   fields forged with a valid checksum. ``check()`` and recovery (the coordinator's
   own start-up, in this process, and ``serve(path=...)`` for some) may only return
   or raise a ``ShmStoreError``; a recovered segment must pass ``check()``.

Budgets: ``FUZZ_FRAMES_S`` / ``FUZZ_FILES_S`` seconds in the default run (about 35 s
together), ``SLOW_FACTOR`` times that under ``-m slow``; ``SHMSTORE_FUZZ_SECONDS``
overrides the total. Each test prints how many cases ran (visible with ``-s``) and
puts the count in its assertion messages. Hypothesis prints how to reproduce a failure.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
import zlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmstore
from shmstore import _channel as C
from shmstore import _layout as L
from shmstore.coordinator import _ops as O
from shmstore.coordinator._config import from_serve
from shmstore.coordinator._server import CoordinatorServer
from tests.helpers.rawclient import RawClient, append_wal_record, encode, nested_array, wal_chain_end, wal_files

FUZZ_FRAMES_S = 20.0
FUZZ_FILES_S = 15.0
SLOW_FACTOR = 20
GOOD = b"g:"  # the well-behaved client's keys; fuzzed ops never touch them

# -- strategies --------------------------------------------------------------------------

ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, -1, 2**63, 2**64 - 1, -(2**63)]))
keys = st.one_of(st.binary(min_size=0, max_size=80), st.sampled_from([b"a", b"b", b"k1", b"x" * 64]))
values = st.one_of(st.binary(max_size=300), st.integers(0, 1000).map(encode))
expiries = st.one_of(st.just(0), ints, st.floats(allow_nan=True), st.integers(1, 2**62))
waits = st.one_of(st.sampled_from([0, 1, True, False]), ints)
leaves = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.binary(max_size=40), st.text(max_size=20))
any_msgpack = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-100, 100)), inner, max_size=4)),
    max_leaves=30)
batch_ops = st.lists(st.one_of(
    st.tuples(st.just(C.OP_PUT), keys, values).map(list),
    st.tuples(st.just(C.OP_PUT), keys, values, expiries).map(list),
    st.tuples(st.just(C.OP_DELETE), keys).map(list)), max_size=12)
dtypes = st.sampled_from(["'<f8'", "'<i4'", "[('a', '<f4'), ('b', '<i8')]", "'|V0'", "'O'", "((", "'<f8', (3,)"])
tables = st.sampled_from(["t0", "t1", "bad name", ""])

valid_frames = st.one_of(
    st.tuples(st.just(C.OP_PUT), waits, keys, values, expiries),
    st.tuples(st.just(C.OP_DELETE), waits, keys),
    st.tuples(st.just(C.OP_CAS), waits, keys, values, ints, expiries),
    st.tuples(st.just(C.OP_INCR), waits, keys, ints),
    st.tuples(st.just(C.OP_BATCH), waits, batch_ops),
    st.tuples(st.just(C.OP_GET_MANY), waits, st.lists(keys, max_size=10)),
    st.tuples(st.sampled_from([C.OP_PING, C.OP_CHECKPOINT, C.OP_SNAPSHOT]), waits),
    st.tuples(st.just(C.OP_BACKUP), waits, st.text(max_size=10)),
    st.tuples(st.just(C.OP_EXPIRE), waits, st.lists(keys, max_size=4), ints),
    st.tuples(st.just(C.OP_TABLE_CREATE), waits, tables, dtypes, st.integers(-2, 70)),
    st.tuples(st.just(C.OP_TABLE_WRITE), waits, tables, st.binary(max_size=64), st.binary(max_size=64)),
    st.tuples(st.just(C.OP_TABLE_READ), waits, tables),
    st.tuples(st.integers(0, 40), waits),
).map(list)


@st.composite
def field_mutants(draw) -> list:
    """A valid frame with its fields changed: replaced, dropped, added, or the op code."""
    op = draw(valid_frames)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["replace", "drop", "add", "opcode"]))
        if how == "replace":
            op[draw(st.integers(0, len(op) - 1))] = draw(any_msgpack)
        elif how == "drop" and len(op) > 1:
            del op[draw(st.integers(0, len(op) - 1))]
        elif how == "add":
            op.insert(draw(st.integers(0, len(op))), draw(any_msgpack))
        else:
            op[0] = draw(st.one_of(st.integers(0, 40), ints))
    return op


@st.composite
def byte_mutants(draw, base) -> bytes:
    """Bytes of ``base`` with bytes flipped, cut, inserted or spliced."""
    b = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
        if how == "flip" and b:
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
        elif how == "cut" and b:
            i = draw(st.integers(0, len(b) - 1))
            del b[i : i + draw(st.integers(1, 16))]
        elif how == "insert":
            b[draw(st.integers(0, len(b))):0] = draw(st.binary(min_size=1, max_size=9))
        elif how == "splice":
            b += draw(st.binary(max_size=20))
    return bytes(b)


class Deep:
    """A deeply nested payload, made on demand (its repr stays short for hypothesis)."""

    def __init__(self, depth_and_kind: tuple[int, str]) -> None:
        self.depth, self.kind = depth_and_kind

    def __repr__(self) -> str:
        return f"Deep({self.depth}, {self.kind!r})"

    def __bytes__(self) -> bytes:
        if self.kind == "array":
            return nested_array(self.depth)
        if self.kind == "map":
            return b"\x81\xc0" * self.depth + b"\xc0"
        return bytes([0x93, C.OP_BATCH, 1]) + nested_array(self.depth)  # a batch of deep junk


encoded_valid = valid_frames.map(encode)
payloads = st.one_of(
    encoded_valid,
    field_mutants().map(encode),
    byte_mutants(encoded_valid),
    any_msgpack.map(encode),
    st.binary(max_size=64),
    st.tuples(st.sampled_from([10, 1000, 200_000]), st.sampled_from(["array", "map", "batch"])).map(Deep),
)


def _budget(default: float, slow: bool) -> float:
    total = os.environ.get("SHMSTORE_FUZZ_SECONDS")
    if total:
        return float(total) * default / (FUZZ_FRAMES_S + FUZZ_FILES_S)
    return default * (SLOW_FACTOR if slow else 1)


# -- 1. frames at a live coordinator -----------------------------------------------------------


class Tamer:
    """Keeps fuzzed frames from doing harm outside the store under test: a frame that
    decodes to an op that would touch the good client's keys, write a backup outside
    the test's directory or make a large table becomes a ping (the frame's *shape*
    is still fuzzed: it only changes what a valid op does)."""

    PING = encode([C.OP_PING, 1])

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.backups = 0

    def __call__(self, payload: bytes) -> bytes:
        try:
            op = O.decode_request(payload)
        except msgspec.DecodeError:
            return payload  # refused by the coordinator as it is
        t = type(op)
        ks = []
        if t in (O.Put, O.Delete, O.Cas, O.Incr):
            ks = [op.key]
        elif t is O.Batch:
            ks = [b.key for b in op.ops]
        if any(k.startswith(GOOD) for k in ks):
            return self.PING
        if t is O.Backup:
            self.backups += 1
            if self.backups > 5:
                return self.PING
            return encode([C.OP_BACKUP, op.wait, os.path.join(self.tmp, f"backup{self.backups}")])
        if t is O.TableCreate and op.rows > 64:
            return self.PING
        return payload


class GoodClient(threading.Thread):
    """A well-behaved client: updates its keys and reads each write back, until stopped."""

    NKEYS = 8

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.name = name
        self.stop = threading.Event()
        self.acked: dict[str, int] = {}
        self.errors: list[str] = []
        self.writes = 0

    def run(self) -> None:
        try:
            with shmstore.connect(self.name, read_cache=0) as s:
                i = 0
                while not self.stop.is_set():
                    k = f"{GOOD.decode()}{i % self.NKEYS}"
                    s.put(k, i, timeout=20)
                    self.acked[k] = i
                    got = s.get(k)
                    if got != i:
                        self.errors.append(f"{k}: wrote {i}, read back {got!r}")
                        return
                    i += 1
                    self.writes += 1
                    time.sleep(0.001)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.errors.append(f"{type(e).__name__}: {e}")


class RingAttack:
    """Impossible ring words: what a client can do besides publishing frames."""

    kinds = st.one_of(
        st.tuples(st.just("head"), st.sampled_from([2**50, 2**64 - 1, -8, +4, +1, 1 << 20])),
        st.tuples(st.just("length"), st.sampled_from([0xFFFFFFFE, 1 << 20, 1 << 30, 7])),
        st.tuples(st.just("pad"), st.sampled_from([0, 8])),
        st.tuples(st.just("zeroword"), st.integers(1, 2**32 - 1)),
    )

    @staticmethod
    def apply(raw: RawClient, kind: str, arg: int) -> None:
        ch = raw.ch
        q = ch.chan.q
        mv = ch.chan.mv
        head = ch.head
        off = head % ch.ring_size
        if kind == "head":
            raw.set_head((2**64 + head + arg) % 2**64 if arg in (-8, 4, 1) else arg)
        elif kind == "length":
            struct.pack_into("<II", mv, ch.ring_ofs + off, arg, 0)
            q[ch.w + C.C_HEAD] = head + 16
        elif kind == "pad":  # a padding mark at offset 0 (a whole ring), or one past HEAD
            struct.pack_into("<I", mv, ch.ring_ofs + off, C.PAD_MARK)
            q[ch.w + C.C_HEAD] = head + (arg or ch.ring_size - off)
        else:
            payload = encode([C.OP_PING, 1])
            struct.pack_into("<II", mv, ch.ring_ofs + off, len(payload), arg)
            mv[ch.ring_ofs + off + 8 : ch.ring_ofs + off + 8 + len(payload)] = payload
            q[ch.w + C.C_HEAD] = head + 8 + ((len(payload) + 7) & ~7)
        raw.ring()


def _fuzz_frames(names, tmp_path, seconds: float) -> None:
    n = names("fuzzf")
    data = tmp_path / "data"
    coord = shmstore.serve(n, path=data, capacity=512, sync="always", ring_size=1 << 20,  # >= 2x the largest payload (see the report: publish)
                           reply_size=16 * 1024, max_clients=8)
    names.coordinators.append(coord)
    tame = Tamer(str(tmp_path))
    counts = {"frames": 0, "refused": 0, "ring_attacks": 0, "channels_closed": 0, "rounds": 0}
    good = GoodClient(n)
    raw = [None]
    deadline = time.monotonic() + seconds

    def reconnect() -> RawClient:
        try:
            return RawClient(n)
        except shmstore.ShmStoreError as e:
            ch = C.open_channel(n)
            try:
                words = [(i, [ch.q[ch.layout.block(i) // 8 + w] for w in (C.C_SESSION, C.C_ACK, C.C_HEAD, C.C_TAIL)])
                         for i in range(ch.layout.max_clients)]
            finally:
                ch.close()
            raise AssertionError(f"a new client was not registered ({e}); coordinator alive: "
                                 f"{coord.alive()}; blocks [session, ack, head, tail]: {words}; "
                                 f"after {counts}") from None

    def send(payload: bytes) -> None:
        r = raw[0]
        payload = bytes(payload)
        ticket = r.send(tame(payload), timeout=20)
        t_end = time.monotonic() + 30
        while r.done() < ticket and not r.channel_closed():
            assert coord.alive(), f"the coordinator died (exit {coord.returncode}) after {counts}"
            assert time.monotonic() < t_end, f"no answer to a frame within 30 s after {counts}: {payload[:80]!r}"
            time.sleep(0.0005)
        counts["frames"] += 1
        if r.channel_closed():
            counts["channels_closed"] += 1
            r.close()
            raw[0] = reconnect()

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(st.lists(payloads, min_size=1, max_size=20), st.one_of(st.none(), st.none(), st.none(), RingAttack.kinds))
    def round_(frames: list[bytes], attack) -> None:
        counts["rounds"] += 1
        for p in frames:
            send(p)
        if attack is not None:
            raw[0].close()
            r = raw[0] = reconnect()  # a fresh ring: HEAD 0, the next frame at offset 0
            RingAttack.apply(r, *attack)
            counts["ring_attacks"] += 1
            t_end = time.monotonic() + 30
            while not r.channel_closed() and r.done() < r.ch.ticket + 1:
                assert coord.alive(), f"the coordinator died (exit {coord.returncode}) of ring words {attack}"
                assert time.monotonic() < t_end, f"ring words {attack} were neither served nor refused"
                time.sleep(0.001)
            r.close()  # its ring is out of step with its own count now: start over
            raw[0] = reconnect()
        assert coord.alive(), f"the coordinator died (exit {coord.returncode}) after {counts}"
        assert not good.errors, f"the good client failed after {counts}: {good.errors}"

    raw[0] = reconnect()
    t0 = time.monotonic()
    good.start()
    try:
        while time.monotonic() < deadline:
            round_()
    finally:
        good.stop.set()
        good.join(60)
    elapsed = time.monotonic() - t0
    counts["refused"] = raw[0].seg.q[L.H_ERRORS]  # errors replied, the good client's none
    summary = (f"frame fuzz: {counts['frames']} frames in {counts['rounds']} rounds "
               f"({counts['refused']} refused, {counts['ring_attacks']} ring attacks, "
               f"{counts['channels_closed']} channels closed) in {elapsed:.1f} s; "
               f"good client: {good.writes} writes read back")
    print(summary)
    raw[0].close()
    assert not good.errors and good.writes > 0, f"{summary}: {good.errors}"
    assert coord.alive(), f"{summary}: the coordinator died (exit {coord.returncode})"
    with shmstore.connect(n, read_cache=0) as s:
        s.put("after", 1, timeout=10)
        assert s.get("after") == 1
        assert all(s.get(k) == v for k, v in good.acked.items()), summary
    # Nothing acknowledged is lost: rebuild from the WAL that logged every accepted op.
    coord.kill()
    shmstore.destroy(n)
    coord2 = shmstore.serve(n, path=data, timeout=60)
    names.coordinators.append(coord2)
    with shmstore.connect(n, read_cache=0) as s:
        lost = {k: (v, s.get(k)) for k, v in good.acked.items() if s.get(k) != v}
        assert not lost and s.get("after") == 1, f"{summary}; lost after the rebuild: {lost}"
    report = shmstore.check(name=n)
    assert report.ok, f"{summary}; the rebuilt segment: {report}"


@pytest.mark.timeout(180)
def test_fuzzed_frames_never_stop_the_coordinator(names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fuzzed relative path lands here (the coordinator's cwd)
    _fuzz_frames(names, tmp_path, _budget(FUZZ_FRAMES_S, slow=False))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzzed_frames_never_stop_the_coordinator_long(names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fuzz_frames(names, tmp_path, _budget(FUZZ_FRAMES_S, slow=True))


# -- 2. mutated data files at recovery and check() ---------------------------------------------


def _make_data_dir(names, d) -> tuple[str, dict]:
    """A small durable store: records, a table, a checkpoint, WAL after it (killed)."""
    n = names("fuzzd")
    coord = shmstore.serve(n, path=d, capacity=64, sync="always")
    want = {}
    try:
        with shmstore.connect(n) as s:
            for i in range(20):
                s.put(f"a{i}", i, ttl=3600 if i % 5 == 0 else None)
                want[f"a{i}"] = i
            t = s.table("t0", dtype="<f8", rows=8)
            t.write([1, 2], [1.5, 2.5])
            s.checkpoint()
            for i in range(10):
                s.put(f"b{i}", [i])
                want[f"b{i}"] = [i]
            with s.batch() as b:
                b.put("c", 3)
                b.delete("a1")
            want["c"] = 3
            del want["a1"]
            s.incr("n", 5)
            want["n"] = 5
            s.delete("a2")
            del want["a2"]
    finally:
        coord.kill()
    shmstore.destroy(n)
    return n, want


def _recrc_ckpt(b: bytearray) -> None:
    if len(b) >= 80:
        struct.pack_into("<I", b, 76, zlib.crc32(bytes(b[:76])))


def _recrc_wal_header(b: bytearray) -> None:
    if len(b) >= 64:
        struct.pack_into("<I", b, 60, zlib.crc32(bytes(b[:60])))


def _recrc_manifest(b: bytearray) -> bytearray:
    lines = bytes(b).split(b"\n")
    body = lines[0]
    return bytearray(body + b"\n" + f"crc32:{zlib.crc32(body):08x}".encode() + b"\n")


file_mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**20), st.just(0)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64), st.just(0)),
    st.tuples(st.just("forge_header"), st.integers(8, 75), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("forge_manifest"), st.sampled_from(["capacity", "key_size", "value_size", "name",
                                                          "layout_fp", "schema_fp", "format"]),
              st.one_of(ints, st.text(max_size=12), st.none(), st.lists(st.integers(), max_size=2))),
)


def _mutate_file(path: str, how: str, a, b) -> str:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    name = os.path.basename(path)
    if how == "flip" and data:
        data[a % len(data)] ^= b
    elif how == "cut":
        del data[a % (len(data) + 1):]
    elif how == "append":
        data += a
    elif how == "forge_header":
        if name.endswith(".ckpt") and len(data) >= 80:
            o = min(a, 68) & ~7 if a >= 16 else 8
            struct.pack_into("<Q", data, o, b) if o + 8 <= 76 else None
            _recrc_ckpt(data)
        elif name.endswith(".wal") and len(data) >= 64:
            o = min(a, 48) & ~7 if a >= 16 else 8
            struct.pack_into("<Q", data, o, b)
            _recrc_wal_header(data)
        else:
            data[a % max(len(data), 1):] = data[a % max(len(data), 1):]
    elif how == "forge_manifest" and name == "MANIFEST":
        try:
            m = msgspec.json.decode(bytes(data).split(b"\n")[0])
            m[a] = b
            data = bytearray(msgspec.json.encode(m))
        except (msgspec.DecodeError, TypeError):
            pass
        data = _recrc_manifest(data)
    with open(path, "wb") as f:
        f.write(data)
    return f"{how} {name}"


def _recover(name: str, d: str) -> str:
    """The coordinator's start-up on ``d``, in this process: 'ok' or the error's type.

    Anything but a ShmStoreError propagates (and fails the test)."""
    server = CoordinatorServer(from_serve(name, path=d))
    try:
        server.setup()
        report = shmstore.check(name=name)
        assert report.ok, f"a segment recovered from {d} fails check(): {report}"
    except shmstore.ShmStoreError as e:
        return type(e).__name__
    finally:
        server.close()
        try:
            shmstore.destroy(name)
        except shmstore.ShmStoreError:
            pass
    return "ok"


def _fuzz_files(names, tmp_path, seconds: float) -> None:
    pristine = str(tmp_path / "pristine")
    n, want = _make_data_dir(names, pristine)
    counts: dict[str, int] = {}
    t0 = time.monotonic()
    deadline = t0 + seconds
    work = str(tmp_path / "work")

    # The unmutated directory recovers everything acknowledged (a control).
    shutil.copytree(pristine, work)
    coord = shmstore.serve(n, path=work, timeout=60)
    names.coordinators.append(coord)
    with shmstore.connect(n, read_cache=0) as s:
        assert {k: s.get(k) for k in want} == want
    coord.stop(timeout=10)
    shmstore.destroy(n)

    @settings(max_examples=15, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def case(data) -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        files = sorted(os.listdir(work))
        files = [f for f in files if f != "LOCK"]
        what = []
        if data.draw(st.booleans(), label="forge a WAL record"):
            payload = bytes(data.draw(payloads, label="record payload"))
            wal = data.draw(st.sampled_from(wal_files(work) + [wal_chain_end(work)]))
            off = append_wal_record(wal, payload)
            what.append(f"forged record at {os.path.basename(wal)}:{off} {payload[:40]!r}")
        for _ in range(data.draw(st.integers(0 if what else 1, 3))):
            f = data.draw(st.sampled_from(files), label="file")
            how, a, b = data.draw(file_mutations, label="mutation")
            what.append(_mutate_file(os.path.join(work, f), how, a, b))
        try:
            report = shmstore.check(path=work)
        except shmstore.ShmStoreError as e:
            report = e
        except BaseException as e:
            raise AssertionError(f"check() raised {type(e).__name__}: {e} after {what}") from e
        use_serve = data.draw(st.integers(0, 9), label="through serve()") == 0
        if use_serve:
            try:
                c = shmstore.serve(n, path=work, timeout=60)
                c.stop(timeout=10)
                outcome = "ok"
            except shmstore.ShmStoreError as e:
                outcome = type(e).__name__
            try:
                shmstore.destroy(n)
            except shmstore.ShmStoreError:
                pass
        else:
            try:
                outcome = _recover(n, work)
            except BaseException as e:
                raise AssertionError(f"recovery raised {type(e).__name__}: {e} after {what}") from e
        counts[outcome] = counts.get(outcome, 0) + 1
        counts["check_clean"] = counts.get("check_clean", 0) + (getattr(report, "ok", False) is True)
        counts["cases"] = counts.get("cases", 0) + 1
        counts["via_serve"] = counts.get("via_serve", 0) + use_serve

    while time.monotonic() < deadline:
        case()
    summary = f"file fuzz: {counts.get('cases', 0)} mutated directories in {time.monotonic() - t0:.1f} s: {counts}"
    print(summary)
    assert counts.get("cases", 0) > 0, summary


@pytest.mark.timeout(180)
def test_fuzzed_data_files_give_typed_errors_or_a_clean_start(names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fuzz_files(names, tmp_path, _budget(FUZZ_FILES_S, slow=False))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzzed_data_files_give_typed_errors_or_a_clean_start_long(names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fuzz_files(names, tmp_path, _budget(FUZZ_FILES_S, slow=True))


# -- regressions the fuzz found ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_incr_of_a_raw_non_msgpack_value_is_a_typed_error(served):
    """Found by the frame fuzz: a raw put stores bytes that are not msgpack; an incr of
    that key then killed the coordinator (raw msgspec.DecodeError)."""
    n, coord = served("incrraw", capacity=10)
    with RawClient(n) as raw:
        assert raw.request(encode([C.OP_PUT, 1, b"k", b"\xde", 0]))[0] == C.ST_OK
        status, result = raw.request(encode([C.OP_INCR, 1, b"k", 1]))
        assert status == C.ST_ERROR and result[0] == "ValueEncodingError", result
    assert coord.alive(), f"the coordinator died (exit {coord.returncode})"


@pytest.mark.timeout(90)
def test_an_empty_batch_does_not_break_the_logs_epoch_order(names, tmp_path):
    """Found by the frame fuzz: an empty batch frame was logged with the same epoch as
    the next record, and recovery refused the WAL ("not from one history")."""
    n = names("emptyb")
    d = tmp_path / "data"
    coord = shmstore.serve(n, path=d, capacity=10, sync="always")
    try:
        with RawClient(n) as raw:
            assert raw.request(encode([C.OP_BATCH, 1, []]))[0] == C.ST_OK
        with shmstore.connect(n) as s:
            s.put("a", 1)
    finally:
        coord.kill()
    shmstore.destroy(n)
    coord2 = shmstore.serve(n, path=d, timeout=30)
    names.coordinators.append(coord2)
    with shmstore.connect(n) as s:
        assert s.get("a") == 1
