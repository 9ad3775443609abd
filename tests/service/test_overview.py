"""The overview routes (stats, example pages and search, the pool map, selection summaries) and
the UI's files, on the shared service stores; checked against the Parquet files and numpy."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from gradstore.datastore import Datastore
from gradstore.service.app import create_app
from gradstore.service.settings import Settings

from conftest import features, id_of, weights

KEY = "overview-key"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def client(service_root):
    with TestClient(create_app(Settings(root=service_root, api_keys=[KEY]))) as c:
        yield c


def ok(response):
    assert response.status_code == 200, response.text
    return response.json()


def error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["message"], body
    return body


# ------------------------------------------------------------------------------------- stats


def test_stats_histograms_match_the_parquet_columns(client, service_root):
    stats = ok(client.get("/v1/datastores/pool/stats", params={"bins": 7}, headers=AUTH))
    store = service_root / "pool"
    assert stats["examples"] == 40 and stats["sources"] == {"toy": 28, "more": 12}
    by_key = {(h["name"], h["checkpoint"]): h for h in stats["histograms"]}
    tokens = pq.read_table(store / "segments" / "seg-000001" / "examples", columns=["num_tokens"]).column("num_tokens").to_numpy()
    expected, edges = np.histogram(tokens, bins=7)
    assert by_key["num_tokens", None]["counts"] == expected.tolist()
    np.testing.assert_allclose(by_key["num_tokens", None]["edges"], edges)
    for checkpoint in ("epoch-1", "epoch-2"):
        loss = pq.read_table(store / "segments" / "seg-000001" / "scores" / checkpoint, columns=["loss"]).column("loss").to_numpy()
        histogram = by_key["loss", checkpoint]
        assert sum(histogram["counts"]) == histogram["count"] == 40
        assert histogram["counts"] == np.histogram(loss.astype(np.float64), bins=7)[0].tolist()
        assert ("grad_norm", checkpoint) in by_key
    names = Datastore.open(store).score_names
    assert stats["scores"] == names and "loss" in names
    assert set(by_key) == {("num_tokens", None)} | {(n, None) if n == "vog" else (n, c) for n in names
                                                    for c in ("epoch-1", "epoch-2")}
    if "vog" in names:
        vog = pq.read_table(store / "segments" / "seg-000001" / "examples", columns=["vog"]).column("vog").to_numpy().astype(np.float64)
        assert by_key["vog", None]["counts"] == np.histogram(vog[np.isfinite(vog)], bins=7)[0].tolist()


def test_stats_errors(client):
    error(client.get("/v1/datastores/pool/stats"), 401, "unauthorized")
    error(client.get("/v1/datastores/nope/stats", headers=AUTH), 404, "datastore_not_found")
    error(client.get("/v1/datastores/pool/stats", params={"bins": 0}, headers=AUTH), 422, "validation_error")


# ---------------------------------------------------------------------------------- examples


def test_examples_page_through_the_store_in_row_order(client):
    seen = []
    offset = 0
    while True:
        page = ok(client.get("/v1/datastores/pool/examples", params={"offset": offset, "limit": 15}, headers=AUTH))
        assert page["total"] == 40
        if not page["items"]:
            break
        seen += [item["id"] for item in page["items"]]
        offset += 15
    assert seen == [id_of(row) for row in range(40)]


def test_examples_search_by_id_and_by_text(client, service_corpus):
    _, records = service_corpus
    page = ok(client.get("/v1/datastores/pool/examples", params={"q": "MORE-1", "limit": 50}, headers=AUTH))
    assert [item["id"] for item in page["items"]] == ["more-1", "more-10", "more-11"]
    assert page["total"] == 3
    word = "paris"
    expected = [r["id"] for source in ("toy", "more") for r in records[source]
                if word in json.dumps(r).lower() or word in r["id"]]
    page = ok(client.get("/v1/datastores/pool/examples", params={"q": word, "limit": 200}, headers=AUTH))
    assert [item["id"] for item in page["items"]] == expected and page["total"] == len(expected) > 0
    page = ok(client.get("/v1/datastores/pool/examples", params={"q": word, "offset": 1, "limit": 2}, headers=AUTH))
    assert [item["id"] for item in page["items"]] == expected[1:3]
    assert ok(client.get("/v1/datastores/pool/examples", params={"q": "zzz-none"}, headers=AUTH))["total"] == 0


def test_examples_bounds(client):
    error(client.get("/v1/datastores/pool/examples", params={"limit": 201}, headers=AUTH), 422, "validation_error")
    error(client.get("/v1/datastores/pool/examples", params={"offset": -1}, headers=AUTH), 422, "validation_error")
    error(client.get("/v1/datastores/pool/examples", params={"q": "x" * 201}, headers=AUTH), 422, "validation_error")


# --------------------------------------------------------------------------------------- map


def weighted_matrix(store, rows=None):
    w = weights(store)
    blocks = [np.sqrt(w[c]) * features(store, c) for c in w]
    matrix = np.concatenate(blocks, axis=1)
    return matrix if rows is None else matrix[rows]


def test_map_is_the_pca_of_the_weighted_features(client, service_root):
    store = service_root / "pool"
    body = ok(client.post("/v1/datastores/pool/map", json={"sample": 30, "seed": 3, "rows": [0, 5, 39]},
                          headers=AUTH))
    sample = body["sample"]["rows"]
    assert len(sample) == 30 == len(set(sample)) and sample == sorted(sample)
    matrix = weighted_matrix(store, sample)
    mean = matrix.mean(axis=0)
    _, singular, axes = np.linalg.svd(matrix - mean, full_matrices=False)
    reference = (matrix - mean) @ axes[:2].T
    got = np.array([body["sample"]["x"], body["sample"]["y"]]).T
    for j in range(2):  # equal up to the sign of each axis
        sign = np.sign(reference[:, j] @ got[:, j])
        np.testing.assert_allclose(got[:, j], sign * reference[:, j], atol=1e-4)
        placed = (weighted_matrix(store, [0, 5, 39]) - mean) @ axes[j]
        np.testing.assert_allclose(np.array([body["rows"]["x"], body["rows"]["y"]])[j], sign * placed, atol=1e-4)
    np.testing.assert_allclose(body["explained_variance"], singular[:2] ** 2 / (singular ** 2).sum(), atol=1e-6)
    assert body["sample"]["sources"] == ["toy" if row < 28 else "more" for row in sample]
    again = ok(client.post("/v1/datastores/pool/map", json={"sample": 30, "seed": 3}, headers=AUTH))
    assert again["sample"] == body["sample"] and again["rows"] == {"x": [], "y": [], "rows": [], "sources": None,
                                                                   "subtasks": None}


def test_map_places_targets_like_their_own_pool_rows(client, service_root):
    """A target given as the raw (unnormalised) features of pool rows lands where those rows do."""
    store = service_root / "pool"
    vectors = {c: (features(store, c)[[2, 7]] * 3.0).tolist() for c in weights(store)}
    body = ok(client.post("/v1/datastores/pool/map",
                          json={"sample": 40, "rows": [2, 7], "targets": {"vectors": vectors}}, headers=AUTH))
    np.testing.assert_allclose(body["targets"]["x"], body["rows"]["x"], atol=1e-3)
    np.testing.assert_allclose(body["targets"]["y"], body["rows"]["y"], atol=1e-3)
    assert body["targets"]["subtasks"] == ["all", "all"]


def test_map_errors(client):
    error(client.post("/v1/datastores/pool/map", json={"sample": 5001}, headers=AUTH), 422, "validation_error")
    body = error(client.post("/v1/datastores/pool/map", json={"rows": [40]}, headers=AUTH), 422, "invalid_query")
    assert "rows: 40" in body["message"]
    error(client.post("/v1/datastores/pool/map", json={"sample": 1}, headers=AUTH), 422, "validation_error")
    error(client.post("/v1/datastores/pool/map", json={"targets": {"vectors": {"nope": [[1.0]]}}}, headers=AUTH),
          422, "invalid_query")


# --------------------------------------------------------------------------------- summary


def test_selection_summary(client):
    page = ok(client.post("/v1/datastores/pool/select", headers=AUTH,
                          json={"targets": {"datastore": "targets", "subtask_field": "task"}, "k": 10,
                                "sources": ["toy", "more"], "page_size": 100}))
    summary = ok(client.get(f"/v1/datastores/pool/selections/{page['selection_id']}/summary", headers=AUTH))
    items = page["items"]
    assert summary["total"] == 10 and summary["pool"] == 40
    assert summary["cutoff"] == pytest.approx(min(item["score"] for item in items))
    composition = {row["source"]: (row["pool"], row["selected"]) for row in summary["composition"]}
    assert composition == {"toy": (28, sum(i["source"] == "toy" for i in items)),
                           "more": (12, sum(i["source"] == "more" for i in items))}
    assert sum(summary["pool_scores"]["counts"]) == 40 and sum(summary["selected_scores"]["counts"]) == 10
    assert summary["selected_scores"]["edges"] == summary["pool_scores"]["edges"]
    subtasks = {s["name"]: s for s in summary["subtasks"]}
    assert set(subtasks) == {"task-0", "task-1"}
    for name, s in subtasks.items():
        assert s["mean_score"] == pytest.approx(np.mean([i["subtask_scores"][name] for i in items]), abs=1e-6)
    assert sum(s["best_for"] for s in subtasks.values()) == 10
    error(client.get(f"/v1/datastores/pool/selections/{'0' * 64}/summary", headers=AUTH), 410, "selection_expired")


def test_summary_of_a_selection_without_targets(client):
    page = ok(client.post("/v1/datastores/pool/select", headers=AUTH,
                          json={"strategy": {"name": "quality", "score": "loss", "order": "low"}, "k": 5}))
    summary = ok(client.get(f"/v1/datastores/pool/selections/{page['selection_id']}/summary", headers=AUTH))
    assert summary["subtasks"] == [] and summary["total"] == 5
    assert summary["cutoff"] == pytest.approx(min(item["score"] for item in page["items"]))


# ------------------------------------------------------------------------------------------ UI


def test_ui_files_come_from_the_package(client):
    package = resources.files("gradstore.service").joinpath("static", "ui")
    for path in ("index.html", "js/app.js", "vendor/uPlot.iife.min.js"):
        response = client.get(f"/ui/{path}")
        assert response.status_code == 200, path
        assert response.content == package.joinpath(*path.split("/")).read_bytes()
        assert "default-src 'self'" in response.headers["content-security-policy"]
    assert client.get("/ui/").content == package.joinpath("index.html").read_bytes()
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    assert client.get("/ui/js/app.js").headers["content-type"].startswith("text/javascript")
    error(client.get("/ui/nope.js"), 404, "not_found")
    error(client.get("/ui/js/%2E%2E/index.html"), 404, "not_found")
    error(client.get("/ui/.hidden"), 404, "not_found")


def test_ui_config_tells_whether_a_key_is_needed(client, service_root):
    assert ok(client.get("/ui/config.json"))["auth_required"] is True
    assert ok(client.get("/ui/config.json"))["api_key_header"] == "X-API-Key"
    with TestClient(create_app(Settings(root=service_root, auth_disabled=True))) as open_client:
        assert ok(open_client.get("/ui/config.json"))["auth_required"] is False
