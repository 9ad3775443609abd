"""Bad input and damaged datastores against the real app over real stores.

A generated sweep (schemathesis over the app's own OpenAPI schema) checks that no request gets a
5xx and that every answer matches the schema, errors in the ``{code, message, detail}`` shape;
explicit tests pin the code and the field named for each kind of bad input that
``test_app.py`` does not already cover; damaged stores are refused on ``/readyz`` with their
reason while the others keep answering.
"""

from __future__ import annotations

import json
import shutil

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from conftest import DIM, copy_stores
from test_app import AUTH, KEY, assert_error, make_app

JSON = {"content-type": "application/json"}
TARGETS = {"datastore": "targets"}


@pytest.fixture(scope="module")
def client(service_root):
    with TestClient(make_app(service_root)) as c:
        yield c


def post_raw(client, path, text, headers=None):
    """POST ``text`` as a JSON body as is (raw tokens such as ``NaN`` included)."""
    return client.post(path, content=text.encode(), headers={**AUTH, **JSON, **(headers or {})})


# ---------------------------------------------------------------------------- generated requests

# Examples per operation and generation mode (hypothesis' default is 100). The whole sweep takes
# about a minute and a half on a loaded 2-core machine.
EXAMPLES_PER_OPERATION = 100

# What a request the schema allows may still be refused for: the state of the server, which no
# schema of the API can hold: checkpoints, sources and record fields of a store, target records
# that leave nothing to train on with its tokenizer (``invalid_query``), cursors and selections
# this server issued (``invalid_cursor``, 410 ``selection_expired``). Statuses schemathesis
# accepts for valid data by itself (404 not found, 403, 409) need no entry.
STATE_DEPENDENT = {"invalid_query", "invalid_cursor", "selection_expired"}


def test_generated_requests_get_no_server_error_and_documented_answers(service_root, tmp_path):
    """Schema-valid requests (on the ``pool`` store) and schema-invalid ones (any name, missing or
    wrong fields, no API key) against every operation, with every check: no 5xx, every status
    documented, every body valid against the schema, every 4xx an error body, every invalid
    request refused, and every valid one accepted unless the server's state decides otherwise
    (``STATE_DEPENDENT``; schemathesis' own ``positive_data_acceptance`` cannot tell those apart
    by status, so it is replaced by that rule)."""
    copy_stores(service_root, tmp_path)  # jobs and exports write under the root
    app = make_app(tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    failures = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _sweep(_strategy(operation, mode), mode)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label  # nothing to make invalid (/healthz)
            except Exception as err:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{operation.label} ({mode.value}): {err}")
    assert not failures, "\n\n".join(failures)


def _strategy(operation, mode: GenerationMode):
    """Cases for ``operation``: valid ones on the real ``pool`` store, invalid ones anywhere."""
    fixed = {"name": "pool"} if mode is GenerationMode.POSITIVE and "{name}" in operation.path else None
    return operation.as_strategy(generation_mode=mode, path_parameters=fixed)


def _sweep(strategy, mode: GenerationMode) -> None:
    @given(case=strategy)
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case):
        if case.headers and "X-API-Key" in case.headers:
            case.headers["X-API-Key"] = KEY  # a generated key is a wrong one; a missing one stays missing
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"code", "message", "detail"}, body
            assert isinstance(body["code"], str) and body["code"], body
            assert isinstance(body["message"], str) and body["message"], body
            if mode is GenerationMode.POSITIVE and response.status_code not in (401, 403, 404, 409):
                assert body["code"] in STATE_DEPENDENT, f"schema-valid request rejected: {body}"

    check()


def test_openapi_documents_the_error_answers(client):
    paths = client.get("/openapi.json").json()["paths"]
    error_ref = "#/components/schemas/ErrorBody"
    for path, methods in paths.items():
        if not path.startswith("/v1"):
            continue
        for method, operation in methods.items():
            documented = operation["responses"]
            for status in ("401", "422"):
                assert documented[status]["content"]["application/json"]["schema"]["$ref"] == error_ref, \
                    (method, path, status)
            if path.startswith("/v1/datastores/{name}"):
                assert {"400", "404", "503"} <= set(documented), (method, path)
            if "requestBody" in operation:
                assert {"413", "415"} <= set(documented), (method, path)
                assert "`unsupported_media_type`" in documented["415"]["description"]


# ------------------------------------------------------------------------------ limits: huge k


@pytest.mark.parametrize("k", [10**12, 2**70])
def test_huge_k_is_refused_naming_the_limit(client, k):
    requests = {"select": {"targets": TARGETS, "k": k}, "influence": {"targets": TARGETS, "k": k},
                "similar": {"id": "ex-1", "k": k}}
    for route, body in requests.items():
        error = assert_error(client.post(f"/v1/datastores/pool/{route}", json=body, headers=AUTH),
                             400, "limit_exceeded")
        assert error["message"] == f"k = {k} exceeds the limit of 10000", route
        assert error["detail"] == {"limit": "k", "value": k, "max": 10000}
    page = client.get(f"/v1/datastores/pool/selections/{'a' * 64}", params={"page_size": k}, headers=AUTH)
    assert assert_error(page, 400, "limit_exceeded")["detail"]["limit"] == "page_size"


def test_bodies_python_json_cannot_parse_are_a_parse_error(client):
    digits = '{"targets": {"datastore": "targets"}, "k": 1' + "0" * 5000 + "}"
    error = assert_error(post_raw(client, "/v1/datastores/pool/select", digits), 400, "bad_request")
    assert "cannot be parsed as JSON" in error["message"] and "digits" in error["message"]
    # Nesting is refused by its depth before any parser recurses (tests/service/test_hostile_requests.py).
    nested = '{"targets": ' + "[" * 100_000 + "]" * 100_000 + "}"
    error = assert_error(post_raw(client, "/v1/datastores/pool/select", nested), 400, "limit_exceeded")
    assert error["detail"] == {"limit": "max_json_depth", "value": 100_001, "max": 64}


# --------------------------------------------------------------------------- non-finite numbers


def _vectors_text(token: str, rows: int = 1) -> str:
    """Target vectors for both checkpoints as JSON text, ``token`` at row 0, position 3."""
    row = ["0.5"] * DIM
    row[3] = token
    first = ",".join(["[" + ",".join(row) + "]"] + ["[" + ",".join(["0.5"] * DIM) + "]"] * (rows - 1))
    second = ",".join(["[" + ",".join(["0.5"] * DIM) + "]"] * rows)
    return f'{{"epoch-1": [{first}], "epoch-2": [{second}]}}'


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_target_vectors_are_refused_naming_the_field(client, token):
    text = f'{{"targets": {{"vectors": {_vectors_text(token)}}}, "k": 3}}'
    select = post_raw(client, "/v1/datastores/pool/select", text)
    error = assert_error(select, 422, "invalid_query")
    assert error["message"].startswith("targets.vectors: ") and "'epoch-1'" in error["message"]
    assert "non-finite" in error["message"] and "position 3" in error["message"]
    assert error["detail"] == {"field": "targets.vectors"}
    influence = post_raw(client, "/v1/datastores/pool-noindex/influence",
                         f'{{"targets": {{"vectors": {_vectors_text(token, rows=2)}}}, "k": 3}}')
    assert assert_error(influence, 422, "invalid_query")["detail"] == {"field": "targets.vectors"}


def test_non_finite_similar_vectors_and_weights_are_refused(client):
    values = ["0.5"] * DIM
    finite = ",".join(values)
    values[0] = "Infinity"
    similar = post_raw(client, "/v1/datastores/pool/similar",
                       f'{{"vectors": {{"epoch-1": [{",".join(values)}], "epoch-2": [{finite}]}}}}')
    error = assert_error(similar, 422, "invalid_query")
    assert error["message"].startswith("vectors: ") and "inf" in error["message"]
    weights = post_raw(client, "/v1/datastores/pool/influence",
                       '{"targets": {"datastore": "targets"}, "k": 3, "weights": {"epoch-1": NaN, "epoch-2": 1}}')
    assert "weight of checkpoint 'epoch-1'" in assert_error(weights, 422, "invalid_query")["message"]
    fraction = post_raw(client, "/v1/datastores/pool/select", '{"targets": {"datastore": "targets"}, "fraction": NaN}')
    assert assert_error(fraction, 422, "validation_error")["detail"][0]["loc"] == ["body", "fraction"]
    # Finite weights whose sum overflows would all scale to 0.
    for route in ("select", "influence"):
        huge = {"targets": TARGETS, "k": 3, "weights": {"epoch-1": 1e308, "epoch-2": 1e308}}
        error = assert_error(client.post(f"/v1/datastores/pool/{route}", json=huge, headers=AUTH), 422, "invalid_query")
        assert error["detail"] == {"field": "weights"} and "overflows" in error["message"]
    one = {"targets": TARGETS, "k": 3, "weights": {"epoch-2": 1e308}, "checkpoints": ["epoch-2"]}
    assert client.post("/v1/datastores/pool/influence", json=one, headers=AUTH).status_code == 200


def test_query_errors_name_stores_without_host_paths(client, service_root):
    body = {"targets": {"datastore": "targets", "subtask_field": "no-such-field"}, "k": 3}
    error = assert_error(client.post("/v1/datastores/pool/select", json=body, headers=AUTH), 422, "invalid_query")
    assert error["message"].startswith("targets: ") and "'no-such-field'" in error["message"]
    assert str(service_root) not in error["message"]


def test_wrong_dimension_and_ragged_vectors_on_similar_and_influence(client):
    similar = client.post("/v1/datastores/pool/similar",
                          json={"vectors": {"epoch-1": [1.0] * 7, "epoch-2": [1.0] * 7}}, headers=AUTH)
    error = assert_error(similar, 422, "invalid_query")
    assert error["message"].startswith("vectors: ") and "dimension 7, the datastore has 256" in error["message"]
    ragged = {"epoch-1": [[1.0] * DIM, [1.0] * 5], "epoch-2": [[1.0] * DIM] * 2}
    error = assert_error(client.post("/v1/datastores/pool/influence", json={"targets": {"vectors": ragged}},
                                     headers=AUTH), 422, "invalid_query")
    assert error["message"].startswith("targets.vectors: ") and "rectangular" in error["message"]


# ----------------------------------------------------------------------- names, paths, records


def test_unknown_datastores_are_named_on_every_route(client):
    for route, body in {"select": {"targets": TARGETS, "k": 3}, "influence": {"targets": TARGETS},
                        "similar": {"id": "ex-1"}}.items():
        error = assert_error(client.post(f"/v1/datastores/no-such-store/{route}", json=body, headers=AUTH),
                             404, "datastore_not_found")
        assert error["detail"] == {"datastore": "no-such-store"}
    error = assert_error(client.post("/v1/datastores/pool/select", json={"targets": {"datastore": "gone"}, "k": 3},
                                     headers=AUTH), 404, "datastore_not_found")
    assert "'gone'" in error["message"]
    assert_error(client.get("/v1/datastores/no-such-store/examples/ex-1", headers=AUTH), 404, "datastore_not_found")


def test_nul_and_traversal_names_are_refused(client):
    for path in ("/v1/datastores/%00", "/v1/datastores/pool%00"):
        assert "\x00" in assert_error(client.get(path, headers=AUTH), 400, "invalid_name")["detail"]["name"]
    select = client.post("/v1/datastores/pool%00/select", json={"targets": TARGETS, "k": 3}, headers=AUTH)
    assert_error(select, 400, "invalid_name")
    select = client.post("/v1/datastores/pool/select", json={"targets": {"datastore": "targets\x00"}, "k": 3},
                         headers=AUTH)
    error = assert_error(select, 422, "validation_error")  # the target store's name pattern
    assert ["body", "targets", "TargetDatastore", "datastore"] in [item["loc"] for item in error["detail"]]
    # Example ids are looked up, never used as paths.
    traversal = client.get("/v1/datastores/pool/examples/..%2F..%2Fmanifest.json", headers=AUTH)
    assert "'../../manifest.json'" in assert_error(traversal, 404, "example_not_found")["message"]


def test_job_inputs_that_name_no_file_are_refused_naming_the_field(client, service_root):
    base = {"datastore": "new-store", "corpus": ["pool/manifest.json"], "model": "pool", "gradient_type": "sgd"}
    jobs_before = client.get("/v1/jobs", headers=AUTH).json()
    cases = [({"corpus": ["/etc/passwd"]}, 403, "path_not_allowed", "corpus"),
             ({"corpus": ["missing.jsonl"]}, 404, "input_not_found", "corpus")]
    for change, status, code, field in cases:
        error = assert_error(client.post("/v1/jobs", json={**base, **change}, headers=AUTH), status, code)
        assert error["detail"]["field"] == field and field in error["message"], change
    for change, loc in (({"datastore": "../escape"}, ["datastore"]), ({"device": "cu\x00da"}, ["device"]),
                        ({"device": "cpu --out=/tmp/x"}, ["device"]), ({"corpus": ["a\x00b"]}, ["corpus", 0]),
                        ({"model": "x" * 300}, ["model"])):
        error = assert_error(client.post("/v1/jobs", json={**base, **change}, headers=AUTH), 422, "validation_error")
        assert error["detail"][0]["loc"] == ["body", *loc], change
    alpha = post_raw(client, "/v1/jobs", json.dumps(base)[:-1] + ', "lora_alpha": NaN}')
    error = assert_error(alpha, 400, "invalid_job")
    assert error["message"] == "lora_alpha must be a finite number, got nan"
    assert client.get("/v1/jobs", headers=AUTH).json() == jobs_before  # none of them was queued
    assert not (service_root / "new-store").exists()


def test_malformed_target_records_are_refused_before_the_model_loads(client):
    records = {"records": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
                           {"text": 5}]}
    error = assert_error(client.post("/v1/datastores/pool/select", json={"targets": records, "k": 3}, headers=AUTH),
                         422, "invalid_query")
    assert error["message"].startswith("targets.records[1]: ") and error["detail"] == {"field": "targets.records[1]"}
    handle = client.app.state.registry.get("pool")
    assert handle._featurizer is None  # refused without loading the store's model


# ------------------------------------------------------------------------------ request bodies


def test_bodies_that_are_not_json_are_refused_naming_the_header(client):
    body = json.dumps({"targets": TARGETS, "k": 3})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
        response = client.post("/v1/datastores/pool/select", content=body.encode(), headers=headers)
        error = assert_error(response, 415, "unsupported_media_type")
        assert "Content-Type: application/json" in error["message"]
        assert error["detail"] == {"header": "Content-Type", "value": content_type}
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = client.post("/v1/datastores/pool/select", content=body.encode(),
                               headers={**AUTH, "content-type": content_type})
        assert response.status_code == 200, (content_type, response.text)
    assert_error(client.post("/v1/jobs", content=b"datastore=x", headers={**AUTH, "content-type": "text/plain"}),
                 415, "unsupported_media_type")


def test_lone_surrogates_are_refused_where_they_occur(client):
    """JSON may escape a lone UTF-16 surrogate; it is no Unicode character, so it is refused at the
    field instead of reaching names, paths and responses."""
    cases = {"/v1/datastores/pool/select": ('{"targets": {"datastore": "\\ud800"}, "k": 3}',
                                            ["body", "targets", "datastore"]),
             "/v1/datastores/pool/similar": ('{"vectors": {"\\udc00": [1.0]}}', ["body", "vectors", "\udc00"]),
             "/v1/jobs": ('{"datastore": "x", "corpus": ["ok", "\\ud800"], "model": "m"}', ["body", "corpus", 1])}
    for path, (text, location) in cases.items():
        error = assert_error(post_raw(client, path, text), 422, "validation_error")
        assert error["detail"][0]["loc"] == location and "surrogate" in error["message"], path
    # A surrogate pair is one character (an emoji): valid Unicode, refused by the name pattern.
    pair = post_raw(client, "/v1/datastores/pool/select", '{"targets": {"datastore": "\\ud83d\\ude00"}, "k": 3}')
    error = assert_error(pair, 422, "validation_error")
    assert "surrogate" not in error["message"] and "pattern" in json.dumps(error["detail"])


def test_body_that_is_not_an_object_names_the_body(client):
    for text in ("[1, 2]", '"text"', "null"):
        error = assert_error(post_raw(client, "/v1/datastores/pool/select", text), 422, "validation_error")
        assert error["detail"][0]["loc"] == ["body"], text


# ------------------------------------------------------------------------------------ API keys


def test_api_key_in_the_wrong_place_is_refused_naming_the_header(client):
    for headers, params in (({"Authorization": f"Bearer {KEY}"}, None), ({}, {"api_key": KEY}),
                            ({"X-API-Key": KEY.upper()}, None), ({"X-API-Key": KEY + "x"}, None)):
        response = client.get("/v1/datastores/pool", headers=headers, params=params)
        error = assert_error(response, 401, "unauthorized")
        assert "X-API-Key header" in error["message"], headers
        assert KEY not in response.text
    # The key is checked before the body: a well-formed but invalid body without a key is a 401.
    assert_error(client.post("/v1/datastores/pool/select", json={"k": -1}), 401, "unauthorized")
    assert_error(client.post("/v1/datastores/pool/select", content=b"k=1", headers={"content-type": "text/plain"}),
                 401, "unauthorized")


# ------------------------------------------------------------------------------- damaged stores


@pytest.fixture
def damaged_root(service_root, tmp_path):
    """``pool`` and ``targets`` intact, beside copies of ``pool`` damaged one way each."""
    root = tmp_path / "root"
    copy_stores(service_root, root)
    shutil.rmtree(root / "pool-noindex")
    for name in ("bad-footer", "wrong-checksum", "no-index", "bad-manifest"):
        shutil.copytree(root / "pool", root / name)
    part = root / "bad-footer" / "segments" / "seg-000001" / "scores" / "epoch-2" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[-8:] = b"\0" * 8  # same size, footer length and magic gone
    part.write_bytes(bytes(data))
    manifest = json.loads((root / "wrong-checksum" / "manifest.json").read_text())
    manifest["files"]["segments/seg-000001/examples/part-00001.parquet"]["sha256"] = "0" * 64
    (root / "wrong-checksum" / "manifest.json").write_text(json.dumps(manifest))
    (root / "no-index" / "index" / "v000001.faiss").unlink()
    (root / "bad-manifest" / "manifest.json").write_text('{"schema_version": 1, "files": ')
    return root


def ready_states(client) -> dict:
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    return {state["name"]: state for state in body["datastores"]}


def test_damaged_stores_are_refused_with_their_reason_and_the_others_keep_answering(damaged_root):
    reasons = {"bad-footer": "segments/seg-000001/scores/epoch-2/part-00000.parquet: unreadable Parquet file",
               "no-index": "index/v000001.faiss: listed in the manifest but missing",
               "bad-manifest": "manifest.json: cannot read the manifest"}
    with TestClient(make_app(damaged_root)) as c:
        states = ready_states(c)
        for name, reason in reasons.items():
            assert states[name]["loaded"] is False and reason in states[name]["error"], states[name]
            assert str(damaged_root) not in states[name]["error"]
            error = assert_error(c.get(f"/v1/datastores/{name}", headers=AUTH), 503, "datastore_unavailable")
            assert reason in error["message"]
            assert error["detail"] == {"datastore": name, "reason": states[name]["error"]}
            select = c.post(f"/v1/datastores/{name}/select", json={"targets": TARGETS, "k": 3}, headers=AUTH)
            assert_error(select, 503, "datastore_unavailable")
        # Checksums are not hashed by default (a full read of the store): sizes and footers agree.
        assert states["wrong-checksum"]["loaded"] is True
        for name in ("pool", "targets"):
            assert states[name] == {"name": name, "loaded": True, "error": None}
        listed = [store["name"] for store in c.get("/v1/datastores", headers=AUTH).json()["datastores"]]
        assert listed == ["pool", "targets", "wrong-checksum"]
        response = c.post("/v1/datastores/pool/similar", json={"id": "ex-5", "k": 3}, headers=AUTH)
        assert response.status_code == 200 and len(response.json()["neighbors"]) == 3
        page = c.post("/v1/datastores/pool/select", json={"targets": TARGETS, "k": 4}, headers=AUTH).json()
        assert page["total"] == 4


def test_verify_checksums_refuses_a_store_whose_files_differ_from_the_manifest(damaged_root):
    with TestClient(make_app(damaged_root, verify_checksums=True)) as c:
        states = ready_states(c)
        assert "segments/seg-000001/examples/part-00001.parquet: sha256 mismatch" in states["wrong-checksum"]["error"]
        assert states["pool"]["loaded"] is True
        assert_error(c.get("/v1/datastores/wrong-checksum", headers=AUTH), 503, "datastore_unavailable")
        assert c.get("/v1/datastores/pool", headers=AUTH).status_code == 200


def test_a_shard_file_swapped_for_another_is_refused_on_open(service_root, tmp_path):
    """A scores file replaced by another shard's (its listed size updated): every footer parses,
    but its rows do not match the manifest's (``pool``: shards of 16, 16 and 8 rows)."""
    copy_stores(service_root, tmp_path)
    store = tmp_path / "pool"
    relative = "segments/seg-000001/scores/epoch-1/part-00002.parquet"
    shutil.copyfile(store / "segments/seg-000001/scores/epoch-1/part-00000.parquet", store / relative)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["files"][relative]["bytes"] = (store / relative).stat().st_size
    (store / "manifest.json").write_text(json.dumps(manifest))
    with TestClient(make_app(tmp_path)) as c:
        error = assert_error(c.get("/v1/datastores/pool", headers=AUTH), 503, "datastore_unavailable")
        assert f"{relative}: 16 rows, the manifest says 8" in error["message"]
        assert c.get("/v1/datastores/targets", headers=AUTH).status_code == 200
