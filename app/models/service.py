"""Model records of the caller's tenant: read, check, delete."""

from __future__ import annotations

from pathlib import Path

from starlette.concurrency import run_in_threadpool

from app.errors import ApiError, not_found
from lqf_core.config import Method
from state.artifacts import ArtifactStore
from state.ids import is_valid_id
from state.records import ModelRecord
from state.registry import Registry, RegistryError


def get_record(store: ArtifactStore, tenant: str, ref: str) -> ModelRecord:
    """The model a reference names: a model id, a model name (its current version),
    `name@alias` or `name@<version>`. 404 for anything the tenant does not have."""
    if is_valid_id(ref, "mdl"):
        record = store.tenant_model(tenant, ref)
        if record is None:
            raise not_found("model", ref)
        return record
    name, _, selector = ref.partition("@")
    try:
        entry = Registry(store).get(tenant, name)
        if entry is None:
            raise not_found("model", ref)
        version = entry.resolve(selector)
    except RegistryError as exc:
        raise ApiError(404, f"model {ref!r} not found: {exc}", "model_not_found") from None
    record = store.tenant_model(tenant, version.model_id)
    if record is None:
        raise ApiError(404, f"model {ref!r} not found: version {version.version} "
                            f"({version.model_id}) was deleted", "model_not_found")
    return record


async def get_record_async(store: ArtifactStore, tenant: str, ref: str) -> ModelRecord:
    """`get_record` for async routes: with object storage it may wait on the bucket (or
    fetch the model), so it runs in a thread; on a directory it is a stat, done inline."""
    if store.remote is None:
        return get_record(store, tenant, ref)
    return await run_in_threadpool(get_record, store, tenant, ref)


def require_lqf(record: ModelRecord, what: str = "influence queries") -> None:
    """Closed-form queries exist for linear-quadratic models only."""
    if record.get("method") != Method.LQF.value:
        raise ApiError(422, f"only lqf models answer {what}; model {record['id']} is "
                            f"{record.get('method')}", "not_lqf")


def weights_file(store: ArtifactStore, tenant: str, ref: str) -> Path:
    return store.model_dir(get_record(store, tenant, ref)["id"]) / "model.safetensors"


def delete(store: ArtifactStore, tenant: str, ref: str) -> str:
    """Delete the model -> its id. A name's version that pointed at it stays listed and
    answers 404 (versions are never renumbered)."""
    model_id = get_record(store, tenant, ref)["id"]
    store.remove(store.model_dir(model_id))
    return model_id
