"""Jobs: submit (202), list, inspect, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Query, Response, status
from sqlalchemy.orm import Session

from backend.api.deps import get_executor, get_session
from backend.api.jobs import JobExecutor
from backend.api.schemas import JobCreate, JobOut, Page
from backend.store import queries
from backend.store.tables import Job

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


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
             responses={200: {"model": JobOut, "description": "served from the store: already done"}})
def submit(response: Response, request: JobCreate = Body(...),
           executor: JobExecutor = Depends(get_executor)) -> JobOut:
    """Queue a job (202). Identical params return the existing job: the stored result when done
    (200), the same job when queued or running (202)."""
    job, reused = executor.submit(request.kind, request.params)
    if job.status == "done":
        response.status_code = status.HTTP_200_OK
    return job_out(job, reused)


@router.get("", response_model=Page[JobOut])
def list_jobs(status_: str | None = Query(None, alias="status"), kind: str | None = None,
              limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
              session: Session = Depends(get_session)) -> Page[JobOut]:
    rows, total = queries.list_jobs(session, status=status_, kind=kind, limit=limit, offset=offset)
    return Page[JobOut](items=[job_out(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: int, session: Session = Depends(get_session)) -> JobOut:
    return job_out(queries.get_job(session, job_id))


@router.delete("/{job_id}", response_model=JobOut)
def cancel_job(job_id: int, executor: JobExecutor = Depends(get_executor)) -> JobOut:
    """Cancel: a queued job at once; a running job at its next progress report."""
    return job_out(executor.cancel(job_id))
