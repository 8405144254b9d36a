"""The built wheel installs one import namespace: shmstore, shmstore.coordinator,
shmstore.workers, and nothing called coordinator or workers at the top level."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_maps_coordinator_and_workers_into_the_shmstore_namespace(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "tests", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    wheels = tmp_path / "wheels"
    # the wheel as shipped: with the compiled core, whatever this run's core is
    build_env = {k: v for k, v in os.environ.items() if k != "SHMSTORE_NO_EXTENSIONS"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, text=True, env=build_env)
    (wheel,) = wheels.glob("shmstore-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert "shmstore" in tops
    assert not {"coordinator", "workers", "scripts"} & tops, tops
    names = zipfile.ZipFile(wheel).namelist()
    assert "shmstore/coordinator/__main__.py" in names and "shmstore/workers/__init__.py" in names
    assert "shmstore/_cli/_main.py" in names and "shmstore/_tools/_bench/_peers.py" in names
    # the compiled core is built into the wheel (setup.py), its sources are not needed there
    assert [n for n in names if n.startswith("shmstore/_native.") and n.endswith(".so")], names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    assert not (target / "coordinator").exists() and not (target / "workers").exists()
    code = (
        "import importlib.util, shmstore, shmstore.coordinator, shmstore.workers;"
        "print(shmstore.__file__);"
        "print(shmstore.coordinator.__file__);"
        "print(importlib.util.find_spec('coordinator'), importlib.util.find_spec('workers'))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         check=True, capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target / "shmstore" / "coordinator"))
    assert out[2] == "None None"
    # The installed console script entry point and python -m both answer --help.
    r = subprocess.run([sys.executable, "-m", "shmstore.coordinator", "--help"], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "coordinator" in r.stdout
