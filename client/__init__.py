"""Python SDK for the gradstore REST service (needs only httpx and pydantic).

Usage::

    from gradstore.client import Client

    with Client("http://localhost:8080", api_key="s3cret") as client:
        print([store.name for store in client.list_datastores()])
        targets = [{"messages": [{"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]}]
        for item in client.iter_selection("pool", targets, fraction=0.05):
            print(item.rank, item.id, round(item.score, 4))
        # another strategy, target-free: the 10 % with the highest effective rank
        page = client.select("pool", strategy={"name": "quality", "score": "effective_rank"}, fraction=0.1)
        print([s.name for s in client.list_strategies()])
        job = client.create_job(datastore="pool2", corpus=["data/a.jsonl"], model="models/m")
        print(client.wait_for_job(job.id, timeout=3600).status)

:class:`AsyncClient` has the same methods as coroutines (``async with``, ``await``,
``async for item in client.iter_selection(...)``).

What to select is :class:`SelectionOptions` (strategy, budget, filters; the same model the
service validates), given as ``options=`` and/or as its fields in keywords. ``targets``
(``select``, ``iter_selection``, ``select_all``, ``influence``) is a wire model
(:class:`TargetRecords`, :class:`TargetDatastore`, :class:`TargetVectors`) or a shorthand: a list
of record dicts, a target datastore's name, or ``{checkpoint: 2-D array}`` (see :func:`to_targets`).

Errors are the :mod:`gradstore.client.errors` hierarchy under :class:`GradstoreError`
(``APIError`` subclasses by HTTP status, keeping the service's ``code``/``message``/``detail``;
``TransportError`` for connection failures and timeouts).

Retries and idempotency: a request is retried up to ``max_retries`` times (default 3) when the
service answers 429 or 503, or when the connection could not be opened (``ConnectError``,
``ConnectTimeout``, ``PoolTimeout``), waiting ``Retry-After`` when the service sends it, else
``backoff * 2**attempt`` seconds plus up to 10 % jitter. A connection that fails after the
request may have been sent (read/write errors and timeouts) is retried only for idempotent
calls: every GET, the read-only POSTs ``select``/``influence``/``similar`` and ``cancel_job``.
``create_job`` (``POST /v1/jobs``) is not idempotent, so it is never retried after a read
timeout: check ``list_jobs()`` before submitting again. Other error statuses raise at once.
"""

from ._async import AsyncClient
from ._base import TERMINAL_JOB_STATUSES, TargetsLike, to_targets
from ._sync import Client
from .errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GoneError,
    GradstoreError,
    InvalidResponseError,
    JobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    TransportError,
)
from .models import (
    Aggregation,
    CheckpointSummary,
    DatastoreDetail,
    DatastoreList,
    DatastoreSummary,
    ErrorBody,
    Example,
    GradientType,
    Health,
    IndexJobRequest,
    InfluenceRequest,
    InfluenceResponse,
    Job,
    JobList,
    JobProgress,
    JobStatus,
    Neighbor,
    QualityFilter,
    Readiness,
    ScoringOptions,
    SelectedExample,
    SelectionOptions,
    SelectPage,
    SelectRequest,
    SimilarRequest,
    SimilarResponse,
    StoreState,
    StrategyInfo,
    StrategyList,
    TargetDatastore,
    TargetInfluence,
    TargetRecords,
    Targets,
    TargetVectors,
)

__all__ = [
    # clients
    "Client",
    "AsyncClient",
    "to_targets",
    "TargetsLike",
    "TERMINAL_JOB_STATUSES",
    # errors
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
    # models
    "Aggregation",
    "CheckpointSummary",
    "DatastoreDetail",
    "DatastoreList",
    "DatastoreSummary",
    "ErrorBody",
    "Example",
    "GradientType",
    "Health",
    "IndexJobRequest",
    "InfluenceRequest",
    "InfluenceResponse",
    "Job",
    "JobList",
    "JobProgress",
    "JobStatus",
    "Neighbor",
    "QualityFilter",
    "Readiness",
    "ScoringOptions",
    "SelectedExample",
    "SelectionOptions",
    "SelectPage",
    "SelectRequest",
    "SimilarRequest",
    "SimilarResponse",
    "StoreState",
    "StrategyInfo",
    "StrategyList",
    "TargetDatastore",
    "TargetInfluence",
    "TargetRecords",
    "Targets",
    "TargetVectors",
]
