"""Datasets in the artifact store: create from a zip, append, list, delete."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import IO, Any

from app.config import Settings
from app.datasets.archive import Limits, extract, open_zip, scan
from app.errors import ApiError, not_found
from worker.store import ArtifactStore, new_id, utc_now, write_json


def _limits(settings: Settings) -> Limits:
    return Limits(settings.max_archive_files, settings.max_uncompressed_bytes)


def _summary(meta: dict[str, Any], items: list[dict[str, Any]],
             excluded: set[int]) -> dict[str, Any]:
    counts = Counter(it["label"] for it in items if it["id"] not in excluded)
    return {**meta, "num_items": sum(counts.values()), "classes": sorted(counts),
            "class_counts": dict(sorted(counts.items())), "updated_at": utc_now()}


def get_meta(store: ArtifactStore, tenant: str, dataset_id: str) -> dict[str, Any]:
    meta = store.dataset_meta(dataset_id)
    if meta is None or meta.get("tenant") != tenant:
        raise not_found("dataset", dataset_id)
    return meta


def create(store: ArtifactStore, settings: Settings, tenant: str, upload: IO[bytes],
           name: str) -> tuple[dict[str, Any], list[str]]:
    with open_zip(upload) as zf:
        entries, ignored = scan(zf, _limits(settings))
        classes = sorted({e.label for e in entries})
        if len(classes) < 2:
            raise ApiError(422, f"a dataset needs at least 2 classes, found {len(classes)} "
                                f"({', '.join(classes)})", "too_few_classes")
        dataset_id = new_id("ds")
        staging = store.make_staging_dir("dataset")
        try:
            items = extract(zf, entries, staging / "images", first_id=0)
            manifest = {"version": 1, "next_item_id": len(items), "items": items, "excluded": []}
            write_json(staging / "manifest.json", manifest)
            now = utc_now()
            meta = _summary({"id": dataset_id, "name": name, "tenant": tenant,
                             "created_at": now}, items, set())
            write_json(staging / "dataset.json", meta)
            store.commit(staging, store.dataset_dir(dataset_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return meta, ignored


def append(store: ArtifactStore, settings: Settings, tenant: str, dataset_id: str,
           upload: IO[bytes]) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    get_meta(store, tenant, dataset_id)
    with open_zip(upload) as zf:
        entries, ignored = scan(zf, _limits(settings))
        root = store.dataset_dir(dataset_id)
        with store.dataset_lock(dataset_id):
            manifest = store.manifest(dataset_id)
            total = len(manifest["items"]) + len(entries)
            if total > settings.max_archive_files:
                raise ApiError(413, f"the dataset would hold {total} items, the limit is "
                                    f"{settings.max_archive_files}", "too_many_files")
            staging = store.make_staging_dir("append")
            try:
                added = extract(zf, entries, staging, first_id=manifest["next_item_id"])
                # Images first, manifest last: a crash in between leaves unreferenced files,
                # never a manifest pointing at a missing image.
                for item in added:
                    os.rename(staging / Path(str(item["file"])).name, root / str(item["file"]))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            manifest["items"].extend(added)
            manifest["next_item_id"] += len(added)
            write_json(root / "manifest.json", manifest)
            meta = _summary(store.dataset_meta(dataset_id) or {}, manifest["items"],
                            set(manifest.get("excluded", [])))
            write_json(root / "dataset.json", meta)
    return meta, added, ignored


def list_items(store: ArtifactStore, tenant: str, dataset_id: str, limit: int,
               offset: int) -> tuple[list[dict[str, Any]], int]:
    get_meta(store, tenant, dataset_id)
    manifest = store.manifest(dataset_id)
    excluded = set(manifest.get("excluded", []))
    items = [{**it, "excluded": it["id"] in excluded} for it in manifest["items"]]
    return items[offset : offset + limit], len(items)


def item_file(store: ArtifactStore, tenant: str, dataset_id: str, item_id: int) -> Path:
    get_meta(store, tenant, dataset_id)
    for item in store.manifest(dataset_id)["items"]:
        if item["id"] == item_id:
            return store.dataset_dir(dataset_id) / item["file"]
    raise not_found("item", str(item_id))


def delete(store: ArtifactStore, tenant: str, dataset_id: str) -> None:
    get_meta(store, tenant, dataset_id)
    store.remove(store.dataset_dir(dataset_id))


def exclude(store: ArtifactStore, dataset_id: str, item_ids: list[int],
            reason: dict[str, Any]) -> dict[str, Any]:
    """Record items as excluded from later training (unlearning) -> the new summary."""
    root = store.dataset_dir(dataset_id)
    with store.dataset_lock(dataset_id):
        manifest = store.manifest(dataset_id)
        excluded = set(manifest.get("excluded", [])) | set(item_ids)
        manifest["excluded"] = sorted(excluded)
        manifest.setdefault("exclusions", []).append(
            {"item_ids": sorted(item_ids), "at": utc_now(), **reason})
        write_json(root / "manifest.json", manifest)
        meta = _summary(store.dataset_meta(dataset_id) or {}, manifest["items"], excluded)
        write_json(root / "dataset.json", meta)
    return meta
