"""Operational routes, open without an API key: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from gradstore.client.models import Health, Readiness

from ..deps import RegistryDep

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Readiness: every datastore opens and jobs run",
            responses={503: {"model": Readiness, "description": "a datastore or the job manager is not ready"}})
async def readyz(request: Request, registry: RegistryDep) -> JSONResponse:
    states = await run_in_threadpool(registry.states)
    ready = all(state.loaded for state in states) and _jobs_running(request)
    body = Readiness(ready=ready, datastores=states)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


def _jobs_running(request: Request) -> bool:
    jobs = getattr(request.app.state, "jobs", None)
    return jobs is not None and jobs.running


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, registry: RegistryDep) -> Response:
    state = request.app.state
    body = state.metrics.render(len(registry.loaded()), getattr(state, "jobs", None))
    return Response(body, media_type=state.metrics.content_type)
