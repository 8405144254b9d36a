"""Counters in shared memory and Store.stats(), checked against known workloads.

The client's counters are read two ways: through stats() and straight from the words
of its client block; the coordinator's from the header. Workloads are sequential and
waited, so the expected numbers are exact (no timing is asserted).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import msgspec
import pytest

import shmstore
from shmstore import _channel as C
from shmstore import _layout as L
from shmstore._shm import open_segment
from shmstore._stats import hist_quantile
from tests.helpers.processes import python, reap, wait_for


def own_block_words(name: str, pid: int) -> dict[str, int]:
    """The counter words of ``pid``'s registered client block, read raw."""
    ch = C.open_channel(name)
    try:
        q = ch.q
        for i in range(ch.layout.max_clients):
            w = ch.layout.block(i) // 8
            if q[w + C.C_ACK] and q[w + C.C_PID] == pid:
                return {"reads": q[w + C.C_READS], "retries": q[w + C.C_READ_RETRIES],
                        "writes": q[w + C.C_WRITES], "timeouts": q[w + C.C_TIMEOUTS],
                        "timed": q[w + C.C_WRITES_TIMED], "ns": q[w + C.C_WRITE_NS],
                        "ns_max": q[w + C.C_WRITE_NS_MAX], "errors": q[w + C.C_WRITE_ERRORS]}
        raise AssertionError(f"no client block of pid {pid}")
    finally:
        ch.close()


def frame_bytes(op: list) -> int:
    """Ring bytes of one request frame: 8-byte header + payload padded to 8."""
    n = len(msgspec.msgpack.encode(op))
    return 8 + ((n + 7) & ~7)


def test_100_puts_50_gets_show_exactly_in_the_block_and_the_header(served):
    n, coord = served(capacity=500)
    with shmstore.connect(n) as s:
        for i in range(100):
            s.put(f"k{i:03d}", i)
        for i in range(50):
            assert s.get(f"k{i:03d}") == i
        st = s.stats()
        raw = own_block_words(n, os.getpid())
    assert (st.reads, st.writes, st.timeouts, st.write_errors) == (50, 100, 0, 0)
    assert (raw["reads"], raw["writes"], raw["timed"], raw["timeouts"], raw["errors"]) == (50, 100, 100, 0, 0)
    assert 0 < raw["ns_max"] <= raw["ns"] and st.write_latency_max == raw["ns_max"] / 1e9
    assert st.write_latency_avg == pytest.approx(raw["ns"] / 100 / 1e9)
    # The coordinator: 100 puts, each waited alone, so 100 groups of exactly 1 request.
    assert (st.puts, st.ops, st.frames, st.groups, st.errors) == (100, 100, 100, 100, 0)
    assert st.group_hist == [100] + [0] * (L.GROUP_HIST_BUCKETS - 1)
    assert st.queue_bytes == frame_bytes([C.OP_PUT, 1, b"k099", msgspec.msgpack.encode(99), 0])
    assert st.queue_bytes_max == st.queue_bytes
    assert st.coordinator_pid == coord.pid and st.coordinator_runs == 1
    assert st.coordinator_rss > 0 and st.coordinator_cpu_seconds >= 0 and st.coordinator_uptime > 0
    me = [c for c in st.clients if c.pid == os.getpid()]
    assert len(me) == 1 and (me[0].reads, me[0].writes) == (50, 100) and me[0].age > 0
    assert (st.total_reads, st.total_writes) == (50, 100)
    assert (st.read_cache_hits, me[0].read_cache_hits, st.total_read_cache_hits) == (0, 0, 0)


def test_pipelined_writes_fill_the_group_histogram_consistently(served):
    n, _ = served(capacity=500)
    with shmstore.connect(n) as s:
        for i in range(300):
            s.put(f"k{i}", i, wait=False)
        s.flush()
        st = s.stats()
    h = st.group_hist
    assert st.frames == 300 and st.puts == 300 and sum(h) == st.groups
    # Each group of bucket b holds 2**b .. 2**(b+1)-1 requests.
    assert sum(c << b for b, c in enumerate(h)) <= 300 <= sum(c * ((2 << b) - 1) for b, c in enumerate(h))
    assert st.queue_bytes_max >= frame_bytes([C.OP_PUT, 0, b"k299", msgspec.msgpack.encode(299), 0])
    assert st.writes == 300 and st.write_latency_avg is None  # none was waited for


def test_rates_are_per_second_since_the_previous_call(served):
    n, _ = served(capacity=100)
    with shmstore.connect(n) as s:
        first = s.stats()
        assert first.interval is None and first.ops_per_s is None
        for i in range(20):
            s.put("k", i)
        second = s.stats()
    assert second.interval > 0
    assert second.ops_per_s == pytest.approx(20 / second.interval)
    assert second.writes_per_s == pytest.approx(20 / second.interval)


CHILD = """
import os, sys, shmstore
s = shmstore.connect(sys.argv[1])
for i in range(int(sys.argv[2])):
    s.put(f"c{i}", i)
for i in range(int(sys.argv[3])):
    s.get("c0")
print("ready", flush=True)
how = sys.argv[4]
if how == "close":
    s.close()
elif how == "kill":
    os.kill(os.getpid(), 9)
else:
    sys.stdin.readline()
"""


def test_a_closed_clients_counts_are_retired_into_the_header(served):
    n, _ = served(capacity=100)
    p = python(CHILD, n, "10", "5000", "close")
    try:
        assert p.communicate(timeout=60)[0].strip() == "ready" and p.returncode == 0
    finally:
        reap(p)
    with shmstore.connect(n) as s:
        st = wait_for(lambda: (x := s.stats()).clients_reclaimed >= 1 and x, what="the block reclaimed")
        seg = open_segment(n)
        try:
            retired = (seg.q[L.H_RETIRED_READS], seg.q[L.H_RETIRED_WRITES], seg.q[L.H_RETIRED_WRITES_TIMED],
                       seg.q[L.H_RETIRED_CACHE_HITS])
        finally:
            seg.close()
    # 5000 gets of one key: the first reads the segment, the read cache answers the rest.
    assert retired == (5000, 10, 10, 4999)
    assert (st.total_reads, st.total_writes, st.clients) == (5000, 10, [])
    assert st.total_read_cache_hits == 4999
    assert st.total_write_latency_avg > 0


def test_a_sigkilled_writer_keeps_its_published_counts(served):
    n, _ = served(capacity=100)
    p = python(CHILD, n, "20", "3", "kill")
    try:
        p.communicate(timeout=60)
        assert p.returncode == -9
    finally:
        reap(p)
    with shmstore.connect(n) as s:
        st = wait_for(lambda: (x := s.stats()).clients_reclaimed >= 1 and x, what="the block reclaimed")
    # Published after every write; the 3 reads after the last write were never published.
    assert (st.total_writes, st.total_reads) == (20, 0)


def test_a_read_only_process_publishes_on_its_4096th_read(served):
    n, _ = served(capacity=100)
    with shmstore.connect(n) as s:
        s.put("c0", 0)
    p = python(CHILD, n, "0", "5000", "wait", stdin=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "ready"
        with shmstore.connect(n) as s:
            st = s.stats()
        mine = [c for c in st.clients if c.pid == p.pid]
        assert len(mine) == 1, st.clients
        assert (mine[0].reads, mine[0].writes) == (4096, 0)  # published at read 4096, not since
    finally:
        reap(p)


READER = """
import sys, shmstore
s = shmstore.connect(sys.argv[1])
for line in sys.stdin:
    for _ in range(4096):
        s.get("c0")
    print("read", flush=True)
"""


def test_a_reader_registers_again_with_a_restarted_coordinator(served):
    n, coord = served(capacity=100)
    with shmstore.connect(n) as s:
        s.put("c0", 0)
    p = python(READER, n, stdin=subprocess.PIPE)

    def read_4096() -> list:
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "read"
        with shmstore.connect(n) as s:
            return [c.reads for c in s.stats().clients if c.pid == p.pid]

    try:
        assert read_4096() == [4096]
        coord.stop()
        coord2 = shmstore.serve(n)
        try:
            assert read_4096() == [8192]  # its totals, carried into the new channel
        finally:
            coord2.stop()
    finally:
        reap(p)


def test_durability_counters_are_read_from_the_header(served):
    """The journal's words (52-95) as the durability engineer fills them: stats()
    turns them into avg/min/max/p99, the exposition into a histogram."""
    n, _ = served(capacity=100)
    seg = open_segment(n, writable=True)  # stand in for the journal: known values
    try:
        q = seg.q
        q[L.H_FSYNCS] = 100
        q[L.H_FSYNC_NS_TOTAL] = 100 * 300_000
        q[L.H_FSYNC_NS_MIN] = 90_000
        q[L.H_FSYNC_NS_MAX] = 5_000_000
        q[L.H_FSYNC_HIST + 8] = 95  # [256, 512) us
        q[L.H_FSYNC_HIST + 11] = 4  # [2048, 4096) us
        q[L.H_FSYNC_HIST + 12] = 1  # [4096, 8192) us
        q[L.H_WAL_BYTES] = 123_456
        q[L.H_CHECKPOINTS] = 3
        q[L.H_CHECKPOINT_NS_LAST] = 250_000_000
        with shmstore.connect(n) as s:
            st = s.stats()
            text = shmstore.prometheus_text(s)
    finally:
        seg.close()
    assert st.fsyncs == 100 and st.fsync_avg == pytest.approx(300e-6)
    assert (st.fsync_min, st.fsync_max) == (90e-6, 5e-3)
    assert st.fsync_p99 == pytest.approx(4096e-6)  # the bucket holding the 99th: [2048, 4096) us
    assert (st.wal_bytes, st.checkpoints, st.checkpoint_last) == (123_456, 3, 0.25)
    fams = parse_exposition(text)
    b = {s[1]["le"]: s[2] for s in fams["shmstore_fsync_duration_seconds"]["samples"]
         if s[0].endswith("_bucket")}
    assert b["0.000512"] == 95 and b["0.004096"] == 99 and b["+Inf"] == 100


def test_hist_quantile_takes_the_upper_edge_of_the_bucket():
    assert hist_quantile([0, 0, 0], 0.5, 1.0) is None
    assert hist_quantile([10, 0, 0], 0.99, 1.0) == 2
    assert hist_quantile([50, 49, 1], 0.5, 1.0) == 2
    assert hist_quantile([50, 49, 1], 0.99, 1.0) == 4
    assert hist_quantile([50, 49, 1], 1.0, 1.0) == 8


# -- the Prometheus exposition -----------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse_exposition(text: str) -> dict[str, dict]:
    """Parse the text format strictly enough to catch mistakes: every sample belongs
    to a family announced by # HELP and # TYPE before it; names and labels are valid;
    values are numbers; histogram buckets are cumulative and end in +Inf == _count."""
    assert text.endswith("\n")
    fams: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert name not in fams, f"family {name} twice"
            fams[name] = {"help": help_, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and kind in ("counter", "gauge", "histogram", "summary", "untyped")
            fams[name]["type"] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name, labels, value = m.groups()
            assert current is not None and fams[current]["type"], line
            fam = fams[current]
            base = current
            if fam["type"] == "histogram":
                assert name in (base + "_bucket", base + "_sum", base + "_count"), line
            else:
                assert name == base, line
            lab = dict(_LABEL.findall(labels or ""))
            assert "store" in lab, line
            fam["samples"].append((name, lab, float(value)))
    for name, fam in fams.items():
        assert name.startswith("shmstore_") and fam["help"] and fam["samples"], name
        if fam["type"] == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        if fam["type"] == "histogram":
            buckets = [s for s in fam["samples"] if s[0].endswith("_bucket")]
            counts = [s[2] for s in buckets]
            assert counts == sorted(counts) and buckets[-1][1]["le"] == "+Inf", name
            (count,) = [s[2] for s in fam["samples"] if s[0].endswith("_count")]
            assert counts[-1] == count, name
    return fams


def value(fams: dict, name: str, **labels: str) -> float:
    for fam in fams.values():
        for n, lab, v in fam["samples"]:
            if n == name and all(lab.get(k) == x for k, x in labels.items()):
                return v
    raise AssertionError(f"no sample {name} {labels}")


def test_prometheus_text_parses_and_matches_a_known_workload(served):
    n, coord = served(capacity=100)
    with shmstore.connect(n) as s:
        for i in range(7):
            s.put(f"k{i}", i)
        s.delete("k0")
        s.incr("n", 5)
        for _ in range(3):
            s.get("k1")  # read once, then answered twice from the read cache
        fams = parse_exposition(shmstore.prometheus_text(s))
    assert value(fams, "shmstore_up", store=n) == 1
    assert value(fams, "shmstore_records") == 7
    assert value(fams, "shmstore_requests_by_kind_total", kind="put") == 7
    assert value(fams, "shmstore_requests_by_kind_total", kind="delete") == 1
    assert value(fams, "shmstore_requests_by_kind_total", kind="incr") == 1
    assert value(fams, "shmstore_ops_applied_total") == 9
    assert value(fams, "shmstore_group_size_requests_count") == 9
    assert value(fams, "shmstore_group_size_requests_bucket", le="1.0") == 9
    assert value(fams, "shmstore_group_size_requests_sum") == 9
    assert value(fams, "shmstore_client_writes_total") == 9
    assert value(fams, "shmstore_client_reads_total") == 3
    assert value(fams, "shmstore_client_read_cache_hits_total") == 2
    assert value(fams, "shmstore_coordinator_resident_memory_bytes") > 0
    assert fams["shmstore_group_size_requests"]["type"] == "histogram"


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_metrics_app_serves_the_exposition_over_http(served):
    n, _ = served(capacity=100)
    with shmstore.connect(n) as s:
        s.put("a", 1)
        server = make_server("127.0.0.1", 0, shmstore.metrics_app(s), handler_class=_Quiet)
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            with urllib.request.urlopen(url, timeout=30) as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == shmstore.PROMETHEUS_CONTENT_TYPE
                fams = parse_exposition(r.read().decode())
            req = urllib.request.Request(url, method="POST", data=b"x")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 405
            e.value.close()
        finally:
            server.shutdown()
            server.server_close()
            t.join()
    assert value(fams, "shmstore_requests_by_kind_total", store=n, kind="put") == 1


def test_stats_prometheus_on_the_command_line_parses(served):
    n, _ = served(capacity=100)
    with shmstore.connect(n) as s:
        s.put("a", 1)
    r = subprocess.run([sys.executable, "-m", "shmstore", "stats", n, "--prometheus"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fams = parse_exposition(r.stdout)
    assert value(fams, "shmstore_records", store=n) == 1
    r = subprocess.run([sys.executable, "-m", "shmstore", "stats", n, "--prometheus", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("shmstore: error: --prometheus")


def test_a_block_taken_over_before_its_reclaim_keeps_the_old_clients_counts(served):
    """A handle that closes and another that claims the same client block at once (the
    coordinator's reclaim tick never saw the block free): the first handle's counts
    must still reach the totals (the new client used to zero them at its claim)."""
    n, _ = served(capacity=100)
    for _ in range(5):  # the takeover must beat the 0.1 s reclaim tick; retried if not
        with shmstore.connect(n) as s0:
            seg = open_segment(n)
            reclaimed = seg.q[L.H_CLIENTS_RECLAIMED]
            before = s0.stats().total_writes
        a = shmstore.connect(n)
        for i in range(10):
            a.put(f"k{i}", i)
        client = a._writer.chan.client
        a.close()
        b = shmstore.connect(n)
        try:
            b.put("b", 1)
            took_over = b._writer.chan.client == client and seg.q[L.H_CLIENTS_RECLAIMED] == reclaimed
            st = b.stats()
        finally:
            b.close()
            seg.close()
        if took_over:
            break
    assert took_over, "the coordinator reclaimed the block every time: no takeover happened"
    assert st.total_writes - before == 11, st
