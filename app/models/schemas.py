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
    # Set on a version made by POST /models/{id}/forget: the model it was derived from
    # and every dataset item it was made to forget (its parent's included).
    parent_id: str | None = None
    forgotten_item_ids: list[int] = []
    # The model name this model is a version of (GET /names/{name}), if any.
    name: str | None = None
    version: int | None = None
    # How the fit went: items fitted and held out, the calibration used and the softmax
    # temperature, how the input size was chosen, and for LQF the solver's iterations,
    # the relative gradient norm it reached and whether that met its tolerance. Empty for
    # models trained before this field existed.
    training: dict[str, Any] = {}
