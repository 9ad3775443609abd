"""Indexing job routes: submit, list, inspect and cancel jobs (``service.jobs.JobManager``).

The app includes this router behind its API-key dependency (``create_app``), like every ``/v1``
router; the header it reads is a setting, so the dependency is built per app.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from gradstore.client.models import ErrorBody, IndexJobRequest, Job, JobList

from ..errors import ServiceError
from ..jobs import JobManager

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS = {404: {"model": ErrorBody, "description": "no such job (`job_not_found`)"}}


def get_jobs(request: Request) -> JobManager:
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise ServiceError(503, "service_unavailable", "the job manager is not running")
    return jobs


JobsDep = Annotated[JobManager, Depends(get_jobs)]


@router.post("", status_code=202, response_model=Job, summary="Queue an indexing job",
             responses={400: {"model": ErrorBody, "description": "invalid name or inputs (`invalid_name`, "
                                                                    "`path_not_allowed`, `invalid_job`)"},
                        409: {"model": ErrorBody, "description": "the datastore exists (without `overwrite`) "
                                                                 "or already has a queued or running job"}})
def submit_job(body: IndexJobRequest, response: Response, jobs: JobsDep) -> Job:
    """Validate the job and queue it; jobs run one at a time, in submission order. The
    ``Location`` header is the job's URL."""
    job = jobs.submit(body)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.get("", response_model=JobList, summary="List the jobs, newest first")
def list_jobs(jobs: JobsDep) -> JobList:
    return JobList(jobs=jobs.list())


@router.get("/{job_id}", response_model=Job, summary="A job's status and progress", responses=_ERRORS)
def get_job(job_id: str, jobs: JobsDep) -> Job:
    return jobs.get(job_id)


@router.post("/{job_id}/cancel", response_model=Job, summary="Cancel a queued or running job",
             responses={**_ERRORS, 409: {"model": ErrorBody, "description": "the job has already finished"}})
def cancel_job(job_id: str, jobs: JobsDep) -> Job:
    """A queued job is cancelled at once; a running one is terminated (its partial work
    discarded), waiting for it to stop."""
    return jobs.cancel(job_id)
