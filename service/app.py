"""The FastAPI application: ``create_app(settings)`` wires settings, state, middleware and routers.

State on ``app.state``: ``settings``, ``api_keys`` (None with auth disabled), ``metrics``, and,
for the lifespan of the app, ``registry`` (the datastores), ``selections`` (the selection cache)
and ``jobs`` (the indexing job manager).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradstore import __version__

from .deps import api_key_auth
from .errors import (
    PayloadTooLarge,
    UnexpectedErrorMiddleware,
    error_response,
    error_responses,
    install_error_handlers,
    payload_too_large,
)
from .jobs import JobManager
from .metrics import Metrics, MetricsMiddleware
from .registry import DatastoreRegistry, SelectionCache
from .routers import datastores, health, influence, select, similar, strategies
from .routers.jobs import router as jobs_router
from .settings import Settings

log = logging.getLogger("gradstore.service")

DESCRIPTION = """\
REST API over gradstore datastores: per-example projected LoRA gradients of a training corpus.

Select the training examples that most influence a target task (LESS), look up the nearest
neighbours of targets or examples through the FAISS index, and run indexing jobs. Every `/v1`
route needs an API key in the configured header; every error is `{code, message, detail}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """A configured app; raises ``ConfigurationError`` when no API key is set and auth is not
    explicitly disabled."""
    settings = settings if settings is not None else Settings()
    api_keys = None if settings.auth_disabled else settings.load_api_keys()
    if api_keys is None:
        log.warning("authentication is disabled: every client can use the API")
    app = FastAPI(title="gradstore", version=__version__, description=DESCRIPTION, lifespan=_lifespan)
    app.state.settings = settings
    app.state.api_keys = api_keys
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(JsonDepthLimitMiddleware, max_depth=settings.max_json_depth)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    _include_routers(app, settings)
    app.openapi = lambda: _openapi_with_limits(app, settings)
    return app


def _openapi_with_limits(app: FastAPI, settings: Settings) -> dict:
    """The OpenAPI schema with what this instance enforces beyond the models: its limits
    (``max_k``, ``max_page_size``, ``max_targets``) and the patterns of the names and ids in
    paths, so that every request the schema allows passes these checks too."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    from gradstore.client.models import DATASTORE_NAME_MAX_LENGTH, DATASTORE_NAME_PATTERN

    from .routers.select import SELECTION_ID

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema["components"]["schemas"]
    for model in ("SelectRequest", "InfluenceRequest", "SimilarRequest"):
        _limit(components[model]["properties"]["k"], "maximum", settings.max_k)
    _limit(components["SelectRequest"]["properties"]["page_size"], "maximum", settings.max_page_size)
    _limit(components["TargetRecords"]["properties"]["records"], "maxItems", settings.max_targets)
    _limit(components["TargetVectors"]["properties"]["vectors"]["additionalProperties"], "maxItems",
           settings.max_targets)
    patterns = {"name": {"pattern": DATASTORE_NAME_PATTERN, "maxLength": DATASTORE_NAME_MAX_LENGTH},
                "selection_id": {"pattern": SELECTION_ID.pattern}}
    for methods in schema["paths"].values():
        for operation in methods.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in patterns:
                    parameter["schema"].update(patterns[parameter["name"]])
                elif parameter["in"] == "query" and parameter["name"] == "page_size":
                    _limit(parameter["schema"], "maximum", settings.max_page_size)
    app.openapi_schema = schema
    return schema


def _limit(schema: dict, keyword: str, value: int) -> None:
    """Set ``keyword`` on ``schema``, or on its non-null ``anyOf`` branches (optional fields)."""
    branches = [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"]
    for branch in branches:
        branch[keyword] = value


def _include_routers(app: FastAPI, settings: Settings) -> None:
    app.include_router(health.router)
    auth = [Depends(api_key_auth(settings.api_key_header))]
    # Every /v1 route may answer these; the routers document their own (datastore names, limits, bodies).
    errors = error_responses(401, 422, 500)
    for router in (datastores.router, select.router, strategies.router, influence.router, similar.router,
                   jobs_router):
        app.include_router(router, dependencies=auth, responses=errors)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.registry = DatastoreRegistry(settings.root, settings.verify_checksums)
    app.state.selections = SelectionCache(settings.selection_cache_size)
    app.state.jobs = JobManager(settings)
    await run_in_threadpool(app.state.jobs.start)
    try:
        yield
    finally:
        await run_in_threadpool(app.state.jobs.stop)  # may wait for a running job to stop


class BodySizeLimitMiddleware:
    """Pure ASGI middleware answering 413 when a request body exceeds ``max_bytes``: at once from
    ``Content-Length``, else while the (chunked) body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except PayloadTooLarge:
            if started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await payload_too_large(self.max_bytes)(scope, receive, send)


class JsonDepthLimitMiddleware:
    """Pure ASGI middleware answering 400 ``limit_exceeded`` when a request body nests arrays and
    objects deeper than ``max_depth``, before anything parses it.

    Parsers and validators recurse once per level: about a thousand levels exhaust Python's
    recursion limit, a few hundred pydantic's serialization depth, either a 500 somewhere past
    the route's checks. The body (already bounded by ``BodySizeLimitMiddleware``, which wraps this
    one) is read whole, its depth counted without recursion, and handed on unchanged.
    """

    def __init__(self, app: ASGIApp, max_depth: int) -> None:
        self.app = app
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        # Fewer brackets than the limit cannot nest beyond it (most bodies: no count needed).
        depth = json_depth(body) if body.count(b"[") + body.count(b"{") > self.max_depth else 0
        if depth > self.max_depth:
            response = error_response(400, "limit_exceeded",
                                      f"the request body nests arrays and objects {depth} levels deep, beyond the "
                                      f"limit of {self.max_depth}",
                                      {"limit": "max_json_depth", "value": depth, "max": self.max_depth})
            await response(scope, receive, send)
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


# A JSON string (escapes included): brackets inside strings do not nest.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[`` / ``{`` in a JSON text (counted without parsing it; strings
    skipped; an invalid text gets some count and is refused later by the parser)."""
    import numpy as np

    step = np.zeros(256, dtype=np.int32)
    step[[ord("["), ord("{")]], step[[ord("]"), ord("}")]] = 1, -1
    codes = np.frombuffer(_JSON_STRING.sub(b"", body), dtype=np.uint8)
    return int(np.cumsum(step[codes]).max(initial=0))


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
