"""Model records of the caller's tenant: read, check, delete."""

from __future__ import annotations

from pathlib import Path

from app.errors import ApiError, not_found
from lqf_core.config import Method
from state.artifacts import ArtifactStore
from state.records import ModelRecord


def get_record(store: ArtifactStore, tenant: str, model_id: str) -> ModelRecord:
    record = store.tenant_model(tenant, model_id)
    if record is None:
        raise not_found("model", model_id)
    return record


def require_lqf(record: ModelRecord, what: str = "influence queries") -> None:
    """Closed-form queries exist for linear-quadratic models only."""
    if record.get("method") != Method.LQF.value:
        raise ApiError(422, f"only lqf models answer {what}; model {record['id']} is "
                            f"{record.get('method')}", "not_lqf")


def weights_file(store: ArtifactStore, tenant: str, model_id: str) -> Path:
    get_record(store, tenant, model_id)
    return store.model_dir(model_id) / "model.safetensors"


def delete(store: ArtifactStore, tenant: str, model_id: str) -> None:
    get_record(store, tenant, model_id)
    store.remove(store.model_dir(model_id))
