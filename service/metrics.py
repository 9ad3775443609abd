"""Prometheus metrics of one app, in its own ``CollectorRegistry`` (several apps may share a process).

- ``gradstore_http_requests_total{method, route, status}``: requests answered;
- ``gradstore_http_request_duration_seconds{method, route, status}``: their latency;
- ``gradstore_datastores_loaded``: datastores opened and cached;
- ``gradstore_jobs{status}``: indexing jobs by status (when the job manager reports counts).

``route`` is the route template (``/v1/datastores/{name}/select``), never the raw path, so label
cardinality stays bounded; requests that match no route are labelled ``unmatched``.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from typing import Any, get_args

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradstore.client.models import JobStatus

JOB_STATUSES = get_args(JobStatus)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The collectors of one app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gradstore_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("gradstore_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.datastores_loaded = Gauge("gradstore_datastores_loaded", "datastores opened and cached",
                                       registry=self.registry)
        self.jobs = Gauge("gradstore_jobs", "indexing jobs by status", ["status"], registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def render(self, loaded_datastores: int, jobs: Any = None) -> bytes:
        """The exposition text, with the gauges brought up to date first."""
        self.datastores_loaded.set(loaded_datastores)
        counts = job_counts(jobs)
        if counts is not None:
            for status in {*JOB_STATUSES, *counts}:
                self.jobs.labels(status).set(counts.get(status, 0))
        return generate_latest(self.registry)


def job_counts(jobs: Any) -> dict[str, int] | None:
    """Jobs by status from a job manager: its ``counts()`` if it has one, else a tally of its
    ``list()``; None when it offers neither."""
    if jobs is None:
        return None
    counts = getattr(jobs, "counts", None)
    if callable(counts):
        return {str(status): int(n) for status, n in counts().items()}
    listing = getattr(jobs, "list", None)
    if callable(listing):
        return dict(Tally(str(getattr(job, "status", "unknown")) for job in listing()))
    return None


class MetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request and counting it by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - start)
