from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from app.deps import Artifacts, Tenant
from app.models import service
from app.models.schemas import ModelList, ModelPublic

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(
    tenant: Tenant, store: Artifacts,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ModelList:
    records = store.list_model_records(tenant)
    return ModelList(items=[ModelPublic(**r) for r in records[offset : offset + limit]],
                     total=len(records), limit=limit, offset=offset)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, tenant: Tenant, store: Artifacts) -> ModelPublic:
    return ModelPublic(**service.get_record(store, tenant, model_id))


@router.get("/{model_id}/weights", response_class=FileResponse)
def get_weights(model_id: str, tenant: Tenant, store: Artifacts) -> FileResponse:
    path = service.weights_file(store, tenant, model_id)
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"{model_id}.safetensors")


@router.delete("/{model_id}", status_code=204)
async def delete_model(model_id: str, request: Request, tenant: Tenant,
                       store: Artifacts) -> Response:
    await run_in_threadpool(service.delete, store, tenant, model_id)
    request.app.state.predictors.evict(model_id)  # on the loop: it owns the batcher task
    request.app.state.posteriors.evict(model_id)
    return Response(status_code=204)
