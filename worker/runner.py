"""One training job from claim to final state: the logic behind the `lqf.train` task."""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from lqf_core.artifacts import load_model, save_model
from lqf_core.config import TrainConfig
from lqf_core.crossfit import DEFAULT_FOLDS, cross_fit_model
from lqf_core.errors import LQFError, TrainingCancelled
from lqf_core.model import TrainedModel
from lqf_core.train import Progress, train_model
from lqf_core.unlearn import forget
from worker.celery_app import SHUTTING_DOWN
from worker.config import WorkerSettings
from worker.jobstore import JobStatus, JobStore
from worker.store import ArtifactStore, new_id, utc_now, write_json

log = logging.getLogger("lqf.worker")

RUNNING = {JobStatus.RUNNING}
RUNNING_OR_CANCELLING = {JobStatus.RUNNING, JobStatus.CANCELLING}


@lru_cache
def _job_store(url: str) -> JobStore:
    return JobStore.from_url(url)


class Lease:
    """Renews the job's lease in the background; `lost` is set if another party took over."""

    def __init__(self, jobs: JobStore, job_id: str, worker: str, ttl_s: float):
        self.jobs, self.job_id, self.worker, self.ttl_s = jobs, job_id, worker, ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lqf-lease", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.jobs.release_lease(self.job_id, self.worker)
        except Exception:
            log.exception("could not release lease", extra={"job_id": self.job_id})

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.jobs.renew_lease(self.job_id, self.worker, self.ttl_s):
                    self.lost.set()  # expired (we stalled longer than the ttl): stop work
                    return
            except Exception:  # a Redis hiccup; the next beat may succeed before the ttl
                log.warning("lease renewal failed", extra={"job_id": self.job_id})


class Stopper:
    """`should_stop` for train_model: a user cancel, a worker shutdown or a lost lease."""

    def __init__(self, jobs: JobStore, job_id: str, lease: Lease):
        self.jobs, self.job_id, self.lease = jobs, job_id, lease
        self.reason: str | None = None
        self._last_check = 0.0

    def __call__(self) -> bool:
        if self.lease.lost.is_set():
            self.reason = "lease_lost"
        elif SHUTTING_DOWN.is_set():
            self.reason = "shutdown"
        elif time.monotonic() - self._last_check > 0.2:  # poll Redis at most 5x a second
            self._last_check = time.monotonic()
            if self.jobs.cancel_requested(self.job_id):
                self.reason = "cancel"
        return self.reason is not None


class ProgressReporter:
    """Writes progress to the job record (throttled) and to the event log (sparser)."""

    def __init__(self, jobs: JobStore, job_id: str):
        self.jobs, self.job_id = jobs, job_id
        self._stage: str | None = None
        self._last_write = self._last_event = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        new_stage = p.stage != self._stage
        done = p.total > 0 and p.step >= p.total
        if not (new_stage or done or now - self._last_write >= 0.5):
            return
        event = new_stage or done or now - self._last_event >= 2.0
        progress = {
            "step": int(p.step),
            "total": int(p.total),
            "fraction": round(p.step / p.total, 4) if p.total else 0.0,
            "stage": p.stage,
        }
        metrics = {k: float(v) for k, v in (p.metrics or {}).items()}
        try:
            self.jobs.report_progress(self.job_id, progress, metrics, event)
        except Exception:  # progress is best effort; never kill training over it
            log.warning("progress report failed", extra={"job_id": self.job_id})
            return
        self._stage, self._last_write = p.stage, now
        if event:
            self._last_event = now


def error_code(exc: BaseException) -> str:
    """InvalidDataError -> "invalid_data", WeightsNotFoundError -> "weights_not_found"."""
    name = type(exc).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class JobFailure(Exception):
    """A deterministic reason to fail the job: (code, message)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Outcome:
    """What a job computed: its metrics, and `store(artifacts, job)`, which writes the
    result and returns (the model id it belongs to, the path to remove if the job is
    cancelled before it is marked done)."""

    metrics: dict[str, float]
    store: Callable[[ArtifactStore, dict[str, Any]], tuple[str, Path]]


Compute = Callable[[ArtifactStore, dict[str, Any], WorkerSettings, ProgressReporter, Stopper],
                   Outcome]


def _new_model(model: TrainedModel, config: TrainConfig) -> Outcome:
    def store(artifacts: ArtifactStore, job: dict[str, Any]) -> tuple[str, Path]:
        model_id = _store_model(artifacts, job, config, model)
        return model_id, artifacts.model_dir(model_id)

    return Outcome(dict(model.metrics), store)


def run_training_job(job_id: str, *, settings: WorkerSettings, worker: str) -> str:
    """Claim the job, train, store the model, record the outcome -> final status."""
    return _run(job_id, settings, worker, _compute_training)


def run_forget_job(job_id: str, *, settings: WorkerSettings, worker: str) -> str:
    """Claim a forget job, retrain the parent without the items, store the new version."""
    return _run(job_id, settings, worker, _compute_forget)


def run_self_influence_job(job_id: str, *, settings: WorkerSettings, worker: str) -> str:
    """Claim a self-influence job, cross-fit the model, store the scores beside it."""
    return _run(job_id, settings, worker, _compute_self_influence)


def _run(job_id: str, settings: WorkerSettings, worker: str, compute: Compute) -> str:
    jobs = _job_store(settings.redis_url)
    claimed = jobs.claim(job_id, worker, settings.lease_ttl_s)
    if claimed != "ok":
        # Cancelled while queued, unknown, or (re-delivery) already run by someone else.
        log.info("job not claimed", extra={"job_id": job_id, "status": claimed})
        return claimed
    job = jobs.get(job_id) or {}
    log.info("job started", extra={"job_id": job_id, "worker": worker})
    with Lease(jobs, job_id, worker, settings.lease_ttl_s) as lease:
        status = _execute(jobs, job, settings, lease, compute)
    log.info("job finished", extra={"job_id": job_id, "status": status})
    return status


def _fail(jobs: JobStore, job_id: str, code: str, message: str) -> str:
    jobs.transition(job_id, RUNNING_OR_CANCELLING, JobStatus.FAILED, message=message,
                    error={"code": code, "message": message})
    return JobStatus.FAILED.value


def _config(job: dict[str, Any], settings: WorkerSettings) -> TrainConfig:
    hyper = dict(job.get("hyperparameters") or {})
    if settings.device != "auto":
        hyper.setdefault("device", settings.device)
    return TrainConfig.from_dict(
        {**hyper, "method": job["method"], "backbone": job["backbone"], "seed": job["seed"]}
    )


def _compute_training(artifacts: ArtifactStore, job: dict[str, Any], settings: WorkerSettings,
                      progress: ProgressReporter, stopper: Stopper
                      ) -> tuple[TrainedModel, TrainConfig]:
    config = _config(job, settings)
    if artifacts.dataset_meta(job["dataset_id"]) is None:
        raise JobFailure("dataset_not_found",
                         f"dataset {job['dataset_id']} was deleted before the job ran")
    # Excluded (forgotten) items are skipped; item ids are recorded in the model so that
    # influence queries and unlearning can name them.
    paths, labels, class_names, ids = artifacts.training_items(job["dataset_id"])
    model = train_model(
        paths, labels, class_names, config, progress=progress, should_stop=stopper,
        weights_dir=settings.weights_dir, item_ids=ids,
    )
    return _new_model(model, config)


def _job_model(artifacts: ArtifactStore, job: dict[str, Any],
               settings: WorkerSettings) -> TrainedModel:
    """The model a forget or self-influence job works on, on the worker's device; the
    model and its dataset must still exist."""
    model_id = job["parent_model_id"]
    if artifacts.model_record(model_id) is None:
        raise JobFailure("model_not_found", f"model {model_id} was deleted before the job ran")
    if artifacts.dataset_meta(job["dataset_id"]) is None:
        raise JobFailure("dataset_not_found",
                         f"dataset {job['dataset_id']} was deleted before the job ran")
    model = load_model(artifacts.model_dir(model_id))
    if settings.device != "auto":
        model.config = model.config.replace(device=settings.device)
    return model


def _compute_forget(artifacts: ArtifactStore, job: dict[str, Any], settings: WorkerSettings,
                    progress: ProgressReporter, stopper: Stopper) -> Outcome:
    parent_id = job["parent_model_id"]
    dataset_id = job["dataset_id"]
    parent = _job_model(artifacts, job, settings)
    parent_ids = [*parent.info.get("train_item_ids", []), *parent.info.get("val_item_ids", [])]
    manifest = artifacts.manifest(dataset_id)
    # Forget what was asked, and anything else the dataset has excluded since the parent
    # was trained: the new version must not keep items the dataset no longer allows.
    excluded = {str(i) for i in manifest.get("excluded", [])}
    forgotten = {str(i) for i in job.get("forget_item_ids") or []}
    forgotten |= excluded & set(parent_ids)
    remaining = [i for i in parent_ids if i not in forgotten]
    files, labels = _items_of(parent, manifest, remaining, artifacts.dataset_dir(dataset_id))
    model = forget(
        parent, files, labels, remaining, sorted(forgotten),
        progress=progress, should_stop=stopper, weights_dir=settings.weights_dir,
        parent_id=parent_id,
    )
    return _new_model(model, parent.config)


def _items_of(model: TrainedModel, manifest: dict[str, Any], ids: list[str],
              root: Path) -> tuple[list[Path], list[int]]:
    """(image files, class indices) of dataset items, in the order of `ids`."""
    by_id = {str(it["id"]): it for it in manifest["items"]}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise JobFailure("invalid_data", f"items {missing[:10]} of the model's training data "
                                         "are no longer in the dataset")
    index = {name: k for k, name in enumerate(model.class_names)}
    strange = sorted({by_id[i]["label"] for i in ids} - set(index))
    if strange:
        raise JobFailure("invalid_data", f"labels {strange} are not classes of the model")
    return [root / by_id[i]["file"] for i in ids], [index[by_id[i]["label"]] for i in ids]


def _compute_self_influence(artifacts: ArtifactStore, job: dict[str, Any],
                            settings: WorkerSettings, progress: ProgressReporter,
                            stopper: Stopper) -> Outcome:
    model_id, dataset_id = job["parent_model_id"], job["dataset_id"]
    model = _job_model(artifacts, job, settings)
    ids = [str(i) for i in model.info.get("train_item_ids", [])]
    files, labels = _items_of(model, artifacts.manifest(dataset_id), ids,
                              artifacts.dataset_dir(dataset_id))
    started = time.monotonic()
    result = cross_fit_model(model, files, labels, ids, folds=DEFAULT_FOLDS,
                             progress=progress, should_stop=stopper,
                             weights_dir=settings.weights_dir)
    seconds = time.monotonic() - started
    order = torch.argsort(result.scores, descending=True).tolist()
    names = model.class_names
    scores = {
        "model_id": model_id, "method": "crossfit", "folds": DEFAULT_FOLDS,
        "job_id": job["id"], "created_at": utc_now(), "seconds": seconds,
        "items": [{"item_id": ids[i], "label": names[labels[i]],
                   "predicted_label": names[int(result.predicted[i])],
                   "score": float(result.scores[i])} for i in order],
    }

    def store(artifacts: ArtifactStore, job: dict[str, Any]) -> tuple[str, Path]:
        path = artifacts.self_influence_path(model_id)
        write_json(path, scores)
        return model_id, path

    return Outcome({"seconds": seconds, "items": float(len(ids))}, store)


def _execute(jobs: JobStore, job: dict[str, Any], settings: WorkerSettings, lease: Lease,
             compute: Compute) -> str:
    job_id = job["id"]
    artifacts = ArtifactStore(settings.data_dir)
    stopper = Stopper(jobs, job_id, lease)
    try:
        outcome = compute(artifacts, job, settings, ProgressReporter(jobs, job_id), stopper)
    except JobFailure as exc:
        return _fail(jobs, job_id, exc.code, exc.message)
    except TrainingCancelled:
        if stopper.reason == "shutdown":
            return _fail(jobs, job_id, "worker_shutdown",
                         "the worker was shut down while the job ran; submit it again")
        if stopper.reason == "lease_lost":
            return "lease_lost"  # the sweeper has already failed it; nothing is ours to write
        jobs.transition(job_id, RUNNING_OR_CANCELLING, JobStatus.CANCELLED,
                        message="cancelled while running")
        return JobStatus.CANCELLED.value
    except LQFError as exc:
        return _fail(jobs, job_id, error_code(exc), str(exc))
    except Exception as exc:
        log.exception("job crashed", extra={"job_id": job_id})
        return _fail(jobs, job_id, "internal_error", f"{type(exc).__name__}: {exc}")

    try:
        model_id, written = outcome.store(artifacts, job)
    except Exception as exc:  # disk full, permissions: say so rather than look "lost"
        log.exception("could not store the result", extra={"job_id": job_id})
        return _fail(jobs, job_id, "storage_error",
                     f"the job finished but its result could not be stored: {exc}")
    done, before = jobs.transition(
        job_id, RUNNING, JobStatus.SUCCEEDED, model_id=model_id,
        metrics={k: float(v) for k, v in outcome.metrics.items()},
        progress={**((jobs.get(job_id) or {}).get("progress") or {}), "fraction": 1.0},
    )
    if done:
        return JobStatus.SUCCEEDED.value
    # Cancelled (or failed by the sweeper) while we were finishing: the user said stop.
    if written.is_dir():
        artifacts.remove(written)
    else:
        written.unlink(missing_ok=True)
    if before == JobStatus.CANCELLING.value:
        jobs.transition(job_id, {JobStatus.CANCELLING}, JobStatus.CANCELLED,
                        message="cancelled while running")
        return JobStatus.CANCELLED.value
    return before


def _store_model(artifacts: ArtifactStore, job: dict[str, Any], config: TrainConfig,
                 model: TrainedModel) -> str:
    """Write the model and its record to staging, then rename into place -> model id."""
    model_id = new_id("mdl")
    model.info.update(job_id=job["id"], dataset_id=job["dataset_id"], tenant=job["tenant"],
                      model_id=model_id)
    staging = artifacts.make_staging_dir("model")
    try:
        version = save_model(model, staging)
        write_json(staging / "record.json", {
            "id": model_id,
            "tenant": job["tenant"],
            "job_id": job["id"],
            "dataset_id": job["dataset_id"],
            "method": config.method.value,
            "backbone": config.backbone,
            "classes": list(model.class_names),
            "metrics": {k: float(v) for k, v in model.metrics.items()},
            "hyperparameters": config.to_dict(),
            "model_version": version,
            "created_at": utc_now(),
            "parent_id": model.info.get("parent_id"),
            "forgotten_item_ids": list(model.info.get("forgotten_item_ids", [])),
        })
        artifacts.commit(staging, artifacts.model_dir(model_id))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model_id
