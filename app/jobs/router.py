from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.deps import Artifacts, Jobs, SettingsDep, Tenant
from app.jobs import service
from app.jobs.schemas import JobCreate, JobEvent, JobPublic
from app.pagination import Limit, Offset, Page, page
from state.jobstore import TERMINAL, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


@router.post("", status_code=201, response_model=JobPublic,
             responses={200: {"description": "an Idempotency-Key retry: the existing job"}})
def create_job(
    body: JobCreate, tenant: Tenant, jobs: Jobs, store: Artifacts, settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    job, created = service.create_training(jobs, store, settings, tenant, body, idempotency_key)
    if not created:
        response.status_code = 200
    return JobPublic(**job)


@router.get("", response_model=Page[JobPublic])
def list_jobs(tenant: Tenant, jobs: Jobs, status: JobStatus | None = None,
              limit: Limit = 100, offset: Offset = 0) -> Page[JobPublic]:
    items, total = jobs.list_jobs(tenant, status.value if status else None, limit, offset)
    return page(items, limit, offset, lambda j: JobPublic(**j), total=total)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, tenant: Tenant, jobs: Jobs) -> JobPublic:
    return JobPublic(**service.get(jobs, tenant, job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, tenant: Tenant, jobs: Jobs) -> JobPublic:
    return JobPublic(**service.cancel(jobs, tenant, job_id))


MAX_EVENT_SEQ = 2**53 - 1  # far past any job's events, well inside Redis's 64-bit range


@router.get(
    "/{job_id}/events",
    response_model=list[JobEvent],
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "JSON list, or live Server-Sent Events when asked for"}},
)
async def job_events(
    job_id: str, request: Request, tenant: Tenant, jobs: Jobs,
    after: Annotated[int, Query(ge=-1, le=MAX_EVENT_SEQ,
                                description="only events with seq > after")] = -1,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    await run_in_threadpool(service.get, jobs, tenant, job_id)
    start = after + 1
    if last_event_id and last_event_id.isdigit():
        # Redis takes 64-bit indexes: a huge header means "past every event", not a 500.
        start = max(start, min(int(last_event_id), MAX_EVENT_SEQ) + 1)
    if "text/event-stream" not in request.headers.get("accept", ""):
        events = await run_in_threadpool(jobs.events, job_id, start)
        return Response(json.dumps(events), media_type="application/json")
    return StreamingResponse(_stream(request, jobs, job_id, start),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(request: Request, jobs: Jobs, job_id: str, start: int) -> AsyncIterator[str]:
    """Tail the event log until the job is final and every event has been sent."""
    cursor, idle = start, 0.0
    terminal = {s.value for s in TERMINAL}
    while not await request.is_disconnected():
        # Status before events: the final status event is written atomically with the
        # status, so a final status read first means its event is in this batch.
        job = await run_in_threadpool(jobs.get, job_id)
        events = await run_in_threadpool(jobs.events, job_id, cursor)
        for event in events:
            yield f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
            cursor = event["seq"] + 1
        if events:
            idle = 0.0
        if job is None or job["status"] in terminal:
            return
        await asyncio.sleep(SSE_POLL_S)
        idle += SSE_POLL_S
        if idle >= SSE_KEEPALIVE_S:
            idle = 0.0
            yield ": keep-alive\n\n"
