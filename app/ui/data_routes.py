"""Pages for datasets and jobs: lists, upload, item grid, job detail with live progress."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from app.datasets import service as datasets
from app.datasets.archive import LabelFrom
from app.deps import Artifacts, Jobs, SettingsDep
from app.jobs import service as jobs_service
from app.jobs.router import job_events
from app.jobs.schemas import JobCreate
from app.models.service import get_record
from app.ui import curves
from app.ui.thumbnails import thumbnail
from app.ui.web import UiSession, check_csrf, redirect, render
from app.uploads import check_upload
from lqf_core.artifacts import read_metadata
from lqf_core.config import Method
from state.jobstore import TERMINAL

router = APIRouter(prefix="/ui", include_in_schema=False)
ITEMS_PER_PAGE = 120


@router.get("", response_class=HTMLResponse)
def home(request: Request, session: UiSession, jobs: Jobs, store: Artifacts) -> HTMLResponse:
    recent, total_jobs = jobs.list_jobs(session.tenant, None, 8, 0)
    return render(request, "home.html", {
        "jobs": recent, "total_jobs": total_jobs,
        "datasets": store.list_dataset_metas(session.tenant)[:8],
        "models": store.list_model_records(session.tenant)[:8],
    }, session=session)


# -- datasets ---------------------------------------------------------------------------
@router.get("/datasets", response_class=HTMLResponse)
def dataset_list(request: Request, session: UiSession, store: Artifacts) -> HTMLResponse:
    return render(request, "datasets.html",
                  {"datasets": store.list_dataset_metas(session.tenant)}, session=session)


@router.post("/datasets")
def dataset_upload(
    session: UiSession, store: Artifacts, settings: SettingsDep,
    file: Annotated[UploadFile, File()],
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    name: Annotated[str, Form(max_length=200)] = "",
    label_from: Annotated[LabelFrom, Form()] = LabelFrom.PARENT,
) -> RedirectResponse:
    check_csrf(session, csrf_token)
    check_upload(file, settings.max_upload_bytes)
    default = (file.filename or "dataset").rsplit("/", 1)[-1].removesuffix(".zip")
    # The dataset page shows this upload's warnings (kept with the dataset).
    meta, _, _ = datasets.create(store, settings, session.tenant, file.file,
                                 name.strip() or default, label_from)
    return redirect(f"/ui/datasets/{meta['id']}")


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse)
def dataset_detail(request: Request, dataset_id: str, session: UiSession, store: Artifacts,
                   page: Annotated[int, Query(ge=1, le=100_000)] = 1) -> HTMLResponse:
    meta = datasets.get_meta(store, session.tenant, dataset_id)
    items, total = datasets.list_items(store, session.tenant, dataset_id, ITEMS_PER_PAGE,
                                       (page - 1) * ITEMS_PER_PAGE)
    pages = max(1, -(-total // ITEMS_PER_PAGE))
    return render(request, "dataset.html", {
        "dataset": meta, "items": items, "total": total, "page": page, "pages": pages,
        "methods": [m.value for m in Method], "warnings": datasets.dataset_warnings(meta),
    }, session=session)


IMAGE_HEADERS = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}


@router.get("/datasets/{dataset_id}/items/{item_id}/image", response_class=FileResponse)
def item_image(dataset_id: str, item_id: int, session: UiSession,
               store: Artifacts) -> FileResponse:
    path = datasets.item_file(store, session.tenant, dataset_id, item_id)
    return FileResponse(path, headers=IMAGE_HEADERS)


@router.get("/datasets/{dataset_id}/items/{item_id}/thumbnail", response_class=Response)
def item_thumbnail(dataset_id: str, item_id: int, session: UiSession,
                   store: Artifacts) -> Response:
    path = datasets.item_file(store, session.tenant, dataset_id, item_id)
    body, media_type = thumbnail(path)
    return Response(body, media_type=media_type, headers=IMAGE_HEADERS)


@router.post("/datasets/{dataset_id}/train")
def start_training(
    dataset_id: str, session: UiSession, jobs: Jobs, store: Artifacts, settings: SettingsDep,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    method: Annotated[Method, Form()] = Method.LQF,
    model_name: Annotated[str, Form(max_length=100)] = "",
) -> RedirectResponse:
    check_csrf(session, csrf_token)
    body = JobCreate(dataset_id=dataset_id, method=method,
                     model_name=model_name.strip() or None)
    job, _ = jobs_service.create_training(jobs, store, settings, session.tenant, body, None)
    return redirect(f"/ui/jobs/{job['id']}")


# -- jobs -------------------------------------------------------------------------------
@router.get("/jobs", response_class=HTMLResponse)
def job_list(request: Request, session: UiSession, jobs: Jobs,
             page: Annotated[int, Query(ge=1, le=100_000)] = 1) -> HTMLResponse:
    per_page = 50
    items, total = jobs.list_jobs(session.tenant, None, per_page, (page - 1) * per_page)
    return render(request, "jobs.html", {
        "jobs": items, "total": total, "page": page, "pages": max(1, -(-total // per_page)),
    }, session=session)


def _curve_charts(jobs: Jobs, store: Artifacts, tenant: str, job: dict[str, Any]) -> list:
    if job.get("model_id") and job.get("kind") in {"train", "forget"}:
        try:
            get_record(store, tenant, job["model_id"])
            info = read_metadata(store.model_dir(job["model_id"])).get("info", {})
            return curves.charts(curves.points_from_info(info))
        except Exception:  # a deleted or unreadable model: fall back to the events
            pass
    return curves.charts(curves.points_from_events(jobs.events(job["id"])))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_detail(request: Request, job_id: str, session: UiSession, jobs: Jobs,
               store: Artifacts) -> HTMLResponse:
    job = jobs_service.get(jobs, session.tenant, job_id)
    return render(request, "job.html", {
        "job": job, "final": job["status"] in {s.value for s in TERMINAL},
        "charts": _curve_charts(jobs, store, session.tenant, job),
    }, session=session)


@router.get("/jobs/{job_id}/curve", response_class=HTMLResponse)
def job_curve(request: Request, job_id: str, session: UiSession, jobs: Jobs,
              store: Artifacts) -> HTMLResponse:
    """The curve alone, for the job page to refresh as points arrive."""
    job = jobs_service.get(jobs, session.tenant, job_id)
    return render(request, "_curve.html",
                  {"charts": _curve_charts(jobs, store, session.tenant, job)})


@router.get("/jobs/{job_id}/events")
async def job_live_events(job_id: str, request: Request, session: UiSession,
                          jobs: Jobs) -> Response:
    """The job's Server-Sent Events, for the signed-in dashboard (the JSON API's stream)."""
    return await job_events(job_id, request, session.tenant, jobs,
                            last_event_id=request.headers.get("last-event-id"))


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: str, session: UiSession, jobs: Jobs,
                 csrf_token: Annotated[str, Form(max_length=200)] = "") -> RedirectResponse:
    check_csrf(session, csrf_token)
    await run_in_threadpool(jobs_service.cancel, jobs, session.tenant, job_id)
    return redirect(f"/ui/jobs/{job_id}")
