"""Integrations with process managers (installed as ``shmstore.workers``)."""
