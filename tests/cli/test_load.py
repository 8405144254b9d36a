"""``shmstore load``: the records ``shmstore scan`` prints go back into a store (the way
a data directory of an older format is carried over: see coordinator/_durable/_formats.py)."""

from __future__ import annotations

import shmstore
from tests.helpers.cli import assert_error, assert_ok, cli

RECORDS = {
    "user:1": {"name": "Ada", "visits": 3},
    "user:2": [1, 2.5, None, True],
    "greeting": "hello\tworld",  # JSON escapes the tab: the line keeps one tab
    "count": 42,
    "ünïcode": "ü",
    "empty": "",
}


def test_scan_then_load_round_trips_every_record(served, tmp_path):
    src, _ = served("scan", capacity=1000)
    with shmstore.connect(src) as s:
        for k, v in RECORDS.items():
            s.put(k, v)
        for i in range(300):  # more than one batch (LOAD_BATCH = 256)
            s.put(f"n{i:03d}", {"i": i, "pad": "x" * (i % 7)})
    dump = tmp_path / "records"
    dump.write_text(assert_ok(cli("scan", src)), encoding="utf-8")
    assert len(dump.read_text(encoding="utf-8").splitlines()) == len(RECORDS) + 300
    dst, _ = served("load", capacity=1000, memory=4 << 20)
    out = assert_ok(cli("load", dst, str(dump)))
    assert out.strip() == str(len(RECORDS) + 300)
    with shmstore.connect(dst) as d, shmstore.connect(src) as s:
        assert dict(d.items()) == dict(s.items())
    # and the dump of the copy is the dump of the original, line for line
    assert assert_ok(cli("scan", dst)) == dump.read_text(encoding="utf-8")


def test_a_bad_line_is_named_and_nothing_is_written(served, tmp_path):
    n, _ = served("bad", capacity=100)
    for body, needle in (
        ("a\t1\nb 2\n", ":2: not a 'KEY<tab>JSON' line"),
        ("a\t1\nb\t{nope\n", ":2: the value is not JSON"),
        ("a\t1\n\n\t3\n", ":3: the key is empty"),
    ):
        f = tmp_path / "bad"
        f.write_text(body)
        assert_error(cli("load", n, str(f)), 1, needle)
    with shmstore.connect(n) as s:
        assert list(s.keys()) == []  # every line is checked before the first batch is sent


def test_a_record_the_store_refuses_names_its_line(served, tmp_path):
    n, _ = served("small", capacity=100, key_size=8, value_size=32)
    f = tmp_path / "recs"
    f.write_text("short\t1\nmuch-too-long-key\t2\n")
    line = assert_error(cli("load", n, str(f)), 1, ":2:")
    assert "key_size" in line
    f.write_text("a\t1\nb\t\"" + "x" * 100 + "\"\n")
    assert_error(cli("load", n, str(f)), 1, ":2:", "value_size")


def test_load_reads_standard_input(served):
    import subprocess
    import sys

    n, _ = served("stdin", capacity=100)
    r = subprocess.run([sys.executable, "-m", "shmstore", "load", n, "-"], input="a\t1\nb\t[2]\n",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr
    with shmstore.connect(n) as s:
        assert dict(s.items()) == {b"a": 1, b"b": [2]}
