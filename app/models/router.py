from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from app.deps import Artifacts, Tenant
from app.models import service
from app.models.schemas import ModelPublic
from app.pagination import Limit, Offset, Page, page

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=Page[ModelPublic])
def list_models(tenant: Tenant, store: Artifacts, limit: Limit = 100,
                offset: Offset = 0) -> Page[ModelPublic]:
    return page(store.list_model_records(tenant), limit, offset, ModelPublic.model_validate)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, tenant: Tenant, store: Artifacts) -> ModelPublic:
    return ModelPublic.model_validate(service.get_record(store, tenant, model_id))


@router.get("/{model_id}/weights", response_class=FileResponse)
def get_weights(model_id: str, tenant: Tenant, store: Artifacts) -> FileResponse:
    path = service.weights_file(store, tenant, model_id)
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"{path.parent.name}.safetensors")


@router.delete("/{model_id}", status_code=204)
async def delete_model(model_id: str, request: Request, tenant: Tenant,
                       store: Artifacts) -> Response:
    model_id = await run_in_threadpool(service.delete, store, tenant, model_id)
    request.app.state.predictors.evict(model_id)  # on the loop: it owns the batcher task
    request.app.state.posteriors.evict(model_id)
    return Response(status_code=204)
