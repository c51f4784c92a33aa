"""What a linear-quadratic model answers: influence, self-influence, exact unlearning."""

from __future__ import annotations

import json
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.bodies import ImageBodySpec, parse_image_body
from app.deps import Artifacts, Jobs, SettingsDep, Tenant
from app.errors import QUERY_TIMEOUT_RESPONSE, invalid, not_found
from app.jobs import service as jobs_service
from app.jobs.schemas import JobPublic
from app.models.service import get_record, require_lqf
from app.predict.service import prepare
from app.queries.schemas import (
    MAX_TOP_K,
    ForgetRequest,
    InfluenceOptions,
    InfluenceRequest,
    InfluenceResponse,
    RankDatasetRequest,
    RankedImage,
    RankOptions,
    RankRequest,
    RankResponse,
    SelfInfluenceMethod,
    SelfInfluenceResponse,
    StoredRanking,
    Variant,
)
from app.queries.service import image_url
from state.artifacts import SELF_INFLUENCE_FILE, ArtifactStore, ranking_file

router = APIRouter(prefix="/models", tags=["queries"])

_INFLUENCE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K,
                              "default": 5},
                    "variant": {"type": "string", "enum": [v.value for v in Variant],
                                "default": "first_order"},
                }}},
            "application/json": {"schema": InfluenceRequest.model_json_schema()},
        },
    }
}


INFLUENCE_BODY = ImageBodySpec(InfluenceOptions, InfluenceRequest, json_field="image",
                               upload_field="file")


@router.post("/{model_id}/influence", response_model=InfluenceResponse,
             responses=QUERY_TIMEOUT_RESPONSE,
             openapi_extra=_INFLUENCE_BODY)
async def influence(model_id: str, request: Request, tenant: Tenant,
                    store: Artifacts) -> InfluenceResponse:
    posteriors = request.app.state.posteriors
    deadline = posteriors.deadline()
    record = await run_in_threadpool(get_record, store, tenant, model_id)  # 404 first
    body = await parse_image_body(request, INFLUENCE_BODY, max_images=1)
    options = body.options
    exact_loo = options.variant == Variant.EXACT_LOO
    entry = await posteriors.get(store, record, request.app.state.predictors, deadline,
                                 leverages=exact_loo)
    x: torch.Tensor = await run_in_threadpool(prepare, entry.predictor, body.images)
    out = await posteriors.run(deadline, entry.influence, x, options.top_k, exact_loo,
                               deadline)
    return InfluenceResponse(model_id=record["id"], model_version=record["model_version"],
                             variant=options.variant, solver=entry.solver, **out)


RANK_BODY = ImageBodySpec(RankOptions, RankRequest, json_field="images", upload_field="files")

_RANK_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {
                    "batch_size": {"type": "integer", "minimum": 1, "maximum": 1000,
                                   "default": 10},
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                }}},
            "application/json": {"schema": {"oneOf": [
                RankRequest.model_json_schema(), RankDatasetRequest.model_json_schema()]}},
        },
    }
}


@router.post("/{model_id}/rank", response_model=RankResponse,
             responses={**QUERY_TIMEOUT_RESPONSE, 202: {
                 "model": JobPublic, "description": "a dataset to rank: the job ranking it "
                 "(poll its Location; once it has succeeded, its ranking_url)"}},
             openapi_extra=_RANK_OPENAPI)
async def rank(model_id: str, request: Request, tenant: Tenant, store: Artifacts,
               jobs: Jobs, settings: SettingsDep,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
               ) -> RankResponse | JSONResponse:
    """Which unlabeled images to label next, in order: each pick maximises the probability
    that the model has its two best classes in the wrong order, under the posterior
    conditioned on the labels of the earlier picks (lqf_core.active; docs/method.md).
    Images in the request (up to LQF_MAX_PREDICT_IMAGES) are answered at once; a
    `dataset_id` (JSON) starts a job."""
    posteriors = request.app.state.posteriors
    deadline = posteriors.deadline()
    record = await run_in_threadpool(get_record, store, tenant, model_id)  # 404 first
    require_lqf(record, "ranking")
    if await _names_a_dataset(request):
        try:
            options = RankDatasetRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise invalid(exc) from None
        job, created = await run_in_threadpool(
            jobs_service.create_rank, jobs, store, settings, tenant, record,
            options.dataset_id, options.batch_size, idempotency_key)
        return JSONResponse(JobPublic(**job).model_dump(mode="json"),
                            status_code=202 if created else 200,
                            headers={"Location": f"/jobs/{job['id']}", "Retry-After": "5"})
    body = await parse_image_body(request, RANK_BODY, max_images=settings.max_predict_images)
    entry = await posteriors.get(store, record, request.app.state.predictors, deadline)
    x: torch.Tensor = await run_in_threadpool(prepare, entry.predictor, body.images)
    ranking = await posteriors.run(deadline, entry.rank, x, body.options.batch_size, deadline)
    names = [name for name, _ in body.images]
    return RankResponse(
        model_id=record["id"], model_version=record["model_version"],
        strategy=ranking.strategy, pool_size=len(names),
        batch=[RankedImage(index=i, name=names[i], score=score)
               for i, score in zip(ranking.order, ranking.scores, strict=True)])


async def _names_a_dataset(request: Request) -> bool:
    """A JSON body with a `dataset_id` (not images)."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        return False
    raw = await request.body()
    if b'"dataset_id"' not in raw:  # an image pool is not parsed twice
        return False
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        return False  # parse_image_body says what is wrong
    return isinstance(body, dict) and "dataset_id" in body and "images" not in body


@router.get("/{model_id}/rankings/{job_id}", response_model=StoredRanking)
def stored_ranking(model_id: str, job_id: str, tenant: Tenant,
                   store: Artifacts) -> StoredRanking:
    """The result of a rank job on this model."""
    record = get_record(store, tenant, model_id)
    try:
        stored = store.read_model_json(record["id"], ranking_file(job_id))
    except (KeyError, FileNotFoundError):
        raise not_found("ranking", job_id) from None
    items = [{**it, "image_url": image_url(stored["dataset_id"], it["item_id"])}
             for it in stored["items"]]
    return StoredRanking(**{**stored, "items": items})


@router.get(
    "/{model_id}/self-influence", response_model=SelfInfluenceResponse,
    responses={**QUERY_TIMEOUT_RESPONSE, 202: {"model": JobPublic,
                     "description": "crossfit scores not computed yet: the job computing "
                                    "them (poll its Location, then ask again)"}},
)
async def self_influence(
    model_id: str, request: Request, tenant: Tenant, store: Artifacts, jobs: Jobs,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    method: SelfInfluenceMethod = SelfInfluenceMethod.CROSSFIT,
) -> SelfInfluenceResponse | JSONResponse:
    """Training items ranked by how surprising their label is to the model trained
    without them. `crossfit` (default) refits the model without each fifth of the items:
    the first request starts that job and answers 202 with it; once it has succeeded the
    ranking is served from storage. `leverage` answers at once from the closed-form
    leave-one-out residual, which is weak when the model fits every training label; for a
    model trained with solver "exact" it is the exact one, stored with the model."""
    record = await run_in_threadpool(get_record, store, tenant, model_id)
    require_lqf(record, "self-influence")
    model_id, model_version = record["id"], record["model_version"]
    if method == SelfInfluenceMethod.LEVERAGE:
        posteriors = request.app.state.posteriors
        deadline = posteriors.deadline()
        entry = await posteriors.get(store, record, request.app.state.predictors, deadline,
                                     leverages=True)
        items, total = await posteriors.run(deadline, entry.self_influence, limit, deadline)
        return SelfInfluenceResponse(model_id=model_id, model_version=model_version,
                                     method=method, solver=entry.self_influence_solver,
                                     total=total, items=items)
    stored = await run_in_threadpool(_stored_self_influence, store, model_id)
    if stored is not None:
        items = [{**it, "image_url": image_url(record["dataset_id"], it["item_id"])}
                 for it in stored["items"][:limit]]
        return SelfInfluenceResponse(model_id=model_id, model_version=model_version,
                                     method=method, folds=stored["folds"],
                                     total=len(stored["items"]), items=items)
    job = await run_in_threadpool(jobs_service.start_self_influence, jobs, store, settings,
                                  tenant, record)
    return JSONResponse(JobPublic(**job).model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/jobs/{job['id']}", "Retry-After": "5"})


def _stored_self_influence(store: ArtifactStore, model_id: str) -> dict[str, Any] | None:
    try:
        return store.read_model_json(model_id, SELF_INFLUENCE_FILE)
    except FileNotFoundError:
        return None


@router.post("/{model_id}/forget", status_code=202, response_model=JobPublic,
             responses={200: {"description": "an Idempotency-Key retry: the existing job"}})
def forget(
    model_id: str, body: ForgetRequest, tenant: Tenant, jobs: Jobs, store: Artifacts,
    settings: SettingsDep, response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    """Start a job that retrains the model without `item_ids` (a new model version whose
    `parent_id` is this model). The items are excluded from the dataset at once, so no
    later training job uses them."""
    job, created = jobs_service.create_forget(jobs, store, settings, tenant, model_id,
                                              body.item_ids, idempotency_key)
    if not created:
        response.status_code = 200
    return JobPublic(**job)
