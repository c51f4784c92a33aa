from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ModelPublic(BaseModel):
    id: str
    method: str
    backbone: str
    classes: list[str]
    metrics: dict[str, float]
    job_id: str
    dataset_id: str
    model_version: str
    hyperparameters: dict[str, Any]
    created_at: str


class ModelList(BaseModel):
    items: list[ModelPublic]
    total: int
    limit: int
    offset: int
