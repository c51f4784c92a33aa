from __future__ import annotations

import mimetypes
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from app.datasets import service
from app.datasets.archive import LabelFrom
from app.datasets.schemas import DatasetCreated, DatasetPublic, ItemPublic, ItemsAdded
from app.deps import Artifacts, Jobs, SettingsDep, Tenant
from app.jobs.schemas import JobPublic
from app.labelstudio.connections import start_import
from app.pagination import Limit, Offset, Page, page
from app.uploads import check_upload

router = APIRouter(prefix="/datasets", tags=["datasets"])

ZipFile = Annotated[UploadFile, File(description="a zip: class folders, or images + labels.csv")]
LabelFromField = Annotated[LabelFrom, Form(description=(
    "class folders: 'parent' labels each image by the folder it is in; 'top' by the first "
    "folder below those that wrap every image (cat/2019/001.png is a 'cat'). A labels.csv "
    "names the labels itself."))]


# Sync handlers: zip reading and image decoding are blocking work, so FastAPI runs them
# in its thread pool, off the event loop.
@router.post("", status_code=201, response_model=DatasetCreated)
def create_dataset(
    tenant: Tenant, store: Artifacts, settings: SettingsDep, file: ZipFile,
    name: Annotated[str | None, Form(max_length=200)] = None,
    label_from: LabelFromField = LabelFrom.PARENT,
) -> DatasetCreated:
    check_upload(file, settings.max_upload_bytes)
    default_name = (file.filename or "dataset").rsplit("/", 1)[-1].removesuffix(".zip")
    meta, ignored, warnings = service.create(store, settings, tenant, file.file,
                                             name or default_name, label_from)
    return DatasetCreated.model_validate({
        **meta, "ignored_files": ignored,
        "warnings": service.class_warnings(meta["classes"]) + warnings})


class LabelStudioImport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connection_id: str = Field(description="a Label Studio connection (POST "
                                           "/label-studio/connections) whose project to import")


@router.post("/from-label-studio", status_code=202, response_model=JobPublic)
def import_from_label_studio(body: LabelStudioImport, tenant: Tenant, store: Artifacts,
                             jobs: Jobs, settings: SettingsDep, response: Response
                             ) -> JobPublic:
    """Pull a Label Studio project's annotated tasks and their images into a new dataset:
    a job (`label_studio_import`) whose `dataset_id` names it once it has succeeded. Each
    item's task id, annotation id and label are kept in the snapshot's provenance."""
    job = start_import(jobs, store, settings, tenant, body.connection_id)
    response.headers["Location"] = f"/jobs/{job['id']}"
    return JobPublic(**job)


@router.get("", response_model=Page[DatasetPublic])
def list_datasets(tenant: Tenant, store: Artifacts, limit: Limit = 100,
                  offset: Offset = 0) -> Page[DatasetPublic]:
    return page(store.list_dataset_metas(tenant), limit, offset,
                DatasetPublic.model_validate)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, tenant: Tenant, store: Artifacts) -> DatasetPublic:
    return DatasetPublic.model_validate(service.get_meta(store, tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, tenant: Tenant, store: Artifacts) -> Response:
    service.delete(store, tenant, dataset_id)
    return Response(status_code=204)


@router.get("/{dataset_id}/items", response_model=Page[ItemPublic])
def list_items(dataset_id: str, tenant: Tenant, store: Artifacts, limit: Limit = 100,
               offset: Offset = 0) -> Page[ItemPublic]:
    items, total = service.list_items(store, tenant, dataset_id, limit, offset)
    return page(items, limit, offset, lambda it: ItemPublic(**it), total=total)


@router.post("/{dataset_id}/items", status_code=201, response_model=ItemsAdded)
def add_items(
    dataset_id: str, tenant: Tenant, store: Artifacts, settings: SettingsDep, file: ZipFile,
    label_from: LabelFromField = LabelFrom.PARENT,
) -> ItemsAdded:
    check_upload(file, settings.max_upload_bytes)
    meta, added, ignored, warnings = service.append(store, settings, tenant, dataset_id,
                                                    file.file, label_from)
    return ItemsAdded(dataset=DatasetPublic.model_validate(meta),
                      added=[ItemPublic(id=a.id, label=a.label, filename=a.filename)
                             for a in added],
                      ignored_files=ignored,
                      warnings=service.class_warnings(meta["classes"]) + warnings)


@router.get("/{dataset_id}/source")
def get_source(dataset_id: str, tenant: Tenant, store: Artifacts) -> dict[str, Any]:
    """Where an imported dataset came from (Label Studio: its URL, project, and each
    item's task id, annotation id and label); 404 for an uploaded one."""
    return service.source(store, tenant, dataset_id)


@router.get("/{dataset_id}/items/{item_id}/image", response_class=FileResponse)
def get_item_image(dataset_id: str, item_id: int, tenant: Tenant,
                   store: Artifacts) -> FileResponse:
    path = service.item_file(store, tenant, dataset_id, item_id)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # nosniff: a browser never renders an uploaded file as anything but its image type.
    return FileResponse(path, media_type=media_type,
                        headers={"X-Content-Type-Options": "nosniff"})
