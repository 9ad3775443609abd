"""The REST service end to end: a real app over real datastores built by the indexer on a tiny model.

Results are checked against numpy computations on the stores' Parquet files, so the service is
tested against the datastore format, not against its own code.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from gradstore.service.app import create_app
from gradstore.service.process import free_port
from gradstore.service.settings import ConfigurationError, Settings

from conftest import DIM, features, id_of, less_scores, numpy_top_k, top_rows, unit, weights

KEY = "test-key-1"
AUTH = {"X-API-Key": KEY}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def corpus(service_corpus):
    """``(folder, {source: records})`` of the shared service stores (see ``conftest.py``)."""
    return service_corpus


@pytest.fixture(scope="module")
def root(service_root):
    """A service root with ``pool``, ``targets`` and ``pool-noindex`` (see ``conftest.py``)."""
    return service_root


def make_app(root: Path, **settings):
    return create_app(Settings(root=root, api_keys=[KEY], **settings))


@pytest.fixture(scope="module")
def client(root):
    with TestClient(make_app(root)) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "detail"} and body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return body


# ------------------------------------------------------------------------- settings and auth


def test_refuses_to_start_without_keys_unless_auth_disabled(root):
    with pytest.raises(ConfigurationError, match="no API key"):
        create_app(Settings(root=root))
    with TestClient(create_app(Settings(root=root, auth_disabled=True))) as open_client:
        assert open_client.get("/v1/datastores").status_code == 200


def test_settings_from_environment_and_key_file(root, tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("# service keys\nfrom-file\n\n")
    monkeypatch.setenv("GRADSTORE_ROOT", str(root))
    monkeypatch.setenv("GRADSTORE_API_KEYS", "env-1, env-2")
    monkeypatch.setenv("GRADSTORE_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("GRADSTORE_MAX_K", "5")
    settings = Settings()
    assert settings.root == root.resolve() and settings.max_k == 5
    assert settings.load_api_keys() == {"env-1", "env-2", "from-file"}
    assert settings.job_input_roots == [root.resolve()] and settings.export_dir == root.resolve() / ".exports"
    assert Settings(api_keys=["flag"]).api_keys == ["flag"]  # keyword arguments (CLI flags) win
    monkeypatch.setenv("GRADSTORE_AUTH_DISABLED", "1")
    assert Settings().auth_disabled


def test_auth_required_on_v1_routes_only(client):
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
        response = client.get("/v1/datastores", headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "ApiKey"
    assert_error(client.post("/v1/datastores/pool/select", json={}), 401, "unauthorized")
    assert_error(client.get("/v1/jobs"), 401, "unauthorized")
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/datastores", headers=AUTH).status_code == 200


# ----------------------------------------------------------------------------- datastores


def test_list_describe_and_example(client, corpus):
    listed = client.get("/v1/datastores", headers=AUTH).json()["datastores"]
    assert [d["name"] for d in listed] == ["pool", "pool-noindex", "targets"]
    pool = listed[0]
    assert pool["examples"] == 40 and pool["dim"] == DIM and pool["index"] == "flat"
    assert [c["name"] for c in pool["checkpoints"]] == ["epoch-1", "epoch-2"] and pool["gradient_type"] == "adam"
    assert listed[1]["index"] is None

    detail = client.get("/v1/datastores/pool", headers=AUTH).json()
    assert detail["sources"] == {"more": 12, "toy": 28} and detail["projection"]["dim"] == DIM
    assert detail["created_at"] and detail["lora"]["r"] == 4

    _, records = corpus
    example = client.get("/v1/datastores/pool/examples/more-3", headers=AUTH).json()
    assert example["row"] == 31 and example["source"] == "more" and example["record"] == records["more"][3]
    assert_error(client.get("/v1/datastores/pool/examples/nope", headers=AUTH), 404, "example_not_found")


# ---------------------------------------------------------------------------------- select


def select(client, name="pool", **body):
    response = client.post(f"/v1/datastores/{name}/select", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def test_select_with_datastore_targets_matches_numpy_less(client, root):
    targets = {c: features(root / "targets", c) for c in weights(root / "pool")}
    expected = less_scores(root, targets)
    page = select(client, targets={"datastore": "targets"}, k=12, page_size=100)
    assert page["total"] == 12 and page["pool"] == 40 and page["next_cursor"] is None
    assert [item["row"] for item in page["items"]] == top_rows(expected, 12)
    np.testing.assert_allclose([item["score"] for item in page["items"]], np.sort(expected)[::-1][:12], atol=1e-4)
    assert [item["rank"] for item in page["items"]] == list(range(1, 13))


def test_select_with_vectors_and_subtasks_matches_numpy_less(client, root):
    rng = np.random.default_rng(7)
    vectors = {c: rng.normal(size=(4, DIM)) for c in weights(root / "pool")}
    subtasks = ["a", "b", "a", "b"]
    expected = less_scores(root, vectors, subtasks)
    page = select(client, targets={"vectors": {c: v.tolist() for c, v in vectors.items()}, "subtasks": subtasks},
                  fraction=0.25)
    assert [item["row"] for item in page["items"]] == top_rows(expected, 10)
    assert set(page["items"][0]["subtask_scores"]) == {"a", "b"}


def test_strategies_route_lists_the_registry(client):
    from gradstore.selection.strategies import registry

    listed = client.get("/v1/strategies", headers=AUTH)
    assert listed.status_code == 200
    strategies = listed.json()["strategies"]
    assert [s["name"] for s in strategies] == list(registry())
    quality = next(s for s in strategies if s["name"] == "quality")
    assert quality["needs_targets"] == "none" and quality["features"] == ["scores"]
    assert set(quality["options_schema"]["properties"]) == {"name", "score", "order", "checkpoint"}
    assert client.get("/v1/strategies").status_code == 401


def test_select_target_free_and_legacy_forms(client, root):
    loss = np.zeros(40)
    for checkpoint, weight in weights(root / "pool").items():
        table = pq.read_table(root / "pool" / "segments" / "seg-000001" / "scores" / checkpoint, columns=["row", "loss"])
        loss[table.column("row").to_numpy()] += weight * table.column("loss").to_numpy()
    page = select(client, strategy={"name": "quality", "score": "loss"}, k=6)
    assert [item["row"] for item in page["items"]] == top_rows(loss, 6)
    assert page["strategy"] == {"name": "quality", "score": "loss", "order": "high", "checkpoint": None}
    legacy = select(client, targets={"datastore": "targets"}, k=5, aggregation="max")
    modern = select(client, targets={"datastore": "targets"}, k=5, strategy={"name": "less", "aggregation": "max"})
    assert legacy["selection_id"] == modern["selection_id"] and legacy["items"] == modern["items"]
    filtered = select(client, strategy="random", fraction=1.0,
                      filters=[{"score": "loss", "keep": "below", "quantile": 0.5}])
    assert filtered["pool"] == filtered["total"] == 20 and filtered["report"]["filters"][0]["pool"] == 20
    for body, message in [
        ({"k": 3, "strategy": "random", "targets": {"datastore": "targets"}}, "does not use targets"),
        ({"k": 3}, "strategy 'less' needs targets"),
        ({"k": 3, "strategy": {"name": "quality", "score": "sparkle"}}, "no score 'sparkle'"),
        ({"k": 3, "strategy": {"name": "rds"}, "targets": {"vectors": {c: [[1.0] * DIM] for c in weights(root / "pool")}}},
         "the targets have no representation vectors"),
    ]:
        response = client.post("/v1/datastores/pool/select", json=body, headers=AUTH)
        assert message in assert_error(response, 422, "invalid_query")["message"]
    unknown = client.post("/v1/datastores/pool/select", json={"k": 3, "strategy": {"name": "best"}}, headers=AUTH)
    assert_error(unknown, 422, "validation_error")


def test_select_with_target_records_equals_the_target_store(client, corpus):
    _, records = corpus
    by_records = select(client, targets={"records": records["tgt"]}, k=8)
    by_store = select(client, targets={"datastore": "targets"}, k=8)
    assert [i["row"] for i in by_records["items"]] == [i["row"] for i in by_store["items"]]
    np.testing.assert_allclose([i["score"] for i in by_records["items"]], [i["score"] for i in by_store["items"]],
                               atol=2e-3)


def test_pagination_covers_the_selection_once_in_order(client):
    body = {"targets": {"datastore": "targets"}, "fraction": 1.0, "page_size": 7}
    first = select(client, **body)
    assert select(client, **{**body, "page_size": 3})["selection_id"] == first["selection_id"]  # deterministic
    rows, ranks, page = [], [], first
    while True:
        rows += [item["row"] for item in page["items"]]
        ranks += [item["rank"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        response = client.get(f"/v1/datastores/pool/selections/{first['selection_id']}",
                              params={"cursor": page["next_cursor"], "page_size": 7}, headers=AUTH)
        assert response.status_code == 200, response.text
        page = response.json()
    assert sorted(rows) == list(range(40)) and ranks == list(range(1, 41))
    full = select(client, **{**body, "page_size": 40})
    assert rows == [item["row"] for item in full["items"]]


def test_unknown_or_evicted_selection_is_gone(root, client):
    missing = "0" * 64
    body = assert_error(client.get(f"/v1/datastores/pool/selections/{missing}", headers=AUTH), 410,
                        "selection_expired")
    assert "repeat the select request" in body["message"]
    assert_error(client.get("/v1/datastores/pool/selections/../x", headers=AUTH), 404, "not_found")
    assert_error(client.get("/v1/datastores/pool/selections/not-an-id", headers=AUTH), 400, "invalid_selection_id")
    page = select(client, targets={"datastore": "targets"}, k=5, page_size=2)
    bad = client.get(f"/v1/datastores/pool/selections/{page['selection_id']}", params={"cursor": "garbage!"},
                     headers=AUTH)
    assert_error(bad, 400, "invalid_cursor")
    with TestClient(make_app(root, selection_cache_size=1)) as small:
        old = select(small, targets={"datastore": "targets"}, k=5, page_size=2)
        select(small, targets={"datastore": "targets"}, k=6)
        response = small.get(f"/v1/datastores/pool/selections/{old['selection_id']}",
                             params={"cursor": old["next_cursor"]}, headers=AUTH)
        assert_error(response, 410, "selection_expired")


def test_export_holds_the_selected_original_records(client, corpus):
    _, records = corpus
    by_id = {r["id"]: r for items in records.values() for r in items}
    page = select(client, targets={"datastore": "targets"}, k=9, export="jsonl")
    ids = [item["id"] for item in page["items"]]
    exported = Path(page["export_path"])
    assert exported.name == f"{page['selection_id']}.jsonl"
    assert [json.loads(line) for line in exported.read_text().splitlines()] == [by_id[i] for i in ids]
    download = client.get(f"/v1/datastores/pool/selections/{page['selection_id']}/export", headers=AUTH)
    assert download.status_code == 200 and download.content == exported.read_bytes()
    assert download.headers["content-type"].startswith("application/x-ndjson")
    parquet = client.get(f"/v1/datastores/pool/selections/{page['selection_id']}/export",
                         params={"format": "parquet"}, headers=AUTH)
    assert parquet.status_code == 200 and parquet.content[:4] == b"PAR1"


# ------------------------------------------------------------------------ influence, similar


@pytest.mark.parametrize("name", ["pool", "pool-noindex"])
def test_influence_equals_exact_numpy_top_k(client, root, name):
    targets = {c: features(root / "targets", c) for c in weights(root / "pool")}
    response = client.post(f"/v1/datastores/{name}/influence", json={"targets": {"datastore": "targets"}, "k": 5},
                           headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["exact"] is True and len(body["results"]) == 6
    for result, (rows, scores) in zip(body["results"], numpy_top_k(root, targets, 5)):
        assert [n["row"] for n in result["neighbors"]] == rows
        np.testing.assert_allclose([n["score"] for n in result["neighbors"]], scores, atol=1e-3)


def test_influence_with_own_checkpoints_scores_exactly(client, root):
    body = {"targets": {"datastore": "targets"}, "k": 4, "checkpoints": ["epoch-2"]}
    response = client.post("/v1/datastores/pool/influence", json=body, headers=AUTH).json()
    assert response["exact"] is True
    only_second = features(root / "pool", "epoch-2") @ unit(features(root / "targets", "epoch-2")).T
    for result in response["results"]:
        expected = top_rows(only_second[:, result["target"]], 4)
        assert [n["row"] for n in result["neighbors"]] == expected


def test_similar_by_id_and_by_vector(client, root):
    w = weights(root / "pool")
    stacked = np.concatenate([np.sqrt(w[c]) * features(root / "pool", c) for c in w], axis=1)
    gram = stacked @ stacked.T
    response = client.post("/v1/datastores/pool/similar", json={"id": "ex-5", "k": 4}, headers=AUTH).json()
    expected = [r for r in top_rows(gram[5], 5) if r != 5][:4]
    assert [n["row"] for n in response["neighbors"]] == expected
    assert [n["id"] for n in response["neighbors"]] == [id_of(row) for row in expected]
    with_self = client.post("/v1/datastores/pool/similar", json={"id": "ex-5", "k": 3, "include_self": True},
                            headers=AUTH).json()
    assert with_self["neighbors"][0]["row"] == 5
    vectors = {c: features(root / "pool", c)[7].tolist() for c in w}
    by_vector = client.post("/v1/datastores/pool-noindex/similar", json={"vectors": vectors, "k": 3},
                            headers=AUTH).json()
    assert by_vector["neighbors"][0]["row"] == 7
    assert [n["row"] for n in by_vector["neighbors"]] == top_rows(gram[7], 3)
    assert_error(client.post("/v1/datastores/pool/similar", json={"id": "nope"}, headers=AUTH), 404,
                 "example_not_found")


# ---------------------------------------------------------------------------------- errors


def test_names_that_leave_the_root_are_refused(root, client, tmp_path):
    for path in ("/v1/datastores/%2e%2e", "/v1/datastores/..%2Fpool", "/v1/datastores/.exports",
                 "/v1/datastores/a..b", "/v1/datastores/%2Fetc"):
        response = client.get(path, headers=AUTH)
        assert response.status_code in (400, 404), path
        assert set(response.json()) == {"code", "message", "detail"}
    assert_error(client.get("/v1/datastores/%2e%2e", headers=AUTH), 400, "invalid_name")
    assert_error(client.get("/v1/datastores/nothing-here", headers=AUTH), 404, "datastore_not_found")
    for name in ("../targets", "/etc", "..", str(root / "targets")):
        response = client.post("/v1/datastores/pool/select", json={"targets": {"datastore": name}, "k": 3},
                               headers=AUTH)
        error = assert_error(response, 422, "validation_error")  # the request model's name pattern
        assert ["body", "targets", "TargetDatastore", "datastore"] in [item["loc"] for item in error["detail"]]
    # A link inside the root to a store outside it is never opened.
    outside = tmp_path / "outside"
    shutil.copytree(root / "targets", outside)
    link_root = tmp_path / "root"
    link_root.mkdir()
    (link_root / "escape").symlink_to(outside)
    with TestClient(make_app(link_root)) as linked:
        assert linked.get("/v1/datastores", headers=AUTH).json() == {"datastores": []}
        assert_error(linked.get("/v1/datastores/escape", headers=AUTH), 400, "invalid_name")


def test_limits_and_invalid_queries(client):
    targets = {"datastore": "targets"}
    body = assert_error(client.post("/v1/datastores/pool/select", json={"targets": targets, "k": 10**9},
                                    headers=AUTH), 400, "limit_exceeded")
    assert body["detail"] == {"limit": "k", "value": 10**9, "max": 10000}
    assert_error(client.post("/v1/datastores/pool/influence", json={"targets": targets, "k": 10**6}, headers=AUTH),
                 400, "limit_exceeded")
    assert_error(client.post("/v1/datastores/pool/select", json={"targets": targets, "k": 3, "page_size": 10**6},
                             headers=AUTH), 400, "limit_exceeded")
    many = {"epoch-1": [[1.0] * DIM] * 300, "epoch-2": [[1.0] * DIM] * 300}
    assert_error(client.post("/v1/datastores/pool/select", json={"targets": {"vectors": many}, "k": 3},
                             headers=AUTH), 400, "limit_exceeded")
    wrong_dim = {"epoch-1": [[1.0] * 7], "epoch-2": [[1.0] * 7]}
    body = assert_error(client.post("/v1/datastores/pool/select", json={"targets": {"vectors": wrong_dim}, "k": 3},
                                    headers=AUTH), 422, "invalid_query")
    assert "dimension 7" in body["message"]
    unknown = {"epoch-1": [[1.0] * DIM], "epoch-9": [[1.0] * DIM]}
    body = assert_error(client.post("/v1/datastores/pool/select", json={"targets": {"vectors": unknown}, "k": 3},
                                    headers=AUTH), 422, "invalid_query")
    assert "epoch-9" in body["message"]
    vector = [0.5] * DIM
    vector[3] = float("nan")  # json.dumps writes NaN, which Python's JSON parser accepts
    nan = json.dumps({"targets": {"vectors": {"epoch-1": [vector], "epoch-2": [[0.5] * DIM]}}, "k": 3})
    body = assert_error(client.post("/v1/datastores/pool/select", content=nan,
                                    headers={**AUTH, "content-type": "application/json"}), 422, "invalid_query")
    assert "non-finite" in body["message"]
    nan_similar = json.dumps({"vectors": {"epoch-1": vector, "epoch-2": [0.5] * DIM}})
    body = assert_error(client.post("/v1/datastores/pool/similar", content=nan_similar,
                                    headers={**AUTH, "content-type": "application/json"}), 422, "invalid_query")
    assert "non-finite" in body["message"]
    assert_error(client.post("/v1/datastores/pool/select", json={"targets": targets, "k": 3, "sources": ["x"]},
                             headers=AUTH), 422, "invalid_query")
    body = assert_error(client.post("/v1/datastores/pool/select", content=b'{"targets": ',
                                    headers={**AUTH, "content-type": "application/json"}), 422, "validation_error")
    assert isinstance(body["detail"], list)
    body = assert_error(client.post("/v1/datastores/pool/select", json={"targets": targets, "k": 0}, headers=AUTH),
                        422, "validation_error")
    assert body["detail"][0]["loc"][:2] == ["body", "k"]
    assert_error(client.post("/v1/datastores/pool/select", json={"targets": targets}, headers=AUTH), 422,
                 "validation_error")
    assert_error(client.get("/v1/nowhere", headers=AUTH), 404, "not_found")
    assert_error(client.delete("/v1/datastores/pool", headers=AUTH), 405, "method_not_allowed")


def test_oversized_bodies_are_refused(root):
    with TestClient(make_app(root, max_body_bytes=2048)) as small:
        big = {"targets": {"vectors": {"epoch-1": [[0.5] * DIM] * 4}}, "k": 3}
        assert_error(small.post("/v1/datastores/pool/select", json=big, headers=AUTH), 413, "payload_too_large")

        def chunks():
            for _ in range(10):
                yield b" " * 512

        chunked = small.post("/v1/datastores/pool/select", content=chunks(),
                             headers={**AUTH, "content-type": "application/json"})
        assert "content-length" not in chunked.request.headers
        assert_error(chunked, 413, "payload_too_large")
        assert_error(small.post("/v1/datastores/pool/select", json=big), 413, "payload_too_large")
        assert small.post("/v1/datastores/pool/similar", json={"id": "ex-1", "k": 2}, headers=AUTH).status_code == 200


def test_unexpected_errors_are_json_without_internals(root, monkeypatch):
    app = make_app(root)
    with TestClient(app, raise_server_exceptions=False) as c:
        def explode(name):
            raise RuntimeError("secret internals /etc/shadow")

        monkeypatch.setattr(app.state.registry, "get", explode)
        response = c.get("/v1/datastores/pool", headers=AUTH)
        body = assert_error(response, 500, "internal_error")
        assert "secret" not in response.text and "Traceback" not in response.text and body["detail"] is None


def test_corrupt_store_is_reported_and_the_others_keep_working(root, tmp_path):
    for name in ("pool", "targets", "truncated", "bad-manifest"):
        shutil.copytree(root / ("pool" if name in ("truncated", "bad-manifest") else name), tmp_path / name)
    part = tmp_path / "truncated" / "segments" / "seg-000001" / "scores" / "epoch-1" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:100])
    manifest = tmp_path / "bad-manifest" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete"', '"partial"', 1))
    with TestClient(make_app(tmp_path)) as c:
        response = c.get("/readyz")
        assert response.status_code == 503
        ready = response.json()
        assert ready["ready"] is False
        states = {s["name"]: s for s in ready["datastores"]}
        assert states["pool"] == {"name": "pool", "loaded": True, "error": None}
        assert "part-00001.parquet" in states["truncated"]["error"] and not states["truncated"]["loaded"]
        assert "partial" in states["bad-manifest"]["error"]
        body = assert_error(c.get("/v1/datastores/truncated", headers=AUTH), 503, "datastore_unavailable")
        assert "part-00001.parquet" in body["message"] and str(tmp_path) not in body["message"]
        assert [d["name"] for d in c.get("/v1/datastores", headers=AUTH).json()["datastores"]] == ["pool", "targets"]
        assert select(c, targets={"datastore": "targets"}, k=3)["total"] == 3
        # Repaired stores and new ones are picked up without a restart.
        shutil.rmtree(tmp_path / "truncated")
        shutil.rmtree(tmp_path / "bad-manifest")
        shutil.copytree(root / "targets", tmp_path / "fresh")
        assert c.get("/v1/datastores/fresh", headers=AUTH).status_code == 200
        assert c.get("/readyz").status_code == 200


# ------------------------------------------------------------------------ metrics, openapi


def test_metrics_count_requests_by_route_template(client):
    client.get("/v1/datastores/pool", headers=AUTH)
    client.get("/v1/datastores/pool", headers={"X-API-Key": "wrong"})
    text = client.get("/metrics").text
    assert 'gradstore_http_requests_total{method="GET",route="/v1/datastores/{name}",status="200"}' in text
    assert 'route="/v1/datastores/{name}",status="401"' in text
    assert "gradstore_http_request_duration_seconds_bucket" in text
    assert "gradstore_datastores_loaded" in text
    assert 'gradstore_jobs{status="queued"} 0.0' in text
    # Apps have their own registries: a second app in this process starts from zero.
    with TestClient(make_app(client.app.state.settings.root)) as other:
        assert 'route="/v1/datastores/{name}"' not in other.get("/metrics").text


def test_openapi_lists_the_v1_routes(client):
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "gradstore"
    for path in ("/v1/datastores", "/v1/datastores/{name}", "/v1/datastores/{name}/examples/{id}",
                 "/v1/datastores/{name}/select", "/v1/datastores/{name}/selections/{selection_id}",
                 "/v1/datastores/{name}/selections/{selection_id}/export", "/v1/datastores/{name}/influence",
                 "/v1/datastores/{name}/similar", "/v1/jobs", "/healthz", "/readyz"):
        assert path in spec["paths"], path
    assert "ApiKey" in spec["components"]["securitySchemes"]


# ------------------------------------------------------------------------ real server, CLI


def test_real_uvicorn_server(root):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        response = httpx.get(f"{base}/v1/datastores/targets", headers=AUTH)
        assert response.status_code == 200 and response.json()["examples"] == 6
        assert httpx.get(f"{base}/v1/datastores").status_code == 401
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert not thread.is_alive()


def test_cli_serve_builds_settings_from_flags(root, monkeypatch, capsys):
    import uvicorn

    from gradstore.cli import main

    monkeypatch.delenv("GRADSTORE_API_KEYS", raising=False)
    assert main(["serve", "--root", str(root)]) == 2
    assert "no API key" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setenv("GRADSTORE_PORT", "9999")
    assert main(["serve", "--root", str(root), "--api-key", "a", "--api-key", "b", "--host", "0.0.0.0"]) == 0
    app, options = calls[0]
    assert options["host"] == "0.0.0.0" and options["port"] == 9999
    assert app.state.api_keys == {"a", "b"}
    assert main(["serve", "--root", str(root), "--no-auth", "--port", "1234"]) == 0
    assert calls[1][0].state.api_keys is None and calls[1][1]["port"] == 1234
    assert calls[1][0].state.settings.verify_checksums is False
    assert main(["serve", "--root", str(root), "--no-auth", "--verify-checksums"]) == 0
    assert calls[2][0].state.settings.verify_checksums is True
