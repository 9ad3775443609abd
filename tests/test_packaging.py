"""The sdist and the wheel hold the whole package, and the wheel works as users install it.

What is built (``python -m build``: the sdist, the wheel from the unpacked sdist, and the wheel
from the source tree as ``pip install .`` and the Dockerfiles build it):

* Every file under the package folders of ``pyproject.toml``'s mapping (``gradstore/``,
  ``indexer/``, ``service/``, ``client/``), Python or not (the web UI's static files under
  ``service/static/``), is in both wheels under its import path, and nothing else is; the sdist
  holds the same files.
* A package folder added anywhere below them, and a static file in a new sub-folder, ship with no
  edit of ``pyproject.toml``: the packages are discovered, not listed by hand.

What is installed (``make install-test``; skipped in the plain suite, see ``tests/installs.py``):

* The wheel (not editable) with the ``cpu`` extra, into a fresh virtual environment after
  ``TORCH_SPEC``: from that install alone, a tiny model and corpus are made, ``gradstore index``
  builds a datastore and ``gradstore serve`` serves it (``/healthz``).
* The wheel with no extras, into a second environment without torch, numpy or faiss: its SDK asks
  that server for a selection, and its ``gradstore serve`` names the missing extra.
* An installation with a gradstore module deleted says that it is broken and how to reinstall.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from gradstore.service.process import ServiceProcess, free_port
from installs import (PACKAGE_FOLDERS, REPO, VERSION, VirtualEnv, build_distributions, build_wheel, copy_sources,
                      install_run, torch_spec)

pytestmark = pytest.mark.slow

EXTRAS_FREE = ("torch", "numpy", "faiss")  # what the base install must not bring


def shipped_files(root: Path = REPO) -> dict[str, Path]:
    """Wheel path -> source file, for every file under the package folders (bytecode aside)."""
    files = {}
    for package, folder in PACKAGE_FOLDERS.items():
        folder = root / folder.relative_to(REPO)
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                wheel_path = Path(*package.split("."), path.relative_to(folder)).as_posix()
                # A file under a nested mapping (indexer/ for gradstore.indexer) is listed once, by its own mapping.
                if not any(other != package and other.startswith(package + ".")
                           and path.is_relative_to(root / PACKAGE_FOLDERS[other].relative_to(REPO))
                           for other in PACKAGE_FOLDERS):
                    files[wheel_path] = path
    return files


def wheel_contents(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist() if ".dist-info/" not in name}


@pytest.fixture(scope="module")
def distributions(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    return build_distributions(copy_sources(out / "sources"), out)


@pytest.mark.parametrize("wheel", ["wheel", "tree_wheel"])
def test_wheel_holds_every_file_of_the_package_folders(distributions, wheel):
    expected = shipped_files()
    assert "gradstore/service/routers/__init__.py" in expected
    assert any(name.startswith("gradstore/service/static/") for name in expected)
    contents = wheel_contents(distributions[wheel])
    missing = sorted(set(expected) - set(contents))
    assert not missing, (f"not in the wheel: {missing}; a non-Python file needs a pattern in "
                         "[tool.setuptools.package-data] of pyproject.toml")
    assert sorted(set(contents) - set(expected)) == []
    for name, source in expected.items():
        assert contents[name] == source.read_bytes(), f"{name} in the wheel differs from {source}"


def test_sdist_holds_the_package_sources(distributions):
    prefix = f"gradstore-{VERSION}/"
    with tarfile.open(distributions["sdist"]) as archive:
        names = {member.name.removeprefix(prefix) for member in archive.getmembers() if member.isfile()}
    sources = {path.relative_to(REPO).as_posix() for path in shipped_files().values()}
    assert not sorted(sources - names), f"not in the sdist: {sorted(sources - names)}"
    assert {"pyproject.toml", "README.md"} <= names


def test_new_package_folders_ship_without_an_edit(tmp_path):
    tree = copy_sources(tmp_path / "tree")
    added = {
        "gradstore/newpart/__init__.py": "gradstore/newpart/__init__.py",
        "gradstore/newpart/deeper/__init__.py": "gradstore/newpart/deeper/__init__.py",
        "gradstore/newpart/deeper/module.py": "gradstore/newpart/deeper/module.py",
        "service/newrouters/__init__.py": "gradstore/service/newrouters/__init__.py",
        "service/static/index.html": "gradstore/service/static/index.html",
        "service/static/vendor/lib/chart.min.js": "gradstore/service/static/vendor/lib/chart.min.js",
        "service/static/css/app.css": "gradstore/service/static/css/app.css",
    }
    for source in added:
        (tree / source).parent.mkdir(parents=True, exist_ok=True)
        (tree / source).write_text(f"# {source}\n")
    contents = wheel_contents(build_wheel(tree, tmp_path / "dist"))
    missing = sorted(wheel_path for wheel_path in added.values() if wheel_path not in contents)
    assert not missing, f"new files not in the wheel: {missing}"
