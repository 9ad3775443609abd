"""Error responses: one JSON shape, ``{code, message, detail}`` (``client.models.ErrorBody``), for all.

Routes raise :class:`ServiceError` with an HTTP status and a stable machine-readable code.
:func:`install_error_handlers` maps everything else onto the same shape: request validation
(422 ``validation_error``), unknown routes and methods (404 ``not_found``, 405
``method_not_allowed``), datastore errors (503 ``datastore_unavailable``, 404
``example_not_found``), engine errors (422 ``invalid_query``) and unexpected exceptions (500
``internal_error``, logged, never echoed to the client).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gradstore.client.models import ErrorBody
from gradstore.indexer.datastore import ExampleNotFoundError
from gradstore.indexer.errors import StoreError

from .engine import SelectionError

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


def error_response(status: int, code: str, message: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(code=code, message=message, detail=jsonable_encoder(detail))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


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
    if exc.status_code == 404 and exc.detail == "Not Found":
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
    return error_response(422, "invalid_query", str(exc))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; see the service log")


def _strip_root(request: Request, message: str) -> str:
    """Messages name stores relative to the service root, not by host paths."""
    settings = getattr(request.app.state, "settings", None)
    if settings is None:
        return message
    return message.replace(f"{settings.root}/", "").replace(str(settings.root), ".")
