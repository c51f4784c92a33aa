from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from app import metrics
from app.deps import Artifacts, SettingsDep, Tenant
from app.errors import ApiError
from app.models.service import get_record
from app.predict import service
from app.predict.schemas import PredictRequest, PredictResponse
from app.queries.service import require_lqf

router = APIRouter(tags=["predict"])

_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["model_id", "files"],
                "properties": {
                    "model_id": {"type": "string"},
                    "top_k": {"type": "integer", "minimum": 1},
                    "uncertainty": {"type": "boolean", "default": False},
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                }}},
            "application/json": {"schema": PredictRequest.model_json_schema()},
        },
    }
}


def _top_k(raw: object) -> int | None:
    if raw in (None, ""):
        return None
    try:
        value = int(str(raw))
    except ValueError:
        raise ApiError(422, f"top_k must be an integer, got {raw!r}", "validation_error") from None
    if value < 1:
        raise ApiError(422, f"top_k must be at least 1, got {value}", "validation_error")
    return value


def _flag(raw: object) -> bool:
    text = str(raw or "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ApiError(422, f"uncertainty must be true or false, got {raw!r}", "validation_error")


async def _parse(request: Request, settings: SettingsDep
                 ) -> tuple[str, list[tuple[str, bytes]], int | None, bool]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_predict_images + 1)
        model_id = form.get("model_id")
        if not isinstance(model_id, str) or not model_id:
            raise ApiError(422, "form field 'model_id' is required", "validation_error")
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        service.check_count(len(files), settings)
        images = [(f.filename or f"files[{i}]", await f.read()) for i, f in enumerate(files)]
        return model_id, images, _top_k(form.get("top_k")), _flag(form.get("uncertainty"))
    if content_type.startswith("application/json"):
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")}
                      for e in exc.errors()]
            raise ApiError(422, errors, "validation_error") from None  # type: ignore[arg-type]
        service.check_count(len(body.images), settings)
        images = []
        for i, text in enumerate(body.images):
            try:
                images.append((f"images[{i}]", base64.b64decode(text, validate=True)))
            except (binascii.Error, ValueError):
                raise ApiError(422, f"images[{i}] is not valid base64", "invalid_data") from None
        return body.model_id, images, body.top_k, body.uncertainty
    raise ApiError(415, "send multipart/form-data (model_id, files) or JSON "
                        "(model_id, images as base64)", "unsupported_media_type")


@router.post("/predict", response_model=PredictResponse, openapi_extra=_OPENAPI_BODY,
             response_model_exclude_none=True)
async def predict(request: Request, tenant: Tenant, store: Artifacts,
                  settings: SettingsDep) -> JSONResponse:
    model_id, images, top_k, uncertainty = await _parse(request, settings)
    record = get_record(store, tenant, model_id)  # 404 for another tenant's model
    if uncertainty:
        require_lqf(record, "uncertainty")
    loaded = await request.app.state.predictors.get(store, model_id, record["model_version"])
    x = await service.prepare_async(loaded.predictor, images)
    predictions = await service.predict(loaded, x, top_k)
    if uncertainty:
        posteriors = request.app.state.posteriors
        entry = await posteriors.get(store, record, request.app.state.predictors)
        for prediction, extra in zip(predictions, await posteriors.run(entry.uncertainty, x),
                                     strict=True):
            prediction["uncertainty"] = extra
    metrics.PREDICTED_IMAGES.inc(len(images))
    # Built in the PredictResponse shape from plain str/float values: returning it as is
    # skips two pydantic passes (construction and response_model) on the hot path.
    return JSONResponse({"model_id": model_id, "model_version": loaded.version,
                         "predictions": predictions})
