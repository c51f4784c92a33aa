from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Variant(StrEnum):
    FIRST_ORDER = "first_order"
    EXACT_LOO = "exact_loo"


class Solver(StrEnum):
    CG = "cg"
    KFAC = "kfac"
    EXACT = "exact"  # from the exact solver's stored leave-one-out outputs


MAX_TOP_K = 100


class InfluenceOptions(BaseModel):
    """The fields of an influence request in either encoding (app.bodies)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    variant: Variant = Variant.FIRST_ORDER


class InfluenceRequest(InfluenceOptions):
    """The JSON encoding: the image as a base64 string."""

    image: str = Field(min_length=1, description="a base64-encoded image file")


class InfluenceItem(BaseModel):
    item_id: int
    label: str
    score: float
    image_url: str


class InfluenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_version: str
    output_class: str
    variant: Variant
    solver: Solver
    proponents: list[InfluenceItem]
    opponents: list[InfluenceItem]


class SelfInfluenceItem(BaseModel):
    item_id: int
    label: str
    predicted_label: str
    score: float
    image_url: str


class SelfInfluenceMethod(StrEnum):
    # Each item scored by LQF refitted without its fold (lqf_core.crossfit): a job.
    CROSSFIT = "crossfit"
    # The closed-form leave-one-out residual (lqf_core.posterior): at once, but weak on
    # models that interpolate their labels (docs/benchmarks.md, mislabel detection).
    LEVERAGE = "leverage"


class SelfInfluenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_version: str
    method: SelfInfluenceMethod
    folds: int | None = None  # crossfit
    solver: Solver | None = None  # leverage: how H^-1 was applied
    total: int
    items: list[SelfInfluenceItem]


class ForgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_ids: list[Annotated[int, Field(strict=True)]] = Field(min_length=1, max_length=20_000,
                                description="dataset item ids to forget")


class RankOptions(BaseModel):
    """The fields of a rank request in either encoding (app.bodies)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=10, ge=1, le=1000,
                            description="how many images to label next")


class RankRequest(RankOptions):
    """The JSON encoding: the pool as base64 strings."""

    images: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="base64-encoded image files")


class RankDatasetRequest(RankOptions):
    """A pool too large for one request: a dataset of the tenant. Its items the model
    learned from (when it is the model's own dataset) are left out; its labels are not
    read. Answered with a job (202)."""

    dataset_id: str


class RankedImage(BaseModel):
    index: int = Field(description="position of the image in the request")
    name: str = Field(description="its file name (multipart) or images[i] (JSON)")
    score: float = Field(description="probability that the model has its two best classes "
                                     "in the wrong order, given the earlier picks' labels")


class RankedItem(BaseModel):
    item_id: int
    score: float
    image_url: str


class StoredRanking(BaseModel):
    """A rank job's result."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    dataset_id: str
    job_id: str
    strategy: str
    pool_size: int
    created_at: str
    seconds: float
    items: list[RankedItem] = Field(description="the items to label next, first first")


class RankResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_version: str
    strategy: str
    pool_size: int
    batch: list[RankedImage] = Field(description="the images to label next, first first")
