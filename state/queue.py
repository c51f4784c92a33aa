"""Job kinds as Celery tasks: the one table of task names, and enqueueing by name.

The api sends tasks by name through a small Celery app of its own, built from the
settings it is given (never the worker's), so it needs no worker code and no torch.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from state.jobstore import JobKind

TASK_NAMES: dict[JobKind, str] = {
    JobKind.TRAIN: "lqf.train",
    JobKind.FORGET: "lqf.forget",
    JobKind.SELF_INFLUENCE: "lqf.self_influence",
    JobKind.LABEL_STUDIO_TRAIN: "lqf.label_studio_train",
    JobKind.LABEL_STUDIO_IMPORT: "lqf.label_studio_import",
    JobKind.RANK: "lqf.rank",
}


@lru_cache
def _sender(broker_url: str) -> Celery:
    app = Celery("lqf-sender", broker=broker_url)
    app.conf.update(broker_connection_retry_on_startup=True, task_ignore_result=True)
    return app


def enqueue(broker_url: str, queue: str, kind: JobKind, job_id: str) -> None:
    """Queue the job's task; a worker claims the job when it starts it."""
    _sender(broker_url).send_task(TASK_NAMES[kind], args=[job_id], queue=queue)
