"""Settings every deployable (api, worker) shares; each adds its own in a subclass."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """What api and worker must agree on: where Redis and the artifact store are."""

    model_config = SettingsConfigDict(env_prefix="LQF_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = Path("data")
    # Where datasets and models are kept: unset or a path is a directory (shared by every
    # host, e.g. NFS), `s3://bucket/prefix` object storage, with data_dir then each host's
    # verified local copy. s3_endpoint_url points boto3 at an S3-compatible server (MinIO).
    artifacts: str | None = None
    s3_endpoint_url: str | None = None
    # With object storage: how long a host serves its copy of a model before checking the
    # bucket again (the longest a deletion takes to reach every replica).
    remote_check_s: float = 2.0
    queue: str = "lqf"
    # A running job holds a lease in Redis that its worker renews every lease_ttl_s / 3;
    # once the lease has expired the job is known to have lost its worker (see README).
    lease_ttl_s: float = 30.0
    sweep_interval_s: float = 5.0
    # A worker counts as alive for /readyz while its heartbeat is younger than this.
    worker_stale_s: float = 15.0
    log_level: str = "INFO"
    log_json: bool = True

    # Where backbone weight files live when not in their pip package. TORCH_HOME (the
    # torchvision cache) is searched too; lqf_core itself reads no environment.
    weights_dir: Path | None = None
    torch_home: Path = Field(default_factory=lambda: Path.home() / ".cache" / "torch",
                             validation_alias="TORCH_HOME")

    def weights_dirs(self) -> list[Path]:
        """Where lqf_core looks for backbone weights, in order (before weight packages)."""
        dirs = [self.weights_dir] if self.weights_dir is not None else []
        return [*dirs, self.torch_home / "hub" / "checkpoints"]
