"""The ``shmstore`` command line, end to end: every command runs as
``python -m shmstore ...`` in a subprocess against a store this test serves.

Every process a test starts is reaped in ``finally``; store names come from the
``names``/``served`` fixtures (unique per test, destroyed and leak-checked at
teardown), and the demo's own store (``demo-<pid>``) is checked separately.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import pytest

import shmstore
from tests.helpers.cli import assert_error, assert_ok, cli, popen_cli
from tests.helpers.processes import reap, shm_objects, wait_for

COMMANDS = ("serve", "get", "put", "del", "scan", "incr", "stats", "destroy", "demo", "cleanup",
            "stress", "bench", "load")


# -- help and usage --------------------------------------------------------------------


def test_top_level_help_lists_every_command():
    out = assert_ok(cli("--help"))
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", out, re.M), (command, out)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help_with_an_example(command):
    out = assert_ok(cli(command, "--help"))
    assert out.startswith(f"usage: shmstore {command}")
    assert "example:" in out and f"shmstore {command}" in out.split("example:")[1]


@pytest.mark.parametrize("argv", [
    ("frobnicate",),
    ("get",),
    ("put", "somestore", "key"),
    ("demo", "--workers", "0"),
    ("stats", "somestore", "--interval", "1"),
    ("incr", "somestore", "key", "one"),
    ("incr", "somestore", "key", str(2**64)),
])
def test_usage_errors_exit_2_with_one_line(argv):
    assert_error(cli(*argv), 2)


def test_no_command_is_a_usage_error():
    assert_error(cli(), 2, "COMMAND")


# -- the data commands -----------------------------------------------------------------


def test_put_get_incr_scan_del_round_trip(served):
    n, _ = served(capacity=100)
    v1 = int(assert_ok(cli("put", n, "user:1", '{"name": "Ada", "tags": ["x", "y"], "n": null}')))
    v2 = int(assert_ok(cli("put", n, "user:2", '"just a string"')))
    assert v2 > v1 > 0
    assert json.loads(assert_ok(cli("get", n, "user:1"))) == {"name": "Ada", "tags": ["x", "y"], "n": None}
    assert json.loads(assert_ok(cli("get", n, "user:2"))) == "just a string"

    assert assert_ok(cli("incr", n, "hits")).strip() == "1"
    assert assert_ok(cli("incr", n, "hits", "41")).strip() == "42"
    assert assert_ok(cli("incr", n, "hits", "-2")).strip() == "40"

    lines = assert_ok(cli("scan", n)).splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["hits", "user:1", "user:2"]
    assert json.loads(lines[0].split("\t", 1)[1]) == 40
    assert assert_ok(cli("scan", n, "--prefix", "user:", "--limit", "1")).splitlines() == [
        'user:1\t{"name":"Ada","tags":["x","y"],"n":null}']
    assert assert_ok(cli("scan", n, "--prefix", "nothing-here")) == ""

    assert_ok(cli("del", n, "user:2"))
    assert_error(cli("get", n, "user:2"), 1, "no key 'user:2'")
    assert_error(cli("del", n, "user:2"), 1, "no key 'user:2'")
    with shmstore.connect(n) as s:
        assert s.get("user:2") is None and s.get("hits") == 40 and len(s) == 2


def test_values_written_by_python_print_as_json(served):
    n, _ = served(capacity=10)
    with shmstore.connect(n) as s:
        s.put("blob", b"\x00\x01\xff")
        s.put("nested", {"a": [1, 2.5, True], "b": {"c": None}})
    assert json.loads(assert_ok(cli("get", n, "blob"))) == "AAH/"  # bytes as base64
    assert json.loads(assert_ok(cli("get", n, "nested"))) == {"a": [1, 2.5, True], "b": {"c": None}}


def test_a_value_that_is_not_json_is_a_usage_error_and_writes_nothing(served):
    n, _ = served(capacity=10)
    line = assert_error(cli("put", n, "k", "hello"), 2, "not valid JSON")
    assert '"hello"' in line  # says how to quote a string
    assert_error(cli("put", n, "k", "{broken"), 2, "JSON")
    assert_error(cli("put", n, "k", "[1, NaN]"), 2, "NaN")
    assert_error(cli("get", n, "k"), 1, "no key")


def test_store_errors_exit_1_with_one_clear_line(served):
    n, _ = served(capacity=10, key_size=8, value_size=64)
    assert_error(cli("put", n, "k", json.dumps("x" * 200)), 1, "value_size=64")
    assert_error(cli("put", n, "a-much-too-long-key", "1"), 1, "key_size=8")
    assert_ok(cli("put", n, "text", '"abc"'))
    assert_error(cli("incr", n, "text"), 1, "not an integer")
    assert_error(cli("get", "bad name!", "k"), 1, "invalid store name")


@pytest.mark.parametrize("argv", [
    ("get", "{}", "k"), ("put", "{}", "k", "1"), ("del", "{}", "k"), ("scan", "{}"),
    ("incr", "{}", "k"), ("stats", "{}"), ("stats", "{}", "--json"), ("destroy", "{}"),
])
def test_a_missing_store_exits_1_with_one_line(names, argv):
    n = names("missing")
    line = assert_error(cli(*(a.format(n) for a in argv)), 1, repr(n))
    assert "no store" in line
    assert shm_objects(n) == []


def test_writes_without_a_coordinator_fail_fast_but_reads_work(served):
    n, coord = served(capacity=10)
    assert_ok(cli("put", n, "k", "7"))
    coord.stop()
    assert json.loads(assert_ok(cli("get", n, "k"))) == 7
    assert_error(cli("put", n, "k", "8", "--timeout", "0.2"), 1, "no coordinator is running")
    assert "not running" in assert_ok(cli("stats", n))


# -- stats ------------------------------------------------------------------------------


def test_stats_json_matches_a_known_workload(served):
    n, coord = served(capacity=500)
    puts, distinct = 300, 40
    with shmstore.connect(n) as s:
        for i in range(puts):
            s.put(f"k{i % distinct}", {"i": i})
    assert_ok(cli("put", n, "one-more", "1"))
    st = json.loads(assert_ok(cli("stats", n, "--json")))
    assert st["ops"] >= puts + 1
    assert st["records"] == distinct + 1
    assert st["capacity"] == 500 and st["coordinator_pid"] == coord.pid and st["name"] == n
    assert st["groups"] >= 1 and st["frames"] >= st["groups"] and st["errors"] == 0
    assert not {"reads", "read_retries", "writes"} & st.keys()  # the CLI handle's own

    table = assert_ok(cli("stats", n))
    assert re.search(rf"records\s+{distinct + 1} of 500", table), table
    assert f"pid {coord.pid}" in table and "ops applied" in table


def _read_until(stream, predicate, what: str) -> list[str]:
    """Lines from ``stream`` up to the first for which ``predicate`` holds."""
    lines = []
    for line in stream:
        lines.append(line)
        if predicate(line, lines):
            return lines
    raise AssertionError(f"the stream ended before {what}: {''.join(lines)!r}")


def test_stats_watch_redraws_with_rates_until_ctrl_c(served):
    n, _ = served(capacity=100)
    p = popen_cli("stats", n, "--watch", "--interval", "0.1")
    try:
        with shmstore.connect(n) as s:
            s.put("k", 1)
        # The first redraw has no rates yet ('-'); later ones do.
        lines = _read_until(p.stdout, lambda ln, ls: ln.strip().startswith("ops/s")
                            and sum(x.strip().startswith("ops/s") for x in ls) >= 3, "three redraws")
        rates = [ln.split()[-1] for ln in lines if ln.strip().startswith("ops/s")]
        assert rates[0] == "-" and rates[1] != "-", rates
        assert sum("Ctrl-C to stop" in ln for ln in lines) >= 3
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "Traceback" not in err, err
    finally:
        reap(p)


def test_stats_watch_json_prints_one_object_per_redraw(served):
    n, _ = served(capacity=100)
    p = popen_cli("stats", n, "--watch", "--json", "--interval", "0.1")
    try:
        lines = _read_until(p.stdout, lambda ln, ls: len(ls) >= 2, "two redraws")
        first, second = (json.loads(ln) for ln in lines)
        assert first["name"] == n and "ops_per_s" not in first and second["ops_per_s"] >= 0
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
        assert p.returncode == 0
    finally:
        reap(p)


# -- destroy and serve -------------------------------------------------------------------


def test_destroy_refuses_a_served_store_then_removes_it(served):
    n, coord = served(capacity=10)
    assert_ok(cli("put", n, "k", "1"))
    assert_error(cli("destroy", n), 1, "still served", f"pid {coord.pid}")
    assert json.loads(assert_ok(cli("get", n, "k"))) == 1  # untouched
    coord.stop()
    assert shm_objects(n)
    assert assert_ok(cli("destroy", n)) == ""
    assert shm_objects(n) == []
    assert_error(cli("destroy", n), 1, "no store named")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_runs_in_the_foreground_until_a_signal(names, sig):
    n = names("serve")
    p = popen_cli("serve", n, "--capacity", "200", "--key-size", "32", "--value-size", "256",
                  "--max-clients", "8")
    try:
        def serving():
            assert p.poll() is None, f"serve exited early: {p.communicate()}"
            try:
                with shmstore.connect(n, timeout=0.5) as s:
                    return s.stats().coordinator_pid == p.pid
            except shmstore.StoreNotFoundError:
                return False

        wait_for(serving, timeout=30, what=f"`shmstore serve {n}` to serve")
        assert int(assert_ok(cli("put", n, "k", '{"v": 1}'))) > 0
        st = json.loads(assert_ok(cli("stats", n, "--json")))
        assert (st["capacity"], st["key_size"], st["value_size"]) == (200, 32, 256)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "serving store" in err and "stopped" in err and "Traceback" not in err
        # Stopped cleanly: the store stays readable, and can be destroyed.
        assert json.loads(assert_ok(cli("get", n, "k"))) == {"v": 1}
        assert_ok(cli("destroy", n))
    finally:
        reap(p)


def test_serve_refuses_a_second_coordinator(served):
    n, coord = served(capacity=10)
    assert_error(cli("serve", n), 1, "already served", str(coord.pid))
    assert coord.alive()


def test_serve_refuses_other_sizes_for_an_existing_store(served):
    n, coord = served(capacity=10)
    coord.stop()
    assert_error(cli("serve", n, "--capacity", "20"), 1, "capacity=10")


# -- demo ------------------------------------------------------------------------------------


def _demo_name(out: str) -> str:
    m = re.search(r"store '(demo-\d+)'", out)
    assert m, out
    return m.group(1)


def test_demo_runs_checks_and_leaves_nothing_behind():
    p = popen_cli("demo", "--seconds", "2", "--workers", "2", "--keys", "300")
    try:
        out, err = p.communicate(timeout=110)
        detail = f"exit {p.returncode}\nstdout:\n{out}\nstderr:\n{err}"
        assert p.returncode == 0, detail
        name = _demo_name(out)
        assert name == f"demo-{p.pid}"
        assert "reads/s" in out and "summary" in out, detail
        # Live latencies each second, percentiles in the summary.
        assert "get avg" in out and "write avg" in out, detail
        assert re.search(r"^  get latency  p50 [\d.]+ [um]s, p99 [\d.]+ [um]s, max", out, re.M), detail
        assert re.search(r"^  write        p50 [\d.]+ [um]s, p99", out, re.M), detail
        assert re.search(r"^result: OK$", out, re.M), detail
        assert "MISMATCH" not in out and "Traceback" not in err, detail
        for counter in ("hits", "misses", "writes"):
            assert re.search(rf"counter:{counter} .* OK$", out, re.M), detail
        assert shm_objects(name) == [], detail
    finally:
        reap(p)


def test_demo_interrupted_by_ctrl_c_stops_everything_and_cleans_up():
    # A session of its own: SIGINT to its process group is what a terminal's Ctrl-C does
    # (it reaches the demo, its coordinator and its workers at once).
    p = popen_cli("demo", "--seconds", "600", "--workers", "2", start_new_session=True)
    try:
        lines = _read_until(p.stdout, lambda ln, ls: re.match(r"\s+\d+\.\ds ", ln) is not None,
                            "the first live stats line")
        name = _demo_name("".join(lines))
        coord_pid = int(re.search(r"coordinator pid (\d+)", "".join(lines)).group(1))
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
        detail = f"exit {p.returncode}\nstdout:\n{out}\nstderr:\n{err}"
        assert p.returncode == 130, detail
        assert "interrupted" in out and "Traceback" not in err, detail
        assert shm_objects(name) == [], detail
        wait_for(lambda: not _alive(coord_pid), timeout=30, what="the demo's coordinator to exit")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # anything of its group still there
        except ProcessLookupError:
            pass
        reap(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_with_path_is_durable_across_a_sigkill(names, tmp_path):
    """`shmstore serve --path` journals writes: after SIGKILL and destroy(), a new
    coordinator rebuilds the acknowledged record from the data directory."""
    import signal as _signal
    import subprocess as _sp

    n = names()
    data = tmp_path / "data"
    p = _sp.Popen([sys.executable, "-m", "shmstore", "serve", n, "--capacity", "100", "--path", str(data)],
                  stdout=_sp.PIPE, stderr=_sp.PIPE, text=True)
    try:
        assert "serving store" in p.stderr.readline()
        with shmstore.connect(n) as s:
            v = s.put("k", "durable")
        p.send_signal(_signal.SIGKILL)
        p.wait()
        shmstore.destroy(n)  # the reboot case: only the directory is left
        coord = shmstore.serve(n, path=data)
        try:
            with shmstore.connect(n) as s:
                assert s.get("k") == "durable" and s.version("k") == v
        finally:
            coord.stop()
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
    r = _sp.run([sys.executable, "-m", "shmstore", "serve", names(), "--sync", "always"],
                capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--path" in r.stderr


def test_serve_encrypts_with_a_key_file_and_refuses_it_without_path(names, tmp_path):
    """`shmstore serve --path D --encryption aes-256-gcm --key-file K` seals the WAL:
    no value is on disk in the clear, and the store comes back only with the key."""
    import subprocess as _sp

    pytest.importorskip("cryptography")
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    n = names()
    data = tmp_path / "data"
    secret = "cli-secret-value-" * 3
    p = _sp.Popen([sys.executable, "-m", "shmstore", "serve", n, "--capacity", "50", "--path", str(data),
                   "--encryption", "aes-256-gcm", "--key-file", str(key)],
                  stdout=_sp.PIPE, stderr=_sp.PIPE, text=True)
    try:
        assert "serving store" in p.stderr.readline()
        with shmstore.connect(n) as s:
            s.put("k", secret)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        reap(p)
        p.stdout.close()
        p.stderr.close()
    assert all(secret.encode()[:17] not in f.read_bytes() for f in data.iterdir() if f.is_file())
    shmstore.destroy(n)
    with pytest.raises(shmstore.EncryptionKeyError):
        names.coordinators.append(shmstore.serve(n, path=data))
    coord = shmstore.serve(n, path=data, key_file=key)
    names.coordinators.append(coord)
    with shmstore.connect(n) as s:
        assert s.get("k") == secret
    r = _sp.run([sys.executable, "-m", "shmstore", "serve", names(), "--encryption", "aes-256-gcm"],
                capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--path" in r.stderr
