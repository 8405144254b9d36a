"""Tools run from a source checkout; tests import them as ``scripts.<name>``."""
