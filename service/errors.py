"""Error responses: one JSON shape, ``{code, message, detail}`` (``client.models.ErrorBody``), for all.

Routes raise :class:`ServiceError` with an HTTP status and a stable machine-readable code.
:func:`install_error_handlers` maps everything else onto the same shape: request validation
(422 ``validation_error``), a body that cannot be parsed at all (400 ``bad_request``), unknown
routes and methods (404 ``not_found``, 405 ``method_not_allowed``), datastore errors (503
``datastore_unavailable``, 404 ``example_not_found``), engine errors (422 ``invalid_query``) and
unexpected exceptions: 503 ``datastore_unavailable`` when a served store's files turn out damaged
(the registry re-checks them), else 500 ``internal_error`` (logged, never echoed to the client).
:data:`ERROR_STATUSES` lists every status with its codes; :func:`error_responses` documents them
in the OpenAPI schema. Error bodies are rendered as ASCII JSON, so an echoed input that is not
valid Unicode (a lone surrogate such as ``"\\ud800"``) cannot break the error response itself.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradstore.client.models import ErrorBody
from gradstore.datastore import ExampleNotFoundError
from gradstore.indexer.errors import StoreError

from gradstore.selection import SelectionError

log = logging.getLogger("gradstore.service")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "service_unavailable",
}


# Every error status the API answers, with the codes it uses (the OpenAPI descriptions).
ERROR_STATUSES = {
    400: "bad input the schema cannot express: `invalid_name`, `limit_exceeded`, `invalid_cursor`, "
         "`invalid_selection_id`, `invalid_job`, `bad_request` (a body that cannot be parsed)",
    401: "`unauthorized`: the API key is missing or unknown",
    403: "`path_not_allowed`: a job input lies outside the folders allowed for job inputs",
    404: "`datastore_not_found`, `example_not_found`, `job_not_found`, `input_not_found` (a job input "
         "path names no file), `not_found` (no such route)",
    409: "`conflict`: the datastore exists, has an active job or its path is a link, or the job has finished",
    410: "`selection_expired`: the selection is no longer cached; repeat the select request",
    413: "`payload_too_large`: the body is larger than the service's limit",
    415: "`unsupported_media_type`: the body is not JSON (`Content-Type: application/json`)",
    422: "`validation_error` (the request does not match the schema; `detail` lists where) or "
         "`invalid_query` (targets, checkpoints or options that do not fit the datastore)",
    500: "`internal_error`: a bug; the details are in the service log",
    503: "`datastore_unavailable` (the datastore cannot be opened; the message says why) or "
         "`service_unavailable`",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` documenting ``statuses`` with the error body and their codes."""
    return {status: {"model": ErrorBody, "description": ERROR_STATUSES[status]} for status in statuses}


class ServiceError(Exception):
    """An error answered as ``status`` with body ``{code, message, detail}``."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers


def limit_exceeded(name: str, value: int, limit: int) -> ServiceError:
    """400 ``limit_exceeded`` naming the limit and the value that broke it."""
    return ServiceError(400, "limit_exceeded", f"{name} = {value} exceeds the limit of {limit}",
                        {"limit": name, "value": value, "max": limit})


def invalid_query(message: str, detail: Any = None) -> ServiceError:
    return ServiceError(422, "invalid_query", message, detail)


class PayloadTooLarge(StarletteHTTPException):
    """Raised while a request body streams in past the limit (an ``HTTPException``, so FastAPI's
    body reading passes it on instead of turning it into a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than the limit of {limit} bytes")
        self.limit = limit


def payload_too_large(limit: int) -> JSONResponse:
    return error_response(413, "payload_too_large", f"request body larger than the limit of {limit} bytes",
                          {"max_body_bytes": limit}, headers={"Connection": "close"})


class ErrorJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: renders any string, even lone surrogates."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, code: str, message: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(code=code, message=message, detail=jsonable_encoder(detail))
    return ErrorJSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ExampleNotFoundError, _example_not_found)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(SelectionError, _selection_error)
    app.add_exception_handler(Exception, _internal_error)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [_clean_error(error) for error in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    message = f"invalid request: {where}: {first['msg']}" if where else f"invalid request: {first['msg']}"
    return error_response(422, "validation_error", message, errors)


def _clean_error(error: dict) -> dict:
    """``loc``, ``msg``, ``type`` of a pydantic error: the input (possibly huge, possibly NaN) and
    exception objects in ``ctx`` are not echoed."""
    return {"loc": [part if isinstance(part, (int, str)) else str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, PayloadTooLarge):
        return payload_too_large(exc.limit)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's "error parsing the body": say why (a number too long to convert, nesting too deep).
        message = f"the request body cannot be parsed as JSON: {_short(str(exc.__cause__))}"
    elif exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    detail = None if isinstance(exc.detail, str) else exc.detail
    return error_response(exc.status_code, code, message, detail, getattr(exc, "headers", None))


async def _example_not_found(request: Request, exc: ExampleNotFoundError) -> JSONResponse:
    return error_response(404, "example_not_found", _strip_root(request, str(exc)))


async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
    return error_response(503, "datastore_unavailable", _strip_root(request, str(exc)))


async def _selection_error(request: Request, exc: SelectionError) -> JSONResponse:
    return error_response(422, "invalid_query", _strip_root(request, str(exc)))


class UnexpectedErrorMiddleware:
    """Pure ASGI middleware, innermost: an exception no handler took becomes its error response
    here (:func:`_internal_error`), so the connection stays usable. The ``Exception`` handler
    answers the same but from Starlette's outermost middleware, which re-raises to the server,
    and uvicorn then drops the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            response = await _internal_error(Request(scope), exc)
            await response(scope, receive, send)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    unavailable = await _damaged_store(request)
    if unavailable is not None:  # a store's files changed under it (truncated, removed): not a bug
        log.warning("%s %s: %s (%s: %s)", request.method, request.url.path, unavailable.message,
                    type(exc).__name__, exc)
        return error_response(unavailable.status, unavailable.code, unavailable.message, unavailable.detail)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; see the service log")


async def _damaged_store(request: Request) -> ServiceError | None:
    """The 503 of a served store whose files no longer check (``DatastoreRegistry.recheck``),
    the request's own store first."""
    from fastapi.concurrency import run_in_threadpool

    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        return None
    name = request.path_params.get("name")
    try:
        return await run_in_threadpool(registry.recheck, [name] if isinstance(name, str) else [])
    except Exception:  # noqa: BLE001 - the original error is what gets reported
        log.exception("re-checking the datastores failed")
        return None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _strip_root(request: Request, message: str) -> str:
    """Messages name stores relative to the service root, not by host paths."""
    settings = getattr(request.app.state, "settings", None)
    if settings is None:
        return message
    return message.replace(f"{settings.root}/", "").replace(str(settings.root), ".")
