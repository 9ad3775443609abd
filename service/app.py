"""The FastAPI application: ``create_app(settings)`` wires settings, state, middleware and routers.

State on ``app.state``: ``settings``, ``api_keys`` (None with auth disabled), ``metrics``, and,
for the lifespan of the app, ``registry`` (the datastores), ``selections`` (the selection cache)
and ``jobs`` (the indexing job manager).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradstore import __version__

from .deps import api_key_auth
from .errors import PayloadTooLarge, error_responses, install_error_handlers, payload_too_large
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
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    _include_routers(app, settings)
    return app


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


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
