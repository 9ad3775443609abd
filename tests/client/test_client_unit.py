"""Unit tests of the SDK's own logic against ``httpx.MockTransport`` fakes (no service, no network)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap

import httpx
import pytest

import gradstore.client as gc
from gradstore.client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    GoneError,
    GradstoreError,
    IndexJobRequest,
    InvalidResponseError,
    JobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QualityFilter,
    RateLimitError,
    SelectionOptions,
    ServerError,
    ServiceUnavailableError,
    TargetDatastore,
    TargetRecords,
    TargetVectors,
    TransportError,
    to_targets,
)
from gradstore.client import _async, _sync

BASE = "http://gradstore.test"
RECORD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
JOB_REQUEST = {"datastore": "pool2", "corpus": ["data/a.jsonl"], "model": "models/tiny"}


def error(status: int, code: str, message: str, detail=None, headers=None) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "message": message, "detail": detail}, headers=headers)


def summary(name: str) -> dict:
    return {"name": name, "examples": 7, "dim": 8, "gradient_type": "adam", "index": "Flat",
            "checkpoints": [{"name": "epoch-1", "weight": 0.5, "learning_rate": 2e-5}]}


class FakeService:
    """Small fake route behaviours of the gradstore service; records every request."""

    def __init__(self, total: int = 7) -> None:
        self.requests: list[httpx.Request] = []
        self.items = [{"rank": i + 1, "row": i, "id": f"ex{i}", "source": "flan", "score": 1.0 - i / 10,
                       "subtask_scores": {"all": 1.0 - i / 10}} for i in range(total)]
        self.jobs: dict[str, dict] = {}
        self.polls = 0
        self.ready = True
        self.expired = False
        self.routes = [
            ("GET", r"/healthz", self.healthz),
            ("GET", r"/readyz", self.readyz),
            ("GET", r"/v1/datastores", self.list_datastores),
            ("GET", r"/v1/datastores/(?P<name>[^/]+)", self.get_datastore),
            ("GET", r"/v1/datastores/(?P<name>[^/]+)/examples/(?P<id>[^/]+)", self.get_example),
            ("POST", r"/v1/datastores/(?P<name>[^/]+)/select", self.select),
            ("GET", r"/v1/datastores/(?P<name>[^/]+)/selections/(?P<sid>[^/]+)", self.page),
            ("GET", r"/v1/datastores/(?P<name>[^/]+)/selections/(?P<sid>[^/]+)/export", self.export),
            ("POST", r"/v1/datastores/(?P<name>[^/]+)/influence", self.influence),
            ("POST", r"/v1/datastores/(?P<name>[^/]+)/similar", self.similar),
            ("POST", r"/v1/jobs", self.create_job),
            ("GET", r"/v1/jobs", self.list_jobs),
            ("GET", r"/v1/jobs/(?P<id>[^/]+)", self.get_job),
            ("POST", r"/v1/jobs/(?P<id>[^/]+)/cancel", self.cancel_job),
        ]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        raw_path = request.url.raw_path.decode().split("?")[0]
        for method, pattern, handler in self.routes:
            match = re.fullmatch(pattern, raw_path)
            if match and request.method == method:
                return handler(request, **match.groupdict())
        return error(404, "route_not_found", f"no route {request.method} {raw_path}")

    # -- routes ------------------------------------------------------------------------------------

    def healthz(self, request):
        return httpx.Response(200, json={"status": "ok"})

    def readyz(self, request):
        body = {"ready": self.ready, "datastores": [{"name": "pool", "loaded": self.ready,
                                                      "error": None if self.ready else "loading"}]}
        return httpx.Response(200 if self.ready else 503, json=body)

    def list_datastores(self, request):
        return httpx.Response(200, json={"datastores": [summary("pool"), summary("target")]})

    def get_datastore(self, request, name):
        if name != "pool":
            return error(404, "datastore_not_found", f"no datastore {name!r}", {"name": name})
        return httpx.Response(200, json={
            **summary("pool"), "sources": {"flan": 7}, "model": {"name": "tiny"}, "lora": {"r": 8},
            "projection": {"dim": 8}, "tokens": {"total": 70}, "created_at": "2024-01-01T00:00:00Z",
            "gradstore_version": "0.1.0", "future_field": "ignored"})

    def get_example(self, request, name, id):
        return httpx.Response(200, json={"row": 3, "id": httpx.URL("/" + id).path[1:], "source": "flan",
                                         "record": RECORD, "num_tokens": 10, "num_label_tokens": 2,
                                         "truncated": False})

    def _page(self, start: int, size: int) -> dict:
        end = min(start + size, len(self.items))
        return {"datastore": "pool", "selection_id": "sel-1", "total": len(self.items), "pool": 100,
                "items": self.items[start:end], "next_cursor": f"c{end}" if end < len(self.items) else None}

    def select(self, request, name):
        body = json.loads(request.content)
        return httpx.Response(200, json=self._page(0, body["page_size"]))

    def page(self, request, name, sid):
        cursor = request.url.params.get("cursor", "c0")
        if self.expired or sid != "sel-1":
            return error(410, "selection_expired", "the selection expired; select again")
        return httpx.Response(200, json=self._page(int(cursor[1:]), int(request.url.params.get("page_size", 1000))))

    def export(self, request, name, sid):
        if sid != "sel-1":
            return error(404, "selection_not_found", f"no selection {sid}")
        return httpx.Response(200, content=b'{"id": "ex0"}\n{"id": "ex1"}\n',
                              headers={"content-type": "application/x-ndjson",
                                       "content-disposition": 'attachment; filename="pool-sel-1.jsonl"'})

    def influence(self, request, name):
        body = json.loads(request.content)
        neighbors = [{"row": 0, "id": "ex0", "source": "flan", "score": 0.9}][: body["k"]]
        return httpx.Response(200, json={"datastore": name, "exact": True,
                                         "results": [{"target": 0, "neighbors": neighbors}]})

    def similar(self, request, name):
        return httpx.Response(200, json={"datastore": name, "neighbors": [
            {"row": 1, "id": "ex1", "source": "flan", "score": 0.8}]})

    def _job(self, id: str, status: str, request: dict) -> dict:
        return {"id": id, "status": status, "request": request, "created_at": "2024-01-01T00:00:00Z",
                "progress": {"done": 0, "total": 7}, "attempts": 1}

    def create_job(self, request):
        body = json.loads(request.content)
        job = self._job(f"job-{len(self.jobs) + 1}", "queued", body)
        self.jobs[job["id"]] = job
        return httpx.Response(202, json=job, headers={"location": f"/v1/jobs/{job['id']}"})

    def list_jobs(self, request):
        return httpx.Response(200, json={"jobs": list(self.jobs.values())})

    def get_job(self, request, id):
        if id not in self.jobs:
            return error(404, "job_not_found", f"no job {id}")
        self.polls += 1
        job = self.jobs[id]
        if job["status"] == "queued":
            job["status"] = "running"
        elif job["status"] == "running" and self.polls >= 3:
            job["status"] = "succeeded"
        return httpx.Response(200, json=job)

    def cancel_job(self, request, id):
        job = self.jobs[id]
        if job["status"] in ("succeeded", "failed"):
            return error(409, "job_finished", f"job {id} is already {job['status']}")
        job["status"] = "cancelled"
        return httpx.Response(200, json=job)


class Scripted:
    """A handler answering a fixed sequence of responses (or raising httpx exceptions)."""

    def __init__(self, *steps) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, type) and issubclass(step, Exception):
            raise step("simulated failure", request=request)
        return step() if callable(step) else step


def health_ok() -> httpx.Response:
    return httpx.Response(200, json={"status": "ok"})


def job_ok() -> httpx.Response:
    return httpx.Response(202, json={"id": "job-1", "status": "queued", "request": JOB_REQUEST,
                                     "created_at": "2024-01-01T00:00:00Z"})


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Record (and skip) the sync client's sleeps."""
    recorded: list[float] = []
    monkeypatch.setattr(_sync, "_sleep", recorded.append)
    return recorded


@pytest.fixture
def async_sleeps(monkeypatch) -> list[float]:
    recorded: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(_async, "_sleep", fake_sleep)
    return recorded


@pytest.fixture
def service() -> FakeService:
    return FakeService()


def make(handler, api_key: str | None = "key-1", **kwargs) -> Client:
    kwargs.setdefault("backoff", 0)
    return Client(BASE, api_key, transport=httpx.MockTransport(handler), **kwargs)


def make_async(handler, api_key: str | None = "key-1", **kwargs) -> AsyncClient:
    kwargs.setdefault("backoff", 0)
    return AsyncClient(BASE, api_key, transport=httpx.MockTransport(handler), **kwargs)


# -- configuration ---------------------------------------------------------------------------------


def test_api_key_header_sent_and_configurable(service):
    with make(service) as client:
        client.health()
    with make(service, api_key="other", api_key_header="Authorization-Token",
              headers={"X-Trace": "t1"}) as client:
        client.health()
    with make(service, api_key=None) as client:
        client.health()
    first, second, third = service.requests
    assert first.headers["X-API-Key"] == "key-1"
    assert first.headers["user-agent"].startswith("gradstore-python/")
    assert second.headers["Authorization-Token"] == "other" and "X-API-Key" not in second.headers
    assert second.headers["X-Trace"] == "t1"
    assert "X-API-Key" not in third.headers


def test_base_url_with_prefix_and_validation(service):
    seen = []

    def handler(request):
        seen.append(request.url)
        return health_ok()

    with Client("http://gradstore.test/api/", transport=httpx.MockTransport(handler)) as client:
        client.health()
    assert str(seen[0]) == "http://gradstore.test/api/healthz"
    with pytest.raises(ValueError):
        Client("gradstore.test")
    with pytest.raises(ValueError):
        Client(BASE, max_retries=-1)
    with pytest.raises(ValueError):
        Client(BASE, transport=httpx.MockTransport(handler), http_client=httpx.Client())


def test_context_manager_closes_owned_client_only(service):
    with make(service) as client:
        pass
    assert client._http.is_closed
    http = httpx.Client(transport=httpx.MockTransport(service))
    with Client(BASE, http_client=http) as client:
        assert client.health().status == "ok"
    assert not http.is_closed
    http.close()


# -- routes ----------------------------------------------------------------------------------------


def test_datastore_routes(service):
    with make(service) as client:
        stores = client.list_datastores()
        assert [store.name for store in stores] == ["pool", "target"]
        assert stores[0].checkpoints[0].weight == 0.5
        detail = client.get_datastore("pool")
        assert detail.sources == {"flan": 7} and detail.gradstore_version == "0.1.0"
        example = client.get_example("pool", "a/b c")
        assert example.record == RECORD
    # path segments are quoted: an id with a slash stays one segment
    assert service.requests[-1].url.raw_path == b"/v1/datastores/pool/examples/a%2Fb%20c"


def test_health_and_ready(service):
    with make(service) as client:
        assert client.health().status == "ok"
        assert client.ready().ready is True


def test_ready_returns_body_on_503_without_retry(service, sleeps):
    service.ready = False
    with make(service, max_retries=3) as client:
        readiness = client.ready()
    assert readiness.ready is False and readiness.datastores[0].error == "loading"
    assert len(service.requests) == 1 and sleeps == []


def test_ready_503_with_error_body_raises():
    handler = Scripted(error(503, "overloaded", "try later"))
    with make(handler) as client, pytest.raises(ServiceUnavailableError) as info:
        client.ready()
    assert info.value.code == "overloaded" and len(handler.requests) == 1


def test_influence_and_similar_bodies(service):
    np = pytest.importorskip("numpy")
    with make(service) as client:
        result = client.influence("pool", [RECORD], k=1, checkpoints=["epoch-1"], weights={"epoch-1": 1.0})
        assert result.exact and result.results[0].neighbors[0].id == "ex0"
        assert client.similar("pool", id="ex0", k=3).neighbors[0].id == "ex1"
        client.similar("pool", vectors={"epoch-1": np.arange(4, dtype=np.float32)}, include_self=True)
        with pytest.raises(ValueError):
            client.similar("pool")  # neither id nor vectors: rejected before sending
    bodies = [json.loads(r.content) for r in service.requests]
    assert bodies[0] == {"targets": {"records": [RECORD]}, "k": 1, "checkpoints": ["epoch-1"],
                         "weights": {"epoch-1": 1.0}}
    assert bodies[1] == {"id": "ex0", "k": 3, "include_self": False}
    assert bodies[2] == {"vectors": {"epoch-1": [0.0, 1.0, 2.0, 3.0]}, "k": 10, "include_self": True}
    assert len(service.requests) == 3


def test_invalid_success_body_raises_invalid_response():
    handler = Scripted(httpx.Response(200, json={"unexpected": True}))
    with make(handler) as client, pytest.raises(InvalidResponseError):
        client.list_datastores()
    handler = Scripted(httpx.Response(200, text="<html>proxy</html>"))
    with make(handler) as client, pytest.raises(InvalidResponseError):
        client.health()


# -- targets ---------------------------------------------------------------------------------------


def test_target_conversion_shorthands():
    records = to_targets([RECORD, RECORD])
    assert isinstance(records, TargetRecords) and len(records.records) == 2
    assert to_targets("mmlu") == TargetDatastore(datastore="mmlu")
    vectors = to_targets({"epoch-1": [[1, 2], [3, 4]], "epoch-2": ((5.0, 6.0),)})
    assert isinstance(vectors, TargetVectors)
    assert vectors.vectors == {"epoch-1": [[1.0, 2.0], [3.0, 4.0]], "epoch-2": [[5.0, 6.0]]}
    model = TargetRecords(records=[RECORD], subtask_field="task")
    assert to_targets(model) is model


def test_target_conversion_numpy():
    np = pytest.importorskip("numpy")
    targets = to_targets({"epoch-1": np.ones((2, 3), dtype=np.float32),
                          "epoch-2": [np.zeros(3), [np.float32(1.5), np.float64(2.0), 3]]})
    assert targets.vectors["epoch-1"] == [[1.0, 1.0, 1.0]] * 2
    assert targets.vectors["epoch-2"] == [[0.0, 0.0, 0.0], [1.5, 2.0, 3]]
    assert all(type(x) in (float, int) for row in targets.vectors["epoch-2"] for x in row)
    json.dumps(targets.model_dump(mode="json"))


@pytest.mark.parametrize("bad, exc", [
    ({"epoch-1": [1.0, 2.0]}, ValueError),         # 1-D: one row per target is required
    ({"epoch-1": "abc"}, TypeError),
    ({}, ValueError),
    ([RECORD, "not a record"], TypeError),
    ([], ValueError),                               # TargetRecords needs at least one record
    (b"bytes", TypeError),
    (42, TypeError),
    ("", ValueError),
])
def test_target_conversion_errors(bad, exc):
    with pytest.raises(exc):
        to_targets(bad)


def test_select_body_and_client_side_validation(service):
    with make(service) as client:
        page = client.select("pool", "target-store", k=5, sources=["flan"], dedup_threshold=0.9, page_size=2)
        assert page.selection_id == "sel-1" and len(page.items) == 2 and page.next_cursor == "c2"
        with pytest.raises(ValueError):
            client.select("pool", "t", k=5, fraction=0.1)
        with pytest.raises(ValueError):
            client.select("pool", "t")
        with pytest.raises(ValueError, match="strategy"):
            client.select("pool", k=5, strategy="nonesuch")
        # The typed options object and keywords build the same request; keywords win.
        options = SelectionOptions(fraction=0.2, strategy={"name": "quality", "score": "vog", "order": "low"},
                                   filters=[QualityFilter(score="loss", keep="below", quantile=0.9)])
        client.select("pool", options=options, page_size=3)
        client.select("pool", None, options, k=7, fraction=None)
    assert len(service.requests) == 3
    bodies = [json.loads(request.content) for request in service.requests]
    assert bodies[0] == {
        "targets": {"datastore": "target-store"}, "strategy": {"name": "less", "aggregation": "less"}, "k": 5,
        "sources": ["flan"], "dedup_threshold": 0.9, "page_size": 2}
    assert bodies[1] == {
        "strategy": {"name": "quality", "score": "vog", "order": "low"}, "fraction": 0.2,
        "filters": [{"score": "loss", "keep": "below", "quantile": 0.9}], "page_size": 3}
    assert bodies[2] == {"strategy": {"name": "quality", "score": "vog", "order": "low"}, "k": 7,
                         "filters": [{"score": "loss", "keep": "below", "quantile": 0.9}], "page_size": 1000}


# -- pagination ------------------------------------------------------------------------------------


def test_iter_selection_follows_cursor_across_three_pages(service):
    with make(service) as client:
        items = list(client.iter_selection("pool", [RECORD], fraction=0.07, page_size=3))
    assert [item.rank for item in items] == list(range(1, 8))
    assert [item.id for item in items] == [f"ex{i}" for i in range(7)]
    first, second, third = service.requests
    assert first.method == "POST" and json.loads(first.content)["page_size"] == 3
    assert second.url.path == "/v1/datastores/pool/selections/sel-1"
    assert dict(second.url.params) == {"cursor": "c3", "page_size": "3"}
    assert dict(third.url.params) == {"cursor": "c6", "page_size": "3"}


def test_select_all_and_iter_pages(service):
    with make(service) as client:
        assert [item.row for item in client.select_all("pool", "t", k=7, page_size=3)] == list(range(7))
        first = client.select("pool", "t", k=7, page_size=5)
        pages = list(client.iter_pages(first, page_size=1))
    assert [len(page.items) for page in pages] == [5, 1, 1]
    assert pages[-1].next_cursor is None


def test_iterating_an_expired_selection_raises_gone(service):
    with make(service) as client:
        iterator = client.iter_selection("pool", "t", k=7, page_size=3)
        assert [next(iterator).rank for _ in range(3)] == [1, 2, 3]
        service.expired = True
        with pytest.raises(GoneError) as info:
            next(iterator)
    assert info.value.code == "selection_expired"


def test_cursor_that_does_not_advance_is_detected():
    stuck = {"datastore": "pool", "selection_id": "s", "total": 9, "pool": 9, "items": [], "next_cursor": "c1"}
    handler = Scripted(httpx.Response(200, json=stuck))
    with make(handler) as client, pytest.raises(InvalidResponseError):
        client.select_all("pool", "t", k=9)


# -- export ----------------------------------------------------------------------------------------


def test_download_export(service, tmp_path):
    with make(service) as client:
        path = client.download_export("pool", "sel-1", tmp_path / "out.jsonl")
        assert path == tmp_path / "out.jsonl"
        assert path.read_bytes() == b'{"id": "ex0"}\n{"id": "ex1"}\n'
        folder = tmp_path / "exports"
        folder.mkdir()
        assert client.download_export("pool", "sel-1", folder) == folder / "pool-sel-1.jsonl"
        buffer = io.BytesIO()
        assert client.download_export("pool", "sel-1", buffer) is None
        assert buffer.getvalue().count(b"\n") == 2
        with pytest.raises(NotFoundError):
            client.download_export("pool", "nope", tmp_path / "missing.jsonl")
    assert service.requests[0].url.path == "/v1/datastores/pool/selections/sel-1/export"
    assert not (tmp_path / "missing.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "out.jsonl"]  # no leftovers


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status, klass", [
    (400, BadRequestError), (422, BadRequestError), (401, AuthenticationError),
    (403, PermissionDeniedError), (404, NotFoundError), (409, ConflictError), (410, GoneError),
    (413, PayloadTooLargeError), (429, RateLimitError), (500, ServerError), (502, ServerError),
    (503, ServiceUnavailableError), (418, APIError),
])
def test_error_mapping_keeps_code_message_detail(status, klass):
    detail = {"field": "k", "limit": 10_000}
    handler = Scripted(error(status, "some_code", "something is wrong", detail))
    with make(handler, max_retries=0) as client, pytest.raises(klass) as info:
        client.get_datastore("pool")
    exc = info.value
    assert type(exc) is klass
    assert (exc.status, exc.code, exc.message, exc.detail) == (status, "some_code", "something is wrong", detail)
    assert isinstance(exc, APIError) and isinstance(exc, GradstoreError)
    assert "some_code" in str(exc) and "something is wrong" in str(exc)
    assert exc.response is not None and exc.response.status_code == status


def test_error_hierarchy():
    assert issubclass(ServiceUnavailableError, ServerError)
    assert issubclass(TransportError, GradstoreError) and not issubclass(TransportError, APIError)
    assert issubclass(JobTimeoutError, TimeoutError)


def test_non_json_error_body_keeps_text():
    html = "<html><body>502 Bad Gateway</body></html>"
    handler = Scripted(httpx.Response(502, text=html, headers={"content-type": "text/html"}))
    with make(handler) as client, pytest.raises(ServerError) as info:
        client.list_jobs()
    exc = info.value
    assert exc.status == 502 and exc.code == "http_502"
    assert exc.message == html and exc.text == html and exc.detail is None


def test_from_response_fallbacks():
    request = httpx.Request("GET", BASE + "/v1/jobs/x")
    exc = APIError.from_response(httpx.Response(404, json={"detail": "Not Found"}, request=request))
    assert type(exc) is NotFoundError and (exc.code, exc.message, exc.detail) == ("http_404", "Not Found", None)
    validation = [{"loc": ["body", "k"], "msg": "must be >= 1"}]
    exc = APIError.from_response(httpx.Response(422, json={"detail": validation}, request=request))
    assert type(exc) is BadRequestError and exc.detail == validation
    exc = APIError.from_response(httpx.Response(500, content=b"", request=request))
    assert (exc.code, exc.message) == ("http_500", "Internal Server Error")
    exc = APIError.from_response(httpx.Response(400, json=[1, 2], request=request))
    assert exc.detail == [1, 2]
    exc = APIError.from_response(httpx.Response(429, json={"code": "rate", "message": "slow down"},
                                                headers={"retry-after": "7"}, request=request))
    assert type(exc) is RateLimitError and exc.retry_after == 7.0 and exc.detail is None


# -- retries ---------------------------------------------------------------------------------------


def test_retry_honours_retry_after(sleeps):
    handler = Scripted(error(429, "rate_limited", "slow down", headers={"Retry-After": "2"}),
                       error(503, "loading", "not ready", headers={"Retry-After": "0.25"}),
                       health_ok)
    with make(handler, backoff=10) as client:
        assert client.health().status == "ok"
    assert len(handler.requests) == 3
    assert sleeps == [2.0, 0.25]


def test_retry_exponential_backoff_with_jitter(sleeps):
    handler = Scripted(error(503, "loading", "x"), error(503, "loading", "x"), error(503, "loading", "x"),
                       health_ok)
    with make(handler, backoff=0.5, max_retries=3) as client:
        client.health()
    assert len(handler.requests) == 4
    for slept, base in zip(sleeps, [0.5, 1.0, 2.0], strict=True):
        assert base <= slept <= base * 1.1


def test_retries_exhausted_raise_the_last_error(sleeps):
    handler = Scripted(error(503, "loading", "datastores are loading", headers={"retry-after": "1"}))
    with make(handler, max_retries=2) as client, pytest.raises(ServiceUnavailableError) as info:
        client.list_datastores()
    assert len(handler.requests) == 3 and sleeps == [1.0, 1.0]
    assert info.value.code == "loading" and info.value.retry_after == 1.0


def test_max_retries_zero_disables_retries(sleeps):
    handler = Scripted(error(429, "rate_limited", "slow down"))
    with make(handler, max_retries=0) as client, pytest.raises(RateLimitError):
        client.health()
    assert len(handler.requests) == 1 and sleeps == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 413, 422, 500, 502])
def test_no_retry_on_other_errors(status, sleeps):
    handler = Scripted(error(status, "nope", "no"))
    with make(handler) as client, pytest.raises(APIError):
        client.get_job("job-1")
    assert len(handler.requests) == 1 and sleeps == []


def test_connect_errors_are_retried(sleeps):
    handler = Scripted(httpx.ConnectError, httpx.ConnectTimeout, health_ok)
    with make(handler) as client:
        assert client.health().status == "ok"
    assert len(handler.requests) == 3 and len(sleeps) == 2


def test_connect_errors_exhausted_raise_transport_error(sleeps):
    handler = Scripted(httpx.ConnectError)
    with make(handler, max_retries=2) as client, pytest.raises(TransportError) as info:
        client.list_datastores()
    assert len(handler.requests) == 3
    assert isinstance(info.value.__cause__, httpx.ConnectError) and not info.value.is_timeout
    assert "/v1/datastores" in str(info.value)


def test_read_timeout_retried_for_idempotent_requests(sleeps):
    handler = Scripted(httpx.ReadTimeout, httpx.RemoteProtocolError, health_ok)
    with make(handler) as client:
        assert client.health().status == "ok"
    assert len(handler.requests) == 3
    handler = Scripted(httpx.ReadError, httpx.Response(200, json={"datastore": "p", "neighbors": []}))
    with make(handler) as client:
        client.similar("p", id="ex0")  # a read-only POST is retried too
    assert len(handler.requests) == 2


def test_create_job_not_retried_after_read_timeout(sleeps):
    handler = Scripted(httpx.ReadTimeout, job_ok)
    with make(handler) as client, pytest.raises(TransportError) as info:
        client.create_job(**JOB_REQUEST)
    assert len(handler.requests) == 1 and sleeps == []
    assert info.value.is_timeout


@pytest.mark.parametrize("failure", [httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError])
def test_create_job_not_retried_when_maybe_sent(failure, sleeps):
    handler = Scripted(failure, job_ok)
    with make(handler) as client, pytest.raises(TransportError):
        client.create_job(**JOB_REQUEST)
    assert len(handler.requests) == 1


def test_create_job_retried_on_connect_errors_and_refusals(sleeps):
    handler = Scripted(httpx.ConnectError, error(429, "rate_limited", "x", headers={"retry-after": "3"}),
                       error(503, "busy", "x"), job_ok)
    with make(handler) as client:
        job = client.create_job(IndexJobRequest(**JOB_REQUEST))
    assert job.id == "job-1" and len(handler.requests) == 4
    assert sleeps[1] == 3.0


# -- jobs ------------------------------------------------------------------------------------------


def test_job_routes_and_wait(service, sleeps):
    with make(service) as client:
        job = client.create_job(**JOB_REQUEST, proj_dim=16)
        assert job.status == "queued" and job.request.proj_dim == 16
        assert json.loads(service.requests[0].content)["proj_dim"] == 16
        assert client.create_job(dict(JOB_REQUEST)).id == "job-2"
        assert [j.id for j in client.list_jobs()] == ["job-1", "job-2"]
        done = client.wait_for_job(job.id, poll_interval=0.5)
        assert done.status == "succeeded"
        assert sleeps == [0.5, 0.5]
        with pytest.raises(ConflictError):
            client.cancel_job(job.id)
        assert client.cancel_job("job-2").status == "cancelled"
        with pytest.raises(NotFoundError):
            client.get_job("job-9")
        with pytest.raises(TypeError):
            client.create_job(IndexJobRequest(**JOB_REQUEST), model="other")
        with pytest.raises(ValueError):
            client.create_job(datastore="x", corpus=[], model="m")  # rejected before sending


def test_wait_for_job_timeout(service, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(_sync, "_clock", lambda: now[0])
    monkeypatch.setattr(_sync, "_sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    service.jobs["job-1"] = service._job("job-1", "running", JOB_REQUEST)
    service.polls = -1000  # never finishes
    with make(service) as client, pytest.raises(JobTimeoutError) as info:
        client.wait_for_job("job-1", poll_interval=2, timeout=5)
    assert info.value.job.status == "running"
    assert now[0] == 105.0


# -- async -----------------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_async_routes(service, tmp_path):
    async with make_async(service) as client:
        assert [s.name for s in await client.list_datastores()] == ["pool", "target"]
        assert (await client.get_datastore("pool")).name == "pool"
        assert (await client.get_example("pool", "ex3")).id == "ex3"
        assert (await client.health()).status == "ok"
        assert (await client.influence("pool", {"epoch-1": [[0.1, 0.2]]}, k=1)).results[0].target == 0
        assert (await client.similar("pool", id="ex0")).neighbors[0].id == "ex1"
        path = await client.download_export("pool", "sel-1", tmp_path / "sel.jsonl")
        assert path.read_bytes().startswith(b'{"id": "ex0"}')
        service.ready = False
        assert (await client.ready()).ready is False
    assert client._http.is_closed
    assert service.requests[0].headers["X-API-Key"] == "key-1"


@pytest.mark.anyio
async def test_async_iter_selection_three_pages(service):
    async with make_async(service) as client:
        ranks = [item.rank async for item in client.iter_selection("pool", [RECORD], k=7, page_size=3)]
        assert ranks == list(range(1, 8))
        assert len(await client.select_all("pool", "t", k=7, page_size=3)) == 7
        first = await client.select("pool", "t", k=7, page_size=3)
        assert first.next_cursor == "c3" and len(first.items) == 3
    cursors = [r.url.params.get("cursor") for r in service.requests if r.method == "GET"]
    assert cursors == ["c3", "c6", "c3", "c6"]


@pytest.mark.anyio
async def test_async_retries_and_errors(async_sleeps):
    handler = Scripted(error(429, "rate_limited", "x", headers={"retry-after": "1.5"}), httpx.ConnectError,
                       health_ok)
    async with make_async(handler) as client:
        assert (await client.health()).status == "ok"
    assert len(handler.requests) == 3 and async_sleeps[0] == 1.5 and len(async_sleeps) == 2

    handler = Scripted(error(404, "datastore_not_found", "no such datastore", {"name": "x"}))
    async with make_async(handler) as client:
        with pytest.raises(NotFoundError) as info:
            await client.get_datastore("x")
    assert info.value.detail == {"name": "x"} and len(handler.requests) == 1

    handler = Scripted(httpx.ReadTimeout, job_ok)
    async with make_async(handler) as client:
        with pytest.raises(TransportError):
            await client.create_job(**JOB_REQUEST)
    assert len(handler.requests) == 1

    handler = Scripted(error(503, "loading", "x"))
    async with make_async(handler, max_retries=2, backoff=0.5) as client:
        with pytest.raises(ServiceUnavailableError):
            await client.list_jobs()
    assert len(handler.requests) == 3 and 0.5 <= async_sleeps[-2] <= 0.55 and 1.0 <= async_sleeps[-1] <= 1.1


@pytest.mark.anyio
async def test_async_jobs(service, async_sleeps):
    async with make_async(service) as client:
        job = await client.create_job(**JOB_REQUEST)
        assert (await client.wait_for_job(job.id, poll_interval=0.25)).status == "succeeded"
        assert async_sleeps == [0.25, 0.25]
        assert len(await client.list_jobs()) == 1
        with pytest.raises(ConflictError):
            await client.cancel_job(job.id)


# -- packaging -------------------------------------------------------------------------------------


def test_public_names():
    for name in gc.__all__:
        assert hasattr(gc, name), name
    assert "from gradstore.client import" in gc.__doc__


def test_import_pulls_in_nothing_heavy():
    code = textwrap.dedent("""
        import sys
        import gradstore.client
        from gradstore.client import Client, AsyncClient
        heavy = {"torch", "numpy", "faiss", "fastapi", "pyarrow", "starlette", "transformers", "pandas"}
        print(sorted(name for name in sys.modules if name.split(".")[0] in heavy))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout
