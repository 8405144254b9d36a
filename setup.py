"""The compiled core: setuptools builds it with the package (``pip install -e .``).

setuptools and not meson-python: the extension is a few C files with no dependencies
beyond Python's headers, and an editable install must compile it in place with only
what ``pip install -e '.[dev]'`` brings; setuptools does both with no extra tool.

``SHMSTORE_NO_EXTENSIONS=1`` at install time builds nothing (the pure-Python core);
otherwise a failed compile fails the install.
"""

import os

from setuptools import Extension, setup


def _pure() -> bool:
    return os.environ.get("SHMSTORE_NO_EXTENSIONS", "") not in ("", "0")


CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
          "-fno-strict-aliasing"]

ext_modules = [] if _pure() else [
    Extension(
        "shmstore._native",
        sources=["shmstore/_csrc/reader.c"],
        depends=["shmstore/_csrc/protocol.h"],
        extra_compile_args=CFLAGS,
    ),
    Extension(
        "shmstore._cwrite",
        sources=["shmstore/_csrc/writer.c"],
        depends=["shmstore/_csrc/protocol.h"],
        extra_compile_args=CFLAGS,
    ),
]

setup(ext_modules=ext_modules)
