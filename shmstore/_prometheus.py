"""Prometheus text exposition of :meth:`Store.stats` (format version 0.0.4).

Names follow the Prometheus conventions: a ``shmstore_`` prefix, ``_total`` on
counters, base units (seconds, bytes) in the name, one ``# HELP`` and ``# TYPE`` line
per metric family, and a ``store`` label on every sample. Serve it from an app::

    from wsgiref.simple_server import make_server
    store = shmstore.connect("app")
    make_server("127.0.0.1", 9100, shmstore.metrics_app(store)).serve_forever()

or return ``shmstore.prometheus_text(store)`` with content type
``shmstore.PROMETHEUS_CONTENT_TYPE`` from a route of your own web framework.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Iterable

from . import _layout as L
from ._stats import StoreStats

if TYPE_CHECKING:
    from ._store import Store

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float | int) -> str:
    if isinstance(x, int):
        return str(x)
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))


class _Writer:
    def __init__(self, store: str) -> None:
        self.lines: list[str] = []
        self.store = _esc(store)

    def family(self, name: str, kind: str, help: str) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float | int, **labels: str) -> None:
        lab = f'store="{self.store}"' + "".join(f',{k}="{_esc(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{lab}}} {_num(value)}")

    def one(self, name: str, kind: str, help: str, value: float | int | None) -> None:
        if value is None:
            return
        self.family(name, kind, help)
        self.sample(name, value)

    def histogram(self, name: str, help: str, buckets: Iterable[tuple[float, int]],
                  total: float, count: int) -> None:
        """``buckets``: (upper bound, count in that bucket), in order; made cumulative."""
        self.family(name, "histogram", help)
        cum = 0
        for le, c in buckets:
            cum += c
            self.sample(name + "_bucket", cum, le=_num(float(le)))
        self.sample(name + "_bucket", count, le="+Inf")
        self.sample(name + "_sum", total)
        self.sample(name + "_count", count)


def render(st: StoreStats) -> str:
    """The exposition text of one :class:`StoreStats`."""
    w = _Writer(st.name)
    g = "gauge"
    c = "counter"
    w.one("shmstore_up", g, "1 if a coordinator serves the store, else 0 (reads still work).",
          1 if st.coordinator_pid else 0)
    w.one("shmstore_records", g, "Records in the store.", st.records)
    w.one("shmstore_capacity_records", g, "The most records the store holds.", st.capacity)
    w.one("shmstore_epoch", g, "The store's commit epoch (the last applied write op).", st.epoch)
    w.one("shmstore_ops_applied_total", c, "Write ops the coordinators applied.", st.ops)
    w.family("shmstore_requests_by_kind_total", c, "Write requests the coordinators handled, by kind.")
    for kind, n in (("put", st.puts), ("delete", st.deletes), ("compare_and_set", st.compare_and_sets),
                    ("incr", st.incrs), ("batch", st.batches), ("get_many", st.fallback_reads)):
        w.sample("shmstore_requests_by_kind_total", n, kind=kind)
    w.one("shmstore_requests_total", c, "Requests the coordinators drained from client queues.", st.frames)
    w.one("shmstore_errors_total", c, "Requests the coordinators refused with an error.", st.errors)
    hist = st.group_hist or [0] * L.GROUP_HIST_BUCKETS
    # Bucket b holds groups of 2**b .. 2**(b+1)-1 requests; the last one every larger
    # group, so it shows only in le="+Inf".
    w.histogram("shmstore_group_size_requests",
                "Requests per group (one wake-up of the coordinator, one WAL write).",
                [(2 ** (b + 1) - 1, n) for b, n in enumerate(hist[:-1])], st.frames, sum(hist))
    w.one("shmstore_queue_bytes", g, "Bytes the last group drained from the client queues.", st.queue_bytes)
    w.one("shmstore_queue_max_bytes", g, "The most bytes any group drained.", st.queue_bytes_max)
    w.one("shmstore_coordinator_runs_total", c, "Coordinators that served this segment (1 + restarts).",
          st.coordinator_runs)
    w.one("shmstore_expired_total", c, "Records the coordinator reclaimed after their TTL ran out.", st.expired)
    w.one("shmstore_watch_wakeups_total", c, "Wake-ups posted to clients waiting in watch().", st.watch_posts)
    w.one("shmstore_clients_reclaimed_total", c, "Client blocks reclaimed after their process closed or died.",
          st.clients_reclaimed)
    if st.fsyncs:
        fh = st.fsync_hist or [0] * L.FSYNC_HIST_BUCKETS
        # Bucket b holds fsyncs of [2**b, 2**(b+1)) microseconds (the first also the
        # faster ones, the last every slower one).
        w.histogram("shmstore_fsync_duration_seconds", "Latency of the journal's fsyncs.",
                    [(2 ** (b + 1) * 1e-6, n) for b, n in enumerate(fh[:-1])],
                    st.fsync_seconds, sum(fh))
        w.one("shmstore_fsync_min_seconds", g, "The fastest fsync.", st.fsync_min)
        w.one("shmstore_fsync_max_seconds", g, "The slowest fsync.", st.fsync_max)
    w.one("shmstore_wal_bytes_total", c, "Bytes appended to the WAL.", st.wal_bytes)
    w.one("shmstore_checkpoints_total", c, "Checkpoints written.", st.checkpoints)
    w.one("shmstore_checkpoint_last_duration_seconds", g, "How long the last checkpoint took.",
          st.checkpoint_last)
    w.one("shmstore_last_checkpoint_epoch", g, "The epoch of the newest checkpoint.", st.last_checkpoint_epoch)
    w.one("shmstore_coordinator_resident_memory_bytes", g, "The coordinator's resident set size.",
          st.coordinator_rss)
    w.one("shmstore_coordinator_cpu_seconds_total", c, "User + system CPU time of the coordinator.",
          st.coordinator_cpu_seconds)
    w.one("shmstore_coordinator_uptime_seconds", g, "Seconds since the coordinator started.",
          st.coordinator_uptime)
    w.one("shmstore_clients", g, "Live client processes (with a client block).", len(st.clients))
    w.one("shmstore_client_reads_total", c, "Reads by all clients (live, closed and dead).", st.total_reads)
    w.one("shmstore_client_read_retries_total", c, "Reads that met a change in progress and read again.",
          st.total_read_retries)
    w.one("shmstore_client_read_cache_hits_total", c, "Reads answered from a handle's read cache.",
          st.total_read_cache_hits)
    w.one("shmstore_client_writes_total", c, "Write requests sent by all clients.", st.total_writes)
    w.one("shmstore_client_timeouts_total", c, "Client writes that timed out.", st.total_timeouts)
    w.one("shmstore_client_write_errors_total", c, "Client writes refused with an error.",
          st.total_write_errors)
    w.one("shmstore_client_write_max_seconds", g, "The slowest waited write of any client.",
          st.total_write_latency_max)
    return "\n".join(w.lines) + "\n"


def prometheus_text(store: Store | StoreStats) -> str:
    """The store's metrics in the Prometheus text format.

    Args:
        store: a :class:`Store` (its :meth:`~Store.stats` is taken now) or a
            :class:`StoreStats` already taken.
    """
    st = store if isinstance(store, StoreStats) else store.stats()
    return render(st)


def metrics_app(store: Store) -> Callable:
    """A WSGI application that answers every GET with :func:`prometheus_text`.

    Calls are serialized on a lock (a Store's stats() keeps rate state per handle).
    Mount it at ``/metrics`` of your WSGI app, or serve it on its own with
    ``wsgiref.simple_server.make_server``.
    """
    lock = threading.Lock()

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"only GET\n"]
        with lock:
            body = prometheus_text(store).encode()
        start_response("200 OK", [("Content-Type", PROMETHEUS_CONTENT_TYPE),
                                  ("Content-Length", str(len(body)))])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app
