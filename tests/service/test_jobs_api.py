"""The jobs API through the real server (``gradstore serve`` on loopback, real indexer
subprocesses): submissions validated in full before any work, output-name conflicts found at
submit, failed jobs leaving nothing behind and explaining themselves without tracebacks or host
paths, corpus lists of any length, paginated listing (and the SDK following it), and an indexer
that does not outlive a killed server."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from gradstore.client import AsyncClient, Client
from gradstore.service.jobs import JobStore
from gradstore.service.process import ServiceProcess

from conftest import chat_records, write_jsonl

KEY = "jobs-key"
AUTH = {"X-API-Key": KEY}


@pytest.fixture
def root(tmp_path, tiny_model_dirs):
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    write_jsonl(root / "in" / "small.jsonl", chat_records(12, 0, "ex"))
    return root


def serve(root: Path, tiny_model_dirs) -> ServiceProcess:
    roots = json.dumps([str(root), str(tiny_model_dirs["gpt2"])])
    return ServiceProcess(root, api_key=KEY, log_file=root.parent / "service.log",
                          env={"GRADSTORE_JOB_INPUT_ROOTS": roots})


def job(tiny_model_dirs, name="store", corpus=("in/small.jsonl",), **fields) -> dict:
    return {"datastore": name, "corpus": list(corpus), "model": str(tiny_model_dirs["gpt2"]), "gradient_type": "sgd",
            "lora_r": 4, "lora_alpha": 8, "proj_dim": 64, "max_length": 64, "device": "cpu", **fields}


def wait(client: httpx.Client, job_id: str, until=lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
         timeout=180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = client.get(f"/v1/jobs/{job_id}").json()
        if until(current):
            return current
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: timed out; it is {current['status']}")


def test_bad_values_are_refused_at_submit_and_nothing_is_queued(root, tiny_model_dirs):
    with serve(root, tiny_model_dirs) as service, httpx.Client(base_url=service.url, headers=AUTH) as client:
        for change in ({"device": "cpu --out=/tmp/x"}, {"device": "cuda:0 "}, {"datastore": "a/b"},
                       {"datastore": "x" * 129}, {"proj_dim": 0}, {"lora_r": 1 << 20}, {"checkpoints": ["c"] * 300},
                       {"corpus": ["in/small.jsonl\nin/small.jsonl"]}, {"model": "m\x00"}):
            response = client.post("/v1/jobs", json=job(tiny_model_dirs, **change))
            assert response.status_code == 422, (change, response.text)
            assert response.json()["detail"][0]["loc"][:2] == ["body", next(iter(change))], change
        for change, status, code in (({"corpus": ["in/missing.jsonl"]}, 404, "input_not_found"),
                                     ({"corpus": ["/etc/passwd"]}, 403, "path_not_allowed"),
                                     ({"model": "in/../.."}, 403, "path_not_allowed"),
                                     ({"gradient_type": "adam"}, 400, "invalid_job")):
            response = client.post("/v1/jobs", json=job(tiny_model_dirs, **change))
            assert response.status_code == status and response.json()["code"] == code, (change, response.text)
        assert client.get("/v1/jobs").json() == {"jobs": [], "next_cursor": None}
        assert sorted(path.name for path in root.iterdir()) == [".gradstore", "in"]


def test_an_output_name_that_is_a_link_is_a_conflict_at_submit(root, tiny_model_dirs, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "linked").symlink_to(elsewhere)
    (root / ".work.partial").symlink_to(elsewhere)
    with serve(root, tiny_model_dirs) as service, httpx.Client(base_url=service.url, headers=AUTH) as client:
        for name, path in (("linked", "linked"), ("work", ".work.partial")):
            for overwrite in (False, True):
                response = client.post("/v1/jobs", json=job(tiny_model_dirs, name, overwrite=overwrite))
                assert response.status_code == 409, response.text
                body = response.json()
                assert body["code"] == "conflict" and "symbolic link" in body["message"]
                assert body["detail"] == {"datastore": name, "path": path}
        assert client.get("/v1/jobs").json()["jobs"] == []
    assert list(elsewhere.iterdir()) == [] and not (root / ".linked.partial").exists()


def test_a_failed_job_leaves_no_partial_folder_and_explains_itself(root, tiny_model_dirs):
    bad = root / "in" / "bad.jsonl"
    write_jsonl(bad, chat_records(30, 1, "ok") + [{"id": "x", "messages": [{"role": "bot", "content": "hi"}]}])
    with serve(root, tiny_model_dirs) as service, httpx.Client(base_url=service.url, headers=AUTH) as client:
        submitted = client.post("/v1/jobs", json=job(tiny_model_dirs, "broken", corpus=["in/bad.jsonl"]))
        assert submitted.status_code == 202, submitted.text
        failed = wait(client, submitted.json()["id"])
    assert failed["status"] == "failed" and failed["error"].startswith("error: ")
    assert "bad.jsonl:31" in failed["error"] and "role" in failed["error"]
    assert "Traceback" not in failed["error"] and str(root) not in failed["error"]
    assert not (root / ".broken.partial").exists() and not (root / "broken").exists()


def test_a_hundred_thousand_corpus_entries_fit_in_one_job(root, tiny_model_dirs):
    """More entries than a command line holds (Linux: 2 MiB of arguments) reach the indexer: it
    reads them in order and stops at the first bad record, in the first source."""
    (root / "in" / "empty.jsonl").touch()
    write_jsonl(root / "in" / "first.jsonl", [{"id": "x", "messages": [{"role": "bot", "content": "hi"}]}])
    entries = ["in/first.jsonl"] + [f"source-{i}=in/empty.jsonl" for i in range(100_000)]
    assert len(json.dumps(entries)) > 2 << 20
    with serve(root, tiny_model_dirs) as service, httpx.Client(base_url=service.url, headers=AUTH,
                                                              timeout=120) as client:
        submitted = client.post("/v1/jobs", json=job(tiny_model_dirs, "wide", corpus=entries))
        assert submitted.status_code == 202, submitted.text
        done = wait(client, submitted.json()["id"], timeout=300)
    assert done["status"] == "failed" and done["error"].startswith("error: "), done["error"]
    assert "first.jsonl:1" in done["error"] and "role" in done["error"]
    assert (root / ".gradstore" / "jobs" / done["id"] / "corpus.txt").read_text().count("\n") == 100_001


def test_jobs_are_listed_a_page_at_a_time_and_the_sdk_follows_the_pages(root, tiny_model_dirs):
    with serve(root, tiny_model_dirs) as service, httpx.Client(base_url=service.url, headers=AUTH) as client:
        ids = []
        for i in range(5):
            submitted = client.post("/v1/jobs", json=job(tiny_model_dirs, f"store-{i}"))
            assert submitted.status_code == 202, submitted.text
            ids.append(submitted.json()["id"])
            client.post(f"/v1/jobs/{ids[-1]}/cancel")
        newest_first = ids[::-1]
        pages, cursor = [], None
        while True:
            page = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            pages.append([j["id"] for j in page["jobs"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
        assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == newest_first
        for params in ({"limit": 0}, {"limit": 1001}, {"cursor": "x"}):
            assert client.get("/v1/jobs", params=params).status_code == 422, params
        with Client(service.url, api_key=KEY) as sdk:
            assert [j.id for j in sdk.list_jobs(page_size=2)] == newest_first

        async def listed():
            async with AsyncClient(service.url, api_key=KEY) as sdk:
                return [j.id for j in await sdk.list_jobs(page_size=2)]

        assert asyncio.run(listed()) == newest_first


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_the_indexer_of_a_killed_server_stops_by_itself_and_the_next_attempt_starts_from_zero(root, tiny_model_dirs):
    write_jsonl(root / "in" / "large.jsonl", chat_records(3000, 2, "ex"))
    service = serve(root, tiny_model_dirs).start()
    try:
        with httpx.Client(base_url=service.url, headers=AUTH) as client:
            submitted = client.post("/v1/jobs", json=job(tiny_model_dirs, "big", corpus=["in/large.jsonl"]))
            job_id = submitted.json()["id"]
            wait(client, job_id, until=lambda j: j["progress"]["done"] > 0 or j["status"] != "queued")
        store = JobStore(root / ".gradstore" / "jobs.sqlite")
        deadline = time.monotonic() + 30  # the job is marked running just before its child's pid is recorded
        row = store.get(job_id)
        while not row["pid"] and time.monotonic() < deadline:
            time.sleep(0.05)
            row = store.get(job_id)
        assert row["status"] == "running" and row["pid"], row
        pid = row["pid"]
        service.kill()  # SIGKILL: no shutdown code runs
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the indexer outlived its server"
        store.update(job_id, progress=json.dumps({"done": 2999, "total": 3000}))  # what the dead attempt had
    finally:
        service.kill()
    with serve(root, tiny_model_dirs) as service, httpx.Client(base_url=service.url, headers=AUTH) as client:
        current = wait(client, job_id, until=lambda j: j["attempts"] == 2)
        assert current["progress"]["done"] < 2999
        client.post(f"/v1/jobs/{job_id}/cancel")
