from __future__ import annotations

from pathlib import Path
from typing import Any

from app.errors import not_found
from worker.store import ArtifactStore


def get_record(store: ArtifactStore, tenant: str, model_id: str) -> dict[str, Any]:
    record = store.model_record(model_id)
    if record is None or record.get("tenant") != tenant:
        raise not_found("model", model_id)
    return record


def weights_file(store: ArtifactStore, tenant: str, model_id: str) -> Path:
    get_record(store, tenant, model_id)
    return store.model_dir(model_id) / "model.safetensors"


def delete(store: ArtifactStore, tenant: str, model_id: str) -> None:
    get_record(store, tenant, model_id)
    store.remove(store.model_dir(model_id))
