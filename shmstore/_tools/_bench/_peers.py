"""The benchmark's peers (private redis-server and memcached servers, py-lmdb
environments, diskcache caches), its data, and the child processes it runs.

Run as a module it is one of the benchmark's child processes. The parent passes only
names, paths and ints on the command line; everything else goes over pipes::

    python shmstore/_tools/_bench/_peers.py echo FD
        the far end of the socketpair ping-pong floor: echo each byte until EOF
    python shmstore/_tools/_bench/_peers.py writer SYSTEM TARGET WORKER_ID [TAG NKEYS]
        a client doing sync puts. SYSTEM is shmstore (TARGET: store name), redis or
        memcached (TARGET: unix socket path), lmdb-nosync or lmdb-sync (TARGET:
        environment directory), diskcache (TARGET: cache directory). It writes its own
        keys ("w<id>-<n>"), or with TAG and NKEYS random keys of that data set.
    python shmstore/_tools/_bench/_peers.py reader SYSTEM TARGET TAG NKEYS
        a client doing gets of random keys of a data set (lmdb: a read txn per get,
        so it sees the writer's changes).

Writers and readers print "ready", then for every "go DURATION_NS" line on stdin work
for that long and print "COUNT ELAPSED_NS"; "quit" or EOF ends them.

    python shmstore/_tools/_bench/_peers.py memclient SYSTEM TARGET TAG NKEYS
        prints "RSS0 USS0 RSS1 USS1": its memory before connecting, and after
        connecting and reading 1,000 random keys (the per-client overhead).

The memory measure's readers are not run through this file (its imports would count):
each is a ``python -c`` of :func:`mem_reader_code`, measured from outside.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

#: Keys each writer cycles through (its own: "w<id>-<n>").
WRITER_KEYS = 1024
#: lmdb map size: far more than the benchmark writes (the file is sparse).
LMDB_MAP_SIZE = 1 << 32
#: diskcache size limit: never cull (its default, 1 GiB, would evict the 1M x 1 KiB set).
DISKCACHE_SIZE_LIMIT = 1 << 40
#: memcached item memory, MiB: room for every data set without an eviction (it grows
#: as used, it is not reserved).
MEMCACHED_MB = 4096


def value_for(i: int, nbytes: int = 64) -> str:
    """The benchmark's value: a str whose msgpack encoding is exactly ``nbytes`` bytes
    (64: a 62-character str; 1024: a 1021-character str)."""
    head = 1 if nbytes <= 32 else 2 if nbytes <= 257 else 3
    return f"{i:08d}".ljust(nbytes - head, "v")


def key_for(tag: str, i: int) -> str:
    """Key ``i`` of data set ``tag``: 9 ASCII characters, e.g. ``a:0000123``."""
    return f"{tag}:{i:07d}"


def open_lmdb(path: str, *, sync: bool):
    """An lmdb environment as the benchmark uses it: writemap off, sync on or off."""
    import lmdb  # noqa: PLC0415  (only the lmdb children and the parent need it)

    return lmdb.open(path, map_size=LMDB_MAP_SIZE, subdir=True, writemap=False,
                     sync=sync, metasync=sync, readahead=False, max_readers=128, lock=True)


def open_diskcache(path: str):
    """A diskcache ``Cache`` (SQLite in ``path``) as a Django or Flask site uses it:
    default settings but a size limit that never culls."""
    import diskcache  # noqa: PLC0415  (only the diskcache children and the parent need it)

    return diskcache.Cache(path, size_limit=DISKCACHE_SIZE_LIMIT)


def memcached_client(socket_path: str):
    """A pymemcache client on memcached's unix socket; its writes wait for the reply
    (pymemcache's default is noreply), like every other system's."""
    from pymemcache.client.base import Client  # noqa: PLC0415

    return Client(socket_path, default_noreply=False)


#: How each memory reader opens its client, as an application would: ``h`` (the
#: handle, kept), ``get`` (its get of one key) and ``enc`` (str key -> the key the
#: client takes). T is the target (store name, socket path or directory).
_MEM_OPEN = {
    "bare": "get = enc = None",
    "shmstore": "import shmstore\nh = shmstore.connect(T)\nget, enc = h.get, str",
    "lmdb": (f"import lmdb\nh = lmdb.open(T, map_size={LMDB_MAP_SIZE}, subdir=True, readahead=False, "
             f"max_readers=128, lock=True)\ntxn = h.begin()\nget, enc = txn.get, str.encode"),
    "redis": "import redis\nh = redis.Redis(unix_socket_path=T)\nget, enc = h.get, str.encode",
    "diskcache": "import diskcache\nh = diskcache.Cache(T)\nget, enc = h.get, str.encode",
    "memcached": "from pymemcache.client.base import Client\nh = Client(T)\nget, enc = h.get, str.encode",
}


def mem_reader_code(system: str) -> str:
    """``python -c`` code of a memory reader: argv TARGET TAG NKEYS; it opens its
    client, reads 1,000 keys of the data set (each must be found), prints "ready" and
    waits for EOF on stdin. ``bare`` opens nothing: the interpreter alone."""
    return "\n".join([
        "import sys",
        "T, TAG, N = sys.argv[1], sys.argv[2], int(sys.argv[3])",
        _MEM_OPEN[system],
        "for i in range(1000 if get else 0):",
        "    if get(enc(f'{TAG}:{i * 7919 % N:07d}')) is None:",  # key_for(TAG, ...)
        "        raise SystemExit(f'memory reader: no key {i * 7919 % N} of {TAG}')",
        "print('ready', flush=True)",
        "sys.stdin.read()",
    ])


def stop_process(p: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, then reap (None: nothing)."""
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


class _Server:
    """A private server process: started in its own session, stopped TERM -> KILL."""

    def __init__(self, tmpdir: str, binary: str, what: str) -> None:
        self.tmpdir = tmpdir
        self.binary = binary
        self.socket_path = os.path.join(tmpdir, f"{what}.sock")
        self.log_path = os.path.join(tmpdir, f"{what}.log")
        self.proc: subprocess.Popen | None = None
        self.version = ""

    def _version(self, exe: str, flag: str) -> None:
        try:
            out = subprocess.run([exe, flag], capture_output=True, text=True, timeout=10)
            self.version = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            self.version = "unknown"

    def _popen(self, args: list[str]) -> None:
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C in the terminal does not reach it; stop() ends it.
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-400:].decode(errors="replace").strip().replace("\n", " | ")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, then reap. Idempotent."""
        p, self.proc = self.proc, None
        stop_process(p)


class MemcachedServer(_Server):
    """A private memcached: unix socket in ``tmpdir`` (mode 0700), no TCP, no UDP.

    :meth:`start` returns a reason string instead of raising when memcached cannot be
    used, so the benchmark can skip the memcached rows.
    """

    def __init__(self, tmpdir: str, binary: str = "memcached") -> None:
        super().__init__(tmpdir, binary, "memcached")

    def start(self, timeout: float = 10.0) -> str | None:
        exe = shutil.which(self.binary)
        if exe is None:
            return (f"{self.binary!r} not found on PATH; install it (Debian/Ubuntu: "
                    f"apt-get install -y memcached) to benchmark against memcached")
        try:
            from pymemcache.exceptions import MemcacheError  # noqa: PLC0415
        except ImportError:
            return "the pymemcache python package is missing (pip install 'shmstore[bench]')"
        self._version(exe, "-V")
        args = [exe, "-s", self.socket_path, "-a", "0700", "-m", str(MEMCACHED_MB), "-U", "0"]
        if os.geteuid() == 0:
            args += ["-u", "root"]  # memcached refuses to run as root without it
        self._popen(args)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"memcached exited at start (code {self.proc.returncode}): {self._log_tail()}"
            if os.path.exists(self.socket_path):
                c = memcached_client(self.socket_path)
                try:
                    c.version()
                    return None
                except (MemcacheError, OSError):
                    pass
                finally:
                    c.close()
            time.sleep(0.02)
        self.stop()
        return f"memcached did not answer on {self.socket_path} within {timeout} s: {self._log_tail()}"


class RedisServer(_Server):
    """A private redis-server: unix socket in ``tmpdir``, no TCP, no persistence.

    :meth:`start` returns a reason string instead of raising when redis cannot be used
    (binary missing, did not come up), so the benchmark can skip the Redis rows.
    """

    def __init__(self, tmpdir: str, binary: str = "redis-server") -> None:
        super().__init__(tmpdir, binary, "redis")

    def start(self, timeout: float = 10.0) -> str | None:
        exe = shutil.which(self.binary)
        if exe is None:
            return (f"{self.binary!r} not found on PATH; install it (Debian/Ubuntu: "
                    f"apt-get install -y redis-server) to benchmark against Redis")
        try:
            import redis  # noqa: PLC0415
        except ImportError:
            return "the redis python package is missing (pip install 'shmstore[bench]')"
        self._version(exe, "--version")
        self._popen([exe, "--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700",
                     "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", self.tmpdir,
                     "--databases", "1"])
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


# -- child processes ---------------------------------------------------------------------


def _echo(fd: int) -> None:
    s = socket.socket(fileno=fd)
    recv, send = s.recv, s.send
    while True:
        b = recv(1)
        if not b:
            return
        send(b)


def _encoded(s: str) -> bytes:
    import msgspec  # noqa: PLC0415

    return msgspec.msgpack.encode(s)


def _client(system: str, target: str):
    """(put(key, value), get(key), close(), key conversion, value conversion)."""
    if system == "shmstore":
        import shmstore  # noqa: PLC0415

        store = shmstore.connect(target)
        return store.put, store.get, store.close, str, str
    if system == "redis":
        import redis  # noqa: PLC0415

        r = redis.Redis(unix_socket_path=target)
        return r.set, r.get, r.close, str.encode, _encoded
    if system in ("lmdb-sync", "lmdb-nosync", "lmdb"):
        env = open_lmdb(target, sync=system == "lmdb-sync")

        def put(k: bytes, v: bytes) -> None:
            with env.begin(write=True) as txn:
                txn.put(k, v)

        def get(k: bytes) -> bytes | None:
            with env.begin() as txn:
                return txn.get(k)

        return put, get, env.close, str.encode, _encoded
    if system == "diskcache":
        cache = open_diskcache(target)
        return cache.set, cache.get, cache.close, str.encode, _encoded
    if system == "memcached":
        mc = memcached_client(target)
        return mc.set, mc.get, mc.close, str.encode, _encoded
    raise SystemExit(f"unknown system {system!r}")


def _serve_rounds(work, out) -> None:
    """Print "ready"; run ``work(end_ns) -> count`` for each "go DURATION_NS" line."""
    clock = time.perf_counter_ns
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        t0 = clock()
        count = work(t0 + int(cmd[1]))
        out.write(f"{count} {clock() - t0}\n")
        out.flush()


def _writer(system: str, target: str, wid: int, tag: str | None, nkeys: int) -> None:
    put, _get, close, key_of, val_of = _client(system, target)
    if tag is None:
        keys = [key_of(f"w{wid}-{n}") for n in range(WRITER_KEYS)]
    else:
        rng = random.Random(wid)
        keys = [key_of(key_for(tag, rng.randrange(nkeys))) for _ in range(WRITER_KEYS)]
    value = val_of(value_for(wid))
    clock = time.perf_counter_ns
    try:
        for k in keys[:64]:  # connect and create the keys before the clock runs
            put(k, value)

        def work(end: int) -> int:
            count = 0
            while True:
                for k in keys:
                    put(k, value)
                    count += 1
                    # One clock read per put: the same price for every system.
                    if clock() >= end:
                        return count

        _serve_rounds(work, sys.stdout)
    finally:
        close()


def _reader(system: str, target: str, tag: str, nkeys: int) -> None:
    _put, get, close, key_of, _val_of = _client(system, target)
    rng = random.Random(os.getpid())
    keys = [key_of(key_for(tag, rng.randrange(nkeys))) for _ in range(4096)]
    clock = time.perf_counter_ns
    try:
        for k in keys[:64]:
            if get(k) is None:
                raise SystemExit(f"reader: {system} has no key {k!r}")

        def work(end: int) -> int:
            count = 0
            while True:
                for k in keys:
                    get(k)
                count += len(keys)
                if clock() >= end:
                    return count

        _serve_rounds(work, sys.stdout)
    finally:
        close()


def _memclient(system: str, target: str, tag: str, nkeys: int) -> None:
    import psutil  # noqa: PLC0415

    me = psutil.Process()
    m0 = me.memory_full_info()
    _put, get, close, key_of, _val_of = _client(system, target)
    rng = random.Random(7)
    for _ in range(1000):
        get(key_of(key_for(tag, rng.randrange(nkeys))))
    m1 = me.memory_full_info()
    print(f"{m0.rss} {m0.uss} {m1.rss} {m1.uss}", flush=True)
    close()


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "echo":
        _echo(int(argv[1]))
    elif len(argv) in (4, 6) and argv[0] == "writer":
        tag, nkeys = (argv[4], int(argv[5])) if len(argv) == 6 else (None, 0)
        _writer(argv[1], argv[2], int(argv[3]), tag, nkeys)
    elif len(argv) == 5 and argv[0] == "reader":
        _reader(argv[1], argv[2], argv[3], int(argv[4]))
    elif len(argv) == 5 and argv[0] == "memclient":
        _memclient(argv[1], argv[2], argv[3], int(argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (KeyboardInterrupt, BrokenPipeError):
        pass
