"""The worker's Celery application (the api sends tasks through state.queue instead).

Delivery policy (see README "When a worker dies"): a task is acknowledged when a worker
starts it (acks early) and prefetch is 1, so Redis never re-delivers a job that is already
running; a job whose worker dies is detected through its expired lease and marked failed.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery, signals

from state.jobstore import JobStore
from state.logs import configure_logging
from worker.config import apply_fit_memory_budget, get_worker_settings
from worker.lifecycle import SHUTTING_DOWN

settings = get_worker_settings()
apply_fit_memory_budget(settings)

celery_app = Celery("lqf", broker=settings.redis_url, include=["worker.tasks"])
celery_app.conf.update(
    task_default_queue=settings.queue,
    task_ignore_result=True,
    task_acks_late=False,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
)

log = logging.getLogger("lqf.worker")

_background: dict[str, Any] = {}


def worker_name() -> str:
    """Unique per process: `hostname/pid` (the solo pool runs tasks in this process)."""
    return f"{_background.get('hostname', 'worker')}/{os.getpid()}"


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(settings.log_level, settings.log_json)


@signals.worker_ready.connect
def _start_background(sender: Any = None, **_: Any) -> None:
    _background["hostname"] = getattr(sender, "hostname", "worker")
    stop = threading.Event()
    jobs = JobStore.from_url(settings.redis_url)

    def loop() -> None:
        # Heartbeat for /readyz, and the sweeper that fails jobs of dead workers.
        interval = max(0.5, min(settings.sweep_interval_s, settings.worker_stale_s / 3))
        while not stop.is_set():
            try:
                jobs.worker_heartbeat(worker_name())
                for job_id in jobs.sweep_lost():
                    log.warning("job lost its worker", extra={"job_id": job_id})
            except Exception:  # Redis briefly away: keep trying, do not kill the thread
                log.exception("worker heartbeat failed")
            stop.wait(interval)

    thread = threading.Thread(target=loop, name="lqf-heartbeat", daemon=True)
    thread.start()
    _background.update(stop=stop, thread=thread, jobs=jobs)
    log.info("worker ready", extra={"worker": worker_name()})


@signals.worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    SHUTTING_DOWN.set()


@signals.worker_shutdown.connect
def _stop_background(**_: Any) -> None:
    if "stop" in _background:
        _background["stop"].set()
        try:
            _background["jobs"].worker_gone(worker_name())
        except Exception:
            log.exception("could not deregister worker")
