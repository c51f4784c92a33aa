from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app import metrics
from app.bodies import ImageBodySpec, parse_image_body
from app.deps import Artifacts, SettingsDep, Tenant
from app.errors import QUERY_TIMEOUT_RESPONSE
from app.models.service import get_record_async, require_lqf
from app.predict import service
from app.predict.schemas import PredictOptions, PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])

_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["model_id", "files"],
                "properties": {
                    "model_id": {"type": "string", "minLength": 1,
                                 "description": "a model id, a model name, or name@alias"},
                    "top_k": {"type": "integer", "minimum": 1},
                    "uncertainty": {"type": "boolean", "default": False},
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                }}},
            "application/json": {"schema": PredictRequest.model_json_schema()},
        },
    }
}


PREDICT_BODY = ImageBodySpec(PredictOptions, PredictRequest, json_field="images",
                             upload_field="files")


@router.post("/predict", response_model=PredictResponse, openapi_extra=_OPENAPI_BODY,
             responses=QUERY_TIMEOUT_RESPONSE,
             response_model_exclude_none=True)
async def predict(request: Request, tenant: Tenant, store: Artifacts,
                  settings: SettingsDep) -> JSONResponse:
    # The deadline of the closed-form part counts from the request's arrival.
    deadline = request.app.state.posteriors.deadline()
    body = await parse_image_body(request, PREDICT_BODY, settings.max_predict_images)
    options, images = body.options, body.images
    record = await get_record_async(store, tenant, options.model_id)  # 404 for others' models
    model_id = record["id"]  # a name or name@alias resolved to its model
    if options.uncertainty:
        require_lqf(record, "uncertainty")
    loaded = await request.app.state.predictors.get(store, model_id, record["model_version"])
    x = await service.prepare_async(loaded.predictor, images)
    if options.uncertainty:
        posteriors = request.app.state.posteriors
        # Before predicting: a posterior still being built answers 503 at once.
        entry = await posteriors.get(store, record, request.app.state.predictors, deadline)
        # Side by side: the prediction runs in an inference process, the posterior's
        # covariances in a query thread, so the answer costs the longer of the two.
        predictions, extras = await asyncio.gather(
            service.predict(loaded, x, options.top_k),
            posteriors.run(deadline, entry.uncertainty, x, deadline))
        for prediction, extra in zip(predictions, extras, strict=True):
            prediction["uncertainty"] = extra
    else:
        predictions = await service.predict(loaded, x, options.top_k)
    metrics.PREDICTED_IMAGES.inc(len(images))
    # Built in the PredictResponse shape from plain str/float values: returning it as is
    # skips two pydantic passes (construction and response_model) on the hot path.
    return JSONResponse({"model_id": model_id, "model_version": loaded.version,
                         "predictions": predictions})
