"""The SDK against the real service: real apps and real ``gradstore serve`` processes over real
datastores built by the indexer on a tiny model (see ``service_root`` in ``conftest.py``).

Every query test runs with four clients:

- ``async-asgi``: ``AsyncClient`` over ``httpx.ASGITransport`` into an in-process app, whose
  lifespan (registry, selection cache, job manager on ``app.state``) runs on the same event loop;
- ``sync-testclient``: ``Client`` sending through Starlette's ``TestClient`` (``http_client=``);
- ``sync-uvicorn`` and ``async-uvicorn``: ``Client`` / ``AsyncClient`` over TCP to
  ``python -m gradstore.cli serve`` on a free loopback port.

The synchronous tests drive an ``AsyncClient`` through :class:`Blocking`, which runs each of its
coroutines on the event loop of an anyio blocking portal (``async for`` iterators are drained
there). Expected results come from numpy over the stores' Parquet files and manifests, never from
the service's own code.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from gradstore.client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    GoneError,
    NotFoundError,
    TargetVectors,
    TransportError,
)
from gradstore.service.app import create_app
from gradstore.service.process import ServiceProcess, free_port
from gradstore.service.settings import Settings

from conftest import DIM, copy_stores, features, id_of, less_scores, numpy_top_k, sgd_job_request, top_rows, weights

KEY = "sdk-key"
KINDS = ["async-asgi", "sync-testclient", "sync-uvicorn", "async-uvicorn"]
STORES = {"pool", "pool-noindex", "targets"}
JOB_TIMEOUT = 120.0


# ------------------------------------------------------------------------------------ fixtures


async def _drain(iterator) -> list:
    return [item async for item in iterator]


class Blocking:
    """An ``AsyncClient`` for synchronous tests: its coroutine methods run on ``portal``'s event
    loop; its async iterators (``iter_selection``, ``iter_pages``) are drained there into lists."""

    def __init__(self, portal, client: AsyncClient) -> None:
        self._portal = portal
        self.client = client

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if inspect.isasyncgenfunction(method):
            return lambda *args, **kwargs: iter(self._portal.call(_drain, method(*args, **kwargs)))
        if inspect.iscoroutinefunction(method):
            return lambda *args, **kwargs: self._portal.call(functools.partial(method, *args, **kwargs))
        return method

    def close(self) -> None:
        self._portal.call(self.client.aclose)


@dataclass
class Service:
    kind: str
    client: Any  # a Client, or an AsyncClient behind Blocking
    make: Callable[..., Any]  # make(api_key=..., **options): another client of the same kind
    root: Path  # the service root (a copy of the shared stores)


@pytest.fixture(scope="module")
def job_inputs(service_corpus, tiny_model_dirs):
    """The folders job inputs may come from (the corpus files and the tiny Llama)."""
    folder, _ = service_corpus
    return [folder, tiny_model_dirs["llama"]]


def settings_for(root: Path, job_inputs) -> Settings:
    return Settings(root=root, api_keys=[KEY], job_input_roots=job_inputs)


@pytest.fixture(scope="module")
def server(service_root, job_inputs, tmp_path_factory):
    """``gradstore serve`` as a child process on a free loopback port, over a copy of the stores."""
    root = copy_stores(service_root, tmp_path_factory.mktemp("sdk-uvicorn-root"))
    env = {"GRADSTORE_JOB_INPUT_ROOTS": ",".join(map(str, job_inputs))}
    with ServiceProcess(root, api_key=KEY, env=env, log_file=root.parent / "serve.log") as process:
        yield process


@pytest.fixture(scope="module", params=KINDS)
def service(request, service_root, job_inputs, tmp_path_factory):
    kind = request.param
    with contextlib.ExitStack() as stack:  # unwinds clients first, then the app or the portal
        if kind.endswith("uvicorn"):
            process = request.getfixturevalue("server")
            app, url, root = None, process.url, process.root
        else:
            root = copy_stores(service_root, tmp_path_factory.mktemp(f"sdk-{kind}-root"))
            app, url = create_app(settings_for(root, job_inputs)), "http://testserver"
        if kind.startswith("async"):
            portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
            transport = None
            if app is not None:
                # ASGITransport only sends requests: the lifespan that fills app.state is run here.
                stack.enter_context(portal.wrap_async_context_manager(app.router.lifespan_context(app)))
                transport = httpx.ASGITransport(app=app)

            def make(**options):
                client = Blocking(portal, AsyncClient(url, transport=transport, **options))
                stack.callback(client.close)
                return client
        else:
            http = stack.enter_context(TestClient(app)) if app is not None else None  # runs the lifespan

            def make(**options):
                return stack.enter_context(Client(url, http_client=http, **options))

        yield Service(kind, make(api_key=KEY), make, root)


def raises_api_error(kind: type[APIError], status: int, code: str, call: Callable[[], Any]) -> APIError:
    with pytest.raises(kind) as caught:
        call()
    error = caught.value
    assert (error.status, error.code) == (status, code), repr(error)
    assert isinstance(error.message, str) and error.message
    return error


# ----------------------------------------------------------------------------- datastores


def test_health_and_readiness(service):
    assert service.client.health().status == "ok"
    ready = service.client.ready()
    assert ready.ready is True
    assert STORES <= {state.name for state in ready.datastores if state.loaded and state.error is None}


def test_list_and_describe_datastores(service, service_root):
    listed = {store.name: store for store in service.client.list_datastores()}
    assert STORES <= set(listed)
    pool = listed["pool"]
    assert pool.examples == 40 and pool.dim == DIM and pool.index == "flat" and pool.gradient_type == "adam"
    expected = weights(service_root / "pool")
    assert [c.name for c in pool.checkpoints] == list(expected)
    total = sum(c.weight for c in pool.checkpoints)
    assert {c.name: c.weight / total for c in pool.checkpoints} == pytest.approx(expected)
    assert listed["pool-noindex"].index is None
    assert listed["targets"].examples == 6 and listed["targets"].gradient_type == "sgd"

    detail = service.client.get_datastore("pool")
    manifest = json.loads((service_root / "pool" / "manifest.json").read_text())
    assert detail.sources == {"toy": 28, "more": 12}
    assert detail.projection["dim"] == DIM and detail.lora["r"] == 4
    assert detail.created_at == manifest["created_at"]


def test_get_example_is_the_original_record(service, service_corpus):
    _, records = service_corpus
    example = service.client.get_example("pool", "more-3")
    assert (example.row, example.id, example.source) == (31, "more-3", "more")
    assert example.record == records["more"][3]
    assert example.num_tokens >= example.num_label_tokens > 0
    assert service.client.get_example("pool", "ex-0").record == records["toy"][0]
    raises_api_error(NotFoundError, 404, "example_not_found", lambda: service.client.get_example("pool", "nope"))


# ---------------------------------------------------------------------------------- select


def test_select_with_a_target_datastore_equals_numpy_less(service, service_root):
    targets = {c: features(service_root / "targets", c) for c in weights(service_root / "pool")}
    expected = less_scores(service_root, targets)
    page = service.client.select("pool", "targets", k=12, page_size=100)  # a name: TargetDatastore
    assert page.datastore == "pool" and page.total == 12 and page.pool == 40 and page.next_cursor is None
    rows = [item.row for item in page.items]
    assert rows == top_rows(expected, 12)
    assert [item.id for item in page.items] == [id_of(row) for row in rows]
    assert [item.rank for item in page.items] == list(range(1, 13))
    np.testing.assert_allclose([item.score for item in page.items], np.sort(expected)[::-1][:12], atol=1e-4)


def test_select_with_raw_vectors_equals_numpy_less(service, service_root):
    rng = np.random.default_rng(11)
    vectors = {c: rng.normal(size=(4, DIM)) for c in weights(service_root / "pool")}

    page = service.client.select("pool", vectors, k=10)  # {checkpoint: ndarray}: TargetVectors
    expected = less_scores(service_root, vectors)
    assert [item.row for item in page.items] == top_rows(expected, 10)
    np.testing.assert_allclose([item.score for item in page.items], np.sort(expected)[::-1][:10], atol=1e-4)

    subtasks = ["a", "b", "a", "b"]
    targets = TargetVectors(vectors={c: v.tolist() for c, v in vectors.items()}, subtasks=subtasks)
    page = service.client.select("pool", targets, fraction=0.25)
    expected = less_scores(service_root, vectors, subtasks)
    assert page.total == 10 and [item.row for item in page.items] == top_rows(expected, 10)
    assert set(page.items[0].subtask_scores) == {"a", "b"}
    np.testing.assert_allclose([item.score for item in page.items], np.sort(expected)[::-1][:10], atol=1e-4)


def test_select_with_target_records_equals_the_target_store(service, service_corpus):
    _, records = service_corpus
    by_records = service.client.select("pool", records["tgt"], k=8)  # record dicts: TargetRecords
    by_store = service.client.select("pool", "targets", k=8)
    assert [i.row for i in by_records.items] == [i.row for i in by_store.items]
    np.testing.assert_allclose([i.score for i in by_records.items], [i.score for i in by_store.items], atol=2e-3)


def test_iter_selection_yields_every_page_once_in_order(service, service_root):
    targets = {c: features(service_root / "targets", c) for c in weights(service_root / "pool")}
    expected = top_rows(less_scores(service_root, targets), 40)

    first = service.client.select("pool", "targets", fraction=1.0, page_size=7)
    assert len(first.items) == 7 and first.next_cursor is not None and first.total == 40
    pages = list(service.client.iter_pages(first, page_size=7))
    assert [len(page.items) for page in pages] == [7, 7, 7, 7, 7, 5]
    assert {page.selection_id for page in pages} == {first.selection_id}

    items = list(service.client.iter_selection("pool", "targets", fraction=1.0, page_size=7))
    assert [item.rank for item in items] == list(range(1, 41))
    assert [item.row for item in items] == expected  # every row once, in rank order
    assert [item.row for item in items] == [item.row for page in pages for item in page.items]
    assert items == service.client.select("pool", "targets", fraction=1.0, page_size=40).items


def test_download_export_holds_the_selected_original_records(service, service_corpus, tmp_path):
    _, records = service_corpus
    by_id = {r["id"]: r for items in records.values() for r in items}

    page = service.client.select("pool", "targets", k=9, export="jsonl")
    expected = [by_id[item.id] for item in page.items]
    written = service.client.download_export("pool", page.selection_id, tmp_path / "selected.jsonl")
    assert written == tmp_path / "selected.jsonl"
    assert [json.loads(line) for line in written.read_text().splitlines()] == expected
    named = service.client.download_export("pool", page.selection_id, tmp_path)  # a folder
    assert named == tmp_path / f"{page.selection_id}.jsonl" and named.read_bytes() == written.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["selected.jsonl", named.name])  # no leftovers

    page = service.client.select("pool", "targets", k=7, export="parquet")
    buffer = io.BytesIO()
    assert service.client.download_export("pool", page.selection_id, buffer) is None
    assert pq.read_table(io.BytesIO(buffer.getvalue())).to_pylist() == [by_id[item.id] for item in page.items]


# ------------------------------------------------------------------------ influence, similar


def test_influence_equals_exact_numpy_top_k(service, service_root):
    targets = {c: features(service_root / "targets", c) for c in weights(service_root / "pool")}
    response = service.client.influence("pool", "targets", k=5)
    assert response.datastore == "pool" and response.exact is True
    assert [result.target for result in response.results] == list(range(6))
    for result, (rows, scores) in zip(response.results, numpy_top_k(service_root, targets, 5)):
        assert [n.row for n in result.neighbors] == rows
        assert [n.id for n in result.neighbors] == [id_of(row) for row in rows]
        np.testing.assert_allclose([n.score for n in result.neighbors], scores, atol=1e-3)


def test_similar_by_id_and_by_vector(service, service_root):
    w = weights(service_root / "pool")
    stacked = np.concatenate([np.sqrt(w[c]) * features(service_root / "pool", c) for c in w], axis=1)
    gram = stacked @ stacked.T

    response = service.client.similar("pool", id="ex-5", k=4)
    expected = [row for row in top_rows(gram[5], 5) if row != 5][:4]
    assert response.datastore == "pool"
    assert [n.row for n in response.neighbors] == expected
    assert [n.id for n in response.neighbors] == [id_of(row) for row in expected]
    np.testing.assert_allclose([n.score for n in response.neighbors], gram[5, expected], atol=1e-3)
    assert service.client.similar("pool", id="ex-5", k=3, include_self=True).neighbors[0].row == 5

    vectors = {c: features(service_root / "pool", c)[7] for c in w}  # one ndarray per checkpoint
    by_vector = service.client.similar("pool-noindex", vectors=vectors, k=3)
    assert [n.row for n in by_vector.neighbors] == top_rows(gram[7], 3)
    raises_api_error(NotFoundError, 404, "example_not_found", lambda: service.client.similar("pool", id="nope"))


# ---------------------------------------------------------------------------------- errors


def test_wrong_or_missing_key_is_an_authentication_error(service):
    for key in ("wrong", None):
        client = service.make(api_key=key)
        error = raises_api_error(AuthenticationError, 401, "unauthorized", client.list_datastores)
        assert error.response is not None and error.response.headers["www-authenticate"] == "ApiKey"
        raises_api_error(AuthenticationError, 401, "unauthorized", lambda: client.select("pool", "targets", k=3))
    assert service.make(api_key=None).health().status == "ok"  # health routes need no key


def test_unknown_datastore_and_selection(service):
    raises_api_error(NotFoundError, 404, "datastore_not_found", lambda: service.client.get_datastore("nothing-here"))
    raises_api_error(NotFoundError, 404, "datastore_not_found",
                     lambda: service.client.select("nothing-here", "targets", k=3))
    for bad_name in ("a..b", "..", "."):  # dot segments reach the service instead of the parent path
        raises_api_error(BadRequestError, 400, "invalid_name", lambda: service.client.get_datastore(bad_name))
    raises_api_error(GoneError, 410, "selection_expired",
                     lambda: service.client.get_selection_page("pool", "0" * 64))


def test_limits_and_malformed_queries(service):
    error = raises_api_error(BadRequestError, 400, "limit_exceeded",
                             lambda: service.client.select("pool", "targets", k=10**9))
    assert error.detail == {"limit": "k", "value": 10**9, "max": 10_000}
    raises_api_error(BadRequestError, 400, "limit_exceeded", lambda: service.client.influence("pool", "targets",
                                                                                               k=10**6))
    raises_api_error(BadRequestError, 400, "limit_exceeded",
                     lambda: service.client.select("pool", "targets", k=3, page_size=10**6))

    wrong_dim = {"epoch-1": np.ones((2, 7)), "epoch-2": np.ones((2, 7))}
    for call in (lambda: service.client.select("pool", wrong_dim, k=3),
                 lambda: service.client.influence("pool", wrong_dim, k=3),
                 lambda: service.client.similar("pool", vectors={c: v[0] for c, v in wrong_dim.items()})):
        error = raises_api_error(BadRequestError, 422, "invalid_query", call)
        assert "dimension 7" in error.message and str(DIM) in error.message, error.message
    error = raises_api_error(BadRequestError, 422, "invalid_query",
                             lambda: service.client.select("pool", {"epoch-9": np.ones((1, DIM))}, k=3))
    assert "epoch-9" in error.message


# ------------------------------------------------------------------------------------ jobs


# The async client's job calls are covered in-process (async-asgi); over TCP the sync client is enough.
@pytest.mark.parametrize("service", KINDS[:3], indirect=True)
def test_create_job_wait_and_query_the_new_datastore(service, service_corpus, tiny_model_dirs, service_root):
    folder, records = service_corpus
    name = f"job-{service.kind}"
    request = sgd_job_request([folder / "tgt.jsonl"], tiny_model_dirs["llama"], datastore=name)
    job = service.client.create_job(request)
    assert job.status in ("queued", "running") and job.request == request and len(job.id) == 32

    done = service.client.wait_for_job(job.id, poll_interval=0.1, timeout=JOB_TIMEOUT)
    assert done.status == "succeeded", done.error
    assert done.id == job.id and done.attempts == 1 and done.error is None
    assert done.progress.done == done.progress.total == len(records["tgt"])
    assert job.id in [j.id for j in service.client.list_jobs()]

    listed = {store.name: store for store in service.client.list_datastores()}
    assert STORES | {name} <= set(listed)
    new = listed[name]
    # A small store gets no index by default: exact searches scan its features.
    assert (new.examples, new.dim, new.gradient_type, new.index) == (6, DIM, "sgd", None)
    assert service.client.get_example(name, "tgt-2").record == records["tgt"][2]
    # Its own vectors, read from its Parquet files, find their example.
    vectors = {c.name: features(service.root / name, c.name)[2] for c in new.checkpoints}
    assert [n.id for n in service.client.similar(name, vectors=vectors, k=1).neighbors] == ["tgt-2"]

    # An append names only the corpus (the SDK sends no defaults): the served store gains its rows.
    job = service.client.create_job(datastore=name, corpus=[str(folder / "more.jsonl")], append=True, device="cpu")
    assert (job.request.proj_dim, job.request.gradient_type, job.request.model) == (DIM, "sgd", None)
    done = service.client.wait_for_job(job.id, poll_interval=0.1, timeout=JOB_TIMEOUT)
    assert done.status == "succeeded", done.error
    grown = service.client.get_datastore(name)
    assert (grown.examples, grown.version) == (6 + len(records["more"]), 2)
    assert service.client.get_example(name, "more-3").record == records["more"][3]


# ------------------------------------------------------------------ transport and restarts


class CountingTransport(httpx.HTTPTransport):
    """A real HTTP transport that counts the requests it tries to send."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        return super().handle_request(request)


class CountingAsyncTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        return await super().handle_async_request(request)


def test_a_closed_port_raises_transport_error_after_the_retries(server, service_corpus, tiny_model_dirs):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    folder, _ = service_corpus
    request = sgd_job_request([folder / "tgt.jsonl"], tiny_model_dirs["llama"], datastore="never")

    for call in (lambda c: c.list_datastores(), lambda c: c.create_job(request)):  # a job was never sent
        transport = CountingTransport()
        with Client(closed, KEY, max_retries=2, backoff=0, transport=transport) as client:
            start = time.monotonic()
            with pytest.raises(TransportError) as caught:
                call(client)
        assert transport.attempts == 3 and time.monotonic() - start < 10
        assert isinstance(caught.value.cause, httpx.ConnectError) and not caught.value.is_timeout
        assert caught.value.request is not None and str(caught.value.request.url).startswith(closed)

    async def async_attempts() -> int:
        transport = CountingAsyncTransport()
        async with AsyncClient(closed, KEY, max_retries=4, backoff=0, transport=transport) as client:
            with pytest.raises(TransportError):
                await client.get_datastore("pool")
        return transport.attempts

    assert anyio.run(async_attempts) == 5

    transport = CountingTransport()  # the same settings against the live server: one attempt
    with Client(server.url, KEY, max_retries=2, backoff=0, transport=transport) as client:
        assert client.get_datastore("pool").examples == 40
    assert transport.attempts == 1


def test_a_job_survives_a_service_restart(tmp_path, service_corpus, tiny_model_dirs, job_inputs):
    """Stop the service (SIGTERM) while its job runs; a new service on the same root and port
    runs the job again from the queue it left in SQLite, under the same id."""
    folder, records = service_corpus
    root = tmp_path / "root"
    root.mkdir()
    env = {"GRADSTORE_JOB_INPUT_ROOTS": ",".join(map(str, job_inputs))}
    first = ServiceProcess(root, api_key=KEY, env=env, log_file=tmp_path / "first.log")
    second = ServiceProcess(root, api_key=KEY, port=first.port, env=env, log_file=tmp_path / "second.log")
    request = sgd_job_request([folder / "tgt.jsonl"], tiny_model_dirs["llama"], datastore="resumed")
    try:
        first.start()
        with Client(first.url, KEY, max_retries=5, backoff=0.1) as client:
            job = client.create_job(request)
            deadline = time.monotonic() + 60
            while (current := client.get_job(job.id)).status == "queued":
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.05)
            assert current.status == "running", current.error  # its indexer is still starting up
            first.stop()  # SIGTERM: the service stops the indexer and puts the job back in the queue
            assert first.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal

            second.start()  # same root, same address: the same client keeps working
            listed = client.list_jobs()
            assert [(j.id, j.request, j.created_at) for j in listed] == [(job.id, request, job.created_at)]
            done = client.wait_for_job(job.id, poll_interval=0.1, timeout=JOB_TIMEOUT)
            assert done.status == "succeeded", done.error
            assert done.attempts == 1  # an orderly shutdown does not count as a failed attempt
            assert done.progress.done == done.progress.total == len(records["tgt"])
            store = client.get_datastore("resumed")
            assert store.examples == 6 and store.dim == DIM
    finally:
        first.kill()
        second.stop()
    log = (root / ".gradstore" / "jobs" / job.id / "index.log").read_text()
    assert log.count("--- attempt 1 at") == 2  # started, stopped, started again


# ------------------------------------------------------------------- quantised copy (runs last)


def test_select_at_a_precision_once_the_store_holds_its_copy(service, service_root):
    """Last of each client's tests: it adds a version with an int8 copy to that client's pool."""
    from gradstore.datastore.versions import quantize

    targets = {c: features(service_root / "targets", c) for c in weights(service_root / "pool")}
    strategy = {"name": "less", "precision": "int8"}
    if "int8" not in json.loads((service.root / "pool" / "manifest.json").read_text())["features"]["quantized"]:
        error = raises_api_error(BadRequestError, 422, "invalid_query",
                                 lambda: service.client.select("pool", "targets", k=12, strategy=strategy))
        assert "no int8 copy of the features to scan" in error.message and "gradstore quantize" in error.message
        quantize(service.root / "pool", "int8")  # the uvicorn clients share one root: the second finds it done
    page = service.client.select("pool", "targets", k=12, strategy=strategy)
    expected = less_scores(service.root, targets, precision="int8")
    assert [item.row for item in page.items] == top_rows(expected, 12)
    np.testing.assert_allclose([item.score for item in page.items], np.sort(expected)[::-1][:12], atol=1e-4)
    assert page.strategy == strategy | {"aggregation": "less", "checkpoints": None, "weights": None}
