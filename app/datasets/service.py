"""Datasets in the artifact store: create from a zip, append, list, exclude, delete."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

from app.config import Settings
from app.datasets.archive import LabelFrom, Limits, extract, open_zip, scan
from app.errors import ApiError, not_found
from app.limits import admit_bytes
from state.artifacts import ArtifactStore, directory_bytes, read_json
from state.ids import new_id, utc_now
from state.records import DatasetManifest, DatasetSummary, ManifestItem


def _limits(settings: Settings) -> Limits:
    return Limits(settings.max_archive_files, settings.max_uncompressed_bytes)


def class_warnings(classes: list[str]) -> list[str]:
    """Class names that differ only in letter case: most likely one class typed two ways
    (labels are kept as given, so they train as separate classes)."""
    spellings: dict[str, list[str]] = {}
    for name in classes:
        spellings.setdefault(name.casefold(), []).append(name)
    return [f"classes {' and '.join(repr(n) for n in sorted(names))} differ only in letter "
            f"case and are kept as {len(names)} classes; rename them to one if they are one"
            for names in spellings.values() if len(names) > 1]


# The upload warnings a dataset keeps (its page shows them), newest last.
MAX_UPLOAD_WARNINGS = 10


def dataset_warnings(meta: DatasetSummary) -> list[str]:
    """What the dataset page shows: its class names' warnings, then its uploads'."""
    return class_warnings(meta["classes"]) + list(meta.get("upload_warnings", []))


def get_meta(store: ArtifactStore, tenant: str, dataset_id: str) -> DatasetSummary:
    meta = store.tenant_dataset(tenant, dataset_id)
    if meta is None:
        raise not_found("dataset", dataset_id)
    return meta


def _deadline(settings: Settings, started: float) -> float:
    return started + settings.upload_process_timeout_s


def create(store: ArtifactStore, settings: Settings, tenant: str, upload: IO[bytes],
           name: str, label_from: LabelFrom = LabelFrom.PARENT
           ) -> tuple[DatasetSummary, list[str], list[str]]:
    """-> (summary, ignored files, this upload's warnings)."""
    started = time.monotonic()
    with open_zip(upload) as zf:
        entries, ignored, warnings = scan(zf, _limits(settings), label_from)
        admit_bytes(store, settings, tenant, sum(e.info.file_size for e in entries))
        classes = sorted({e.label for e in entries})
        if len(classes) < 2:
            raise ApiError(422, f"a dataset needs at least 2 classes, found {len(classes)} "
                                f"({', '.join(classes)})", "too_few_classes")
        dataset_id = new_id("ds")
        staging = store.make_staging_dir("dataset")
        try:
            items = extract(zf, entries, staging / "images", first_id=0,
                            deadline=_deadline(settings, started))
            meta = store.write_dataset(staging, DatasetManifest.new(items), {
                "id": dataset_id, "name": name, "tenant": tenant, "created_at": utc_now(),
                "stored_bytes": directory_bytes(staging), "upload_warnings": warnings})
            store.commit(staging, store.dataset_dir(dataset_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return meta, ignored, warnings


def append(store: ArtifactStore, settings: Settings, tenant: str, dataset_id: str,
           upload: IO[bytes], label_from: LabelFrom = LabelFrom.PARENT
           ) -> tuple[DatasetSummary, list[ManifestItem], list[str], list[str]]:
    """-> (summary, the items added, ignored files, this upload's warnings)."""
    started = time.monotonic()
    get_meta(store, tenant, dataset_id)
    with open_zip(upload) as zf:
        entries, ignored, warnings = scan(zf, _limits(settings), label_from)
        admit_bytes(store, settings, tenant, sum(e.info.file_size for e in entries))
        root = store.dataset_dir(dataset_id)
        with store.dataset_lock(dataset_id):
            manifest = store.manifest(dataset_id)
            total = len(manifest.items) + len(entries)
            if total > settings.max_archive_files:
                raise ApiError(413, f"the dataset would hold {total} items, the limit is "
                                    f"{settings.max_archive_files}", "too_many_files")
            staging = store.make_staging_dir("append")
            try:
                added = extract(zf, entries, staging, first_id=manifest.next_item_id,
                                deadline=_deadline(settings, started))
                # Images first, manifest last: a crash in between leaves unreferenced files,
                # never a manifest pointing at a missing image.
                for item in added:
                    os.rename(staging / Path(item.file).name, root / item.file)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            manifest.append(added)
            old = store.dataset_meta(dataset_id) or {}
            kept = [w for w in old.get("upload_warnings", []) if w not in warnings] + warnings
            meta = store.write_dataset(root, manifest, {
                **old, "stored_bytes": directory_bytes(root),
                "upload_warnings": kept[-MAX_UPLOAD_WARNINGS:]})
    return meta, added, ignored, warnings


def list_items(store: ArtifactStore, tenant: str, dataset_id: str, limit: int,
               offset: int) -> tuple[list[dict[str, Any]], int]:
    get_meta(store, tenant, dataset_id)
    manifest = store.manifest(dataset_id)
    excluded = set(manifest.excluded)
    items = [{"id": it.id, "label": it.label, "filename": it.filename,
              "excluded": it.id in excluded} for it in manifest.items[offset:offset + limit]]
    return items, len(manifest.items)


def item_file(store: ArtifactStore, tenant: str, dataset_id: str, item_id: int) -> Path:
    get_meta(store, tenant, dataset_id)
    for item in store.manifest(dataset_id).items:
        if item.id == item_id:
            return store.dataset_dir(dataset_id) / item.file
    raise not_found("item", str(item_id))


def source(store: ArtifactStore, tenant: str, dataset_id: str) -> dict[str, Any]:
    get_meta(store, tenant, dataset_id)
    try:
        data: dict[str, Any] = read_json(store.local_dataset(dataset_id) / "source.json")
    except FileNotFoundError:
        raise ApiError(404, f"dataset {dataset_id} was uploaded, not imported: it has no "
                            "source record", "no_source") from None
    return data


def delete(store: ArtifactStore, tenant: str, dataset_id: str) -> None:
    get_meta(store, tenant, dataset_id)
    store.remove(store.dataset_dir(dataset_id))


def exclude(store: ArtifactStore, dataset_id: str, item_ids: list[int],
            reason: dict[str, Any]) -> DatasetSummary:
    """Record items as excluded from later training (unlearning) -> the new summary."""
    with store.dataset_lock(dataset_id):
        manifest = store.manifest(dataset_id)
        manifest.exclude(item_ids, reason)
        return store.write_dataset(store.dataset_dir(dataset_id), manifest,
                                   store.dataset_meta(dataset_id) or {})
