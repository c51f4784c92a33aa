"""Shared FastAPI dependencies: settings, stores and the caller's tenant."""

from __future__ import annotations

import base64
import binascii
import hmac
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings, get_settings
from app.errors import ApiError
from app.limits import admit_request
from state.artifacts import ArtifactStore
from state.jobstore import JobStore
from state.stores import artifacts_for

_bearer = HTTPBearer(auto_error=False, description="An API key from LQF_API_KEYS")


@lru_cache
def _job_store(url: str) -> JobStore:
    return JobStore.from_url(url)


def get_job_store() -> JobStore:
    return _job_store(get_settings().redis_url)


def get_artifacts() -> ArtifactStore:
    return artifacts_for(get_settings())


# The dependencies are `async def` although they do no I/O: FastAPI runs a plain `def`
# dependency in its thread pool, and each such hop costs a /predict request latency
# and GIL hand-offs (measured with bench.serve; see docs/benchmarks.md).
async def settings_dependency() -> Settings:
    return get_settings()


async def job_store_dependency() -> JobStore:
    return get_job_store()


async def artifacts_dependency() -> ArtifactStore:
    return get_artifacts()


def tenant_for_key(presented: str, settings: Settings) -> str:
    tenant = None
    for key, owner in settings.tenant_keys().items():
        # Constant-time compare against every key so timing does not leak a prefix.
        if hmac.compare_digest(presented.encode(), key.encode()):
            tenant = owner
    if tenant is None:
        raise ApiError(401, "invalid API key", "unauthorized")
    return tenant


async def get_tenant(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(settings_dependency)],
) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "missing 'Authorization: Bearer <api key>' header", "unauthorized")
    tenant = tenant_for_key(credentials.credentials, settings)
    admit_request(tenant, settings)
    return tenant


async def get_tenant_bearer_or_basic(
    request: Request, settings: Annotated[Settings, Depends(settings_dependency)],
) -> str:
    """Bearer <key>, or HTTP basic auth with the API key as the password: what Label
    Studio's ML-backend connection can send."""
    tenant = _bearer_or_basic(request, settings)
    admit_request(tenant, settings)
    return tenant


def _bearer_or_basic(request: Request, settings: Settings) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return tenant_for_key(value.strip(), settings)
    if scheme.lower() == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
            _, sep, password = decoded.partition(":")
        except (binascii.Error, ValueError):
            sep, password = "", ""
        if sep and password:
            return tenant_for_key(password, settings)
        raise ApiError(401, "malformed basic auth: send user:<api key>", "unauthorized")
    raise ApiError(401, "missing 'Authorization: Bearer <api key>' header (or basic auth with "
                        "the API key as the password)", "unauthorized")


Tenant = Annotated[str, Depends(get_tenant)]
TenantBearerOrBasic = Annotated[str, Depends(get_tenant_bearer_or_basic)]
SettingsDep = Annotated[Settings, Depends(settings_dependency)]
Jobs = Annotated[JobStore, Depends(job_store_dependency)]
Artifacts = Annotated[ArtifactStore, Depends(artifacts_dependency)]
