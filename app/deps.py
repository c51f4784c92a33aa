"""Shared FastAPI dependencies: settings, stores and the caller's tenant."""

from __future__ import annotations

import hmac
from functools import lru_cache
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings, get_settings
from app.errors import ApiError
from worker.jobstore import JobStore
from worker.store import ArtifactStore

_bearer = HTTPBearer(auto_error=False, description="An API key from LQF_API_KEYS")


@lru_cache
def _job_store(url: str) -> JobStore:
    return JobStore.from_url(url)


def get_job_store() -> JobStore:
    return _job_store(get_settings().redis_url)


def get_artifacts() -> ArtifactStore:
    return ArtifactStore(get_settings().data_dir).ensure()


def get_tenant(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "missing 'Authorization: Bearer <api key>' header", "unauthorized")
    presented = credentials.credentials.encode()
    tenant = None
    for key, owner in settings.tenant_keys().items():
        # Constant-time compare against every key so timing does not leak a prefix.
        if hmac.compare_digest(presented, key.encode()):
            tenant = owner
    if tenant is None:
        raise ApiError(401, "invalid API key", "unauthorized")
    return tenant


Tenant = Annotated[str, Depends(get_tenant)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
Jobs = Annotated[JobStore, Depends(get_job_store)]
Artifacts = Annotated[ArtifactStore, Depends(get_artifacts)]
