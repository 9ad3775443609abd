"""Hostile and unlucky requests against the real server (``gradstore serve`` on loopback over
copies of the test stores): deep nesting, oversize target records, a store damaged while it is
served, missing and wrong API keys. Each gets a 4xx or 503 naming the reason, never a 500, and
the connection and the other stores keep working."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from gradstore.service.process import ServiceProcess

from conftest import copy_stores

KEY = "hostile-key"
AUTH = {"X-API-Key": KEY}
TARGETS = {"datastore": "targets"}


@pytest.fixture(scope="module")
def served(service_root, tmp_path_factory):
    root = copy_stores(service_root, tmp_path_factory.mktemp("hostile-root"))
    for name in ("damaged", "removed"):
        copy_stores_one(root / "pool", root / name)
    with ServiceProcess(root, api_key=KEY, log_file=root.parent / f"{root.name}.log") as service:
        with httpx.Client(base_url=service.url, headers=AUTH, timeout=60) as client:
            yield service, root, client


def copy_stores_one(source, dest):
    import shutil

    shutil.copytree(source, dest)


def nested(depth: int) -> dict:
    """A select request whose target record holds an extra field nested ``depth`` lists deep."""
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    text = json.dumps({"targets": {"records": [record]}, "k": 3})
    return text[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"


def error_of(response, status, code) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "detail"} and body["code"] == code, body
    return body


@pytest.mark.parametrize("depth", [300, 900, 10_000])
def test_deep_nesting_is_refused_naming_the_limit_and_the_connection_survives(served, depth):
    _, _, client = served
    response = client.post("/v1/datastores/pool/select", content=nested(depth).encode(),
                           headers={"content-type": "application/json"})
    error = error_of(response, 400, "limit_exceeded")
    assert error["detail"] == {"limit": "max_json_depth", "value": depth + 1, "max": 64}
    assert "beyond the limit of 64" in error["message"]
    # The same connection answers the next request.
    assert client.post("/v1/datastores/pool/select", json={"targets": TARGETS, "k": 3}).status_code == 200


def test_nesting_within_the_limit_is_accepted(served):
    _, _, client = served
    response = client.post("/v1/datastores/pool/select", json={"targets": TARGETS, "k": 3,
                                                                "weights": {"epoch-1": 1.0, "epoch-2": 1.0}})
    assert response.status_code == 200
    deep = client.post("/v1/datastores/pool/select", content=nested(40).encode(),
                       headers={"content-type": "application/json"})
    assert deep.status_code != 400 or deep.json()["code"] != "limit_exceeded", deep.text


def test_an_oversize_target_record_is_refused_before_tokenising(served):
    _, _, client = served
    big = {"messages": [{"role": "user", "content": "alpha " * 1_000_000}, {"role": "assistant", "content": "ok"}]}
    started = time.monotonic()
    response = client.post("/v1/datastores/pool/select", json={"targets": {"records": [big]}, "k": 3})
    elapsed = time.monotonic() - started
    error = error_of(response, 400, "limit_exceeded")
    assert error["detail"]["field"] == "targets.records[0]" and error["detail"]["limit"] == "max_target_record_chars"
    assert error["detail"]["value"] > 6_000_000 and "targets.records[0]" in error["message"]
    assert elapsed < 2.0, elapsed  # tokenising it takes seconds


def _example_and_similar(client, name):
    return (client.get(f"/v1/datastores/{name}/examples/ex-1"),
            client.post(f"/v1/datastores/{name}/similar", json={"id": "ex-1", "k": 3}))


def test_a_store_damaged_while_served_answers_503_on_every_route_at_once(served):
    _, root, client = served
    for response in _example_and_similar(client, "damaged"):
        assert response.status_code == 200, response.text
    shard = root / "damaged" / "segments" / "seg-000001" / "examples" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated in place
    reason = "examples/part-00000.parquet"
    for response in _example_and_similar(client, "damaged"):
        error = error_of(response, 503, "datastore_unavailable")
        assert reason in error["message"] and str(root) not in error["message"]
    for response in (client.get("/v1/datastores/damaged"),
                     client.post("/v1/datastores/damaged/select", json={"targets": TARGETS, "k": 3}),
                     client.post("/v1/datastores/damaged/influence", json={"targets": TARGETS, "k": 3})):
        assert reason in error_of(response, 503, "datastore_unavailable")["message"]
    for response in _example_and_similar(client, "pool"):
        assert response.status_code == 200, response.text
    assert client.post("/v1/datastores/pool/select", json={"targets": TARGETS, "k": 3}).status_code == 200


def test_a_store_whose_features_vanish_while_served_is_reported_then_refused(served):
    _, root, client = served
    before = client.post("/v1/datastores/removed/select", json={"targets": TARGETS, "k": 3})
    assert before.status_code == 200
    for path in (root / "removed" / "segments" / "seg-000001" / "features").rglob("part-00001.*"):
        path.unlink()
    # The version's feature files are held open (mapped) once scanned: the service answers from
    # them, as they were, until the store's files are checked again.
    again = client.post("/v1/datastores/removed/select", json={"targets": TARGETS, "k": 3})
    assert again.status_code == 200 and again.json()["items"] == before.json()["items"]
    ready = client.get("/readyz")
    assert ready.status_code == 503
    states = {s["name"]: s for s in ready.json()["datastores"]}
    assert "part-00001" in states["removed"]["error"] and not states["removed"]["loaded"]
    error = error_of(client.post("/v1/datastores/removed/select", json={"targets": TARGETS, "k": 5}),
                     503, "datastore_unavailable")
    assert "part-00001" in error["message"]
    assert client.post("/v1/datastores/pool/select", json={"targets": TARGETS, "k": 5}).status_code == 200


def test_every_non_health_route_needs_the_key(served):
    service, _, _ = served
    schema = httpx.get(f"{service.url}/openapi.json").json()
    checked = 0
    for path, methods in schema["paths"].items():
        concrete = (path.replace("{name}", "pool").replace("{id}", "ex-1").replace("{job_id}", "0" * 32)
                    .replace("{selection_id}", "a" * 64))
        for method in methods:
            for headers in ({}, {"X-API-Key": "wrong"}):
                response = httpx.request(method.upper(), f"{service.url}{concrete}", headers=headers,
                                         json={} if method == "post" else None, timeout=30)
                if path in ("/healthz", "/readyz", "/metrics", "/ui/config.json"):  # the UI asks before it has a key
                    assert response.status_code != 401, path
                    continue
                error = error_of(response, 401, "unauthorized")
                assert "X-API-Key" in error["message"], (method, path)
                checked += 1
    assert checked >= 2 * 12
