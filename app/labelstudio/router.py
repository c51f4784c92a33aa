"""Label Studio ML backend: connect a trained model as `<api>/label-studio/<model_id>`.

Routes of the protocol under that base: `GET /health` (and the base itself), `POST
/setup`, `POST /predict`, `POST /webhook`. Authentication: Bearer <api key>, or basic
auth with the API key as the password (Label Studio's connection form has fields for
it). Models are trained with `POST /jobs`; webhooks are acknowledged, not acted on.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.config import Settings
from app.deps import Artifacts, SettingsDep, TenantBearerOrBasic
from app.errors import ApiError
from app.labelstudio import service as ls
from app.models.service import get_record
from app.predict import service as predict_service

router = APIRouter(prefix="/label-studio/{model_id}", tags=["label-studio"])

# Images fetched at once from Label Studio for one /predict call.
FETCH_CONCURRENCY = 8


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(422, "the body is not valid JSON", "validation_error") from None
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object", "validation_error")
    return body


@router.get("")
@router.get("/health")
async def health(model_id: str, tenant: TenantBearerOrBasic, store: Artifacts) -> dict[str, Any]:
    record = get_record(store, tenant, model_id)
    return {"status": "UP", "model_class": f"LQF Serve ({record.get('method')})",
            "model_version": record["model_version"]}


@router.post("/setup")
async def setup(model_id: str, request: Request, tenant: TenantBearerOrBasic,
                store: Artifacts) -> dict[str, Any]:
    """Label Studio's connection check: a labeling config this backend cannot serve is
    refused here, so the project shows why."""
    record = get_record(store, tenant, model_id)
    body = await _json_body(request)
    if body.get("schema"):
        ls.choose(dict.fromkeys(record["classes"], 0.0),
                  ls.parse_label_config(str(body["schema"])))
    return {"model_version": record["model_version"]}


@router.post("/webhook", status_code=201)
async def webhook(model_id: str, request: Request, tenant: TenantBearerOrBasic,
                  store: Artifacts) -> dict[str, Any]:
    get_record(store, tenant, model_id)
    body = await _json_body(request)
    return {"status": "ignored", "action": body.get("action"),
            "detail": "this backend does not train from Label Studio events; "
                      "start training with POST /jobs"}


@router.post("/predict")
async def predict(model_id: str, request: Request, tenant: TenantBearerOrBasic,
                  store: Artifacts, settings: SettingsDep) -> JSONResponse:
    record = get_record(store, tenant, model_id)
    body = await _json_body(request)
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise ApiError(422, "'tasks' must be a list of Label Studio tasks", "validation_error")
    if len(tasks) > settings.label_studio_max_tasks:
        raise ApiError(413, f"{len(tasks)} tasks in one call, the limit is "
                            f"{settings.label_studio_max_tasks}", "too_many_tasks")
    control = ls.parse_label_config(str(body.get("label_config") or ""))
    sources = [ls.task_image_source(task, control, i) for i, task in enumerate(tasks)]
    images = await _fetch_all(sources, settings)
    loaded = await request.app.state.predictors.get(store, model_id, record["model_version"])
    results: list[dict[str, Any]] = []
    step = settings.max_predict_images
    for start in range(0, len(images), step):
        x = await predict_service.prepare_async(loaded.predictor, images[start:start + step])
        for row in await predict_service.predict(loaded, x, None):
            label, score = ls.choose(row["probabilities"], control)
            results.append(ls.prediction(label, score, control, loaded.version))
    return JSONResponse({"results": results, "model_version": loaded.version})


async def _fetch_all(sources: list[tuple[str, str]], settings: Settings
                     ) -> list[tuple[str, bytes]]:
    fetcher = ls.ImageFetcher(settings.label_studio_url, settings.label_studio_api_key,
                              settings.label_studio_max_image_bytes)
    gate = asyncio.Semaphore(FETCH_CONCURRENCY)
    async with httpx.AsyncClient(follow_redirects=False) as client:

        async def one(name: str, source: str) -> tuple[str, bytes]:
            async with gate:
                return name, await fetcher.fetch(client, name, source)

        return list(await asyncio.gather(*(one(n, s) for n, s in sources)))
