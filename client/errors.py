"""Exceptions raised by the gradstore SDK.

Every exception the SDK raises on purpose derives from :class:`GradstoreError`::

    GradstoreError
    ├── TransportError              the service could not be reached or did not answer
    │                               (connection refused, DNS, timeouts, broken connection);
    │                               wraps the httpx exception (``__cause__``)
    ├── APIError                    the service answered with an error status
    │   │                           (attributes: status, code, message, detail, response)
    │   ├── BadRequestError         400, 422: invalid request
    │   ├── AuthenticationError     401: missing or unknown API key
    │   ├── PermissionDeniedError   403
    │   ├── NotFoundError           404: no such datastore, example, selection or job
    │   ├── ConflictError           409: e.g. the datastore already exists, the job is finished
    │   ├── GoneError               410: e.g. an expired selection or cursor
    │   ├── PayloadTooLargeError    413: request body above the service's limit
    │   ├── RateLimitError          429 (``retry_after``: seconds, when the service said)
    │   └── ServerError             5xx
    │       └── ServiceUnavailableError   503 (``retry_after`` as above)
    ├── InvalidResponseError        a success response whose body does not match the contract
    └── JobTimeoutError             ``wait_for_job`` ran out of time (also a ``TimeoutError``)

An error status outside this table (another 4xx, a 3xx) raises :class:`APIError` itself.
Arguments rejected before any request is sent (e.g. both ``k`` and ``fraction``) raise
``ValueError`` / ``TypeError`` (pydantic's ``ValidationError`` is a ``ValueError``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:  # pragma: no cover
    from .models import Job

__all__ = [
    "GradstoreError",
    "TransportError",
    "APIError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "GoneError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "InvalidResponseError",
    "JobTimeoutError",
    "error_class_for_status",
]

_MAX_MESSAGE_CHARS = 1000


class GradstoreError(Exception):
    """Base class of every exception raised by the SDK."""


class TransportError(GradstoreError):
    """No usable HTTP response: connection failure, timeout, protocol error.

    The original httpx exception is ``__cause__`` (and :attr:`cause`); :attr:`request` is the
    httpx request that failed, when known.
    """

    def __init__(self, message: str, *, request: httpx.Request | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.cause = cause

    @property
    def is_timeout(self) -> bool:
        """Whether the failure was a timeout (connect, read, write or pool)."""
        return isinstance(self.cause, httpx.TimeoutException)


class APIError(GradstoreError):
    """The service answered with an error status and (usually) an ``ErrorBody``.

    ``code`` is the service's stable machine-readable code (``http_<status>`` when the body was
    not an ``ErrorBody``), ``message`` a human-readable message, ``detail`` any extra data.
    ``text`` keeps the raw body; ``retry_after`` is the ``Retry-After`` header in seconds.
    """

    def __init__(self, status: int, code: str, message: str, detail: Any = None, *,
                 response: httpx.Response | None = None, text: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, code, message, detail)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.response = response
        self.text = text
        self.retry_after = retry_after

    @property
    def status_code(self) -> int:
        """Alias of :attr:`status` (the httpx spelling)."""
        return self.status

    def __str__(self) -> str:
        text = f"{self.status} {self.code}: {self.message}"
        if self.detail is not None:
            detail = self.detail if isinstance(self.detail, str) else json.dumps(self.detail, default=str)
            if len(detail) > _MAX_MESSAGE_CHARS:
                detail = detail[:_MAX_MESSAGE_CHARS] + "..."
            text += f" ({detail})"
        return text

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
                f"message={self.message!r}, detail={self.detail!r})")

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        """The exception for an error response, of the subclass that its status maps to.

        Parses the ``ErrorBody`` (``{"code", "message", "detail"}``). Other bodies degrade
        gracefully: a JSON object with only ``detail`` (a framework's default error) keeps it as
        ``detail``; a non-JSON body becomes the message (truncated; the whole body is ``text``).
        """
        status = response.status_code
        try:
            text = response.text
        except Exception:  # a streamed response that was not read
            text = ""
        reason = response.reason_phrase or f"HTTP {status}"
        code, message, detail = f"http_{status}", reason, None
        body: Any = None
        if text.strip():
            try:
                body = json.loads(text)
            except ValueError:
                body = None
                stripped = text.strip()
                message = stripped
                if len(message) > _MAX_MESSAGE_CHARS:
                    message = message[:_MAX_MESSAGE_CHARS] + "..."
        if isinstance(body, dict):
            if isinstance(body.get("code"), str) and isinstance(body.get("message"), str):
                code, message, detail = body["code"], body["message"], body.get("detail")
            elif "detail" in body:
                detail = body["detail"]
                if isinstance(detail, str):
                    message, detail = detail, None
            else:
                detail = body
        elif body is not None:
            detail = body
        klass = error_class_for_status(status)
        return klass(status, code, message, detail, response=response, text=text,
                     retry_after=parse_retry_after(response.headers.get("retry-after")))


class BadRequestError(APIError):
    """400 or 422: the request is invalid (``detail`` says where, for validation errors)."""


class AuthenticationError(APIError):
    """401: missing or unknown API key."""


class PermissionDeniedError(APIError):
    """403: the key may not do this (e.g. a job input path outside the allowed folders)."""


class NotFoundError(APIError):
    """404: no such datastore, example, selection or job."""


class ConflictError(APIError):
    """409: the request conflicts with the current state."""


class GoneError(APIError):
    """410: the resource existed but is gone (e.g. an expired selection cursor)."""


class PayloadTooLargeError(APIError):
    """413: the request body is above the service's limit."""


class RateLimitError(APIError):
    """429: too many requests (retried automatically, then raised)."""


class ServerError(APIError):
    """5xx: the service failed."""


class ServiceUnavailableError(ServerError):
    """503: the service is not ready or overloaded (retried automatically, then raised)."""


class InvalidResponseError(GradstoreError):
    """A success response whose body is not what the API contract says (wrong service/version?)."""

    def __init__(self, message: str, *, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.response = response


class JobTimeoutError(GradstoreError, TimeoutError):
    """``wait_for_job`` gave up before the job reached a terminal status; ``job`` is its last state."""

    def __init__(self, message: str, *, job: Job | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.job = job


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    422: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class_for_status(status: int) -> type[APIError]:
    """The :class:`APIError` subclass for an HTTP status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if 500 <= status <= 599:
        return ServerError
    return APIError


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date; None when absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)
