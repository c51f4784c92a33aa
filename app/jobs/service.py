"""Creating, reading and cancelling jobs; the training itself runs in a worker."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from app.config import Settings
from app.errors import ApiError, not_found
from app.jobs.schemas import JobCreate
from lqf_core.backbones import check_backbone
from lqf_core.config import TrainConfig
from worker.jobstore import ACTIVE, TERMINAL, IdempotencyConflict, JobStatus, JobStore
from worker.store import ArtifactStore

TOP_LEVEL = ("method", "backbone", "seed")


def validate(body: JobCreate, settings: Settings) -> TrainConfig:
    """Everything that would make the job fail at once is refused here with a 4xx."""
    clash = [k for k in TOP_LEVEL if k in body.hyperparameters]
    if clash:
        raise ApiError(422, f"set {clash} at the top level of the request, not in "
                            "hyperparameters", "invalid_config")
    # InvalidConfigError / UnknownBackboneError / WeightsNotFoundError -> 422 (app.errors)
    config = TrainConfig.from_dict({**body.hyperparameters, "method": body.method.value,
                                    "backbone": body.backbone, "seed": body.seed})
    check_backbone(body.backbone, weights_dir=settings.weights_dir)
    return config


def fingerprint(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def create(jobs: JobStore, store: ArtifactStore, settings: Settings, tenant: str,
           body: JobCreate, idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
    meta = store.dataset_meta(body.dataset_id)
    if meta is None or meta.get("tenant") != tenant:
        raise not_found("dataset", body.dataset_id)
    validate(body, settings)
    fields = {"dataset_id": body.dataset_id, "method": body.method.value,
              "backbone": body.backbone, "hyperparameters": body.hyperparameters,
              "seed": body.seed}
    try:
        job, created = jobs.create(tenant, fields, idempotency_key, fingerprint(body))
    except IdempotencyConflict:
        raise ApiError(409, "this Idempotency-Key was already used with a different request",
                       "idempotency_conflict") from None
    if created:
        from worker.celery_app import celery_app  # no torch: sending by name only

        celery_app.send_task("lqf.train", args=[job["id"]], queue=settings.queue)
    return job, created


def get(jobs: JobStore, tenant: str, job_id: str) -> dict[str, Any]:
    job = jobs.get(job_id)
    if job is None or job.get("tenant") != tenant:
        raise not_found("job", job_id)
    if job["status"] in {s.value for s in ACTIVE} and not jobs.has_lease(job_id):
        # Its worker is gone; settle it now instead of waiting for the next sweep.
        jobs.sweep_lost()
        job = jobs.get(job_id) or job
    return job


def cancel(jobs: JobStore, tenant: str, job_id: str) -> dict[str, Any]:
    job = get(jobs, tenant, job_id)
    status = jobs.request_cancel(job_id)
    if status in {s.value for s in TERMINAL} and status != JobStatus.CANCELLED.value:
        raise ApiError(409, f"job {job_id} already {status}; nothing to cancel", "job_finished")
    return jobs.get(job_id) or job
