"""The artifact store: datasets and models as plain files under one directory.

Layout (the directory is a shared volume in compose, so every worker and api sees it):
    datasets/{id}/dataset.json   summary: tenant, name, classes, counts (cheap to list)
    datasets/{id}/manifest.json  every item: stable id, label, original filename, file
    datasets/{id}/images/        the uploaded bytes, one file per item
    models/{id}/record.json      tenant, source job and dataset, classes, metrics, version
    models/{id}/model.*          what lqf_core.artifacts.save_model wrote
    .tmp/                        staging: everything is built here, then renamed into place,
                                 so a reader never sees half a dataset or model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from state.ids import is_valid_id
from state.records import DatasetManifest, DatasetSummary, ModelRecord


def directory_bytes(path: Path) -> int:
    """The size of every file under `path` (0 if it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


RECORD_CACHE_SIZE = 1024


class ArtifactStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.datasets = self.root / "datasets"
        self.models = self.root / "models"
        self.tmp = self.root / ".tmp"
        # Model records never change once published (staged, then renamed into place), so
        # a parsed record stays valid while its file is the same one: /predict reads the
        # record on every request, and a stat is cheaper than a read and a parse.
        self._records: dict[str, tuple[tuple[int, int], ModelRecord]] = {}

    def ensure(self) -> ArtifactStore:
        for path in (self.datasets, self.models, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        return self

    # -- staging ------------------------------------------------------------------
    def make_staging_dir(self, prefix: str) -> Path:
        self.ensure()
        return Path(tempfile.mkdtemp(prefix=prefix + "-", dir=self.tmp))

    def clean_staging(self, max_age_s: float = 24 * 3600) -> None:
        """Drop what crashed writers left in .tmp (old enough that no writer still owns it)."""
        if not self.tmp.is_dir():
            return
        cutoff = time.time() - max_age_s
        for path in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime < cutoff:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink()

    def commit(self, staging: Path, final: Path) -> None:
        """Move a fully written staging directory into place (same filesystem: atomic)."""
        os.rename(staging, final)

    def remove(self, path: Path) -> None:
        """Make a directory disappear at once (rename), then delete it at leisure."""
        if not path.exists():
            return
        trash = self.tmp / f"trash-{uuid.uuid4().hex}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # -- datasets -------------------------------------------------------------------
    def dataset_dir(self, dataset_id: str) -> Path:
        if not is_valid_id(dataset_id, "ds"):
            raise KeyError(dataset_id)
        return self.datasets / dataset_id

    def dataset_meta(self, dataset_id: str) -> DatasetSummary | None:
        try:
            return cast(DatasetSummary, read_json(self.dataset_dir(dataset_id) / "dataset.json"))
        except (KeyError, FileNotFoundError):
            return None

    def tenant_dataset(self, tenant: str, dataset_id: str) -> DatasetSummary | None:
        """The dataset's summary if it exists and belongs to `tenant`, else None."""
        meta = self.dataset_meta(dataset_id)
        return meta if meta is not None and meta.get("tenant") == tenant else None

    def manifest(self, dataset_id: str) -> DatasetManifest:
        return DatasetManifest.from_json(read_json(self.dataset_dir(dataset_id) / "manifest.json"))

    def write_dataset(self, directory: Path, manifest: DatasetManifest,
                      meta: DatasetSummary) -> DatasetSummary:
        """Write manifest, then the summary computed from it, into a dataset directory
        (a staging one, or the live one under `dataset_lock`) -> the summary."""
        summary = manifest.summary(meta)
        write_json(directory / "manifest.json", manifest.to_json())
        write_json(directory / "dataset.json", summary)
        return summary

    def tenant_stored_bytes(self, tenant: str) -> int:
        """What the tenant's datasets and models take on disk (per-tenant storage limit).
        A dataset records its size as it is written; older ones are measured."""
        total = 0
        for meta in self.list_dataset_metas(tenant):
            recorded = meta.get("stored_bytes")
            total += int(recorded) if isinstance(recorded, int) else \
                directory_bytes(self.dataset_dir(meta["id"]))
        for record in self.list_model_records(tenant):
            total += directory_bytes(self.model_dir(record["id"]))
        return total

    def list_dataset_metas(self, tenant: str) -> list[DatasetSummary]:
        return cast(list[DatasetSummary], self._list(self.datasets, "dataset.json", tenant))

    @contextlib.contextmanager
    def dataset_lock(self, dataset_id: str) -> Iterator[None]:
        """Serialise writers of one dataset (appends) across threads and processes."""
        lock_path = self.dataset_dir(dataset_id) / ".lock"
        with open(lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def training_items(self, dataset_id: str
                       ) -> tuple[list[Path], list[int], list[str], list[str]]:
        """(image paths, label indices, class names, item ids as lqf_core's strings) of
        the items a new training job uses, in the same order."""
        items = self.manifest(dataset_id).active_items()
        class_names = sorted({it.label for it in items})
        index = {name: i for i, name in enumerate(class_names)}
        root = self.dataset_dir(dataset_id)
        return ([root / it.file for it in items], [index[it.label] for it in items],
                class_names, [str(it.id) for it in items])

    # -- models ---------------------------------------------------------------------
    def model_dir(self, model_id: str) -> Path:
        if not is_valid_id(model_id, "mdl"):
            raise KeyError(model_id)
        return self.models / model_id

    def self_influence_path(self, model_id: str) -> Path:
        """A model's cross-fitted mislabel scores (a self-influence job's result)."""
        return self.model_dir(model_id) / "self_influence.json"

    def ranking_path(self, model_id: str, job_id: str) -> Path:
        """A rank job's result: the items of a dataset to label next under the model."""
        if not is_valid_id(job_id, "job"):
            raise KeyError(job_id)
        return self.model_dir(model_id) / "rankings" / f"{job_id}.json"

    def model_record(self, model_id: str) -> ModelRecord | None:
        try:
            path = self.model_dir(model_id) / "record.json"
            stat = path.stat()
            key = (stat.st_ino, stat.st_mtime_ns)
            cached = self._records.get(model_id)
            if cached is not None and cached[0] == key:
                return cached[1]
            record = read_json(path)
        except (KeyError, FileNotFoundError):
            self._records.pop(model_id, None)
            return None
        if len(self._records) >= RECORD_CACHE_SIZE:
            self._records.pop(next(iter(self._records)))
        self._records[model_id] = (key, record)
        return record

    def tenant_model(self, tenant: str, model_id: str) -> ModelRecord | None:
        """The model's record if it exists and belongs to `tenant`, else None."""
        record = self.model_record(model_id)
        return record if record is not None and record.get("tenant") == tenant else None

    def list_model_records(self, tenant: str) -> list[ModelRecord]:
        return cast(list[ModelRecord], self._list(self.models, "record.json", tenant))

    def _list(self, parent: Path, filename: str, tenant: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not parent.is_dir():
            return out
        for child in parent.iterdir():
            try:
                meta = read_json(child / filename)
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                continue
            if meta.get("tenant") == tenant:
                out.append(meta)
        out.sort(key=lambda m: (m.get("created_at", ""), m["id"]), reverse=True)
        return out
