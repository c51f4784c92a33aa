"""The Celery worker's settings (env vars LQF_*): the shared ones and its own."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from lqf_core import signals
from state.settings import CommonSettings


class WorkerSettings(CommonSettings):
    # Un-acked (prefetched, not yet started) tasks come back after this many seconds.
    visibility_timeout_s: int = 3600
    # The device of jobs that do not name one ("auto": CUDA when the worker has a GPU).
    # A job's own `device` hyperparameter wins (worker.lifecycle.job_device).
    device: str = "auto"
    # Where the other ranks of a `workers: N` job run: "local" (child processes on this
    # worker's host, one per core or GPU) or "workers" (tasks taken by other workers on the
    # queue, on any host; they reach this one at rank_host, so set it to an address they
    # can connect to, or "auto": what this host's name resolves to).
    distributed: str = "local"
    rank_host: str = "127.0.0.1"
    # A training fit keeps its layer signals (lqf_core.signals: solver products about 2.5x
    # faster) up to this many GiB per process; a larger one uses the cached linear maps,
    # about a third of the memory. 0 always uses the maps.
    signals_max_gb: float = Field(default=6.0, ge=0)


def apply_fit_memory_budget(settings: WorkerSettings) -> None:
    """Make this process's fits use the settings' budget for layer signals."""
    signals.MAX_BYTES = int(settings.signals_max_gb * 1024**3)


@lru_cache
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()
