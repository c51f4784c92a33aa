"""The ML-backend protocol's request handling that every connection style shares: the
JSON body, and answering /predict for a model with one `choices` result per task."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from fastapi import Request

from app.config import Settings
from app.errors import ApiError
from app.labelstudio import service as ls
from app.predict import service as predict_service
from state.artifacts import ArtifactStore
from state.labelstudio import choices_prediction
from state.records import ModelRecord

# Images fetched at once from Label Studio for one /predict call.
FETCH_CONCURRENCY = 8


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(422, "the body is not valid JSON", "validation_error") from None
    except RecursionError:
        raise ApiError(422, "the body's JSON is nested too deeply", "validation_error") from None
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object", "validation_error")
    return body



async def predict_tasks(request: Request, store: ArtifactStore, settings: Settings,
                        record: ModelRecord, body: dict[str, Any], fetcher: ls.ImageFetcher,
                        version: str) -> list[dict[str, Any]]:
    """One prediction per task of Label Studio's /predict body, labelled `version`."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise ApiError(422, "'tasks' must be a list of Label Studio tasks", "validation_error")
    if len(tasks) > settings.label_studio_max_tasks:
        raise ApiError(413, f"{len(tasks)} tasks in one call, the limit is "
                            f"{settings.label_studio_max_tasks}", "too_many_tasks")
    control = ls.parse_label_config(str(body.get("label_config") or ""))
    sources = [ls.task_image_source(task, control, i) for i, task in enumerate(tasks)]
    images = await fetch_all(sources, fetcher)
    loaded = await request.app.state.predictors.get(store, record["id"], record["model_version"])
    results: list[dict[str, Any]] = []
    step = settings.max_predict_images
    for start in range(0, len(images), step):
        x = await predict_service.prepare_async(loaded.predictor, images[start:start + step])
        for row in await predict_service.predict(loaded, x, None):
            label, score = ls.choose(row["probabilities"], control)
            results.append(choices_prediction(label, score, control, version))
    return results


async def fetch_all(sources: list[tuple[str, str]], fetcher: ls.ImageFetcher
                    ) -> list[tuple[str, bytes]]:
    gate = asyncio.Semaphore(FETCH_CONCURRENCY)
    async with httpx.AsyncClient(follow_redirects=False) as client:

        async def one(name: str, source: str) -> tuple[str, bytes]:
            async with gate:
                return name, await fetcher.fetch(client, name, source)

        return list(await asyncio.gather(*(one(n, s) for n, s in sources)))
