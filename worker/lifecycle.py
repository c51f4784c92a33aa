"""A job's life on a worker, whatever its kind: claim, lease, stop, progress, final record.

`run_job` claims the job (queued -> running under a lease), calls the kind's `Compute`
(worker/jobs/), stores what it returns and records the final status. Every way a job
can end is decided here, once:
  * succeeded -- the result is stored, then the status set; if a cancel (or the sweeper)
    got there first, the stored result is removed again; then the kind's best-effort
    `after_success` step, if any;
  * failed -- a `JobFailure` or `LQFError` (deterministic: bad data, missing weights),
    a crash, a result that could not be stored, or a worker shutdown;
  * cancelled -- the user asked, and the job stopped at its next poll;
  * nothing written -- the lease was lost (we stalled; the sweeper has failed the job).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import redis

from lqf_core.errors import Cancelled, LQFError
from lqf_core.train import Progress
from state.artifacts import ArtifactStore
from state.jobstore import JobStatus, JobStore
from state.stores import artifacts_for
from worker.config import WorkerSettings

T = TypeVar("T")
# What a Redis restart looks like to a client: the job's compute carries on through it.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)

log = logging.getLogger("lqf.worker")

RUNNING = {JobStatus.RUNNING}
RUNNING_OR_CANCELLING = {JobStatus.RUNNING, JobStatus.CANCELLING}

# Set when the worker is asked to shut down: a running job stops at its next poll.
SHUTTING_DOWN = threading.Event()


@lru_cache
def _job_store(url: str) -> JobStore:
    return JobStore.from_url(url)


def job_store(settings: WorkerSettings) -> JobStore:
    return _job_store(settings.redis_url)


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
    """`should_stop` for lqf_core: a user cancel, a worker shutdown or a lost lease."""

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
            try:
                if self.jobs.cancel_requested(self.job_id):
                    self.reason = "cancel"
            except REDIS_DOWN:
                # Redis is restarting: keep computing. The lease decides: an outage longer
                # than it ends the job (the sweeper fails it), a shorter one costs nothing.
                pass
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
        # A step that carries metrics (a solver iteration, an epoch) is a point of the
        # job's live curve, so it is an event too (still at most one per 0.5 s).
        curve_point = bool(p.metrics) and p.stage in {"solve", "epoch"}
        event = new_stage or done or curve_point or now - self._last_event >= 2.0
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


Undo = Callable[[], None]


@dataclass
class Outcome:
    """What a job computed: its metrics, and `store(artifacts)`, which writes the result
    and returns (the job record's fields that name it, e.g. {"model_id": ...}, how to
    take the result back if the job is cancelled before it is marked done)."""

    metrics: dict[str, float]
    store: Callable[[ArtifactStore], tuple[dict[str, str], Undo]]
    # Run once the job has succeeded, with the fields `store` returned: work that needs
    # the stored result (e.g. its version) and must not fail the job; errors are logged.
    after_success: Callable[[dict[str, str]], None] | None = None


@dataclass
class JobContext:
    """What a kind's compute function gets besides the job record."""

    artifacts: ArtifactStore
    settings: WorkerSettings
    progress: ProgressReporter
    should_stop: Stopper


Compute = Callable[[dict[str, Any], JobContext], Outcome]


def job_device(job: dict[str, Any], settings: WorkerSettings) -> str:
    """The device a job runs on: its own `device` hyperparameter if it set one, else the
    worker's LQF_DEVICE ("auto" by default). One rule for every kind."""
    return str((job.get("hyperparameters") or {}).get("device") or settings.device)


def run_job(job_id: str, compute: Compute, *, settings: WorkerSettings, worker: str) -> str:
    """Claim the job, compute, store the result, record the outcome -> final status."""
    jobs = _job_store(settings.redis_url)
    claimed = jobs.claim(job_id, worker, settings.lease_ttl_s)
    if claimed != "ok":
        # Cancelled while queued, unknown, or (re-delivery) already run by someone else.
        log.info("job not claimed", extra={"job_id": job_id, "status": claimed})
        return claimed
    job = jobs.get(job_id) or {}
    log.info("job started", extra={"job_id": job_id, "worker": worker, "kind": job.get("kind")})
    with Lease(jobs, job_id, worker, settings.lease_ttl_s) as lease:
        status = _execute(jobs, job, settings, lease, compute)
    log.info("job finished", extra={"job_id": job_id, "status": status})
    return status


def while_redis_restarts(fn: Callable[[], T], seconds: float) -> T:
    """fn(), retried while Redis is unreachable, for up to `seconds` (the lease: past it
    the sweeper fails the job anyway). The job's final record must survive a restart."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except REDIS_DOWN:
            if time.monotonic() >= deadline:
                raise
            log.warning("redis unreachable; retrying the job's record")
            time.sleep(0.5)


def _fail(jobs: JobStore, job_id: str, code: str, message: str, patience_s: float) -> str:
    while_redis_restarts(lambda: jobs.transition(
        job_id, RUNNING_OR_CANCELLING, JobStatus.FAILED, message=message,
        error={"code": code, "message": message}), patience_s)
    return JobStatus.FAILED.value


def _execute(jobs: JobStore, job: dict[str, Any], settings: WorkerSettings, lease: Lease,
             compute: Compute) -> str:
    job_id = job["id"]
    patience = settings.lease_ttl_s

    def fail(code: str, message: str) -> str:
        return _fail(jobs, job_id, code, message, patience)

    def record(fn: Callable[[], T]) -> T:
        return while_redis_restarts(fn, patience)

    artifacts = artifacts_for(settings)
    stopper = Stopper(jobs, job_id, lease)
    context = JobContext(artifacts, settings, ProgressReporter(jobs, job_id), stopper)
    try:
        outcome = compute(job, context)
    except JobFailure as exc:
        return fail(exc.code, exc.message)
    except Cancelled:
        if stopper.reason == "shutdown":
            return fail("worker_shutdown",
                        "the worker was shut down while the job ran; submit it again")
        if stopper.reason == "lease_lost":
            return "lease_lost"  # the sweeper has already failed it; nothing is ours to write
        record(lambda: jobs.transition(job_id, RUNNING_OR_CANCELLING, JobStatus.CANCELLED,
                                       message="cancelled while running"))
        return JobStatus.CANCELLED.value
    except LQFError as exc:
        return fail(error_code(exc), str(exc))
    except Exception as exc:
        log.exception("job crashed", extra={"job_id": job_id})
        return fail("internal_error", f"{type(exc).__name__}: {exc}")

    try:
        result, undo = outcome.store(artifacts)
    except Exception as exc:  # disk full, permissions: say so rather than look "lost"
        log.exception("could not store the result", extra={"job_id": job_id})
        return fail("storage_error",
                    f"the job finished but its result could not be stored: {exc}")
    try:
        progress = (record(lambda: jobs.get(job_id)) or {}).get("progress") or {}
        done, before = record(lambda: jobs.transition(
            job_id, RUNNING, JobStatus.SUCCEEDED, **result,
            metrics={k: float(v) for k, v in outcome.metrics.items()},
            progress={**progress, "fraction": 1.0},
        ))
    except REDIS_DOWN:
        undo()  # Redis stayed away past the lease: publish nothing the record does not name
        raise
    if done:
        if outcome.after_success is not None:
            try:
                outcome.after_success(result)
            except Exception:
                log.exception("after-success step failed", extra={"job_id": job_id})
        return JobStatus.SUCCEEDED.value
    # Cancelled (or failed by the sweeper) while we were finishing: the user said stop.
    undo()
    if before == JobStatus.CANCELLING.value:
        record(lambda: jobs.transition(job_id, {JobStatus.CANCELLING}, JobStatus.CANCELLED,
                                       message="cancelled while running"))
        return JobStatus.CANCELLED.value
    return before
