"""The asynchronous client (asyncio or trio, through anyio)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio
import httpx

from ._base import TERMINAL_JOB_STATUSES, BaseClient, Call, TargetsLike, export_file_name
from .errors import APIError, InvalidResponseError, JobTimeoutError
from .models import DatastoreStats, ExamplePage, MapResponse, SelectionSummary
from .models import (
    DatastoreDetail,
    DatastoreSummary,
    Example,
    Health,
    IndexJobRequest,
    InfluenceResponse,
    Job,
    Readiness,
    SelectedExample,
    SelectionOptions,
    SelectPage,
    SimilarResponse,
    StrategyInfo,
)

T = TypeVar("T")

# Module-level so that tests (and callers) can replace them.
_sleep = anyio.sleep
_clock = time.monotonic


class AsyncClient(BaseClient):
    """Asynchronous client of the gradstore REST service.

    ``base_url`` is the service root (``http://host:8080``, or with a path prefix); ``api_key``
    is sent in the ``api_key_header`` header. ``timeout`` is in seconds (or an ``httpx.Timeout``).
    Retries: see :mod:`gradstore.client` (429/503/connection errors, up to ``max_retries``, with
    exponential ``backoff`` and ``Retry-After``).

    ``transport`` is any ``httpx.AsyncBaseTransport`` (e.g. ``httpx.MockTransport``,
    ``httpx.ASGITransport(app=app)``); ``http_client`` an ``httpx.AsyncClient`` to send through
    instead (not closed by :meth:`aclose`). Use with ``async with``, or call :meth:`aclose`.
    """

    def __init__(self, base_url: str | httpx.URL, api_key: str | None = None, *,
                 api_key_header: str = "X-API-Key",
                 timeout: float | httpx.Timeout | None = 30.0,
                 max_retries: int = 3,
                 backoff: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None,
                 headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, api_key_header=api_key_header, timeout=timeout,
                         max_retries=max_retries, backoff=backoff, headers=headers)
        if http_client is not None and transport is not None:
            raise ValueError("give transport or http_client, not both")
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(
            transport=transport, timeout=self.timeout, follow_redirects=False)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection pool (not a caller's ``http_client``)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    # -- sending -----------------------------------------------------------------------------------

    async def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """Send with retries; the final response (error statuses included, not raised)."""
        attempt = 0
        while True:
            request = self._build_request(self._http, call)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.RequestError as exc:
                delay = self._retry_after_error(call, attempt, exc)
                if delay is None:
                    raise self._transport_error(exc, request) from exc
            else:
                delay = self._retry_after_response(call, attempt, response)
                if delay is None:
                    return response
                await response.aclose()
            await _sleep(delay)
            attempt += 1

    async def _request(self, call: Call[T]) -> T:
        return self._finish(call, await self._send(call))

    # -- datastores --------------------------------------------------------------------------------

    async def list_datastores(self) -> list[DatastoreSummary]:
        """The served datastores (``GET /v1/datastores``)."""
        return await self._request(self._list_datastores())

    async def get_datastore(self, name: str) -> DatastoreDetail:
        """One datastore's manifest summary (``GET /v1/datastores/{name}``)."""
        return await self._request(self._get_datastore(name))

    async def get_example(self, name: str, id: str) -> Example:
        """One training example of a datastore, by corpus id."""
        return await self._request(self._get_example(name, id))

    # -- selection ---------------------------------------------------------------------------------

    async def list_strategies(self) -> list[StrategyInfo]:
        """The service's selection strategies with their options' schemas (``GET /v1/strategies``)."""
        return await self._request(self._list_strategies())

    async def select(self, name: str, targets: TargetsLike | None = None, options: SelectionOptions | None = None, *,
               page_size: int = 1000, export: str | None = None, **selection: Any) -> SelectPage:
        """Run a selection on datastore ``name``: the first page.

        What to select is a :class:`SelectionOptions` (``options``) and/or its fields as keywords
        (``k=``, ``fraction=``, ``strategy=``, ``sources=``, ``filters=``, ``per_source_cap=``,
        ``dedup_threshold=``; keywords win): ``select("pool", targets, k=50)``,
        ``select("pool", strategy={"name": "quality", "score": "effective_rank"}, fraction=0.1)``.
        ``targets`` (see :func:`gradstore.client.to_targets`) is left out for target-free
        strategies. Further pages: :meth:`get_selection_page` / :meth:`iter_pages`, or use
        :meth:`iter_selection`.
        """
        return await self._request(self._select(name, targets, options, selection, page_size, export))

    async def get_selection_page(self, name: str, selection_id: str, *, cursor: str | None = None,
                                 page_size: int | None = None) -> SelectPage:
        """A page of an earlier selection (``GET .../selections/{id}?cursor=&page_size=``)."""
        return await self._request(self._get_selection_page(name, selection_id, cursor, page_size))

    async def iter_pages(self, first: SelectPage, *,
                         page_size: int | None = None) -> AsyncIterator[SelectPage]:
        """``first`` and the following pages of its selection, by ``next_cursor``.

        Raises :class:`GoneError` when the selection expired on the service meanwhile.
        """
        page = first
        while True:
            yield page
            cursor = page.next_cursor
            if cursor is None:
                return
            page = await self.get_selection_page(first.datastore, first.selection_id, cursor=cursor,
                                                 page_size=page_size)
            if page.next_cursor == cursor:
                raise InvalidResponseError(f"selection {first.selection_id}: the cursor did not advance")

    async def iter_selection(self, name: str, targets: TargetsLike | None = None,
                       options: SelectionOptions | None = None, *, page_size: int = 1000,
                       export: str | None = None, **selection: Any) -> AsyncIterator[SelectedExample]:
        """Every selected example, in rank order, fetching pages of ``page_size`` as needed.

        Same arguments as :meth:`select`; the request is sent on the first ``next()``.
        """
        first = await self.select(name, targets, options, page_size=page_size, export=export, **selection)
        async for page in self.iter_pages(first, page_size=page_size):
            for item in page.items:
                yield item

    async def select_all(self, name: str, targets: TargetsLike | None = None,
                         options: SelectionOptions | None = None, *, page_size: int = 1000,
                         export: str | None = None, **selection: Any) -> list[SelectedExample]:
        """The whole selection as a list (all pages of :meth:`iter_selection`)."""
        return [item async for item in self.iter_selection(name, targets, options, page_size=page_size,
                                                           export=export, **selection)]

    async def download_export(self, name: str, selection_id: str,
                              path: str | os.PathLike[str] | IO[bytes]) -> Path | None:
        """Download a selection's export file (``select(..., export="jsonl"|"parquet")``).

        ``path``: the file to write (replaced atomically: a partial download never appears
        there), an existing folder (the file is named after the service's file name or the
        selection id), or a writable binary file object (returns None).
        """
        call = self._export(name, selection_id)
        response = await self._send(call, stream=True)
        try:
            if not 200 <= response.status_code < 300:
                await response.aread()
                raise APIError.from_response(response)
            if hasattr(path, "write"):
                async for chunk in response.aiter_bytes():
                    path.write(chunk)  # type: ignore[union-attr]
                return None
            target = Path(path)  # type: ignore[arg-type]
            if target.is_dir():
                target = target / export_file_name(response, selection_id)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            try:
                async with anyio.wrap_file(os.fdopen(fd, "wb")) as file:
                    async for chunk in response.aiter_bytes():
                        await file.write(chunk)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return target
        except httpx.RequestError as exc:
            raise self._transport_error(exc, response.request) from exc
        finally:
            await response.aclose()

    # -- influence and similar ---------------------------------------------------------------------

    async def influence(self, name: str, targets: TargetsLike, *, k: int = 10,
                        checkpoints: Sequence[str] | None = None,
                        weights: Mapping[str, float] | None = None) -> InfluenceResponse:
        """The ``k`` most influential training examples for each target example."""
        return await self._request(
            self._influence(name, targets, k=k, checkpoints=checkpoints, weights=weights))

    async def similar(self, name: str, *, id: str | None = None, vectors: Mapping[str, Any] | None = None,
                      k: int = 10, include_self: bool = False) -> SimilarResponse:
        """Nearest training examples to a training example (``id``) or to ``vectors``
        (checkpoint name -> one vector)."""
        return await self._request(
            self._similar(name, id=id, vectors=vectors, k=k, include_self=include_self))

    # -- jobs --------------------------------------------------------------------------------------

    async def create_job(self, request: IndexJobRequest | Mapping[str, Any] | None = None, /,
                         **fields: Any) -> Job:
        """Queue an indexing job: ``create_job(IndexJobRequest(...))`` or ``create_job(datastore=...,
        corpus=[...], model=...)``; with ``append=True`` (no model needed) the corpus is added to the
        existing datastore with its recorded settings. Only the fields given are sent, so settings
        left out take the service's defaults (an append's: the store's). Not retried once the
        request may have reached the service."""
        return await self._request(self._create_job(request, fields))

    async def get_job(self, id: str) -> Job:
        """A job's current state."""
        return await self._request(self._get_job(id))

    async def list_jobs(self, *, page_size: int | None = None) -> list[Job]:
        """Every job the service knows, newest first: every page of ``GET /v1/jobs``, of
        ``page_size`` jobs each (default: the service's)."""
        jobs, cursor = [], None
        while True:
            page = await self._request(self._list_jobs(cursor, page_size))
            jobs += page.jobs
            if page.next_cursor is None or page.next_cursor == cursor:
                return jobs
            cursor = page.next_cursor

    async def cancel_job(self, id: str) -> Job:
        """Ask the service to cancel a job; returns its state."""
        return await self._request(self._cancel_job(id))

    async def wait_for_job(self, id: str, *, poll_interval: float = 1.0, timeout: float | None = None) -> Job:
        """Poll a job until it is ``succeeded``, ``failed`` or ``cancelled``, and return it.

        Raises :class:`JobTimeoutError` (with the last state in ``.job``) after ``timeout`` seconds.
        """
        if poll_interval <= 0:
            raise ValueError("poll_interval must be > 0")
        deadline = None if timeout is None else _clock() + timeout
        while True:
            job = await self.get_job(id)
            if job.status in TERMINAL_JOB_STATUSES:
                return job
            wait = poll_interval
            if deadline is not None:
                remaining = deadline - _clock()
                if remaining <= 0:
                    raise JobTimeoutError(f"job {id} still {job.status} after {timeout} s", job=job)
                wait = min(wait, remaining)
            await _sleep(wait)

    # -- health ------------------------------------------------------------------------------------

    async def health(self) -> Health:
        """Liveness (``GET /healthz``)."""
        return await self._request(self._health())

    async def ready(self) -> Readiness:
        """Readiness (``GET /readyz``): the body also when the service answers 503 (not ready)."""
        return await self._request(self._ready())

    # -- overview ----------------------------------------------------------------------------------

    async def get_stats(self, name: str, *, bins: int | None = None) -> DatastoreStats:
        """Examples per source and histograms of token length, loss, gradient norm and the stored
        quality scores (``GET /v1/datastores/{name}/stats``)."""
        return await self._request(self._get_stats(name, bins))

    async def list_examples(self, name: str, *, offset: int = 0, limit: int = 20,
                      query: str | None = None) -> ExamplePage:
        """A page of stored examples in row order; with ``query``, of those whose id or record
        text contains it (case-insensitive)."""
        return await self._request(self._list_examples(name, offset, limit, query))

    async def pool_map(self, name: str, *, sample: int = 2000, seed: int = 0, rows: Sequence[int] = (),
                 targets: TargetsLike | None = None) -> MapResponse:
        """2-D PCA coordinates of a seeded sample of the pool, with ``rows`` and ``targets`` placed
        on the same axes (``POST /v1/datastores/{name}/map``)."""
        return await self._request(self._pool_map(name, sample=sample, seed=seed, rows=rows, targets=targets))

    async def get_selection_summary(self, name: str, selection_id: str, *, bins: int | None = None) -> SelectionSummary:
        """Composition per source, the pool's score histogram with the cut-off and the per-subtask
        breakdown of a cached selection."""
        return await self._request(self._get_selection_summary(name, selection_id, bins))
