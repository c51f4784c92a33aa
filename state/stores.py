"""The artifact store a deployment's settings ask for, opened once per process."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import redis

from state.artifacts import ArtifactStore
from state.locks import RedisLocks
from state.remote import RemoteStore
from state.settings import CommonSettings


def artifacts_for(settings: CommonSettings) -> ArtifactStore:
    return _open(settings.data_dir, settings.artifacts, settings.s3_endpoint_url,
                 settings.redis_url, settings.remote_check_s)


@lru_cache
def _open(data_dir: Path, artifacts: str | None, endpoint_url: str | None, redis_url: str,
          remote_check_s: float) -> ArtifactStore:
    if not artifacts or not artifacts.startswith("s3://"):
        return ArtifactStore(Path(artifacts) if artifacts else data_dir).ensure()
    remote = RemoteStore(artifacts, endpoint_url=endpoint_url or None)
    remote.ensure_bucket()
    locks = RedisLocks(redis.Redis.from_url(redis_url, socket_timeout=10))
    return ArtifactStore(data_dir, remote, locks, remote_check_s).ensure()
