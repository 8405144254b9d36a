"""A private redis-server for tests: 127.0.0.1, a free port, its own temporary directory.

xdist-safe: no fixed port (a port is found by binding port 0, and the start is retried
when another process takes it first) and a unique directory per server. Whatever
happens, :meth:`RedisServer.cleanup` kills the process and removes the directory (the
``redis_server`` fixture calls it in teardown).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis

START_TIMEOUT = 10.0
PORT_TRIES = 5


def have_redis_server() -> bool:
    return shutil.which("redis-server") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process (started by :meth:`start`).

    Args:
        appendonly: run with an append-only file (``appendonly yes``).
        appendfsync: ``always`` (every write is on disk when acknowledged) or
            ``everysec``.
    """

    def __init__(self, *, appendonly: bool = False, appendfsync: str = "always") -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync {appendfsync!r}")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.dir = tempfile.mkdtemp(prefix="shmredis-")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    @property
    def socket_path(self) -> str:
        return os.path.join(self.dir, "redis.sock")

    def _args(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
            "--unixsocket", self.socket_path, "--unixsocketperm", "700",
            "--save", "", "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log"),
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
        ]

    def _launch(self) -> bool:
        """Start on ``self.port``; False when the port was taken meanwhile."""
        self.proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as c:
                    if c.ping():
                        return True
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                # ResponseError: LOADING while the AOF is read back
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {START_TIMEOUT} s; "
                           f"see {self.dir}/redis.log")

    def start(self) -> RedisServer:
        """Start on a free port (a new one per try when another process took it)."""
        for _ in range(PORT_TRIES):
            self.port = _free_port()
            if self._launch():
                return self
        raise RuntimeError(f"redis-server could not bind a free port in {PORT_TRIES} tries; "
                           f"see {self.dir}/redis.log")

    def restart(self) -> RedisServer:
        """Start again on the same port and directory (the AOF's data comes back)."""
        if self.proc is not None:
            self.stop()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._launch():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server could not bind port {self.port} again")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        """SIGTERM (Redis flushes the AOF and exits) and wait; then KILL if it hangs."""
        p = self.proc
        if p is None:
            return
        self.proc = None
        try:
            os.kill(p.pid, signal.SIGCONT)  # a frozen server cannot act on TERM
            p.terminate()
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        except ProcessLookupError:
            p.wait()

    def kill(self) -> None:
        """SIGKILL (a crash: what the AOF does not hold is lost) and reap."""
        p = self.proc
        if p is None:
            return
        self.proc = None
        p.kill()
        p.wait()

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A plain redis-py client (bytes replies), closed at cleanup."""
        c = redis.Redis.from_url(self.url, socket_timeout=5)
        self._clients.append(c)
        return c

    def cleanup(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self.proc is not None:
            self.thaw()
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
