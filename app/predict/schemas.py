from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class PredictOptions(BaseModel):
    """The fields of a prediction request in either encoding (app.bodies)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str
    top_k: int | None = Field(default=None, ge=1, description="classes per prediction")
    uncertainty: bool = Field(default=False, description="add the posterior predictive "
                              "(lqf models only)")


class PredictRequest(PredictOptions):
    """The JSON encoding: images as base64 strings."""

    images: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="base64-encoded image files")


class PredictionUncertainty(BaseModel):
    probabilities: dict[str, float] = Field(
        description="class probabilities that account for the posterior's output variance")
    variance: dict[str, float] = Field(description="posterior variance of each class output")
    ood_score: float = Field(
        description="entropy of the probabilities with the posterior over log(classes): "
                    "0 = one class certain, 1 = uniform; high for images unlike the "
                    "training ones (docs/method.md, 'The OOD score')")
    variance_ratio: float = Field(
        description="trace of the output covariance over the median training item's: "
                    "about 1 in distribution; grows without bound far from the data")
    solver: str = Field(description="'cg' (exact solves) or 'kfac' (approximation)")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]
    uncertainty: PredictionUncertainty | None = None


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_version: str
    predictions: list[Prediction]
