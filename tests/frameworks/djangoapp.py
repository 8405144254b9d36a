"""A Django project in one module, for the Gunicorn test: ``gunicorn tests.frameworks.djangoapp``.

$SHMSTORE_DJANGO_STORE names the store of its default cache; OPTIONS are the backend's
defaults, so the first worker to touch the cache starts the coordinator (detached).
Views: ``/set?k=&v=[&int=1]`` and ``/incr?k=`` write, ``/get?k=`` reads; each answers JSON with
the worker's pid and whether this worker started the coordinator.
"""

from __future__ import annotations

import json
import os

import django
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    SECRET_KEY="shmstore-test",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    CACHES={"default": {"BACKEND": "shmstore.django.ShmStoreCache",
                        "LOCATION": os.environ["SHMSTORE_DJANGO_STORE"], "TIMEOUT": None}},
)
django.setup()

from django.core.cache import cache  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402


def _answer(**kw) -> HttpResponse:
    kw.update(pid=os.getpid(), started=cache.store.coordinator is not None)
    return HttpResponse(json.dumps(kw), content_type="application/json")


def set_view(request):
    v = request.GET["v"]
    cache.set(request.GET["k"], int(v) if request.GET.get("int") else v)
    return _answer()


def get_view(request):
    return _answer(value=cache.get(request.GET["k"]))


def incr_view(request):
    return _answer(value=cache.incr(request.GET["k"]))


urlpatterns = [path("set", set_view), path("get", get_view), path("incr", incr_view)]
application = get_wsgi_application()
