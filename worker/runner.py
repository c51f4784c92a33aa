"""One training job from claim to final state: the logic behind the `lqf.train` task."""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from functools import lru_cache
from typing import Any

from lqf_core.artifacts import save_model
from lqf_core.config import TrainConfig
from lqf_core.errors import LQFError, TrainingCancelled
from lqf_core.model import TrainedModel
from lqf_core.train import Progress, train_model
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


def run_training_job(job_id: str, *, settings: WorkerSettings, worker: str) -> str:
    """Claim the job, train, store the model, record the outcome -> final status."""
    jobs = _job_store(settings.redis_url)
    claimed = jobs.claim(job_id, worker, settings.lease_ttl_s)
    if claimed != "ok":
        # Cancelled while queued, unknown, or (re-delivery) already run by someone else.
        log.info("job not claimed", extra={"job_id": job_id, "status": claimed})
        return claimed
    job = jobs.get(job_id) or {}
    log.info("job started", extra={"job_id": job_id, "worker": worker})
    with Lease(jobs, job_id, worker, settings.lease_ttl_s) as lease:
        status = _train(jobs, job, settings, lease)
    log.info("job finished", extra={"job_id": job_id, "status": status})
    return status


def _fail(jobs: JobStore, job_id: str, code: str, message: str) -> str:
    jobs.transition(job_id, RUNNING_OR_CANCELLING, JobStatus.FAILED, message=message,
                    error={"code": code, "message": message})
    return JobStatus.FAILED.value


def _train(jobs: JobStore, job: dict[str, Any], settings: WorkerSettings, lease: Lease) -> str:
    job_id = job["id"]
    artifacts = ArtifactStore(settings.data_dir)
    stopper = Stopper(jobs, job_id, lease)
    try:
        hyper = dict(job.get("hyperparameters") or {})
        if settings.device != "auto":
            hyper.setdefault("device", settings.device)
        config = TrainConfig.from_dict(
            {**hyper, "method": job["method"], "backbone": job["backbone"], "seed": job["seed"]}
        )
        if artifacts.dataset_meta(job["dataset_id"]) is None:
            return _fail(jobs, job_id, "dataset_not_found",
                         f"dataset {job['dataset_id']} was deleted before the job ran")
        paths, labels, class_names = artifacts.training_set(job["dataset_id"])
        model = train_model(
            paths, labels, class_names, config,
            progress=ProgressReporter(jobs, job_id), should_stop=stopper,
            weights_dir=settings.weights_dir,
        )
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
        model_id = _store_model(artifacts, job, config, model)
    except Exception as exc:  # disk full, permissions: say so rather than look "lost"
        log.exception("could not store model", extra={"job_id": job_id})
        return _fail(jobs, job_id, "storage_error",
                     f"training finished but the model could not be stored: {exc}")
    final_dir = artifacts.model_dir(model_id)
    done, before = jobs.transition(
        job_id, RUNNING, JobStatus.SUCCEEDED, model_id=model_id,
        metrics={k: float(v) for k, v in model.metrics.items()},
        progress={**((jobs.get(job_id) or {}).get("progress") or {}), "fraction": 1.0},
    )
    if done:
        return JobStatus.SUCCEEDED.value
    # Cancelled (or failed by the sweeper) while we were finishing: the user said stop.
    artifacts.remove(final_dir)
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
        })
        artifacts.commit(staging, artifacts.model_dir(model_id))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model_id
