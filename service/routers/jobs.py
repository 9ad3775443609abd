"""Indexing job routes: submit, list, inspect and cancel jobs (``service.jobs.JobManager``).

The app includes this router behind its API-key dependency (``create_app``), like every ``/v1``
router; the header it reads is a setting, so the dependency is built per app.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from gradstore.client.models import JOB_PAGE_DEFAULT, JOB_PAGE_MAX, ErrorBody, IndexJobRequest, Job, JobList

from ..deps import JsonBody
from ..errors import ServiceError, error_responses
from ..jobs import JOB_CURSOR_PATTERN, JobManager

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(503))

# Linux limits on file names: a longer path names no file (the OS refuses it with ENAMETOOLONG).
PATH_MAX, NAME_MAX = 4096, 255
PATH_FIELDS = {"corpus", "model", "tokenizer", "checkpoints", "run"}

_ERRORS = {404: {"model": ErrorBody, "description": "no such job (`job_not_found`)"}}


def get_jobs(request: Request) -> JobManager:
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise ServiceError(503, "service_unavailable", "the job manager is not running")
    return jobs


JobsDep = Annotated[JobManager, Depends(get_jobs)]


@router.post("", status_code=202, response_model=Job, summary="Queue an indexing job",
             responses={400: {"model": ErrorBody, "description": "invalid name or inputs (`invalid_name`, "
                                                                    "`invalid_job`)"},
                        409: {"model": ErrorBody, "description": "the datastore exists (without `overwrite` or "
                                                                 "`append`), already has a queued or running job, "
                                                                 "or its path in the root is a link; an append "
                                                                 "gives a setting the store differs in"},
                        **error_responses(403, 404, 413, 415)},
             dependencies=[JsonBody])
def submit_job(body: IndexJobRequest, response: Response, jobs: JobsDep) -> Job:
    """Validate the job and queue it; jobs run one at a time, in submission order. The
    ``Location`` header is the job's URL. With ``append``, the corpus is added to the existing
    datastore as its next version: settings left out take the store's values (the returned job
    names them)."""
    check_job_values(body)
    job = jobs.submit(body)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.get("", response_model=JobList, summary="List the jobs, newest first, a page at a time",
            responses=error_responses(400))
def list_jobs(jobs: JobsDep,
              limit: Annotated[int, Query(ge=1, le=JOB_PAGE_MAX, description="jobs in this page")] = JOB_PAGE_DEFAULT,
              cursor: Annotated[str | None, Query(pattern=JOB_CURSOR_PATTERN,
                                                  description="the previous page's next_cursor")] = None) -> JobList:
    """Jobs newest first; while ``next_cursor`` is set, pass it as ``cursor`` for the next page."""
    page, next_cursor = jobs.page(limit, cursor)
    return JobList(jobs=page, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=Job, summary="A job's status and progress", responses=_ERRORS)
def get_job(job_id: str, jobs: JobsDep) -> Job:
    return jobs.get(job_id)


@router.post("/{job_id}/cancel", response_model=Job, summary="Cancel a queued or running job",
             responses={**_ERRORS, 409: {"model": ErrorBody, "description": "the job has already finished"}})
def cancel_job(job_id: str, jobs: JobsDep) -> Job:
    """A queued job is cancelled at once; a running one is terminated (its partial work
    discarded), waiting for it to stop."""
    return jobs.cancel(job_id)


def check_job_values(request: IndexJobRequest) -> None:
    """400 ``invalid_job`` naming the field of a value the indexer cannot take: a NaN or infinite
    number, a string with a NUL character (no path or command-line argument holds one), or a path
    longer than the file system allows."""
    fields = request.model_dump()
    for field, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ServiceError(400, "invalid_job", f"{field} must be a finite number, got {value}", {"field": field})
    for field, text in _strings(fields):
        if "\x00" in text:
            raise ServiceError(400, "invalid_job", f"{field} contains a NUL character", {"field": field})
        if field.partition("[")[0] in PATH_FIELDS and _too_long(text):
            raise ServiceError(400, "invalid_job", f"{field} is longer than a path can be ({PATH_MAX} bytes, "
                               f"{NAME_MAX} per name)", {"field": field})


def _strings(fields: dict) -> Iterator[tuple[str, str]]:
    """``(field, text)`` for every string of the request's fields, list items as ``field[i]``."""
    for field, value in fields.items():
        if isinstance(value, str):
            yield field, value
        elif isinstance(value, list):
            yield from ((f"{field}[{i}]", item) for i, item in enumerate(value) if isinstance(item, str))


def _too_long(path: str) -> bool:
    return len(path.encode()) > PATH_MAX or any(len(part.encode()) > NAME_MAX for part in path.split("/"))
