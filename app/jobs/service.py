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


def create_forget(jobs: JobStore, store: ArtifactStore, settings: Settings, tenant: str,
                  model_id: str, item_ids: list[str], idempotency_key: str | None
                  ) -> tuple[dict[str, Any], bool]:
    """Validate, exclude the items from the dataset, queue an `lqf.forget` job."""
    from app.datasets.service import exclude
    from app.models.service import get_record
    from lqf_core.artifacts import read_metadata

    record = get_record(store, tenant, model_id)
    wanted = list(dict.fromkeys(item_ids))
    info = read_metadata(store.model_dir(model_id)).get("info", {})
    known = {str(i) for i in [*info.get("train_item_ids", []), *info.get("val_item_ids", [])]}
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise ApiError(422, f"item ids not in model {model_id}'s training data: "
                            f"{unknown[:20]}", "unknown_items")
    dataset_id = record["dataset_id"]
    meta = store.dataset_meta(dataset_id)
    if meta is None or meta.get("tenant") != tenant:
        raise ApiError(409, f"the dataset {dataset_id} the model was trained on is gone",
                       "dataset_gone")
    hyper = dict(record.get("hyperparameters") or {})
    fields = {"dataset_id": dataset_id, "method": record["method"],
              "backbone": record["backbone"], "hyperparameters": hyper,
              "seed": int(hyper.get("seed", 0)), "kind": "forget",
              "parent_model_id": model_id, "forget_item_ids": wanted}
    canonical = json.dumps({"forget": model_id, "item_ids": sorted(wanted)})
    try:
        job, created = jobs.create(tenant, fields, idempotency_key,
                                   hashlib.sha256(canonical.encode()).hexdigest())
    except IdempotencyConflict:
        raise ApiError(409, "this Idempotency-Key was already used with a different request",
                       "idempotency_conflict") from None
    if created:
        # Dataset ids are integers in the manifest; the model names them as strings.
        exclude(store, dataset_id, [int(i) for i in wanted],
                {"model_id": model_id, "job_id": job["id"]})
        from worker.celery_app import celery_app

        celery_app.send_task("lqf.forget", args=[job["id"]], queue=settings.queue)
    return job, created


def start_self_influence(jobs: JobStore, store: ArtifactStore, settings: Settings, tenant: str,
                         record: dict[str, Any]) -> dict[str, Any]:
    """The job computing a model's cross-fitted mislabel scores: the one queued or running,
    else a new `lqf.self_influence` job (one per model at a time, whoever asks)."""
    model_id = record["id"]
    dataset_id = record["dataset_id"]
    meta = store.dataset_meta(dataset_id)
    if meta is None or meta.get("tenant") != tenant:
        raise ApiError(409, f"the dataset {dataset_id} the model was trained on is gone; "
                            "self-influence refits on its training images", "dataset_gone")
    hyper = dict(record.get("hyperparameters") or {})
    fields = {"dataset_id": dataset_id, "method": record["method"],
              "backbone": record["backbone"], "hyperparameters": hyper,
              "seed": int(hyper.get("seed", 0)), "kind": "self_influence",
              "parent_model_id": model_id}
    key = f"self-influence:{model_id}"
    job, created = jobs.create(tenant, fields, key, key)
    if not created and job["status"] in {s.value for s in TERMINAL}:
        # The last one ended without a result (failed or cancelled): try again.
        jobs.drop_idempotency_key(tenant, key)
        job, created = jobs.create(tenant, fields, key, key)
    if created:
        from worker.celery_app import celery_app

        celery_app.send_task("lqf.self_influence", args=[job["id"]], queue=settings.queue)
    return job
