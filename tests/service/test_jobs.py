"""Indexing jobs in the service: real tiny models, real ``gradstore index`` subprocesses, real
SQLite, real signals, through ``JobManager`` and through the HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from gradstore.client.models import IndexJobRequest, Job
from gradstore.datastore import Datastore
from gradstore.service.errors import ServiceError
from gradstore.service.jobs import JobManager
from gradstore.service.settings import Settings

from conftest import sgd_job_request

WORDS = "alpha beta gamma delta add reverse capital paris cat tac number seven".split()
SHARDED = ["--shard-size", "24"]  # small shards: a job that is interrupted has some finished


def chat_records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": f"ex-{i}", "dataset": "toy",
             "messages": [{"role": "user", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 8))))},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    for name, n in (("small", 30), ("medium", 144), ("large", 1500)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_records(n, seed=n)))
    return root


@pytest.fixture
def settings(tmp_path, inputs, tiny_model_dirs):
    root = tmp_path / "root"
    root.mkdir()
    return Settings(root=root, job_input_roots=[inputs, tiny_model_dirs["llama"]], auth_disabled=True)


@pytest.fixture
def managers():
    """Managers made by a test; every one still running is stopped at the end."""
    made = []

    def make(settings, **kwargs) -> JobManager:
        manager = JobManager(settings, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop()


def job_request(inputs, model_dirs, corpus: str | list[str] = "small", **overrides) -> IndexJobRequest:
    """A fresh-LoRA sgd job; ``corpus`` names one of the ``inputs`` files, or is the request's list."""
    corpus = [str(inputs / f"{corpus}.jsonl")] if isinstance(corpus, str) else corpus
    return sgd_job_request(corpus, overrides.pop("model", model_dirs["llama"]), **overrides)


def wait_for(get_job, until, timeout=60.0) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = get_job()
        if until(job):
            return job
        assert not finished(job), f"the job ended {job.status}: {job.error}"
        assert time.monotonic() < deadline, f"timed out; job is {job.status}: {job.error}"
        time.sleep(0.05)


def run(manager: JobManager, request: IndexJobRequest) -> Job:
    """Submit the job and wait until it ends."""
    job = manager.submit(request)
    return wait_for(lambda: manager.get(job.id), finished)


def finished(job: Job) -> bool:
    return job.status in ("succeeded", "failed", "cancelled")


def done_shards(root: Path, name: str = "pool") -> int:
    return len(list((root / f".{name}.partial" / "_shards").glob("*.done")))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def log_text(settings, job_id) -> str:
    return (settings.root / ".gradstore" / "jobs" / job_id / "index.log").read_text()


# ------------------------------------------------------------------------------------------------


def test_job_runs_to_a_published_store_with_full_progress(settings, inputs, tiny_model_dirs, managers):
    manager = managers(settings)
    manager.start()
    job = manager.submit(job_request(inputs, tiny_model_dirs))
    assert job.status == "queued" and job.attempts == 0 and len(job.id) == 32
    job = wait_for(lambda: manager.get(job.id), finished)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1 and job.error is None
    assert job.created_at <= job.started_at <= job.finished_at
    assert job.progress.done == job.progress.total == 30
    assert job.progress.examples_per_second > 0 and job.progress.eta_seconds == 0
    store = Datastore.open(settings.root / "pool")
    assert store.manifest.counts.examples == 30 and store.manifest.features.dim == 256
    assert (settings.root / ".gradstore" / "jobs.sqlite").is_file()
    assert "datastore written to" in log_text(settings, job.id)

    with pytest.raises(ServiceError) as exists:  # the store exists now
        manager.submit(job_request(inputs, tiny_model_dirs))
    assert exists.value.status == 409 and exists.value.code == "conflict"
    assert [j.id for j in manager.list()] == [job.id]


def test_an_append_job_adds_a_version_with_the_stores_settings(settings, inputs, tiny_model_dirs, managers):
    later = inputs / "later.jsonl"
    later.write_text("".join(json.dumps({**r, "id": f"later-{i}"}) + "\n" for i, r in enumerate(chat_records(12, 7))))
    manager = managers(settings)
    manager.start()
    built = run(manager, job_request(inputs, tiny_model_dirs))
    assert built.status == "succeeded", built.error

    # Only the datastore and the corpus given: the job's record names the store's settings.
    job = manager.submit(IndexJobRequest(datastore="pool", corpus=[str(later)], append=True, device="cpu"))
    assert (job.request.gradient_type, job.request.proj_dim, job.request.lora_r, job.request.lora_alpha,
            job.request.max_length) == ("sgd", 256, 4, 8.0, 64)
    assert job.request.model is None and job.request.append
    job = wait_for(lambda: manager.get(job.id), finished)
    assert job.status == "succeeded", job.error
    store = Datastore.open(settings.root / "pool", verify=True)
    assert store.version == 2 and [h.action for h in store.manifest.history] == ["build", "append"]
    assert store.manifest.counts.examples == 42 and store.row_of("later-11") == 41

    with pytest.raises(ServiceError) as err:  # a setting the store differs in: refused before queueing
        manager.submit(IndexJobRequest(datastore="pool", corpus=[str(later)], append=True, proj_dim=128, lora_r=4))
    assert (err.value.status, err.value.code) == (409, "conflict")
    assert "proj_dim: store 256, request 128" in err.value.message and "lora_r" not in err.value.message
    # Ids the store holds fail the job, naming them, unless replace is asked for.
    again = IndexJobRequest(datastore="pool", corpus=[str(later)], append=True, device="cpu")
    taken = run(manager, again)
    assert taken.status == "failed" and "12 of the new records have ids the store already holds" in taken.error
    assert Datastore.open(settings.root / "pool").version == 2
    replaced = run(manager, again.model_copy(update={"replace": True}))
    assert replaced.status == "succeeded", replaced.error
    store = Datastore.open(settings.root / "pool", verify=True)
    assert store.version == 3 and store.num_examples == 42 and store.row_of("later-0") == 42

    shutil.copytree(settings.root / "pool", settings.root / "damaged")  # its recorded settings lack one
    manifest = json.loads((settings.root / "damaged" / "manifest.json").read_text())
    del manifest["settings"]["config"]["projection"]
    (settings.root / "damaged" / "manifest.json").write_text(json.dumps(manifest))
    cases = [
        (IndexJobRequest(datastore="damaged", corpus=[str(later)], append=True), 409, "conflict"),
        (IndexJobRequest(datastore="none", corpus=[str(later)], append=True), 404, "datastore_not_found"),
        (IndexJobRequest(datastore="pool", corpus=[str(later)], append=True, overwrite=True), 400, "invalid_job"),
        (IndexJobRequest(datastore="other", corpus=[str(later)], gradient_type="sgd"), 400, "invalid_job"),
        (job_request(inputs, tiny_model_dirs, datastore="other", replace=True), 400, "invalid_job"),
    ]
    for request, status, code in cases:
        with pytest.raises(ServiceError) as err:
            manager.submit(request)
        assert (err.value.status, err.value.code) == (status, code), request


def test_a_failing_job_reports_the_indexer_error(settings, inputs, tiny_model_dirs, managers):
    bad = inputs / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    manager = managers(settings)
    manager.start()
    job = manager.submit(job_request(inputs, tiny_model_dirs, corpus="bad"))
    job = wait_for(lambda: manager.get(job.id), finished)
    assert job.status == "failed" and job.attempts == 1
    assert job.error.startswith("error: ") and f"{bad}:1" in job.error and "role" in job.error
    assert not (settings.root / "pool").exists()


def test_submissions_are_validated_before_queueing(settings, inputs, tiny_model_dirs, managers, tmp_path):
    manager = managers(settings)  # not started: nothing runs
    outside = tmp_path / "outside.jsonl"
    outside.write_text((inputs / "small.jsonl").read_text())
    for name in ("../escape", ".hidden", "a..b", "x" * 129):
        with pytest.raises(ValidationError, match="datastore"):  # the request model refuses it
            job_request(inputs, tiny_model_dirs, datastore=name)
        with pytest.raises(ServiceError) as err:  # and so does the manager, however it was built
            manager.submit(IndexJobRequest.model_construct(**{**job_request(inputs, tiny_model_dirs).__dict__,
                                                               "datastore": name}))
        assert (err.value.status, err.value.code) == (400, "invalid_name"), name
    cases = [
        (dict(corpus=[str(outside)]), 403, "path_not_allowed"),
        (dict(corpus=[f"named={outside}"]), 403, "path_not_allowed"),
        (dict(corpus=[str(inputs / ".." / outside.parent.name / "outside.jsonl")]), 403, "path_not_allowed"),
        (dict(model="/etc"), 403, "path_not_allowed"),
        (dict(corpus=[str(inputs / "missing.jsonl")]), 404, "input_not_found"),
        (dict(checkpoints=[str(inputs / "no-such-checkpoint")]), 404, "input_not_found"),
        (dict(gradient_type="adam"), 400, "invalid_job"),
    ]
    for overrides, status, code in cases:
        with pytest.raises(ServiceError) as err:
            manager.submit(job_request(inputs, tiny_model_dirs, **overrides))
        assert (err.value.status, err.value.code) == (status, code), overrides
    link = inputs / "link-outside.jsonl"  # a symlink inside an input root pointing out of it
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    with pytest.raises(ServiceError) as err:
        manager.submit(job_request(inputs, tiny_model_dirs, corpus="link-outside"))
    assert err.value.code == "path_not_allowed" and "link-outside" in err.value.message

    first = manager.submit(job_request(inputs, tiny_model_dirs, corpus=[f"toy={inputs / 'small.jsonl'}"]))
    with pytest.raises(ServiceError) as err:  # an active job for the same datastore
        manager.submit(job_request(inputs, tiny_model_dirs, overwrite=True))
    assert err.value.status == 409 and first.id in err.value.message
    assert [j.status for j in manager.list()] == ["queued"]
    with pytest.raises(ServiceError) as err:
        manager.get("0" * 32)
    assert (err.value.status, err.value.code) == (404, "job_not_found")


def test_cancel_queued_and_running_jobs(settings, inputs, tiny_model_dirs, managers):
    manager = managers(settings)
    manager.start()
    running = manager.submit(job_request(inputs, tiny_model_dirs, corpus="large"))
    queued = manager.submit(job_request(inputs, tiny_model_dirs, datastore="later"))
    wait_for(lambda: manager.get(running.id), lambda j: j.status == "running" and j.progress.total > 0)
    pid = manager.store.get(running.id)["pid"]
    assert pid and pid_alive(pid)

    assert manager.cancel(queued.id).status == "cancelled"
    job = manager.cancel(running.id)
    assert job.status == "cancelled" and job.finished_at is not None
    assert 0 < job.progress.total == 1500 and job.progress.done < job.progress.total
    assert not pid_alive(pid)
    assert not (settings.root / "pool").exists() and not (settings.root / ".pool.partial").exists()
    assert not (settings.root / "later").exists()
    with pytest.raises(ServiceError) as err:
        manager.cancel(running.id)
    assert (err.value.status, err.value.code) == (409, "conflict")
    assert {j.id: j.status for j in manager.list()} == {running.id: "cancelled", queued.id: "cancelled"}


def test_stop_requeues_the_running_job_and_the_next_manager_resumes_it(settings, inputs, tiny_model_dirs, managers):
    first = managers(settings, index_args=SHARDED)
    first.start()
    job = first.submit(job_request(inputs, tiny_model_dirs, corpus="medium"))
    wait_for(lambda: first.get(job.id), lambda j: done_shards(settings.root) >= 2 or finished(j))
    first.stop()
    stopped = first.get(job.id)
    assert stopped.status == "queued", "the job finished before the service stopped"
    assert stopped.attempts == 0 and first.store.get(job.id)["pid"] is None  # a shutdown is no failed attempt

    reader = JobManager(settings)  # a fresh process's view of the jobs, from SQLite
    assert [(j.id, j.status) for j in reader.list()] == [(job.id, "queued")]

    second = managers(settings, index_args=SHARDED)
    second.start()
    resumed = wait_for(lambda: second.get(job.id), finished)
    assert resumed.status == "succeeded", resumed.error
    assert resumed.attempts == 1 and resumed.progress.done == resumed.progress.total == 144
    assert "resuming" in log_text(settings, job.id)
    assert Datastore.open(settings.root / "pool").manifest.counts.examples == 144


SERVICE_SCRIPT = """
import sys, time
from gradstore.client.models import IndexJobRequest
from gradstore.service.jobs import JobManager
from gradstore.service.settings import Settings
settings = Settings.model_validate_json(sys.argv[1])
manager = JobManager(settings, index_args=sys.argv[3:])
manager.start()
print(manager.submit(IndexJobRequest.model_validate_json(sys.argv[2])).id, flush=True)
time.sleep(600)
"""


def test_a_job_left_running_by_a_crashed_service_is_resumed(settings, inputs, tiny_model_dirs, managers):
    request = job_request(inputs, tiny_model_dirs, corpus="medium")
    service = subprocess.Popen([sys.executable, "-c", SERVICE_SCRIPT, settings.model_dump_json(),
                                request.model_dump_json(), *SHARDED], stdout=subprocess.PIPE, text=True)
    try:
        job_id = service.stdout.readline().strip()
        reader = JobManager(settings)
        wait_for(lambda: reader.get(job_id), lambda j: done_shards(settings.root) >= 2 or finished(j))
        service.send_signal(signal.SIGKILL)  # the service dies; its indexer is left behind
        service.wait()
    finally:
        service.kill()
    row = reader.store.get(job_id)
    assert row["status"] == "running" and row["attempts"] == 1, "the job finished before the service died"
    orphan = row["pid"]

    manager = managers(settings, index_args=SHARDED)
    manager.start()  # settles the job: stops the orphan, queues the job again
    assert not pid_alive(orphan)
    job = wait_for(lambda: manager.get(job_id), finished)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2 and job.progress.done == job.progress.total == 144
    assert "resuming" in log_text(settings, job_id)
    assert Datastore.open(settings.root / "pool").manifest.counts.examples == 144


def test_a_job_interrupted_too_often_fails_with_a_reason(settings, inputs, tiny_model_dirs, managers):
    old = managers(settings)
    job = old.submit(job_request(inputs, tiny_model_dirs))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old.store.update(job.id, status="running", attempts=3, pid=dead.pid, started_at=job.created_at.isoformat())

    manager = managers(settings)
    manager.start()
    job = manager.get(job.id)
    assert job.status == "failed" and job.finished_at is not None
    assert "3 attempts" in job.error
    assert not (settings.root / "pool").exists()


def test_an_indexer_started_just_before_a_crash_is_found_without_its_pid(settings, inputs, tiny_model_dirs,
                                                                          managers):
    """The service died after starting the indexer but before recording its pid."""
    old = managers(settings)
    job = old.submit(job_request(inputs, tiny_model_dirs))
    progress_file = old.jobs_dir / job.id / "progress.json"
    # A stand-in for that indexer: a live process with the indexer's identifying arguments.
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "gradstore.cli", "index",
                               f"--progress-file={progress_file}"], start_new_session=True)
    try:
        old.store.update(job.id, status="running", attempts=1, pid=None, started_at=job.created_at.isoformat())
        manager = managers(settings)
        manager.start()
        assert orphan.wait(timeout=60) is not None  # terminated by the new service
        assert manager.get(job.id).status in ("queued", "running", "succeeded")
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_http_api(settings, inputs, tiny_model_dirs):
    from fastapi.testclient import TestClient

    from gradstore.service.app import create_app

    settings = settings.model_copy(update={"auth_disabled": False, "api_keys": ["secret"]})
    with TestClient(create_app(settings)) as client:
        body = job_request(inputs, tiny_model_dirs).model_dump(mode="json")
        assert client.post("/v1/jobs", json=body).status_code == 401
        client.headers["X-API-Key"] = "secret"

        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        job = Job.model_validate(response.json())
        assert response.headers["location"] == f"/v1/jobs/{job.id}"
        assert job.status in ("queued", "running")

        def get():
            reply = client.get(response.headers["location"])
            assert reply.status_code == 200
            return Job.model_validate(reply.json())

        job = wait_for(get, finished)
        assert job.status == "succeeded", job.error
        assert job.progress.done == job.progress.total == 30
        assert client.get("/v1/datastores/pool").json()["examples"] == 30
        listed = client.get("/v1/jobs").json()["jobs"]
        assert [j["id"] for j in listed] == [job.id]

        missing = client.get("/v1/jobs/nope")
        assert missing.status_code == 404 and missing.json()["code"] == "job_not_found"
        assert client.post("/v1/jobs/nope/cancel").status_code == 404
        again = client.post(f"/v1/jobs/{job.id}/cancel")
        assert again.status_code == 409 and again.json()["code"] == "conflict"

        outside = dict(body, datastore="other", corpus=["/etc/passwd"])
        reply = client.post("/v1/jobs", json=outside)
        assert reply.status_code == 403 and reply.json()["code"] == "path_not_allowed"
        assert "/etc/passwd" in reply.json()["message"]
        for bad in ({"proj_dim": 0}, {"proj_dim": 2**70}, {"max_length": 2**40}, {"seed": 2**64}):
            reply = client.post("/v1/jobs", json=dict(body, datastore="other", **bad))
            assert reply.status_code == 422 and next(iter(bad)) in reply.json()["message"], bad
        assert client.post("/v1/jobs", json=body).json()["code"] == "conflict"
