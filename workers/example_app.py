"""A small WSGI app whose gunicorn workers share a counter and a cache through shmstore.

Run it (``pip install 'shmstore[gunicorn]'``) with this ``gunicorn.conf.py``::

    from shmstore.workers.gunicorn import hooks
    globals().update(hooks("app", capacity=100_000))
    workers = 4

::

    gunicorn -c gunicorn.conf.py shmstore.workers.example_app:app
    curl localhost:8000/incr            # {"value": 1, "pid": 4242}
    curl 'localhost:8000/put?k=greeting&v=hello'
    curl 'localhost:8000/get?k=greeting'  # answered by any worker
    curl localhost:8000/stats

Routes (GET; every answer is JSON and names the ``pid`` of the worker that answered):

==========================  =========================================================
``/incr``                   add 1 to the shared counter ``hits``: ``{"value": n}``
``/put?k=KEY&v=TEXT``       cache TEXT under ``cache:KEY``: ``{"version": v}``
``/get?k=KEY``              ``{"value": TEXT}``, or 404 if nothing is cached
``/pid``                    ``{}`` (just the pid)
``/stats``                  the store's counters (:meth:`shmstore.Store.stats`)
``/sleep?s=S&tag=T``        a slow request: record ``sleeping:T = pid``, sleep S s
                            (at most 60), for trying worker timeouts and kills
==========================  =========================================================

Each increment is applied once by the coordinator, so ``/incr`` values are unique
across workers and the counter equals the number of increments applied.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

import msgspec

import shmstore
from shmstore.workers.gunicorn import store

#: The shared counter /incr adds to.
COUNTER = "hits"
#: Cache entries live under this key prefix.
CACHE_PREFIX = "cache:"
MAX_SLEEP = 60.0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _incr(q: dict[str, str]) -> tuple[int, dict]:
    return 200, {"value": store().incr(COUNTER)}


def _put(q: dict[str, str]) -> tuple[int, dict]:
    if "k" not in q or "v" not in q:
        return 400, {"error": "usage: /put?k=KEY&v=TEXT"}
    return 200, {"version": store().put(CACHE_PREFIX + q["k"], q["v"])}


def _get(q: dict[str, str]) -> tuple[int, dict]:
    if "k" not in q:
        return 400, {"error": "usage: /get?k=KEY"}
    missing = object()
    value = store().get(CACHE_PREFIX + q["k"], missing)
    if value is missing:
        return 404, {"error": f"nothing cached under {q['k']!r}"}
    return 200, {"value": value}


def _pid(q: dict[str, str]) -> tuple[int, dict]:
    return 200, {}


def _stats(q: dict[str, str]) -> tuple[int, dict]:
    return 200, msgspec.structs.asdict(store().stats())


def _sleep(q: dict[str, str]) -> tuple[int, dict]:
    try:
        seconds = min(float(q.get("s", "1")), MAX_SLEEP)
    except ValueError:
        return 400, {"error": "usage: /sleep?s=SECONDS&tag=TAG"}
    if "tag" in q:
        store().put(f"sleeping:{q['tag']}", os.getpid())
    time.sleep(seconds)
    return 200, {"slept": seconds}


ROUTES: dict[str, Callable[[dict[str, str]], tuple[int, dict]]] = {
    "/incr": _incr, "/put": _put, "/get": _get, "/pid": _pid, "/stats": _stats, "/sleep": _sleep,
}
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI application."""
    route = ROUTES.get(environ.get("PATH_INFO", ""))
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if route is None:
        status, body = 404, {"error": f"routes: {', '.join(ROUTES)}"}
    else:
        try:
            status, body = route(query)
        except (shmstore.KeyTooLongError, shmstore.ValueTooLargeError, shmstore.InvalidKeyError,
                shmstore.ValueEncodingError) as e:
            status, body = 400, {"error": str(e)}
        except shmstore.ShmStoreError as e:  # no coordinator (yet), a full store, ...
            status, body = 503, {"error": str(e)}
    body["pid"] = os.getpid()
    data = json.dumps(body).encode()
    start_response(f"{status} {REASONS.get(status, '')}", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(data))),
    ])
    return [data]
