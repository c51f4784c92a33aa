from __future__ import annotations

from pydantic import BaseModel


class DatasetPublic(BaseModel):
    id: str
    name: str
    num_items: int
    classes: list[str]
    class_counts: dict[str, int]
    created_at: str
    updated_at: str


class DatasetCreated(DatasetPublic):
    # Files in the archive that are neither images nor labels.csv, left out.
    ignored_files: list[str] = []


class DatasetList(BaseModel):
    items: list[DatasetPublic]
    total: int
    limit: int
    offset: int


class ItemPublic(BaseModel):
    id: int
    label: str
    filename: str
    excluded: bool = False


class ItemList(BaseModel):
    items: list[ItemPublic]
    total: int
    limit: int
    offset: int


class ItemsAdded(BaseModel):
    dataset: DatasetPublic
    added: list[ItemPublic]
    ignored_files: list[str] = []
