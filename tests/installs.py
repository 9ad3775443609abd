"""Distributions built from this repository, and fresh virtual environments to install them in.

Shared by the tests of what users and the container images install (``tests/test_packaging.py``,
``tests/test_docker.py``).

* :data:`PACKAGE_FOLDERS` is ``pyproject.toml``'s folder mapping: import package -> folder.
* :func:`build_distributions` runs ``python -m build`` on a copy of the sources
  (:func:`copy_sources`): the sdist, the wheel built from the unpacked sdist (as pip builds one
  from PyPI's sdist) and the wheel built from the tree itself (as ``pip install .`` and the
  Dockerfiles build it). The two wheels can differ: setuptools adds every file the sdist lists
  inside a package folder to that package, so only the tree's wheel shows a sub-package that
  discovery missed.
* :class:`VirtualEnv` is a new virtual environment with nothing installed but pip. Its commands
  run in a folder outside the repository with ``PYTHONPATH`` unset, so they import what is
  installed in it and never the source tree.
* Tests that install into fresh environments (a minute or more each, with pip's cache) carry
  :func:`install_test`: they run with ``GRADSTORE_INSTALL_TEST=1`` (``make install-test``, which CI
  runs) and are skipped otherwise. Torch is installed first as ``TORCH_SPEC`` (the Makefile's, or
  the environment's): an unpinned torch would pull a CUDA build of several GB.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_FOLDERS = {package: REPO / folder for package, folder in PROJECT["tool"]["setuptools"]["package-dir"].items()}
VERSION = PROJECT["project"]["version"]

def install_test(test):
    """Marks ``test`` as one that installs into fresh virtual environments: ``install`` and
    ``slow``, and skipped unless ``GRADSTORE_INSTALL_TEST=1``."""
    skip = pytest.mark.skipif(os.environ.get("GRADSTORE_INSTALL_TEST") != "1",
                              reason="installs into fresh virtual environments: run `make install-test`")
    return pytest.mark.slow(pytest.mark.install(skip(test)))


def torch_spec() -> str:
    """The torch requirement installed before the extras: ``TORCH_SPEC``, else the Makefile's."""
    if os.environ.get("TORCH_SPEC"):
        return os.environ["TORCH_SPEC"]
    found = re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert found, "Makefile: no `TORCH_SPEC ?= ...` line"
    return found.group(1)


def run(command: list, *, cwd: Path, timeout: float = 600, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """``command`` with its output captured; a failure shows the command and the end of its output."""
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited with {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def copy_sources(dest: Path) -> Path:
    """The files a distribution is built from (``pyproject.toml``, ``README.md``, the package
    folders; no bytecode), copied to ``dest``: a build there leaves the repository untouched and
    cannot pick up a stale ``build/`` folder."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    for folder in PACKAGE_FOLDERS.values():
        if folder.parent == REPO:
            shutil.copytree(folder, dest / folder.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def build_distributions(source: Path, out: Path) -> dict[str, Path]:
    """Built from the source tree ``source`` into ``out``: ``sdist``, ``wheel`` (built from the
    unpacked sdist, as pip builds one from PyPI) and ``tree_wheel`` (built from the tree itself, as
    ``pip install .`` and the Dockerfiles do)."""
    run([sys.executable, "-m", "build", "--outdir", out / "release", source], cwd=out, timeout=600)
    built = {"sdist": next((out / "release").glob("gradstore-*.tar.gz")),
             "wheel": next((out / "release").glob("gradstore-*.whl"))}
    built["tree_wheel"] = build_wheel(source, out / "tree")
    return built


def build_wheel(source: Path, out: Path) -> Path:
    """The wheel built from the source tree ``source`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "build", "--wheel", "--outdir", out, source], cwd=out, timeout=600)
    return next(out.glob("gradstore-*.whl"))


class VirtualEnv:
    """A fresh virtual environment at ``path``; its commands run in ``workdir``."""

    def __init__(self, path: Path, workdir: Path):
        self.path = path
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "venv", path], cwd=workdir, timeout=300)

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name

    @property
    def env(self) -> dict[str, str]:
        """The calling environment without ``PYTHONPATH`` or another active virtual environment."""
        env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
        env["PATH"] = os.pathsep.join([str(self.path / "bin"), env.get("PATH", "")])
        return env

    def pip(self, *args, timeout: float = 900) -> subprocess.CompletedProcess:
        """``python -m pip ARGS`` in this environment (pip's cache is used, as configured)."""
        return run([self.python, "-m", "pip", "--disable-pip-version-check", *args], cwd=self.workdir,
                   timeout=timeout, env=self.env)

    def run(self, *command, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return run(list(command), cwd=self.workdir, timeout=timeout, env=self.env, check=check)

    def python_code(self, code: str, *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(self.python, "-c", code, check=check, timeout=timeout)

    def importable(self, module: str) -> bool:
        result = self.python_code(f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)",
                                  check=False)
        return result.returncode == 0
