"""Label Studio connected to a model name: `<api>/ls/<secret>` is the ML backend URL.

Management (Bearer API key), under /label-studio/connections: create one for a name (its
URL, with the secret, is shown once), list them, see one's status (what Label Studio
last sent, the last error it would hide, the last training job), delete.

The protocol, under /ls/<secret>: `GET /health` (and the base), `POST /setup`, `POST
/predict` and `GET /versions` answer for the name's current version, so a new version
reaches Label Studio's next predict run without reconnecting. `POST /webhook`
(annotation events, START_TRAINING) and the legacy `POST /train` start a training job
on the project's annotations (`label_studio_train`): after `min_annotations` annotation
events, or at once for START_TRAINING; a job still queued absorbs later events
(debounce), and the webhook answers without waiting for anything but Redis.

The secret authenticates every call, webhooks included (Label Studio sends those without
the backend's credentials but copies the URL); a wrong one gets the same 404 as a path
that does not exist.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.deps import Artifacts, Jobs, SettingsDep, Tenant
from app.errors import ApiError
from app.jobs import service as jobs_service
from app.jobs.schemas import BACKBONE_NAMES, JobCreate
from app.labelstudio import service as ls
from app.labelstudio.protocol import json_body, predict_tasks
from app.pagination import Limit, Offset, Page, page
from lqf_core.config import Method
from state.artifacts import ArtifactStore
from state.connections import Connection, ConnectionStore, version_label
from state.jobstore import JobKind, JobStatus, JobStore
from state.labelstudio import project_id
from state.records import ModelRecord
from state.registry import NAME_RE, ModelName, Registry, RegistryError, Version, check_name

log = logging.getLogger("lqf.api")

manage = APIRouter(prefix="/label-studio/connections", tags=["label-studio"])
protocol = APIRouter(prefix="/ls/{secret}", tags=["label-studio"])

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}


class ConnectionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(description="the model name it serves and trains (created by its "
                                  "first training)",
                      json_schema_extra={"pattern": NAME_RE.pattern})
    min_annotations: int = Field(default=1, ge=1, le=100_000, strict=True,
                                 description="annotation events that start a training job")
    method: Method = Method.LQF
    backbone: str = Field(default=JobCreate.model_fields["backbone"].default,
                          json_schema_extra={"enum": BACKBONE_NAMES})
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0, le=2**32 - 1, strict=True)


class ConnectionPublic(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    name: str
    created_at: str
    updated_at: str | None = None
    min_annotations: int
    training: dict[str, Any]
    label_studio_url: str | None = None
    project: int | None = None
    has_access_token: bool = False
    pending_annotations: int = 0
    last_job_id: str | None = None
    last_job_status: str | None = None
    last_error: str | None = None
    last_review: dict[str, Any] | None = Field(
        default=None, description="the last review sent to Label Studio after a training "
        "job: model_version, tasks (given mislabeling and neighbors), solver, seconds, "
        "published_at, or error")


class ConnectionCreated(ConnectionPublic):
    url_path: str = Field(description="append to this API's base URL: the ML backend URL to "
                                      "give Label Studio. It holds the secret; shown once")


def _public(conn: Connection, jobs: JobStore) -> ConnectionPublic:
    status = None
    if conn.last_job_id:
        job = jobs.get(conn.last_job_id)
        status = job["status"] if job else None
        if job and job.get("error"):
            return ConnectionPublic(**{**conn.public(), "last_job_status": status,
                                       "last_error": job["error"]["message"]})
    return ConnectionPublic(**conn.public(), last_job_status=status)


@manage.post("", status_code=201, response_model=ConnectionCreated)
def create_connection(body: ConnectionCreate, tenant: Tenant, store: Artifacts,
                      jobs: Jobs, settings: SettingsDep) -> ConnectionCreated:
    try:
        check_name(body.name)
    except RegistryError as exc:
        raise ApiError(422, str(exc), "invalid_name") from None
    training: dict[str, Any] = {"method": body.method.value, "backbone": body.backbone,
                                "hyperparameters": body.hyperparameters, "seed": body.seed}
    # Refused now what would make every training job fail (422 naming it).
    jobs_service.validate(JobCreate(dataset_id="", **training), settings)
    conn, secret = ConnectionStore(store).create(tenant, body.name, body.min_annotations,
                                                      training)
    return ConnectionCreated(**_public(conn, jobs).model_dump(), url_path=f"/ls/{secret}")


@manage.get("", response_model=Page[ConnectionPublic])
def list_connections(tenant: Tenant, store: Artifacts, jobs: Jobs, limit: Limit = 100,
                     offset: Offset = 0) -> Page[ConnectionPublic]:
    return page(ConnectionStore(store).list(tenant), limit, offset,
                lambda c: _public(c, jobs))


def _owned(store: ArtifactStore, tenant: str, conn_id: str) -> Connection:
    conn = ConnectionStore(store).by_id(tenant, conn_id)
    if conn is None:
        raise ApiError(404, f"connection {conn_id!r} not found", "connection_not_found")
    return conn


@manage.get("/{conn_id}", response_model=ConnectionPublic)
def get_connection(conn_id: str, tenant: Tenant, store: Artifacts,
                   jobs: Jobs) -> ConnectionPublic:
    """What Label Studio last sent, the last error it would not show, the last job."""
    return _public(_owned(store, tenant, conn_id), jobs)


@manage.delete("/{conn_id}", status_code=204)
def delete_connection(conn_id: str, tenant: Tenant, store: Artifacts) -> Response:
    ConnectionStore(store).delete(_owned(store, tenant, conn_id).key)
    return Response(status_code=204)


# -- the protocol ----------------------------------------------------------------------


def _connection(secret: str, store: Artifacts) -> Connection:
    conn = ConnectionStore(store).by_secret(secret)
    if conn is None:
        raise ApiError(404, "not found", "not_found")  # as for any unknown path
    return conn


Conn = Annotated[Connection, Depends(_connection)]


def _name(store: ArtifactStore, conn: Connection) -> ModelName | None:
    return Registry(store).get(conn.tenant, conn.name)


def _label(conn: Connection, version: Version) -> str:
    return version_label(conn.name, version.version)


def _current(store: ArtifactStore, conn: Connection) -> tuple[ModelRecord, str] | None:
    """(record, version label) of the name's current version; None before the first."""
    entry = _name(store, conn)
    if entry is None or not entry.versions:
        return None
    version = entry.current()
    record = store.tenant_model(conn.tenant, version.model_id)
    if record is None:
        raise ApiError(409, f"{conn.name} v{version.version} ({version.model_id}) was "
                            "deleted: roll back or retrain", "model_gone")
    return record, _label(conn, version)


def _untrained(conn: Connection) -> str:
    return f"{conn.name}@untrained"


def _remember_error(store: ArtifactStore, conn: Connection, message: str) -> None:
    log.warning("label studio request refused", extra={"connection": conn.id,
                                                       "error": message})
    with ConnectionStore(store).updating(conn.key) as c:
        c.last_error = message


# Routes that read or write files or Redis are plain `def` (FastAPI's thread pool), or
# hand that part to it: never on the event loop.
@protocol.get("")
@protocol.get("/health")
def health(conn: Conn, store: Artifacts) -> dict[str, Any]:
    current = _current(store, conn)
    return {"status": "UP", "model_class": f"LQF Serve ({conn.name})",
            "model_version": current[1] if current else _untrained(conn)}


def _checked_hostname(hostname: Any, settings: Settings) -> str | None:
    """Label Studio's own address, where its files and exports are fetched from. With
    LQF_LABEL_STUDIO_URL set it must be that one; never a link-local address."""
    if not isinstance(hostname, str) or not hostname:
        return None
    parts = urlsplit(hostname)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ls.invalid(f"hostname {hostname!r} is not an http(s) URL")
    if (parts.hostname or "").startswith("169.254."):
        raise ls.invalid(f"hostname {hostname!r} is a link-local address; refused")
    if settings.label_studio_url:
        allowed = urlsplit(settings.label_studio_url)
        if (parts.scheme, parts.netloc) != (allowed.scheme, allowed.netloc):
            raise ls.invalid(f"hostname {hostname!r} is not LQF_LABEL_STUDIO_URL "
                             f"({settings.label_studio_url}); only that Label Studio is used")
    return hostname.rstrip("/")


@protocol.post("/setup")
async def setup(conn: Conn, request: Request, store: Artifacts,
                settings: SettingsDep) -> dict[str, Any]:
    body = await json_body(request)
    return await run_in_threadpool(_setup, conn, body, store, settings)


def _setup(conn: Connection, body: dict[str, Any], store: ArtifactStore,
           settings: Settings) -> dict[str, Any]:
    try:
        hostname = _checked_hostname(body.get("hostname"), settings)
        schema = str(body.get("schema") or "")
        current = _current(store, conn)
        if schema:
            control = ls.parse_label_config(schema)
            if current is not None:
                ls.choose(dict.fromkeys(current[0]["classes"], 0.0), control)
    except ApiError as exc:
        _remember_error(store, conn, str(exc.detail))
        raise
    with ConnectionStore(store).updating(conn.key) as c:
        c.label_studio_url = hostname or c.label_studio_url or settings.label_studio_url or None
        token = body.get("access_token")
        c.access_token = token if isinstance(token, str) and token else c.access_token
        c.project = project_id(body.get("project")) or c.project
        c.label_config = schema or c.label_config
        c.last_error = None
    return {"model_version": current[1] if current else _untrained(conn)}


@protocol.get("/versions")
def versions(conn: Conn, store: Artifacts) -> dict[str, Any]:
    entry = _name(store, conn)
    labels = [_label(conn, v) for v in reversed(entry.versions)] if entry else []
    return {"versions": labels or [_untrained(conn)]}


@protocol.post("/predict")
async def predict(conn: Conn, request: Request, store: Artifacts,
                  settings: SettingsDep) -> JSONResponse:
    body = await json_body(request)
    current = await run_in_threadpool(_current, store, conn)
    if current is None:  # nothing trained yet: Label Studio stores nothing
        return JSONResponse({"results": [], "model_version": _untrained(conn)})
    record, label = current
    fetcher = ls.ImageFetcher(conn.label_studio_url or settings.label_studio_url,
                              conn.access_token or settings.label_studio_api_key,
                              settings.label_studio_max_image_bytes)
    try:
        results = await predict_tasks(request, store, settings, record, body, fetcher, label)
    except ApiError as exc:
        await run_in_threadpool(_remember_error, store, conn, str(exc.detail))
        raise
    return JSONResponse({"results": results, "model_version": label})


@protocol.post("/webhook", status_code=201)
async def webhook(conn: Conn, request: Request, store: Artifacts, jobs: Jobs,
                  settings: SettingsDep) -> dict[str, Any]:
    body = await json_body(request)
    action = str(body.get("action") or "")
    if action != "START_TRAINING" and action not in ANNOTATION_EVENTS:
        return {"status": "ignored", "action": action}
    return await run_in_threadpool(_count_and_train, store, jobs, settings, conn, body,
                                   action == "START_TRAINING")


@protocol.post("/train", status_code=201)
async def train(conn: Conn, request: Request, store: Artifacts, jobs: Jobs,
                settings: SettingsDep) -> dict[str, Any]:
    """The legacy training call: as START_TRAINING."""
    body = await json_body(request)
    return await run_in_threadpool(_count_and_train, store, jobs, settings, conn, body, True)


def _count_and_train(store: ArtifactStore, jobs: JobStore, settings: Settings,
                     conn: Connection, body: dict[str, Any], force: bool) -> dict[str, Any]:
    with ConnectionStore(store).updating(conn.key) as c:
        c.project = c.project or project_id(body.get("project"))
        if not force:
            c.pending_annotations += 1
        if not force and c.pending_annotations < c.min_annotations:
            return {"status": "counted", "pending_annotations": c.pending_annotations,
                    "min_annotations": c.min_annotations}
        job = _training_job(jobs, settings, c)
        c.pending_annotations, c.last_job_id = 0, job["id"]
    return {"status": "training", "job_id": job["id"]}


def start_import(jobs: JobStore, store: ArtifactStore, settings: Settings, tenant: str,
                 conn_id: str) -> dict[str, Any]:
    """A job that imports the connection's project (its annotated tasks and images) as a
    new dataset snapshot, without training."""
    conn = _owned(store, tenant, conn_id)
    if not conn.label_studio_url or conn.project is None:
        raise ApiError(409, f"connection {conn_id} has no Label Studio project yet: connect "
                            "its URL in the project's settings first (Label Studio then "
                            "calls /setup)", "not_set_up")
    job, _ = jobs_service.create_job(jobs, settings, tenant, JobKind.LABEL_STUDIO_IMPORT,
                                     {"dataset_id": None, "connection_id": conn.id}, None,
                                     "")
    return job


def _training_job(jobs: JobStore, settings: Settings, conn: Connection) -> dict[str, Any]:
    """The connection's queued training job, else a new one: a job that has not started
    yet will read every annotation made until it starts."""
    fields = {"dataset_id": None, **conn.training, "model_name": conn.name,
              "connection_id": conn.id}
    # A running one has exported already: the new annotations need a new run.
    return jobs_service.shared_job(jobs, settings, conn.tenant, JobKind.LABEL_STUDIO_TRAIN,
                                   fields, f"label-studio-train:{conn.id}",
                                   reusable={JobStatus.QUEUED})
