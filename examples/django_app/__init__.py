"""A minimal Django project whose Gunicorn workers share one cache (see docs/django_gunicorn.md)."""
