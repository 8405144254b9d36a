"""Helpers of scripts/bench.py: the peers' servers and the child processes it runs.

Run as a script it is one of the benchmark's child processes (the parent passes only
names, paths and ints on the command line; everything else goes over pipes)::

    python scripts/_bench_peers.py echo FD
        the far end of the socketpair ping-pong floor: echo each byte until EOF
    python scripts/_bench_peers.py writer SYSTEM TARGET WORKER_ID
        one of the "writes/s from 2 client processes" clients. SYSTEM is shmstore
        (TARGET: store name), redis (TARGET: unix socket path), lmdb-nosync or
        lmdb-sync (TARGET: environment directory). It prints "ready", then for every
        "go DURATION_NS" line on stdin it does sync puts of its own keys for that long
        and prints "COUNT ELAPSED_NS"; "quit" or EOF ends it.

Imported, it provides :class:`RedisServer` (a private redis-server on a unix socket)
and :func:`open_lmdb`, shared by the parent and the writer children.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

#: Keys each writer cycles through (its own: "w<id>-<n>").
WRITER_KEYS = 1024
#: lmdb map size: far more than the benchmark writes (the file is sparse).
LMDB_MAP_SIZE = 1 << 30


def value_for(i: int) -> str:
    """The benchmark's value: a 62-character str, whose msgpack encoding is 64 bytes."""
    return f"{i:08d}".ljust(62, "v")


def open_lmdb(path: str, *, sync: bool):
    """An lmdb environment as the benchmark uses it: writemap off, sync on or off."""
    import lmdb  # noqa: PLC0415  (only the lmdb children and the parent need it)

    return lmdb.open(path, map_size=LMDB_MAP_SIZE, subdir=True, writemap=False,
                     sync=sync, metasync=sync, readahead=False, max_readers=64, lock=True)


class RedisServer:
    """A private redis-server: unix socket in ``tmpdir``, no TCP, no persistence.

    :meth:`start` returns a reason string instead of raising when redis cannot be used
    (binary missing, did not come up), so the benchmark can skip the Redis rows.
    """

    def __init__(self, tmpdir: str, binary: str = "redis-server") -> None:
        self.tmpdir = tmpdir
        self.binary = binary
        self.socket_path = os.path.join(tmpdir, "redis.sock")
        self.log_path = os.path.join(tmpdir, "redis.log")
        self.proc: subprocess.Popen | None = None
        self.version = ""

    def start(self, timeout: float = 10.0) -> str | None:
        exe = shutil.which(self.binary)
        if exe is None:
            return (f"{self.binary!r} not found on PATH; install it (Debian/Ubuntu: "
                    f"apt-get install -y redis-server) to benchmark against Redis")
        try:
            import redis  # noqa: PLC0415
        except ImportError:
            return "the redis python package is missing (pip install -e '.[bench]')"
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
            self.version = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            self.version = "unknown"
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C in the terminal does not reach it; stop() ends it.
            self.proc = subprocess.Popen(
                [exe, "--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", self.tmpdir,
                 "--databases", "1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"redis-server exited at start (code {self.proc.returncode}): {self._log_tail()}"
            if os.path.exists(self.socket_path):
                try:
                    c = redis.Redis(unix_socket_path=self.socket_path)
                    try:
                        if c.ping():
                            return None
                    finally:
                        c.close()
                except redis.exceptions.RedisError:
                    pass
            time.sleep(0.02)
        self.stop()
        return f"redis-server did not answer on {self.socket_path} within {timeout} s: {self._log_tail()}"

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-400:].decode(errors="replace").strip().replace("\n", " | ")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, then reap. Idempotent."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.proc = None


# -- child processes ---------------------------------------------------------------------


def _echo(fd: int) -> None:
    s = socket.socket(fileno=fd)
    recv, send = s.recv, s.send
    while True:
        b = recv(1)
        if not b:
            return
        send(b)


def _make_put(system: str, target: str):
    """(put(key, value), close(), key list, value) for one writer child."""
    if system == "shmstore":
        import shmstore  # noqa: PLC0415

        store = shmstore.connect(target)
        return store.put, store.close, str, value_for
    if system == "redis":
        import redis  # noqa: PLC0415

        r = redis.Redis(unix_socket_path=target)
        return r.set, r.close, str.encode, _encoded_value
    if system in ("lmdb-sync", "lmdb-nosync"):
        env = open_lmdb(target, sync=system == "lmdb-sync")

        def put(k: bytes, v: bytes) -> None:
            with env.begin(write=True) as txn:
                txn.put(k, v)

        return put, env.close, str.encode, _encoded_value
    raise SystemExit(f"unknown writer system {system!r}")


def _encoded_value(i: int) -> bytes:
    import msgspec  # noqa: PLC0415

    return msgspec.msgpack.encode(value_for(i))


def _writer(system: str, target: str, wid: int) -> None:
    put, close, key_of, val_of = _make_put(system, target)
    keys = [key_of(f"w{wid}-{n}") for n in range(WRITER_KEYS)]
    value = val_of(wid)
    clock = time.perf_counter_ns
    out = sys.stdout
    try:
        for k in keys[:64]:  # connect and create the keys before the clock runs
            put(k, value)
        out.write("ready\n")
        out.flush()
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            duration = int(cmd[1])
            count = 0
            t0 = clock()
            end = t0 + duration
            while True:
                for k in keys:
                    put(k, value)
                    count += 1
                    # One clock read per put: the same price for every system.
                    if clock() >= end:
                        break
                else:
                    continue
                break
            out.write(f"{count} {clock() - t0}\n")
            out.flush()
    finally:
        close()


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "echo":
        _echo(int(argv[1]))
    elif len(argv) >= 4 and argv[0] == "writer":
        _writer(argv[1], argv[2], int(argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (KeyboardInterrupt, BrokenPipeError):
        pass
