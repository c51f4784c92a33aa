"""Celery tasks: thin wrappers; the job logic lives in worker.runner."""

from __future__ import annotations

from worker.celery_app import celery_app, settings, worker_name
from worker.runner import run_forget_job, run_self_influence_job, run_training_job


@celery_app.task(name="lqf.train", ignore_result=True)
def train(job_id: str) -> str:
    # No autoretry: failures are deterministic (bad data/config) or need a human.
    return run_training_job(job_id, settings=settings, worker=worker_name())


@celery_app.task(name="lqf.forget", ignore_result=True)
def forget(job_id: str) -> str:
    return run_forget_job(job_id, settings=settings, worker=worker_name())


@celery_app.task(name="lqf.self_influence", ignore_result=True)
def self_influence(job_id: str) -> str:
    return run_self_influence_job(job_id, settings=settings, worker=worker_name())
