"""Settings of the example project: one app, no database, the cache chosen by environment.

``DJANGO_APP_CACHE`` picks the cache backend, so one app serves every variant of the
benchmark (``scripts/django_bench.py``):

=============  ===========================================  ==============================
value          BACKEND                                      LOCATION (``DJANGO_APP_CACHE_LOCATION``)
=============  ===========================================  ==============================
``shmstore``   ``shmstore.django.ShmStoreCache`` (default)  the store name (``django-app``)
``locmem``     Django's ``LocMemCache``: one per worker     a name (``django-app``)
``redis``      Django's ``RedisCache``                      a URL (``redis://127.0.0.1:6379``)
``diskcache``  ``diskcache.DjangoCache``                    a directory (required)
=============  ===========================================  ==============================

``DJANGO_APP_CACHE_MEMORY`` is the shmstore cache's memory budget in MiB (64).
gunicorn.conf.py reads ``CACHE_KIND``, ``STORE_NAME`` and ``STORE_OPTIONS`` from here so
that the store its hooks serve is the one the cache backend connects to.
"""

from __future__ import annotations

import os

# -- the cache -----------------------------------------------------------------------

BACKENDS = {
    "shmstore": "shmstore.django.ShmStoreCache",
    "locmem": "django.core.cache.backends.locmem.LocMemCache",
    "redis": "django.core.cache.backends.redis.RedisCache",
    "diskcache": "diskcache.DjangoCache",
}
DEFAULT_LOCATIONS = {
    "shmstore": "django-app",
    "locmem": "django-app",
    "redis": "redis://127.0.0.1:6379",
}

CACHE_KIND = os.environ.get("DJANGO_APP_CACHE", "shmstore")
if CACHE_KIND not in BACKENDS:
    raise ValueError(f"DJANGO_APP_CACHE={CACHE_KIND!r}: choose one of {', '.join(BACKENDS)}")
CACHE_LOCATION = os.environ.get("DJANGO_APP_CACHE_LOCATION") or DEFAULT_LOCATIONS.get(CACHE_KIND)
if CACHE_LOCATION is None:
    raise ValueError(f"DJANGO_APP_CACHE={CACHE_KIND} needs DJANGO_APP_CACHE_LOCATION (a directory)")

#: The shmstore store (LOCATION) and its serve() keywords (OPTIONS); gunicorn.conf.py
#: gives the same to shmstore.workers.gunicorn.hooks().
STORE_NAME = CACHE_LOCATION
STORE_OPTIONS = {
    "memory": int(os.environ.get("DJANGO_APP_CACHE_MEMORY", "64")) << 20,
    "eviction": "lru",  # a cache: the least recently used records make room
    "key_size": 256,  # memcached's 250-byte keys (Django's key warnings) + ":1:"
    "value_size": (1 << 20) - 128 - 256,  # the largest record still fits a 1 MiB page
}

CACHES = {
    "default": {
        "BACKEND": BACKENDS[CACHE_KIND],
        "LOCATION": CACHE_LOCATION,
        "TIMEOUT": 600,
        "OPTIONS": STORE_OPTIONS if CACHE_KIND == "shmstore" else {},
    },
}

# -- the rest: as little as Django needs -----------------------------------------------

# A development key: set DJANGO_SECRET_KEY for anything but trying the example.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "django_app.urls"
WSGI_APPLICATION = "django_app.wsgi.application"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict = {}
USE_TZ = True
TIME_ZONE = "UTC"  # Django sets the process TZ from this (its default is America/Chicago)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django": {"handlers": ["console"], "level": "WARNING"}},
}
