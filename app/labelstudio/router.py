"""Label Studio ML backend for one model: `<api>/label-studio/<model reference>`.

Routes of the protocol under that base: `GET /health` (and the base itself), `POST
/setup`, `POST /predict`, `POST /webhook`. Authentication: Bearer <api key>, or basic
auth with the API key as the password (Label Studio's connection form has fields for
it). Webhooks are acknowledged, not acted on: to train from Label Studio, connect a
model name instead (connections.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.deps import Artifacts, SettingsDep, TenantBearerOrBasic
from app.labelstudio import service as ls
from app.labelstudio.protocol import json_body, predict_tasks
from app.models.service import get_record_async

router = APIRouter(prefix="/label-studio/{model_id}", tags=["label-studio"])

@router.get("")
@router.get("/health")
async def health(model_id: str, tenant: TenantBearerOrBasic, store: Artifacts) -> dict[str, Any]:
    record = await get_record_async(store, tenant, model_id)
    return {"status": "UP", "model_class": f"LQF Serve ({record.get('method')})",
            "model_version": record["model_version"]}


@router.post("/setup")
async def setup(model_id: str, request: Request, tenant: TenantBearerOrBasic,
                store: Artifacts) -> dict[str, Any]:
    """Label Studio's connection check: a labeling config this backend cannot serve is
    refused here, so the project shows why."""
    record = await get_record_async(store, tenant, model_id)
    body = await json_body(request)
    if body.get("schema"):
        ls.choose(dict.fromkeys(record["classes"], 0.0),
                  ls.parse_label_config(str(body["schema"])))
    return {"model_version": record["model_version"]}


@router.post("/webhook", status_code=201)
async def webhook(model_id: str, request: Request, tenant: TenantBearerOrBasic,
                  store: Artifacts) -> dict[str, Any]:
    await get_record_async(store, tenant, model_id)
    body = await json_body(request)
    return {"status": "ignored", "action": body.get("action"),
            "detail": "this backend does not train from Label Studio events; "
                      "start training with POST /jobs"}


@router.post("/predict")
async def predict(model_id: str, request: Request, tenant: TenantBearerOrBasic,
                  store: Artifacts, settings: SettingsDep) -> JSONResponse:
    record = await get_record_async(store, tenant, model_id)
    body = await json_body(request)
    fetcher = ls.ImageFetcher(settings.label_studio_url, settings.label_studio_api_key,
                              settings.label_studio_max_image_bytes)
    results = await predict_tasks(request, store, settings, record, body, fetcher,
                                  record["model_version"])
    return JSONResponse({"results": results, "model_version": record["model_version"]})
