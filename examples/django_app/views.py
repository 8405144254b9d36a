"""Views of the example project: a value set through one worker, read by any other.

======================  ===============================================================
``/set?k=KEY&v=TEXT``   ``cache.set(KEY, TEXT)``: ``{"key": KEY, "pid": PID}``
``/get?k=KEY``          ``cache.get(KEY)``: ``{"key": KEY, "value": TEXT, "pid": PID}``,
                        404 (``"value": null``) when nothing is cached under KEY
``/fragments``          a page of 20 fragments, each read from the cache (one
                        ``cache.get`` per fragment, as the ``{% cache %}`` template tag
                        does) and rendered and cached when missing
======================  ===============================================================

Every answer names the worker that gave it: ``pid`` in the JSON, and the
``X-Worker-Pid`` header; ``/fragments`` counts the fragments it had to render in
``X-Cache-Misses`` (0 once the cache is warm) and gives the microseconds it spent in
cache calls in ``X-Cache-Time-Us`` (what the benchmark compares across backends).
"""

from __future__ import annotations

import os
import time

from django.core.cache import cache
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.html import escape

#: Fragments on the /fragments page.
FRAGMENTS = 20
#: Rows in each fragment (each fragment's HTML is ~0.7 KB).
ROWS = 8
#: Seconds a rendered fragment stays cached.
FRAGMENT_TIMEOUT = 600

_MISSING = object()


def _answer(body: dict, status: int = 200) -> JsonResponse:
    pid = os.getpid()
    response = JsonResponse({**body, "pid": pid}, status=status)
    response["X-Worker-Pid"] = str(pid)
    return response


def set_value(request: HttpRequest) -> JsonResponse:
    key, value = request.GET.get("k"), request.GET.get("v")
    if key is None or value is None:
        return _answer({"error": "usage: /set?k=KEY&v=TEXT"}, 400)
    cache.set(key, value)
    return _answer({"key": key})


def get_value(request: HttpRequest) -> JsonResponse:
    key = request.GET.get("k")
    if key is None:
        return _answer({"error": "usage: /get?k=KEY"}, 400)
    value = cache.get(key, _MISSING)
    if value is _MISSING:
        return _answer({"key": key, "value": None}, 404)
    return _answer({"key": key, "value": value})


def render_fragment(i: int) -> str:
    """The HTML of fragment ``i``: what a cache miss costs to make (a little work)."""
    rows = "".join(
        f"<tr><td>{i}.{r}</td><td>{escape(f'item <{i * ROWS + r}> & co')}</td>"
        f"<td>{(i * 31 + r * 17) % 997 / 10:.1f}</td></tr>"
        for r in range(ROWS)
    )
    return f'<section id="fragment-{i}"><h2>Fragment {i}</h2><table>{rows}</table></section>'


def fragments(request: HttpRequest) -> HttpResponse:
    parts = []
    misses = 0
    in_cache = 0  # ns spent in cache calls
    for i in range(FRAGMENTS):
        key = f"fragment:{i}"
        t0 = time.perf_counter_ns()
        html = cache.get(key)
        in_cache += time.perf_counter_ns() - t0
        if html is None:
            misses += 1
            html = render_fragment(i)
            t0 = time.perf_counter_ns()
            cache.set(key, html, FRAGMENT_TIMEOUT)
            in_cache += time.perf_counter_ns() - t0
        parts.append(html)
    body = "<!doctype html><title>fragments</title><main>" + "".join(parts) + "</main>\n"
    response = HttpResponse(body)
    response["X-Worker-Pid"] = str(os.getpid())
    response["X-Cache-Misses"] = str(misses)
    response["X-Cache-Time-Us"] = str(in_cache // 1000)
    return response
