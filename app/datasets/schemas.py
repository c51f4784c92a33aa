from __future__ import annotations

from pydantic import BaseModel, Field


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
    # What looks like a mistake but was stored as given (class names that differ only
    # in letter case).
    warnings: list[str] = []


class ItemPublic(BaseModel):
    id: int = Field(description="the item's number in its dataset (0, 1, ...; never reused); "
                                "every request and response names items by it")
    label: str
    filename: str
    excluded: bool = False


class ItemsAdded(BaseModel):
    dataset: DatasetPublic
    added: list[ItemPublic]
    ignored_files: list[str] = []
    warnings: list[str] = []
