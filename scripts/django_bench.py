#!/usr/bin/env python3
"""Requests/s of a Django view that reads 20 cached fragments, under Gunicorn, per cache.

The app is ``examples/django_app`` (its ``/fragments`` view: one ``cache.get`` per
fragment, as Django's ``{% cache %}`` tag does) served by ``gunicorn -w 4``, once for
each cache backend, all in the same run on the same machine:

- ``shmstore``: ``shmstore.django.ShmStoreCache``, its coordinator started by the
  Gunicorn hooks in the example's gunicorn.conf.py;
- ``locmem``: Django's ``LocMemCache`` (a private copy per worker);
- ``redis``: Django's ``RedisCache`` on a private ``redis-server`` this script starts
  (unix socket in a temporary directory, no persistence) and stops at the end;
- ``diskcache``: ``diskcache.DjangoCache`` in a temporary directory.

Every server is started first and warmed (requests until a round of them renders no
fragment: every worker's cache holds all 20, LocMemCache's four copies included); then
the load generator (``--clients`` processes, each one ``http.client`` connection, kept
alive where the server allows it: Gunicorn's sync workers close it after each
response) sends ``--requests`` GETs to each server in turn, ``--rounds`` times with
the backends interleaved, and measures wall time. Reported per backend: requests/s (the
median round), p50/p99 latency over all rounds, the time the view spent in the cache
(p50 of the view's own ``X-Cache-Time-Us`` header: the 20 gets), and cache misses
while measuring (0: the caches were warm). Nothing here asserts a speed.

    python scripts/django_bench.py                      # Markdown table
    python scripts/django_bench.py --json               # JSON instead
    python scripts/django_bench.py --backends shmstore,locmem --requests 2000 --rounds 1

Needs ``pip install -e '.[dev]'`` (Django, Gunicorn, redis, diskcache) and
``redis-server`` on PATH; a backend that cannot run is skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import multiprocessing
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "examples" / "django_app"
CONF = APP_DIR / "gunicorn.conf.py"
BACKENDS = ("shmstore", "locmem", "redis", "diskcache")
#: The view the benchmark measures.
PATH = "/fragments"
#: The shmstore store's name starts with this and the script's pid (destroyed at the end).
STORE_PREFIX = "djbench-"
#: Warm-up rounds at most (each: 8 requests per worker) before measuring anyway.
WARM_ROUNDS = 20


# -- the app under gunicorn ----------------------------------------------------------


class AppServer:
    """The example Django app served by ``python -m gunicorn`` in a child process.

    ``start()`` binds 127.0.0.1 port 0 (the kernel picks a free port; the port is read
    from gunicorn's log) and waits until the app answers; ``stop()`` sends SIGTERM to
    the master (it stops its workers, then its hooks stop the shmstore coordinator),
    then SIGKILL to the master's process group if it is still there, and reaps it.
    Usable as a context manager; ``stop()`` is idempotent.
    """

    def __init__(self, backend: str, location: str, log_path: str | os.PathLike, *,
                 workers: int = 4, worker_class: str = "sync",
                 env: dict[str, str] | None = None) -> None:
        self.backend = backend
        self.location = location
        self.log_path = Path(log_path)
        self.workers = workers
        self.worker_class = worker_class
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 90.0) -> None:
        """Launch gunicorn and wait until the app answers."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start gunicorn without waiting (:meth:`wait_ready` waits)."""
        env = {**os.environ, **self.env, "DJANGO_APP_CACHE": self.backend,
               "DJANGO_APP_CACHE_LOCATION": self.location}
        env.pop("DJANGO_SETTINGS_MODULE", None)  # the example's own, from gunicorn.conf.py
        args = [sys.executable, "-m", "gunicorn", "-c", str(CONF), "-b", "127.0.0.1:0",
                "-w", str(self.workers), "-k", self.worker_class]
        if self.worker_class == "gthread":
            args += ["--threads", "2"]
        with open(self.log_path, "wb") as log:
            # Its own session: a Ctrl-C in the terminal reaches only this script, which
            # then stops the server the ordinary way (SIGTERM to the master).
            self.proc = subprocess.Popen(args, cwd=self.log_path.parent, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until gunicorn listens and the app answers a request.

        Raises:
            RuntimeError: gunicorn exited, or did not answer within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while not self.port:
            self._check_alive()
            m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+) ", self.log_tail(1 << 20))
            if m:
                self.port = int(m.group(1))
            elif time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not listen within {timeout} s:\n{self.log_tail()}")
            else:
                time.sleep(0.05)
        while True:
            self._check_alive()
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _, _ = self.request("/get?k=-ready-probe", timeout=5)
                if status in (200, 404):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with code {self.proc.returncode}:\n{self.log_tail()}")

    def request(self, path: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        """One GET on a connection of its own: (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def get_json(self, path: str, timeout: float = 30.0) -> tuple[int, dict]:
        status, _, body = self.request(path, timeout)
        return status, json.loads(body)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the process group; returns the exit code."""
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its session: the master's own group
                proc.wait()
        return proc.returncode


# -- the load generator --------------------------------------------------------------


def _client(port: int, path: str, count: int, barrier: Any, out: Any) -> None:
    """One client process: ``count`` GETs on one keep-alive connection (reopened when
    the server closes it), after the barrier; puts its measurements on ``out``."""
    lat_ns: list[int] = []
    cache_us: list[int] = []
    misses = errors = 0
    pids: set[int] = set()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        barrier.wait()
        start = time.monotonic_ns()
        for _ in range(count):
            t0 = time.perf_counter_ns()
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                continue
            lat_ns.append(time.perf_counter_ns() - t0)
            if r.status != 200:
                errors += 1
                continue
            misses += int(r.getheader("X-Cache-Misses", "0"))
            cache_us.append(int(r.getheader("X-Cache-Time-Us", "0")))
            pids.add(int(r.getheader("X-Worker-Pid", "0")))
        end = time.monotonic_ns()
    finally:
        conn.close()
    out.put({"start": start, "end": end, "lat_ns": lat_ns, "cache_us": cache_us,
             "misses": misses, "errors": errors, "pids": sorted(pids)})


def run_load(port: int, requests: int, clients: int, path: str = PATH) -> dict:
    """``requests`` GETs of ``path`` from ``clients`` processes at once.

    Returns:
        ``{"seconds", "requests", "lat_ns", "cache_us", "misses", "errors", "pids"}``:
        wall time from the first client's start to the last one's end (the monotonic
        clock is the same in every process), and the clients' measurements merged.
    """
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(clients)
    out = ctx.Queue()
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    procs = [ctx.Process(target=_client, args=(port, path, n, barrier, out), daemon=True)
             for n in shares]
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return {
        "seconds": (max(r["end"] for r in results) - min(r["start"] for r in results)) / 1e9,
        "requests": requests,
        "lat_ns": [x for r in results for x in r["lat_ns"]],
        "cache_us": [x for r in results for x in r["cache_us"]],
        "misses": sum(r["misses"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "pids": sorted({p for r in results for p in r["pids"]}),
    }


def warm(server: AppServer, clients: int) -> int:
    """Send rounds of requests until one renders no fragment and reaches every worker.

    Returns:
        The number of warm-up requests sent.
    """
    sent = 0
    for _ in range(WARM_ROUNDS):
        r = run_load(server.port, max(8 * server.workers, clients), clients)
        sent += r["requests"]
        if r["errors"]:
            raise RuntimeError(f"{server.backend}: {r['errors']} failed requests while warming:\n"
                               f"{server.log_tail()}")
        if r["misses"] == 0 and len(r["pids"]) >= server.workers:
            break
    return sent


# -- backends ------------------------------------------------------------------------


def _skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None."""
    needs = {"shmstore": "shmstore.django", "redis": "redis", "diskcache": "diskcache"}
    for module in ("django", "gunicorn", needs.get(backend)):
        if module is None:
            continue
        try:
            __import__(module)
        except ImportError as e:
            return f"cannot import {module} ({e}); pip install -e '.[dev]'"
    return None


@contextlib.contextmanager
def backend_servers(backends: list[str], tmp: str, *, workers: int, worker_class: str,
                    skipped: dict[str, str], stopped: dict[str, dict]) -> Iterator[dict[str, AppServer]]:
    """Start one app server per backend (and redis-server); stop them all at the end.

    Backends that cannot run are left out, with the reason put in ``skipped``; each
    server's master pid and exit code go into ``stopped`` when it has been stopped.
    """
    from shmstore._tools._bench._peers import RedisServer

    servers: dict[str, AppServer] = {}
    store_name = f"{STORE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    redis_server = None
    try:
        for backend in backends:
            reason = _skip_reason(backend)
            if reason is None and backend == "redis":
                redis_server = RedisServer(tmp)
                reason = redis_server.start()
                if reason is not None:
                    redis_server = None
            if reason is not None:
                skipped[backend] = reason
                continue
            location = {"shmstore": store_name, "locmem": "bench",
                        "redis": f"unix://{redis_server.socket_path}" if redis_server else "",
                        "diskcache": os.path.join(tmp, "diskcache")}[backend]
            servers[backend] = AppServer(backend, location, os.path.join(tmp, f"gunicorn-{backend}.log"),
                                         workers=workers, worker_class=worker_class)
        for server in servers.values():
            server.launch()
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        codes = {}
        for backend, server in servers.items():
            codes[backend] = server.stop()
            if server.proc is not None:
                stopped[backend] = {"pid": server.pid, "exit_code": codes[backend]}
        if redis_server is not None:
            redis_server.stop()
        if "shmstore" in servers:
            _destroy_store(store_name)
        bad = {b: c for b, c in codes.items() if c not in (0, None)}
        if bad:
            print(f"warning: gunicorn exit codes {bad}", file=sys.stderr)


def _destroy_store(name: str) -> None:
    import shmstore

    deadline = time.monotonic() + 10
    while True:
        try:
            shmstore.destroy(name)
            return
        except shmstore.CoordinatorRunningError:
            # Its master was SIGKILLed: the coordinator stops by itself within 100 ms.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- the run -------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]  # nearest rank


def bench(args: argparse.Namespace) -> dict:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"unknown backends {unknown}: choose from {', '.join(BACKENDS)}")
    load_before = os.getloadavg()[0]
    skipped: dict[str, str] = {}
    stopped: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {}
    warmed: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="django-bench-") as tmp, \
            backend_servers(backends, tmp, workers=args.workers, worker_class=args.worker_class,
                            skipped=skipped, stopped=stopped) as servers:
        for backend, server in servers.items():
            warmed[backend] = warm(server, args.clients)
        for _ in range(args.rounds):
            for backend, server in servers.items():  # interleaved: drift hits all alike
                runs.setdefault(backend, []).append(run_load(server.port, args.requests, args.clients))
    rows = []
    for backend in backends:
        if backend not in runs:
            continue
        rounds = runs[backend]
        lat = [x for r in rounds for x in r["lat_ns"]]
        cache_us = [x for r in rounds for x in r["cache_us"]]
        rates = [r["requests"] / r["seconds"] for r in rounds]
        rows.append({
            "backend": backend,
            "req_per_s": statistics.median(rates),
            "req_per_s_rounds": rates,
            "p50_ms": _percentile(lat, 50) / 1e6,
            "p99_ms": _percentile(lat, 99) / 1e6,
            "cache_p50_us": _percentile(cache_us, 50),
            "misses": sum(r["misses"] for r in rounds),
            "errors": sum(r["errors"] for r in rounds),
            "workers_seen": len({p for r in rounds for p in r["pids"]}),
            "warmup_requests": warmed[backend],
        })
    import django
    import gunicorn

    return {
        "config": {
            "view": PATH, "fragments": 20, "workers": args.workers, "worker_class": args.worker_class,
            "clients": args.clients, "requests": args.requests, "rounds": args.rounds,
            "python": platform.python_version(), "django": django.__version__,
            "gunicorn": gunicorn.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
            # the 1-minute load average before and after: other work on the machine
            "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "results": rows,
        "skipped": skipped,
        "servers": stopped,  # each gunicorn master: pid, exit code (0: a clean stop)
        "store_prefix": f"{STORE_PREFIX}{os.getpid()}-",  # the shmstore store, destroyed at the end
    }


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        (f"Django {c['django']} view reading {c['fragments']} cached fragments (`{c['view']}`), "
         f"Gunicorn {c['gunicorn']} with {c['workers']} {c['worker_class']} workers, "
         f"{c['clients']} client processes x {c['requests']} requests x {c['rounds']} rounds, "
         f"Python {c['python']}, {c['cpus']} CPUs ({c['machine']}), load average "
         f"{c['loadavg'][0]} before, {c['loadavg'][1]} after."),
        "",
        "| backend | req/s | p50 latency | p99 latency | cache time per request (p50) | misses |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"shmstore": "shmstore (ShmStoreCache)", "locmem": "LocMemCache (per worker)",
             "redis": "Redis (RedisCache, unix socket)", "diskcache": "diskcache (DjangoCache)"}
    for r in report["results"]:
        lines.append(f"| {names[r['backend']]} | {r['req_per_s']:,.0f} | {r['p50_ms']:.2f} ms | "
                     f"{r['p99_ms']:.2f} ms | {r['cache_p50_us']:,.0f} µs | {r['misses']} |")
    for backend, reason in report["skipped"].items():
        lines.append(f"\n{backend}: skipped ({reason})")
    errors = {r["backend"]: r["errors"] for r in report["results"] if r["errors"]}
    if errors:
        lines.append(f"\nfailed requests: {errors}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help=f"comma-separated, from {','.join(BACKENDS)} (default: all)")
    ap.add_argument("--requests", type=int, default=4000, help="requests per backend and round (4000)")
    ap.add_argument("--clients", type=int, default=4, help="client processes (4)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds, backends interleaved; req/s is the median round (3)")
    ap.add_argument("--workers", type=int, default=4, help="gunicorn workers (4)")
    ap.add_argument("--worker-class", default="sync", choices=["sync", "gthread"],
                    help="gunicorn worker class (sync: a connection per request)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    for flag in ("requests", "clients", "rounds", "workers"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1")
    if args.requests < args.clients:
        ap.error("--requests must be at least --clients")
    report = bench(args)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
