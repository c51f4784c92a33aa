from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from lqf_core.backbones import list_backbones
from lqf_core.config import Method, TrainConfig
from state.jobstore import JobKind, JobStatus
from state.registry import NAME_RE

# The schema lists the registry's backbones; whether one's weights are installed is checked
# per request (422).
BACKBONE_NAMES: list[JsonValue] = [*list_backbones()]

class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str
    method: Method = Method.LQF
    backbone: str = Field(default=TrainConfig.backbone,
                          json_schema_extra={"enum": BACKBONE_NAMES})
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Any TrainConfig field except method, backbone and seed "
        "(e.g. image_size, max_iters, epochs, lr, val_fraction, device); the rest keep "
        "their defaults",
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, strict=True)
    model_name: str | None = Field(
        default=None, description="on success the model becomes this name's next version "
        "(the name is created by its first version)",
        json_schema_extra={"pattern": NAME_RE.pattern})


class JobProgress(BaseModel):
    step: int = 0
    total: int = 0
    fraction: float = 0.0
    stage: str = ""


class JobError(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    # label_studio_train / _import: the snapshot, once imported
    dataset_id: str | None = None
    method: str | None = None  # None for label_studio_import (it trains nothing)
    backbone: str | None = None
    # The overrides the job was submitted with, never the full configuration: {} for
    # forget and self-influence jobs, which reuse their parent model's (GET /models/{id}).
    hyperparameters: dict[str, Any] = {}
    seed: int = 0
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: JobProgress
    metrics: dict[str, float] = {}
    error: JobError | None = None
    model_id: str | None = None
    # "hostname/pid" of the worker that ran it, for operators.
    worker: str | None = None
    attempts: int = 0
    # train: a new model on dataset_id; forget: retrain model parent_model_id without
    # forget_item_ids; self_influence: cross-fit model parent_model_id for mislabel scores.
    kind: JobKind = JobKind.TRAIN
    parent_model_id: str | None = None
    forget_item_ids: list[int] | None = None
    model_name: str | None = None
    connection_id: str | None = None  # label_studio_train: the connection that asked
    # rank: the pool and the batch asked for; once done, where the ranking is
    pool_dataset_id: str | None = None
    batch_size: int | None = None
    ranking_url: str | None = None


class JobEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    seq: int
    time: str
    type: str
