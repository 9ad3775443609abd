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
                      install_test, torch_spec)

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


# ---- installed as users install it (make install-test) ----------------------------------------------

API_KEY = "install-test-key"

MAKE_INPUTS = """
import json, sys
from gradstore.indexer.demo_corpus import generate_corpus, generate_targets, write_jsonl
from gradstore.indexer.tiny import build_model, build_tokenizer

corpus = generate_corpus(48, seed=0)
write_jsonl(corpus, "corpus.jsonl")
write_jsonl(generate_targets("arithmetic", 4, seed=0), "targets.jsonl")
tokenizer = build_tokenizer([m["content"] for r in corpus for m in r["messages"]], vocab_size=384)
build_model("gpt2", tokenizer, "model", seed=0)
"""


class InstalledService(ServiceProcess):
    """``gradstore serve`` started through an environment's console script."""

    def __init__(self, env: VirtualEnv, root: Path, **kwargs):
        super().__init__(root, api_key=API_KEY, port=free_port(), log_file=env.workdir / "serve.log", **kwargs)
        self.venv = env

    def command(self) -> list[str]:
        return [str(self.venv.bin("gradstore")), "serve", "--root", str(self.root), "--host", self.host,
                "--port", str(self.port), "--log-level", "warning", "--api-key", API_KEY]

    def start(self) -> "InstalledService":
        self.env = {**self.venv.env, **(self.env or {})}
        return super().start()


@pytest.fixture(scope="module")
def cpu_env(distributions, tmp_path_factory) -> VirtualEnv:
    """The wheel with the ``cpu`` extra, after the project's torch."""
    folder = tmp_path_factory.mktemp("cpu-install")
    env = VirtualEnv(folder / "venv", folder / "work")
    env.pip("install", torch_spec())
    env.pip("install", f"{distributions['wheel']}[cpu]")
    return env


@pytest.fixture(scope="module")
def base_env(distributions, tmp_path_factory) -> VirtualEnv:
    """The wheel alone: the client SDK."""
    folder = tmp_path_factory.mktemp("base-install")
    env = VirtualEnv(folder / "venv", folder / "work")
    env.pip("install", str(distributions["wheel"]))
    return env


@pytest.fixture(scope="module")
def installed_service(cpu_env):
    """A datastore ``pool`` indexed by the installed ``gradstore index``, served by the installed
    ``gradstore serve``."""
    cpu_env.python_code(MAKE_INPUTS)
    work = cpu_env.workdir
    result = cpu_env.run(cpu_env.bin("gradstore"), "index", "--corpus", "corpus.jsonl", "--model", "model",
                         "--out", "stores/pool", "--gradient-type", "sgd", "--lora-r", "4", "--proj-dim", "256",
                         "--max-length", "64", "--device", "cpu", "--no-progress")
    assert "datastore written to stores/pool" in result.stdout
    with InstalledService(cpu_env, work / "stores", startup_timeout=120) as service:
        yield service


@install_test
def test_wheel_is_installed_not_the_sources(cpu_env):
    result = cpu_env.python_code(
        "import gradstore, gradstore.service.routers, importlib.resources as r\n"
        "print(gradstore.__file__)\n"
        "print((r.files('gradstore.service') / 'static' / 'README.md').is_file())")
    location, static = result.stdout.split()
    assert Path(location).is_relative_to(cpu_env.path) and not Path(location).is_relative_to(REPO)
    assert static == "True"


@install_test
def test_installed_cpu_extra_indexes_and_serves(cpu_env, installed_service):
    import httpx

    assert httpx.get(f"{installed_service.url}/healthz", timeout=10).status_code == 200
    info = json.loads(cpu_env.run(cpu_env.bin("gradstore"), "info", "stores/pool", "--json").stdout)
    assert info["counts"]["examples"] == 48 and info["gradient_type"] == "sgd"


CLIENT_SELECTS = """
import json, sys
from gradstore.client import Client

targets = [json.loads(line) for line in open(sys.argv[2])]
with Client(sys.argv[1], api_key=sys.argv[3]) as client:
    assert client.health().status == "ok"
    page = client.select("pool", targets, k=5)
    print(json.dumps({"examples": client.get_datastore("pool").examples,
                      "selected": [(item.rank, item.id) for item in page.items]}))
"""


@install_test
def test_base_install_selects_through_the_sdk_without_torch_numpy_or_faiss(base_env, cpu_env, installed_service):
    for module in EXTRAS_FREE:
        assert not base_env.importable(module), f"the base install brings {module}"
    assert base_env.importable("httpx") and base_env.importable("gradstore.client")
    script = base_env.workdir / "query_service.py"  # not select.py: that would shadow the standard select module
    script.write_text(CLIENT_SELECTS)
    result = base_env.run(base_env.python, script, installed_service.url, cpu_env.workdir / "targets.jsonl", API_KEY)
    answer = json.loads(result.stdout)
    corpus_ids = {json.loads(line)["id"] for line in (cpu_env.workdir / "corpus.jsonl").read_text().splitlines()}
    assert answer["examples"] == 48
    assert [rank for rank, _ in answer["selected"]] == [1, 2, 3, 4, 5]
    assert {id for _, id in answer["selected"]} <= corpus_ids


@install_test
def test_base_install_serve_names_the_missing_extra(base_env):
    result = base_env.run(base_env.bin("gradstore"), "serve", "--root", base_env.workdir, "--no-auth", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("gradstore serve: missing dependency "), result.stderr
    assert "'cpu' or 'gpu' extra" in result.stderr and "pip install 'gradstore[cpu]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert base_env.run(base_env.bin("gradstore"), "--help").stdout.startswith("usage: gradstore")


@install_test
def test_incomplete_installation_says_so(cpu_env, installed_service):
    # Last: it breaks the cpu environment, as a wheel without gradstore.service.routers would.
    located = cpu_env.python_code("import gradstore.service.routers as r, os; print(os.path.dirname(r.__file__))")
    shutil.rmtree(located.stdout.strip())
    result = cpu_env.run(cpu_env.bin("gradstore"), "serve", "--root", "stores", "--no-auth", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("gradstore serve: this gradstore installation is incomplete: "
                                    "the module 'gradstore.service.routers' is missing"), result.stderr
    assert "--force-reinstall" in result.stderr and "extra" not in result.stderr
