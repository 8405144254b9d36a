"""Gunicorn settings of the example project.

From the repository root::

    gunicorn -c examples/django_app/gunicorn.conf.py            # the shmstore cache
    DJANGO_APP_CACHE=locmem gunicorn -c examples/django_app/gunicorn.conf.py

Command-line flags override what is set here (``-b 127.0.0.1:9000``, ``-w 8``).

With the shmstore cache, :func:`shmstore.workers.gunicorn.hooks` runs the store for the
server's lifetime: the master starts its coordinator before forking the workers (and
starts a new one should it die), each worker claims its client block in ``post_fork``,
and the coordinator stops after the workers when the master exits. The cache backend
(``LOCATION`` = the same store name, ``OPTIONS`` = the same ``serve()`` keywords) then
connects to that coordinator rather than starting one of its own.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # the master reads django_app.settings below
    sys.path.insert(0, str(_HERE.parent))

from django_app import settings as _app  # plain Python: sets up nothing of Django

wsgi_app = "django_app.wsgi:application"
pythonpath = str(_HERE.parent)
raw_env = ["DJANGO_SETTINGS_MODULE=django_app.settings"]
bind = "127.0.0.1:8000"
workers = 4
worker_class = "sync"
timeout = 30
graceful_timeout = 10
control_socket_disable = True

if _app.CACHE_KIND == "shmstore":
    from shmstore.workers.gunicorn import hooks

    globals().update(hooks(_app.STORE_NAME, **_app.STORE_OPTIONS))
