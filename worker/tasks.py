"""Celery tasks: one per job kind, each only hands its job to worker.lifecycle."""

from __future__ import annotations

from typing import Any

from state.jobstore import JobKind
from state.queue import TASK_NAMES
from worker.celery_app import celery_app, settings, worker_name
from worker.jobs import COMPUTE
from worker.jobs.ranks import FIT_RANK_TASK, fit_rank
from worker.lifecycle import job_store, run_job


def _register(kind: JobKind) -> Any:
    compute = COMPUTE[kind]

    # No autoretry: failures are deterministic (bad data/config) or need a human.
    @celery_app.task(name=TASK_NAMES[kind], ignore_result=True)
    def task(job_id: str) -> str:
        return run_job(job_id, compute, settings=settings, worker=worker_name())

    return task


TASKS = {kind: _register(kind) for kind in JobKind}


@celery_app.task(name=FIT_RANK_TASK, ignore_result=True)
def fit_rank_task(**kwargs: Any) -> str:
    """A rank of another worker's distributed fit (worker.jobs.ranks)."""
    return fit_rank(settings, job_store(settings), **kwargs)
