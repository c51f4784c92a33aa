"""The records the artifact store keeps, typed, each with one owner of its layout.

    DatasetSummary   datasets/{id}/dataset.json   what a dataset listing shows
    DatasetManifest  datasets/{id}/manifest.json  every item, and which are excluded
    ModelRecord      models/{id}/record.json      a model's provenance and version

Item ids are integers: the store numbers a dataset's items 0, 1, 2, ... in upload order
and never reuses a number. `lqf_core` treats ids as opaque strings (a library user may
have any), so a model's own metadata lists them as decimal strings; `item_ids_of`
converts at that boundary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from state.ids import utc_now

MANIFEST_VERSION = 1


class DatasetSummary(TypedDict, total=False):
    id: str
    name: str
    tenant: str
    created_at: str
    updated_at: str
    num_items: int
    classes: list[str]
    class_counts: dict[str, int]
    stored_bytes: int  # the directory's size when last written (per-tenant storage limit)
    upload_warnings: list[str]  # what its uploads looked wrong in (app.datasets.archive)


class ModelRecord(TypedDict, total=False):
    id: str
    tenant: str
    job_id: str
    dataset_id: str
    method: str
    backbone: str
    classes: list[str]
    metrics: dict[str, float]
    hyperparameters: dict[str, Any]  # the model's full TrainConfig
    model_version: str  # sha256 of the artifact
    created_at: str
    parent_id: str | None  # the model a forget job derived this one from
    forgotten_item_ids: list[int]
    name: str | None  # the model name (state.registry) this model is a version of
    version: int | None
    training: dict[str, Any]  # how the fit went (worker.jobs.models.training_summary)


@dataclass
class ManifestItem:
    id: int
    label: str
    filename: str  # as the user named it in the upload
    file: str  # path of the stored image, relative to the dataset directory


class ItemsGone(LookupError):
    """Items a model was trained on are no longer in its dataset, or have other labels."""


@dataclass
class DatasetManifest:
    """Every item of a dataset. Excluded items (forgotten by a model) stay listed, with
    a log of who excluded them, but no later training uses them."""

    items: list[ManifestItem]
    next_item_id: int
    excluded: list[int] = field(default_factory=list)
    exclusions: list[dict[str, Any]] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    @classmethod
    def new(cls, items: list[ManifestItem]) -> DatasetManifest:
        return cls(items=items, next_item_id=len(items))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetManifest:
        return cls(items=[ManifestItem(**it) for it in data["items"]],
                   next_item_id=int(data["next_item_id"]),
                   excluded=[int(i) for i in data.get("excluded", [])],
                   exclusions=list(data.get("exclusions", [])),
                   version=int(data.get("version", MANIFEST_VERSION)))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def is_excluded(self, item_id: int) -> bool:
        return item_id in set(self.excluded)

    def active_items(self) -> list[ManifestItem]:
        """The items a new training job uses: all but the excluded ones."""
        excluded = set(self.excluded)
        return [it for it in self.items if it.id not in excluded]

    def append(self, items: list[ManifestItem]) -> None:
        self.items.extend(items)
        self.next_item_id += len(items)

    def exclude(self, item_ids: Iterable[int], reason: dict[str, Any]) -> None:
        ids = sorted(set(item_ids))
        self.excluded = sorted(set(self.excluded) | set(ids))
        self.exclusions.append({"item_ids": ids, "at": utc_now(), **reason})

    def summary(self, meta: DatasetSummary) -> DatasetSummary:
        """`meta` with counts of the active items."""
        counts = Counter(it.label for it in self.active_items())
        return {**meta, "num_items": sum(counts.values()), "classes": sorted(counts),
                "class_counts": dict(sorted(counts.items())), "updated_at": utc_now()}

    def resolve(self, item_ids: Sequence[int], class_names: Sequence[str],
                root: Path) -> tuple[list[Path], list[int], list[str]]:
        """(image files, class indices, labels) of items, in the order of `item_ids`.
        ItemsGone if an item left the dataset or its label is not one of `class_names`."""
        by_id = {it.id: it for it in self.items}
        missing = [i for i in item_ids if i not in by_id]
        if missing:
            raise ItemsGone(f"items {missing[:10]} of the model's training data are no "
                            "longer in the dataset")
        index = {name: k for k, name in enumerate(class_names)}
        labels = [by_id[i].label for i in item_ids]
        strange = sorted(set(labels) - set(index))
        if strange:
            raise ItemsGone(f"labels {strange} are not classes of the model")
        return ([root / by_id[i].file for i in item_ids], [index[label] for label in labels],
                labels)


def item_ids_of(model_info: dict[str, Any], *splits: str) -> list[int]:
    """A trained model's item ids (decimal strings in its metadata) as dataset item ids;
    `splits` are metadata keys, e.g. "train_item_ids"."""
    return [int(i) for split in splits for i in model_info.get(split, [])]
