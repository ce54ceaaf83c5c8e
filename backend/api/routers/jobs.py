"""Jobs: submit (202), list, inspect, cancel."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Query, Response, status
from sqlalchemy.orm import Session

from backend.api.deps import get_executor, get_session
from backend.api.jobs import JobExecutor
from backend.api.openapi import errors
from backend.api.schemas import JobCreate, JobOut, Offset, Page, RecordId
from backend.store import queries
from backend.store.tables import JOB_STATUSES, Job

router = APIRouter(prefix="/api/jobs", tags=["jobs"])
JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]


def job_out(job: Job, reused: bool = False) -> JobOut:
    out = JobOut.model_validate(job)
    out.reused = reused
    links = {"self": f"/api/jobs/{job.id}"}
    if job.circuit_id is not None:
        links["circuit"] = f"/api/circuits/{job.circuit_id}"
    if job.sweep_id is not None:
        links["sweep"] = f"/api/sweeps/{job.sweep_id}"
    if job.edge_circuit_id is not None:
        links["edge_circuit"] = f"/api/edge-circuits/{job.edge_circuit_id}"
    if job.edge_sweep_id is not None:
        links["edge_sweep"] = f"/api/edge-sweeps/{job.edge_sweep_id}"
    if job.hierarchy_id is not None:
        links["hierarchy"] = f"/api/hierarchies/{job.hierarchy_id}"
    out.links = links
    return out


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={200: {"model": JobOut, "description": "served from the store: already done"},
                        **errors(404)})
def submit(response: Response, request: Annotated[JobCreate, Body()],
           executor: JobExecutor = Depends(get_executor)) -> JobOut:
    """Queue a job (202). Identical params return the existing job: the stored result when done
    (200), the same job when queued or running (202). Unknown names (model, transcoder, task,
    method, circuit) are 404; parameters out of range 422, each error naming its field."""
    job, reused = executor.submit(request.kind, request.params)
    if job.status == "done":
        response.status_code = status.HTTP_200_OK
    return job_out(job, reused)


@router.get("", response_model=Page[JobOut])
def list_jobs(status_: JobStatus | None = Query(None, alias="status"),
              kind: str | None = Query(None, max_length=50),
              limit: int = Query(50, ge=1, le=500), offset: Offset = 0,
              session: Session = Depends(get_session)) -> Page[JobOut]:
    rows, total = queries.list_jobs(session, status=status_, kind=kind, limit=limit, offset=offset)
    return Page[JobOut](items=[job_out(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: RecordId, session: Session = Depends(get_session)) -> JobOut:
    return job_out(queries.get_job(session, job_id))


@router.delete("/{job_id}", response_model=JobOut, responses=errors(409))
def cancel_job(job_id: RecordId, executor: JobExecutor = Depends(get_executor)) -> JobOut:
    """Cancel: a queued job at once; a running job at its next progress report. A job that
    already ended is 409."""
    return job_out(executor.cancel(job_id))
