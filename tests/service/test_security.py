"""No code from a client's files: hostile checkpoints and model folders submitted as jobs through
the real HTTP server (``gradstore serve`` on loopback) fail with their reason, and their payload
never runs (its marker file stays absent). The command line refuses the same files unless told
to trust them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gradstore.service.process import ServiceProcess

from payloads import checkpoint_with_adapter_payload, checkpoint_with_optimizer_payload, model_with_remote_code

KEY = "security-key"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, service_run, tiny_model_dirs):
    """Hostile inputs in one folder (an allowed job input root), each with its own marker."""
    inputs = tmp_path_factory.mktemp("hostile-inputs")
    markers = tmp_path_factory.mktemp("markers")
    files = {
        "optimizer": checkpoint_with_optimizer_payload(service_run / "epoch-1", inputs / "ckpt-optimizer",
                                                       markers / "optimizer"),
        "adapter": checkpoint_with_adapter_payload(service_run / "epoch-1", inputs / "ckpt-adapter",
                                                   markers / "adapter"),
        "model": model_with_remote_code(tiny_model_dirs["gpt2"], inputs / "model-remote-code", markers / "model"),
    }
    return inputs, markers, files


@pytest.fixture(scope="module")
def server(tmp_path_factory, hostile, service_corpus, tiny_model_dirs):
    inputs, _, _ = hostile
    root = tmp_path_factory.mktemp("security-root")
    roots = json.dumps([str(inputs), str(service_corpus[0]), str(tiny_model_dirs["gpt2"])])
    log = root.parent / f"{root.name}-service.log"
    with ServiceProcess(root, api_key=KEY, log_file=log, env={"GRADSTORE_JOB_INPUT_ROOTS": roots}) as service:
        yield service, root, log


def _run_job(service, body: dict, timeout: float = 120.0) -> dict:
    headers = {"X-API-Key": KEY}
    response = httpx.post(f"{service.url}/v1/jobs", json=body, headers=headers, timeout=30)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{service.url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s")


def _job(service_corpus, model, name, **fields) -> dict:
    folder, _ = service_corpus
    return {"datastore": name, "corpus": [str(folder / "tgt.jsonl")], "model": str(model), "proj_dim": 64,
            "max_length": 64, "device": "cpu", **fields}


def _assert_refused(job: dict, root: Path, marker: Path, *reason: str) -> None:
    assert job["status"] == "failed", job
    for part in reason:
        assert part in job["error"], job["error"]
    assert "Traceback" not in job["error"] and "site-packages" not in job["error"], job["error"]
    assert not marker.exists(), "the payload ran"
    assert not (root / f".{job['request']['datastore']}.partial").exists()
    assert not (root / job["request"]["datastore"]).exists()


def test_a_pickled_optimizer_payload_fails_the_job_and_does_not_run(server, hostile, service_corpus, tiny_model_dirs):
    service, root, _ = server
    _, markers, files = hostile
    job = _run_job(service, _job(service_corpus, tiny_model_dirs["gpt2"], "payload-optimizer",
                                 checkpoints=[str(files["optimizer"])], gradient_type="adam"))
    _assert_refused(job, root, markers / "optimizer", "optimizer.pt: refused", "weights_only=True",
                    "GLOBAL exec", "gradstore convert-optimizer IN OUT")


def test_a_pickled_adapter_payload_fails_the_job_and_does_not_run(server, hostile, service_corpus, tiny_model_dirs):
    service, root, _ = server
    _, markers, files = hostile
    job = _run_job(service, _job(service_corpus, tiny_model_dirs["gpt2"], "payload-adapter",
                                 checkpoints=[str(files["adapter"])], gradient_type="sgd"))
    _assert_refused(job, root, markers / "adapter", "adapter_model.bin: refused", "adapter_model.safetensors")


def test_a_model_asking_for_its_own_code_fails_the_job_and_does_not_run(server, hostile, service_corpus):
    service, root, _ = server
    _, markers, files = hostile
    job = _run_job(service, _job(service_corpus, files["model"], "payload-model", gradient_type="sgd"))
    _assert_refused(job, root, markers / "model", "model-remote-code", "custom code")


def test_the_job_api_has_no_way_to_trust_pickles(server, service_corpus, tiny_model_dirs):
    service, _, _ = server
    for field in ("trust_pickled_checkpoints", "trust_remote_code"):
        body = _job(service_corpus, tiny_model_dirs["gpt2"], "never", **{field: True})
        response = httpx.post(f"{service.url}/v1/jobs", json=body, headers={"X-API-Key": KEY}, timeout=30)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", field]


def _gradstore(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradstore.cli", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_the_cli_refuses_the_same_optimizer_without_the_flag(hostile, service_corpus, tiny_model_dirs, tmp_path):
    _, markers, files = hostile
    folder, _ = service_corpus
    result = _gradstore("index", "--corpus", folder / "tgt.jsonl", "--model", tiny_model_dirs["gpt2"],
                        "--checkpoint", files["optimizer"], "--out", tmp_path / "store", "--proj-dim", 64,
                        "--max-length", 64, "--device", "cpu", "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "optimizer.pt: refused" in result.stderr and "--trust-pickled-checkpoints" not in result.stderr
    assert "gradstore convert-optimizer IN OUT" in result.stderr and "Traceback" not in result.stderr
    assert not (markers / "optimizer").exists()
    assert not (tmp_path / "store").exists()


def test_the_cli_flag_states_its_risk_and_is_off_by_default():
    index_help = _gradstore("index", "--help").stdout
    flag = " ".join(index_help[index_help.rindex("--trust-pickled-checkpoints"):].split()[:60])
    assert "RUNS ANY CODE" in flag and "off by default" in flag
    convert = _gradstore("convert-optimizer", "--help").stdout
    assert "weights_only=True" in convert and "RUNS ANY CODE" in " ".join(convert.split())


def test_the_operator_cannot_add_the_flag_to_every_job(tmp_path):
    from gradstore.service.jobs import JobManager
    from gradstore.service.settings import Settings

    with pytest.raises(ValueError, match="--trust-pickled-checkpoints is not allowed"):
        JobManager(Settings(root=tmp_path, auth_disabled=True), index_args=["--trust-pickled-checkpoints"])
