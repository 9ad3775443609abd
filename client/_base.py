"""The I/O-free part shared by :class:`Client` and :class:`AsyncClient`.

Request building (routes, bodies, path quoting), target conversion, the retry policy and response
parsing live here; ``_sync.py`` and ``_async.py`` only add the sending loop and the methods.

Retry and idempotency rule
--------------------------
A request is retried (at most ``max_retries`` times, so ``max_retries + 1`` attempts) when:

- the service answers **429** or **503**: it refused the request without acting on it. The wait
  is the ``Retry-After`` header (seconds or an HTTP date; capped at 300 s) when present, else
  the exponential backoff ``backoff * 2**attempt`` (capped at 30 s) plus up to 10 % jitter;
- the request **cannot have reached the service**: ``httpx.ConnectError``, ``ConnectTimeout``,
  ``PoolTimeout`` (same backoff);
- the connection failed **after the request may have been sent** (``ReadError``,
  ``ReadTimeout``, ``WriteError``, ``WriteTimeout``, ``RemoteProtocolError``, ``CloseError``),
  **only for idempotent requests**: every GET, the query POSTs (``select``, ``influence``,
  ``similar``: read-only; a repeated ``select`` only makes a fresh selection) and
  ``cancel_job`` (cancelling twice is cancelling once).

``POST /v1/jobs`` (``create_job``) is **not idempotent**: the service may have queued a job
before the connection broke, so it is retried only in the first two cases, never after a read
timeout. Any other error status (400, 401, 404, ...) raises at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from .. import __version__
from .errors import APIError, InvalidResponseError, TransportError, parse_retry_after
from .models import (
    DatastoreDetail,
    DatastoreList,
    DatastoreSummary,
    Example,
    Health,
    IndexJobRequest,
    InfluenceRequest,
    InfluenceResponse,
    Job,
    JobList,
    Readiness,
    SelectionOptions,
    SelectPage,
    SelectRequest,
    SimilarRequest,
    SimilarResponse,
    StrategyInfo,
    StrategyList,
    TargetDatastore,
    TargetRecords,
    Targets,
    TargetVectors,
)
from .models import DatastoreStats, ExamplePage, MapRequest, MapResponse, SelectionSummary

logger = logging.getLogger("gradstore.client")

T = TypeVar("T")

#: Job statuses after which a job does not change any more.
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
#: Response statuses that are retried (the service refused the request without acting on it).
RETRY_STATUSES = frozenset({429, 503})
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 300.0
USER_AGENT = f"gradstore-python/{__version__}"

# Raised before the request could reach the service: safe to retry any request.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Raised when the request may have reached the service: retried for idempotent requests only.
_MAYBE_SENT = (httpx.ReadError, httpx.ReadTimeout, httpx.WriteError, httpx.WriteTimeout,
               httpx.RemoteProtocolError, httpx.CloseError)

#: What ``targets`` accepts: a model, a datastore name, a list of records, ``{checkpoint: 2-D array}``.
TargetsLike = Union[TargetRecords, TargetDatastore, TargetVectors, str,
                    Sequence[Mapping[str, Any]], Mapping[str, Any]]


# -- targets and vectors ---------------------------------------------------------------------------


def _vector(value: Any, where: str) -> list[float]:
    """A 1-D array-like (list, tuple, ndarray, tensor) -> a list of Python numbers."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{where}: expected a vector of numbers, got {type(value).__name__}")
    value = list(value)
    if any(isinstance(x, (list, tuple, Mapping, str)) for x in value):
        raise ValueError(f"{where}: expected a vector of numbers (1-D)")
    return [x if type(x) in (float, int) else float(x) for x in value]


def _matrix(value: Any, where: str) -> list[list[float]]:
    """A 2-D array-like -> a list of rows of Python numbers."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # ndarray / tensor: nested Python lists in one call
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{where}: expected a 2-D array (one row per target example), "
                        f"got {type(value).__name__}")
    rows = list(value)
    if not rows:
        raise ValueError(f"{where}: no target vectors")
    if not all(hasattr(row, "tolist") or isinstance(row, (list, tuple)) for row in rows):
        raise ValueError(f"{where}: expected a 2-D array (one row per target example), got a 1-D one "
                         "(for record targets pass a list of record dicts)")
    return [_vector(row, f"{where}[{i}]") for i, row in enumerate(rows)]


def to_targets(targets: TargetsLike) -> Targets:
    """Normalise the ``targets`` argument of ``select`` / ``influence`` to a wire model.

    - ``TargetRecords`` / ``TargetDatastore`` / ``TargetVectors``: as is;
    - a ``str``: the name of a target datastore (``TargetDatastore``);
    - a ``dict`` of checkpoint name -> 2-D array (nested lists, NumPy array, tensor: anything with
      ``.tolist()``), one row per target example (``TargetVectors``);
    - a list of record dicts (``TargetRecords``).

    Use the models directly for the options (``subtask_field``, ``subtasks``).
    """
    if isinstance(targets, (TargetRecords, TargetDatastore, TargetVectors)):
        return targets
    if isinstance(targets, str):
        if not targets:
            raise ValueError("targets: empty datastore name")
        return TargetDatastore(datastore=targets)
    if isinstance(targets, Mapping):
        if not targets:
            raise ValueError("targets: no checkpoint vectors")
        vectors: dict[str, list[list[float]]] = {}
        for name, value in targets.items():
            if not isinstance(name, str):
                raise TypeError(f"targets: checkpoint names must be str, got {type(name).__name__}")
            vectors[name] = _matrix(value, f"targets[{name!r}]")
        return TargetVectors(vectors=vectors)
    if (isinstance(targets, (bytes, bytearray)) or not isinstance(targets, Iterable)
            or hasattr(targets, "tolist")):
        raise TypeError("targets: expected TargetRecords / TargetDatastore / TargetVectors, a datastore name, "
                        "a list of record dicts or a {checkpoint: 2-D array} dict, "
                        f"got {type(targets).__name__}")
    records = list(targets)
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"targets[{i}]: expected a record dict, got {type(record).__name__}")
    return TargetRecords(records=[dict(record) for record in records])


def to_query_vectors(vectors: Mapping[str, Any]) -> dict[str, list[float]]:
    """``similar``'s ``vectors``: checkpoint name -> one 1-D vector (list, ndarray, tensor)."""
    if not isinstance(vectors, Mapping):
        raise TypeError(f"vectors: expected a {{checkpoint: vector}} dict, got {type(vectors).__name__}")
    return {str(name): _vector(value, f"vectors[{name!r}]") for name, value in vectors.items()}


# -- calls -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: the request to send, how to parse its answer, and whether it may be repeated."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    idempotent: bool = True
    #: error statuses that are answers of this route (parsed, not raised, not retried)
    answers: frozenset[int] = field(default_factory=frozenset)


def _segment(value: Any, what: str) -> str:
    text = str(value)
    if not text:
        raise ValueError(f"{what} must not be empty")
    if text in (".", ".."):
        # Left as is, URL normalisation would turn ".." into the parent path; encoded, it reaches
        # the service, which answers for that name or id.
        return text.replace(".", "%2E")
    return quote(text, safe="")


def _body(model: BaseModel, *, given_only: bool = False) -> dict[str, Any]:
    """The JSON body of a request; ``given_only``: only the fields the caller set, so that the
    service fills the rest (an append takes the store's settings for those it leaves out)."""
    return model.model_dump(mode="json", exclude_none=True, exclude_unset=given_only)


def _parse(model: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: model.model_validate_json(response.content)


def _none(response: httpx.Response) -> None:
    return None


class BaseClient:
    """Configuration, request building and the retry policy (no I/O)."""

    def __init__(self, base_url: str | httpx.URL, api_key: str | None = None, *,
                 api_key_header: str = "X-API-Key",
                 timeout: float | httpx.Timeout | None = 30.0,
                 max_retries: int = 3,
                 backoff: float = 0.5,
                 headers: Mapping[str, str] | None = None) -> None:
        url = httpx.URL(str(base_url))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {str(base_url)!r}")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if backoff < 0:
            raise ValueError("backoff must be >= 0")
        if not api_key_header:
            raise ValueError("api_key_header must not be empty")
        self.base_url = str(url.copy_with(query=None, fragment=None)).rstrip("/")
        self.api_key_header = api_key_header
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.headers: dict[str, str] = {"Accept": "application/json", "User-Agent": USER_AGENT}
        self.headers.update(headers or {})
        if api_key is not None:
            self.headers[api_key_header] = api_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- sending helpers ---------------------------------------------------------------------------

    def _build_request(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any]) -> httpx.Request:
        # The timeout goes as a plain 4-tuple, which clients with httpx's API but not its classes
        # also take (Starlette's TestClient is built on httpx2 and refuses an httpx.Timeout).
        timeout = (self.timeout.connect, self.timeout.read, self.timeout.write, self.timeout.pool)
        return http.build_request(call.method, self.base_url + call.path, json=call.json,
                                  params=call.params, headers=self.headers, timeout=timeout)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
        delay = min(self.backoff * (2 ** attempt), MAX_BACKOFF)
        return delay + random.uniform(0.0, 0.1 * delay) if delay > 0 else 0.0

    def _retry_after_error(self, call: Call[Any], attempt: int, exc: httpx.RequestError) -> float | None:
        """The wait before retrying after a transport error, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if isinstance(exc, _NOT_SENT) or (call.idempotent and isinstance(exc, _MAYBE_SENT)):
            delay = self._delay(attempt, None)
            logger.info("%s %s: %s; retry %d/%d in %.2fs", call.method, call.path,
                        type(exc).__name__, attempt + 1, self.max_retries, delay)
            return delay
        return None

    def _retry_after_response(self, call: Call[Any], attempt: int, response: httpx.Response) -> float | None:
        """The wait before retrying after this response, or None to keep it."""
        status = response.status_code
        if attempt >= self.max_retries or status not in RETRY_STATUSES or status in call.answers:
            return None
        delay = self._delay(attempt, parse_retry_after(response.headers.get("retry-after")))
        logger.info("%s %s: HTTP %d; retry %d/%d in %.2fs", call.method, call.path, status,
                    attempt + 1, self.max_retries, delay)
        return delay

    @staticmethod
    def _transport_error(exc: httpx.RequestError, request: httpx.Request) -> TransportError:
        reason = str(exc) or type(exc).__name__
        return TransportError(f"{type(exc).__name__}: {reason} ({request.method} {request.url})",
                              request=request, cause=exc)

    @staticmethod
    def _finish(call: Call[T], response: httpx.Response) -> T:
        """Parse a final (read) response, or raise the error it stands for."""
        status = response.status_code
        if not (200 <= status < 300 or status in call.answers):
            raise APIError.from_response(response)
        try:
            return call.parse(response)
        except (ValidationError, ValueError) as exc:
            if status in call.answers and not 200 <= status < 300:
                raise APIError.from_response(response) from None
            raise InvalidResponseError(
                f"{call.method} {call.path}: unexpected response body ({exc.__class__.__name__}: "
                f"{str(exc)[:500]})", response=response) from exc

    # -- calls -------------------------------------------------------------------------------------

    @staticmethod
    def _list_datastores() -> Call[list[DatastoreSummary]]:
        return Call("GET", "/v1/datastores",
                    lambda r: DatastoreList.model_validate_json(r.content).datastores)

    @staticmethod
    def _get_datastore(name: str) -> Call[DatastoreDetail]:
        return Call("GET", f"/v1/datastores/{_segment(name, 'name')}", _parse(DatastoreDetail))

    @staticmethod
    def _get_example(name: str, id: str) -> Call[Example]:
        return Call("GET", f"/v1/datastores/{_segment(name, 'name')}/examples/{_segment(id, 'id')}",
                    _parse(Example))

    @staticmethod
    def _select(name: str, targets: TargetsLike | None, options: SelectionOptions | None,
                selection: Mapping[str, Any], page_size: int, export: str | None) -> Call[SelectPage]:
        """``options`` (a :class:`SelectionOptions`) and/or its fields as keywords (``k=``,
        ``strategy=``, ...; keywords win), validated here as the service would."""
        fields = {} if options is None else options.model_dump(exclude_unset=True)
        fields.update(selection)
        request = SelectRequest(targets=None if targets is None else to_targets(targets), page_size=page_size,
                                export=export, **fields)
        return Call("POST", f"/v1/datastores/{_segment(name, 'name')}/select", _parse(SelectPage),
                    json=_body(request))

    @staticmethod
    def _list_strategies() -> Call[list[StrategyInfo]]:
        return Call("GET", "/v1/strategies", lambda r: StrategyList.model_validate_json(r.content).strategies)

    @staticmethod
    def _get_selection_page(name: str, selection_id: str, cursor: str | None,
                            page_size: int | None) -> Call[SelectPage]:
        params: dict[str, Any] = {}
        if cursor is not None:
            params["cursor"] = cursor
        if page_size is not None:
            if page_size < 1:
                raise ValueError("page_size must be >= 1")
            params["page_size"] = page_size
        return Call("GET", f"/v1/datastores/{_segment(name, 'name')}/selections/"
                           f"{_segment(selection_id, 'selection_id')}",
                    _parse(SelectPage), params=params or None)

    @staticmethod
    def _export(name: str, selection_id: str) -> Call[None]:
        return Call("GET", f"/v1/datastores/{_segment(name, 'name')}/selections/"
                           f"{_segment(selection_id, 'selection_id')}/export", _none)

    @staticmethod
    def _influence(name: str, targets: TargetsLike, *, k: int, checkpoints: Sequence[str] | None,
                   weights: Mapping[str, float] | None) -> Call[InfluenceResponse]:
        request = InfluenceRequest(targets=to_targets(targets), k=k,
                                   checkpoints=None if checkpoints is None else list(checkpoints),
                                   weights=None if weights is None else dict(weights))
        return Call("POST", f"/v1/datastores/{_segment(name, 'name')}/influence",
                    _parse(InfluenceResponse), json=_body(request))

    @staticmethod
    def _similar(name: str, *, id: str | None, vectors: Mapping[str, Any] | None, k: int,
                 include_self: bool) -> Call[SimilarResponse]:
        request = SimilarRequest(id=id, vectors=None if vectors is None else to_query_vectors(vectors),
                                 k=k, include_self=include_self)
        return Call("POST", f"/v1/datastores/{_segment(name, 'name')}/similar",
                    _parse(SimilarResponse), json=_body(request))

    @staticmethod
    def _create_job(request: IndexJobRequest | Mapping[str, Any] | None,
                    fields: Mapping[str, Any]) -> Call[Job]:
        if request is None:
            request = IndexJobRequest(**fields)
        elif fields:
            raise TypeError("create_job: give either an IndexJobRequest or keyword fields, not both")
        elif isinstance(request, Mapping):
            request = IndexJobRequest.model_validate(dict(request))
        elif not isinstance(request, IndexJobRequest):
            raise TypeError(f"create_job: expected an IndexJobRequest, got {type(request).__name__}")
        return Call("POST", "/v1/jobs", _parse(Job), json=_body(request, given_only=True), idempotent=False)

    @staticmethod
    def _get_job(id: str) -> Call[Job]:
        return Call("GET", f"/v1/jobs/{_segment(id, 'id')}", _parse(Job))

    @staticmethod
    def _list_jobs(cursor: str | None = None, limit: int | None = None) -> Call[JobList]:
        """One page of jobs; ``list_jobs`` follows ``next_cursor``."""
        params = {name: value for name, value in (("cursor", cursor), ("limit", limit)) if value is not None}
        return Call("GET", "/v1/jobs", _parse(JobList), params=params or None)

    @staticmethod
    def _cancel_job(id: str) -> Call[Job]:
        return Call("POST", f"/v1/jobs/{_segment(id, 'id')}/cancel", _parse(Job))

    @staticmethod
    def _health() -> Call[Health]:
        return Call("GET", "/healthz", _parse(Health))

    @staticmethod
    def _ready() -> Call[Readiness]:
        return Call("GET", "/readyz", _parse(Readiness), answers=frozenset({503}))

    # -- overview ----------------------------------------------------------------------------------

    @staticmethod
    def _get_stats(name: str, bins: int | None) -> Call[DatastoreStats]:
        return Call("GET", f"/v1/datastores/{_segment(name, 'name')}/stats", _parse(DatastoreStats),
                    params=None if bins is None else {"bins": bins})

    @staticmethod
    def _list_examples(name: str, offset: int, limit: int, query: str | None) -> Call[ExamplePage]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if query:
            params["q"] = query
        return Call("GET", f"/v1/datastores/{_segment(name, 'name')}/examples", _parse(ExamplePage), params=params)

    @staticmethod
    def _pool_map(name: str, *, sample: int, seed: int, rows: Sequence[int],
                  targets: TargetsLike | None) -> Call[MapResponse]:
        request = MapRequest(sample=sample, seed=seed, rows=[int(row) for row in rows],
                             targets=None if targets is None else to_targets(targets))
        return Call("POST", f"/v1/datastores/{_segment(name, 'name')}/map", _parse(MapResponse),
                    json=_body(request))

    @staticmethod
    def _get_selection_summary(name: str, selection_id: str, bins: int | None) -> Call[SelectionSummary]:
        return Call("GET", f"/v1/datastores/{_segment(name, 'name')}/selections/"
                           f"{_segment(selection_id, 'selection_id')}/summary", _parse(SelectionSummary),
                    params=None if bins is None else {"bins": bins})


# -- export file names -----------------------------------------------------------------------------

_SUFFIX_BY_TYPE = {
    "application/x-ndjson": ".jsonl",
    "application/jsonl": ".jsonl",
    "application/json-lines": ".jsonl",
    "application/x-jsonlines": ".jsonl",
    "application/vnd.apache.parquet": ".parquet",
    "application/x-parquet": ".parquet",
    "application/parquet": ".parquet",
}


def export_file_name(response: httpx.Response, selection_id: str) -> str:
    """The file name for an export written into a folder: the ``Content-Disposition`` name when
    it is a plain name, else ``<selection_id><suffix from the content type>``."""
    disposition = response.headers.get("content-disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename":
            name = value.strip().strip('"')
            if name and "/" not in name and "\\" not in name and name not in (".", ".."):
                return name
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return selection_id + _SUFFIX_BY_TYPE.get(content_type, "")
