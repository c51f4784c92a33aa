"""Settings shared by every deployable (api, worker) and the worker's own settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """What api and worker must agree on: where Redis and the artifact store are."""

    model_config = SettingsConfigDict(env_prefix="LQF_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = Path("data")
    queue: str = "lqf"
    # A running job holds a lease in Redis that its worker renews every lease_ttl_s / 3;
    # once the lease has expired the job is known to have lost its worker (see README).
    lease_ttl_s: float = 30.0
    sweep_interval_s: float = 5.0
    # A worker counts as alive for /readyz while its heartbeat is younger than this.
    worker_stale_s: float = 15.0
    log_level: str = "INFO"
    log_json: bool = True


class WorkerSettings(CommonSettings):
    """The Celery worker's settings (env vars LQF_*)."""

    # Where backbone weight files live when not in their pip package or TORCH_HOME.
    weights_dir: Path | None = None
    # Un-acked (prefetched, not yet started) tasks come back after this many seconds.
    visibility_timeout_s: int = 3600
    # "auto" uses CUDA when the worker has a GPU; the job's own `device` hyperparameter wins.
    device: str = "auto"


@lru_cache
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()
