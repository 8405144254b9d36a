"""The coordinator's settings table (coordinator/_config.py) and what is made from it:
serve()'s signature, the ServerConfig the child decodes, `shmstore serve`'s flags,
docs/settings.md, and the one validate() that refuses bad values before a process starts.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import psutil
import pytest

import shmstore
from shmstore import _api
from shmstore.coordinator import _config
from shmstore.coordinator._config import BY_NAME, CLI, FIELD, SERVE, SETTINGS
from tests.helpers.processes import shm_objects

ROOT = Path(__file__).resolve().parents[2]


def test_serve_signature_is_the_tables():
    params = list(inspect.signature(shmstore.serve).parameters.values())
    assert params[0].name == "name" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    keywords = params[1:]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in keywords)
    table = {s.name: s.default for s in SETTINGS if SERVE in s.where}
    assert {p.name: p.default for p in keywords} == table
    # the docstring documents every keyword
    args = shmstore.serve.__doc__.split("Args:")[1].split("Raises:")[0]
    assert [n for n in table if f"\n        {n}: " not in args] == []


def test_server_config_fields_are_the_tables():
    fields = {f.name: f for f in msgspec.structs.fields(shmstore.coordinator.ServerConfig)}
    table = [s for s in SETTINGS if FIELD in s.where]
    assert list(fields) == [s.name for s in table]
    for s in table:
        if s.name == "name":
            assert fields["name"].required
        else:
            assert fields[s.name].default == s.default, s.name
    assert shmstore.coordinator.ServerConfig is _config.ServerConfig


def test_every_setting_of_serve_and_the_struct_has_a_flag():
    """All settings that make sense on a command line: those of both serve() and the
    coordinator (not value_type, a Python type; not detach/timeout, serve()'s own;
    not the internal schema and parent fields)."""
    from shmstore._cli import build_parser

    wanted = {s.name for s in SETTINGS if FIELD in s.where and SERVE in s.where}
    assert {s.name for s in SETTINGS if CLI in s.where} == wanted
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {a.dest: a for a in serve._actions if a.option_strings}
    for n in wanted:
        assert BY_NAME[n].flag in flags[n].option_strings
        assert flags[n].default == BY_NAME[n].default, n
    args = parser.parse_args(["serve", "x"])
    assert _config.from_args(args) == _config.validate(_config.ServerConfig(name="x"))


def test_flags_reach_the_config(tmp_path):
    from shmstore._cli import build_parser

    argv = ["serve", "x", "--capacity", "10", "--key-size", "8", "--value-size", "32",
            "--max-clients", "3", "--ring-size", "8192", "--reply-size", "4096", "--spin-us", "0",
            "--path", str(tmp_path), "--sync", "periodic", "--sync-interval", "0.5",
            "--checkpoint-ops", "7", "--checkpoint-interval", "9", "--checkpoint-bytes", "100_000",
            "--checkpoint-keep", "3", "--compression", "zstd", "--encryption", "aes-256-gcm",
            "--key-file", "k"]
    config = _config.from_args(build_parser().parse_args(argv))
    assert config == _config.ServerConfig(
        name="x", capacity=10, key_size=8, value_size=32, max_clients=3, ring_size=8192,
        reply_size=4096, spin_us=0.0, path=str(tmp_path), sync="periodic", sync_interval=0.5,
        checkpoint_ops=7, checkpoint_interval=9.0, checkpoint_bytes=100_000, checkpoint_keep=3,
        compression="zstd", encryption="aes-256-gcm", key_file=os.path.abspath("k"))


def test_docs_settings_md_is_current():
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert committed == _config.markdown(), (
        "docs/settings.md is stale: python -m shmstore.coordinator._config --markdown docs/settings.md")
    for s in SETTINGS:
        if SERVE in s.where:
            assert f"| `{s.name}` |" in committed
    assert "docs/settings.md" in (ROOT / "README.md").read_text()


def test_the_settings_load_without_the_coordinator():
    code = ("import sys, shmstore; a = set(sys.modules); import shmstore.coordinator._config; "
            "print(sorted(m for m in set(sys.modules) - a if m.startswith('shmstore.coordinator')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['shmstore.coordinator',", "'shmstore.coordinator._config']"]
    # the package's names still resolve, lazily
    code = ("import sys, shmstore.coordinator as c; from shmstore.coordinator import CoordinatorServer; "
            "print('shmstore.coordinator._server' in sys.modules, sorted(c.__all__) == sorted(set(c.__all__) & set(dir(c))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_server_config_pickles_and_round_trips_as_json():
    import pickle

    config = _config.from_serve("x", capacity=5, path="d", sync_interval=1)
    assert pickle.loads(pickle.dumps(config)) == config
    assert _config.decode(msgspec.json.encode(config)) == config
    assert config.sync == "always" and config.path == os.path.abspath("d")
    assert isinstance(config.sync_interval, float) and config.parent_pid == os.getpid()
    assert _config.from_serve("x", detach=True).parent_pid == 0


BAD = [
    ("max_clients", 1.5), ("max_clients", True), ("max_clients", "64"), ("max_clients", 0),
    ("max_clients", -1), ("max_clients", None),
    ("capacity", False), ("capacity", 2.0), ("capacity", -5), ("key_size", 10**6),
    ("ring_size", 4095), ("reply_size", 1.5), ("checkpoint_ops", True), ("checkpoint_keep", 0),
    ("checkpoint_bytes", "1"),
    ("spin_us", math.nan), ("spin_us", -1.0), ("spin_us", True),
    ("sync_interval", math.nan), ("sync_interval", math.inf), ("sync_interval", 0),
    ("sync_interval", "0.1"), ("sync_interval", 10**400), ("checkpoint_interval", -math.inf),
    ("checkpoint_interval", False),
    ("timeout", math.nan), ("timeout", 0), ("timeout", True),
    ("sync", "sometimes"), ("sync", 1), ("compression", "gzip"), ("encryption", True),
    ("path", 3), ("path", ""), ("key_file", b"k"), ("detach", 1),
]


@pytest.fixture
def no_process(monkeypatch):
    """Fails the test if serve() starts a process (and checks no child appeared)."""
    started = []

    def popen(*args, **kwargs):
        started.append(args)
        raise AssertionError(f"a process was started: {args}")

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    monkeypatch.setattr(_api.subprocess, "Popen", popen)
    yield started
    assert started == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


@pytest.mark.parametrize(("setting", "value"), BAD, ids=[f"{s}={v!r:.12}" for s, v in BAD])
def test_bad_values_are_typed_errors_before_a_process_starts(names, no_process, tmp_path, setting, value):
    n = names()
    extra = {"path": tmp_path} if setting != "path" else {}
    with pytest.raises(shmstore.InvalidLayoutError) as e:
        shmstore.serve(n, **extra, **{setting: value})
    assert isinstance(e.value, ValueError) and setting in str(e.value)
    assert "must be" in str(e.value)  # says what to give instead
    assert shm_objects(n) == []
    if setting != "timeout":  # open()'s own timeout is connect()'s
        # open() checks them too, before it looks for a running coordinator
        with pytest.raises(shmstore.InvalidLayoutError):
            shmstore.open(n, **extra, **{setting: value})
        assert shm_objects(n) == []


def test_settings_that_do_not_go_together(names, no_process, tmp_path):
    n = names()
    for kwargs, needle in ((dict(sync="always"), "needs path="), (dict(sync="periodic"), "needs path="),
                           (dict(compression="zstd"), "needs path="),
                           (dict(encryption="aes-256-gcm"), "needs path="),
                           (dict(key_file=tmp_path / "k"), "needs path=")):
        with pytest.raises(shmstore.InvalidLayoutError, match=needle):
            shmstore.serve(n, **kwargs)
    with pytest.raises(TypeError, match="bogus"):
        shmstore.serve(n, bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        shmstore.open(n, bogus=1)
    with pytest.raises(shmstore.InvalidNameError):
        shmstore.serve("no/slash", max_clients=2)
    assert shm_objects(n) == []


def test_open_refuses_a_bad_setting_even_when_a_coordinator_runs(served):
    n, _ = served(capacity=10)
    with pytest.raises(shmstore.InvalidLayoutError, match="max_clients"):
        shmstore.open(n, max_clients=1.5)


def test_the_child_refuses_what_it_cannot_decode_with_a_typed_error(names):
    """A config that skipped serve() still gets the one check: the coordinator process
    writes the typed error to its ready pipe and exits, having made nothing."""
    n = names()
    for config, needle in (({"name": n, "max_clients": 1.5}, "Expected `int`"),
                           ({"name": n, "max_clients": 0}, "max_clients must be"),
                           ({"name": n, "sync": "always"}, "needs path=")):
        r, w = os.pipe()
        try:
            p = subprocess.run([sys.executable, "-m", "shmstore.coordinator", "--config",
                                msgspec.json.encode(config).decode(), "--ready-fd", str(w)],
                               pass_fds=(w,), capture_output=True, text=True, timeout=120)
        finally:
            os.close(w)
        with os.fdopen(r) as f:
            line = f.read()
        assert p.returncode == 1, p.stderr
        assert line.startswith("error InvalidLayoutError: ") and needle in line, line
        assert shm_objects(n) == []


def test_setup_checks_through_validate(names):
    from shmstore.coordinator import CoordinatorServer, ServerConfig

    n = names()
    for bad in (dict(max_clients=0), dict(ring_size=1.5), dict(reply_size=True), dict(spin_us=math.inf)):
        server = CoordinatorServer(ServerConfig(name=n, **bad))
        with pytest.raises(shmstore.InvalidLayoutError, match=next(iter(bad))):
            server.setup()
        server.close()
        assert shm_objects(n) == []


def test_read_line_tells_eof_from_timeout():
    r, w = os.pipe()
    os.write(w, b"partial")
    os.close(w)
    assert _api._read_line(r, 5.0) == "partial"  # the writer is gone: no waiting
    os.close(r)
    r, w = os.pipe()
    try:
        assert _api._read_line(r, 0.01) is None
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--max-clients", "1.5"], "--max-clients"),
    (["--sync-interval", "nan"], "--sync-interval"),
    (["--checkpoint-keep", "0"], "--checkpoint-keep"),
    (["--sync", "periodic"], "--path"),
    (["--key-file", "k"], "--path"),
])
def test_cli_refuses_bad_flags_with_usage_errors(names, argv, needle):
    n = names()
    r = subprocess.run([sys.executable, "-m", "shmstore", "serve", n, *argv], capture_output=True,
                       text=True, timeout=120)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("shmstore: error: "), r.stderr
    assert needle in lines[0], r.stderr
    assert shm_objects(n) == []
