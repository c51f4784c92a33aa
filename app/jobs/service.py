"""Creating, reading and cancelling jobs; the work itself runs in a worker.

Every kind of job is created by `create_job`: one record in the job store (idempotent
per key), one task on the queue. The kind-specific functions only say what the job is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from app.config import Settings
from app.datasets.service import exclude
from app.errors import ApiError, not_found
from app.jobs.schemas import JobCreate
from app.limits import admit_bytes, admit_job
from app.models.service import get_record
from lqf_core.artifacts import read_metadata
from lqf_core.backbones import check_backbone
from lqf_core.config import TrainConfig
from state.artifacts import ArtifactStore
from state.jobstore import ACTIVE, TERMINAL, IdempotencyConflict, JobKind, JobStatus, JobStore
from state.queue import enqueue
from state.records import ModelRecord, item_ids_of
from state.registry import RegistryError, check_name

TOP_LEVEL = ("method", "backbone", "seed")


def fingerprint(request: Any) -> str:
    """What makes two requests with one Idempotency-Key the same request."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def create_job(jobs: JobStore, settings: Settings, tenant: str, kind: JobKind,
               fields: dict[str, Any], idempotency_key: str | None, request_fingerprint: str,
               before_enqueue: Callable[[dict[str, Any]], None] | None = None
               ) -> tuple[dict[str, Any], bool]:
    """Store a queued job of `kind` and queue its task -> (job, created). A retry with the
    same key returns the existing job; `before_enqueue` runs once, for a new job only."""
    try:
        job, created = jobs.create(tenant, kind, fields, idempotency_key, request_fingerprint,
                                   admit=lambda: admit_job(jobs, settings, tenant))
    except IdempotencyConflict:
        raise ApiError(409, "this Idempotency-Key was already used with a different request",
                       "idempotency_conflict") from None
    if created:
        if before_enqueue is not None:
            before_enqueue(job)
        enqueue(settings.redis_url, settings.queue, kind, job["id"])
    return job, created


def shared_job(jobs: JobStore, settings: Settings, tenant: str, kind: JobKind,
               fields: dict[str, Any], key: str, reusable: set[JobStatus]) -> dict[str, Any]:
    """The job of `kind` that everyone asking under `key` shares while its status is in
    `reusable`; once it has moved on, a new one."""
    job, created = create_job(jobs, settings, tenant, kind, fields, key, key)
    if not created and job["status"] not in {s.value for s in reusable}:
        jobs.drop_idempotency_key(tenant, key)
        job, _ = create_job(jobs, settings, tenant, kind, fields, key, key)
    return job


def validate(body: JobCreate, settings: Settings) -> TrainConfig:
    """Everything that would make the job fail at once is refused here with a 4xx."""
    clash = [k for k in TOP_LEVEL if k in body.hyperparameters]
    if clash:
        raise ApiError(422, f"set {clash} at the top level of the request, not in "
                            "hyperparameters", "invalid_config")
    # InvalidConfigError / UnknownBackboneError / WeightsNotFoundError -> 422 (app.errors)
    config = TrainConfig.from_dict({**body.hyperparameters, "method": body.method.value,
                                    "backbone": body.backbone, "seed": body.seed})
    check_backbone(body.backbone, weights_dir=settings.weights_dirs())
    return config


def create_training(jobs: JobStore, store: ArtifactStore, settings: Settings, tenant: str,
                    body: JobCreate, idempotency_key: str | None
                    ) -> tuple[dict[str, Any], bool]:
    if store.tenant_dataset(tenant, body.dataset_id) is None:
        raise not_found("dataset", body.dataset_id)
    validate(body, settings)
    # A tenant already over its storage gets no new model (forgetting is never refused).
    admit_bytes(store, settings, tenant, 0)
    if body.model_name is not None:
        try:
            check_name(body.model_name)
        except RegistryError as exc:
            raise ApiError(422, str(exc), "invalid_name") from None
    fields = {"dataset_id": body.dataset_id, "method": body.method.value,
              "backbone": body.backbone, "hyperparameters": body.hyperparameters,
              "seed": body.seed, "model_name": body.model_name}
    return create_job(jobs, settings, tenant, JobKind.TRAIN, fields, idempotency_key,
                      fingerprint(body.model_dump(mode="json")))


def _derived_fields(store: ArtifactStore, tenant: str, record: ModelRecord,
                    why: str) -> dict[str, Any]:
    """The fields of a job that works on an existing model (forget, self-influence)."""
    dataset_id = record["dataset_id"]
    if store.tenant_dataset(tenant, dataset_id) is None:
        raise ApiError(409, f"the dataset {dataset_id} the model was trained on is gone; "
                            f"{why}", "dataset_gone")
    config = record.get("hyperparameters") or {}
    return {"dataset_id": dataset_id, "method": record["method"],
            "backbone": record["backbone"], "hyperparameters": {},
            "seed": int(config.get("seed", 0)), "parent_model_id": record["id"]}


def create_forget(jobs: JobStore, store: ArtifactStore, settings: Settings, tenant: str,
                  model_id: str, item_ids: list[int], idempotency_key: str | None
                  ) -> tuple[dict[str, Any], bool]:
    """Validate, exclude the items from the dataset, queue a forget job."""
    record = get_record(store, tenant, model_id)
    model_id = record["id"]  # a name or name@alias resolved
    wanted = list(dict.fromkeys(item_ids))
    info = read_metadata(store.model_dir(model_id)).get("info", {})
    known = set(item_ids_of(info, "train_item_ids", "val_item_ids"))
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise ApiError(422, f"item ids not in model {model_id}'s training data: "
                            f"{unknown[:20]}", "unknown_items")
    # The new version joins the parent's model name, if it has one.
    fields = {**_derived_fields(store, tenant, record, "forget retrains on its items"),
              "forget_item_ids": wanted, "model_name": record.get("name")}

    def exclude_items(job: dict[str, Any]) -> None:
        exclude(store, record["dataset_id"], wanted, {"model_id": model_id, "job_id": job["id"]})

    return create_job(jobs, settings, tenant, JobKind.FORGET, fields, idempotency_key,
                      fingerprint({"forget": model_id, "item_ids": sorted(wanted)}),
                      before_enqueue=exclude_items)


def start_self_influence(jobs: JobStore, store: ArtifactStore, settings: Settings, tenant: str,
                         record: ModelRecord) -> dict[str, Any]:
    """The job computing a model's cross-fitted mislabel scores: the one queued or running,
    else a new one (one per model at a time, whoever asks)."""
    fields = _derived_fields(store, tenant, record,
                             "self-influence refits on its training images")
    # A succeeded one left its result beside the model (never asked again); a failed or
    # cancelled one left none: try again.
    return shared_job(jobs, settings, tenant, JobKind.SELF_INFLUENCE, fields,
                      f"self-influence:{record['id']}", reusable=set(JobStatus) - TERMINAL)


def create_rank(jobs: JobStore, store: ArtifactStore, settings: Settings, tenant: str,
                record: ModelRecord, pool_dataset_id: str, batch_size: int,
                idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
    """A job ranking the items of a dataset (not the model's training items) to label
    next under the model."""
    if store.tenant_dataset(tenant, pool_dataset_id) is None:
        raise not_found("dataset", pool_dataset_id)
    fields = {**_derived_fields(store, tenant, record, "ranking reads its training images"),
              "pool_dataset_id": pool_dataset_id, "batch_size": batch_size}
    return create_job(jobs, settings, tenant, JobKind.RANK, fields, idempotency_key,
                      fingerprint({"rank": record["id"], "pool": pool_dataset_id,
                                   "batch_size": batch_size}))


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
