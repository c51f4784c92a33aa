"""The artifact store: datasets and models as plain files under one directory.

Layout (the directory is a shared volume in compose, so every worker and api sees it;
with object storage, `LQF_ARTIFACTS=s3://...`, it is each host's verified local copy and
the bucket holds the same layout, see state/remote.py):
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
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from state.ids import is_valid_id
from state.locks import FileLocks, Locks
from state.records import DatasetManifest, DatasetSummary, ModelRecord
from state.remote import RemoteStore, Tree


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


def ranking_file(job_id: str) -> str:
    """Where in its model's directory a rank job's result is."""
    if not is_valid_id(job_id, "job"):
        raise KeyError(job_id)
    return f"rankings/{job_id}.json"


SELF_INFLUENCE_FILE = "self_influence.json"
RECORD_CACHE_SIZE = 1024
LOCAL_MARKER = ".tree.json"  # the published marker this host's copy matches (never sent)
SUMMARY_FILE = {"datasets": "dataset.json", "models": "record.json"}


class ArtifactStore:
    """Datasets, models and small documents under `root`; with `remote`, object storage
    holds the durable copy and `root` is this host's cache of it (checked against the
    bucket at least every `remote_check_s` for a model, on every read for a dataset)."""

    def __init__(self, root: Path | str, remote: RemoteStore | None = None,
                 locks: Locks | None = None, remote_check_s: float = 2.0):
        self.root = Path(root)
        self.datasets = self.root / "datasets"
        self.models = self.root / "models"
        self.tmp = self.root / ".tmp"
        self.remote = remote
        self.locks: Locks = locks or FileLocks()
        self.remote_check_s = remote_check_s
        self._model_checked: dict[str, float] = {}  # model id -> when its marker was seen
        # Model records never change once published (staged, then renamed into place), so
        # a parsed record stays valid while its file is the same one: /predict reads the
        # record on every request, and a stat is cheaper than a read and a parse.
        self._records: dict[str, tuple[tuple[int, int], ModelRecord]] = {}

    def reachable(self) -> bool:
        """Can this process use the store (readiness): the bucket answers, or the
        directory is there."""
        return self.remote.reachable() if self.remote is not None else self.root.is_dir()

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
        """Move a fully written staging directory into place (same filesystem: atomic).
        With object storage it is published first (files, then the marker)."""
        if self.remote is not None:
            self._publish(staging, final, previous=None)
        os.rename(staging, final)

    def remove(self, path: Path) -> None:
        """Make a directory disappear at once (rename), then delete it at leisure."""
        if self.remote is not None:
            self.remote.remove_tree(self._key(path))
        self._remove_local(path)

    def _remove_local(self, path: Path) -> None:
        if not path.exists():
            return
        trash = self.tmp / f"trash-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):  # another thread got there first
            os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def editing(self, directory: Path) -> Iterator[None]:
        """Change a published dataset or model in place (an append, a label edit, a file
        added to a model): one writer at a time, across hosts; with object storage the
        local copy is brought up to date first and published again after."""
        with self.locks.hold(self._key(directory), directory / ".lock"):
            if self.remote is None:
                yield
                return
            previous = self._sync(directory)
            if previous is None:
                raise FileNotFoundError(directory)
            try:
                yield
            except BaseException:
                # The local copy may now differ from what was published: forget that it
                # matched, so the next read downloads it again.
                (directory / LOCAL_MARKER).unlink(missing_ok=True)
                raise
            self._publish(directory, directory, previous)

    # -- object storage ---------------------------------------------------------------
    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _publish(self, source: Path, final: Path, previous: Tree | None) -> None:
        assert self.remote is not None
        summary = read_json(source / SUMMARY_FILE[final.parent.name])
        tree = self.remote.publish_tree(source, self._key(final), summary, previous)
        write_json(source / LOCAL_MARKER, tree.to_json())

    def _local_tree(self, directory: Path) -> Tree | None:
        try:
            return Tree.from_json(read_json(directory / LOCAL_MARKER))
        except FileNotFoundError:
            return None

    def _sync(self, directory: Path) -> Tree | None:
        """Bring this host's copy of a published tree up to date (download what changed,
        verified by hash) -> its marker; None, and no local copy, if it is not published."""
        assert self.remote is not None
        tree = self.remote.tree(self._key(directory))
        if tree is None:
            self._remove_local(directory)
            return None
        have = self._local_tree(directory)
        if have == tree:
            return tree
        if not directory.is_dir():
            # A first download goes to staging and is renamed into place whole.
            staging = self.make_staging_dir("fetch")
            try:
                self.remote.download_tree(self._key(directory), tree, staging)
                write_json(staging / LOCAL_MARKER, tree.to_json())
                with contextlib.suppress(OSError):  # another thread fetched it meanwhile
                    os.rename(staging, directory)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if self._local_tree(directory) == tree:
                return tree
            have = self._local_tree(directory)
        # An update (files added, summaries rewritten): file by file, each replaced whole.
        self.remote.download_tree(self._key(directory), tree, directory, have)
        write_json(directory / LOCAL_MARKER, tree.to_json())
        return tree

    def _remote_listing(self, folder: str, tenant: str) -> list[tuple[dict[str, Any], int]]:
        assert self.remote is not None
        out = [(tree.summary, tree.size) for tree in self.remote.trees(folder)
               if tree.summary.get("tenant") == tenant]
        out.sort(key=lambda m: (m[0].get("created_at", ""), m[0]["id"]), reverse=True)
        return out

    # -- small documents (model names, Label Studio connections) ------------------------
    def read_doc(self, path: Path) -> Any:
        """A JSON document of the store; FileNotFoundError if there is none."""
        if self.remote is None:
            return read_json(path)
        data = self.remote.get_json(self._key(path))
        if data is None:
            raise FileNotFoundError(path)
        return data

    def write_doc(self, path: Path, data: Any) -> None:
        if self.remote is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, data)
        else:
            self.remote.put_json(self._key(path), data)

    def delete_doc(self, path: Path) -> None:
        if self.remote is None:
            path.unlink(missing_ok=True)
        else:
            self.remote.delete(self._key(path))

    def list_docs(self, folder: Path) -> list[Any]:
        """Every `*.json` document directly in `folder`, by name."""
        if self.remote is None:
            return [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() \
                else []
        names = [n for n in self.remote.children(self._key(folder)) if n.endswith(".json")]
        docs = [self.remote.get_json(f"{self._key(folder)}/{n}") for n in names]
        return [d for d in docs if d is not None]

    def doc_lock(self, path: Path) -> contextlib.AbstractContextManager[None]:
        """Serialise read-modify-write of one document (lock file beside it)."""
        return self.locks.hold(self._key(path), path.with_suffix(".lock"))

    # -- datasets -------------------------------------------------------------------
    def dataset_dir(self, dataset_id: str) -> Path:
        if not is_valid_id(dataset_id, "ds"):
            raise KeyError(dataset_id)
        return self.datasets / dataset_id

    def dataset_meta(self, dataset_id: str) -> DatasetSummary | None:
        try:
            directory = self.dataset_dir(dataset_id)
            if self.remote is not None:
                tree = self.remote.tree(self._key(directory))
                return None if tree is None else cast(DatasetSummary, tree.summary)
            return cast(DatasetSummary, read_json(directory / "dataset.json"))
        except (KeyError, FileNotFoundError):
            return None

    def local_dataset(self, dataset_id: str) -> Path:
        """The dataset's directory on this host, up to date with object storage."""
        directory = self.dataset_dir(dataset_id)
        if self.remote is not None and self._sync(directory) is None:
            raise FileNotFoundError(directory)
        return directory

    def tenant_dataset(self, tenant: str, dataset_id: str) -> DatasetSummary | None:
        """The dataset's summary if it exists and belongs to `tenant`, else None."""
        meta = self.dataset_meta(dataset_id)
        return meta if meta is not None and meta.get("tenant") == tenant else None

    def manifest(self, dataset_id: str) -> DatasetManifest:
        return DatasetManifest.from_json(read_json(self.local_dataset(dataset_id) /
                                                   "manifest.json"))

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
        if self.remote is not None:
            return sum(size for folder in ("datasets", "models")
                       for _, size in self._remote_listing(folder, tenant))
        total = 0
        for meta in self.list_dataset_metas(tenant):
            recorded = meta.get("stored_bytes")
            total += int(recorded) if isinstance(recorded, int) else \
                directory_bytes(self.dataset_dir(meta["id"]))
        for record in self.list_model_records(tenant):
            total += directory_bytes(self.model_dir(record["id"]))
        return total

    def list_dataset_metas(self, tenant: str) -> list[DatasetSummary]:
        if self.remote is not None:
            return [cast(DatasetSummary, m) for m, _ in self._remote_listing("datasets", tenant)]
        return cast(list[DatasetSummary], self._list(self.datasets, "dataset.json", tenant))

    def dataset_lock(self, dataset_id: str) -> contextlib.AbstractContextManager[None]:
        """Serialise writers of one dataset (appends, label edits) across threads,
        processes and hosts."""
        return self.editing(self.dataset_dir(dataset_id))

    def training_items(self, dataset_id: str
                       ) -> tuple[list[Path], list[int], list[str], list[str]]:
        """(image paths, label indices, class names, item ids as lqf_core's strings) of
        the items a new training job uses, in the same order."""
        items = self.manifest(dataset_id).active_items()  # brings the local copy up to date
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
        return self.model_dir(model_id) / SELF_INFLUENCE_FILE

    def ranking_path(self, model_id: str, job_id: str) -> Path:
        """A rank job's result: the items of a dataset to label next under the model."""
        return self.model_dir(model_id) / ranking_file(job_id)

    def read_model_json(self, model_id: str, relative: str) -> Any:
        """A JSON file of a model (its cross-fitted scores, a ranking). With object storage
        a file another host added since this one last checked is fetched on a miss."""
        path = self.model_dir(model_id) / relative
        if self.remote is not None and self.model_record(model_id) is None:
            raise FileNotFoundError(path)
        try:
            return read_json(path)
        except FileNotFoundError:
            if self.remote is None:
                raise
        self._model_checked.pop(model_id, None)
        if self.model_record(model_id) is None:
            raise FileNotFoundError(path)
        return read_json(path)

    def write_model_json(self, model_id: str, relative: str, data: Any) -> Path:
        """Add (or replace) a JSON file of a published model -> its local path."""
        directory = self.model_dir(model_id)
        with self.editing(directory):
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, data)
        return path

    def delete_model_file(self, model_id: str, relative: str) -> None:
        directory = self.model_dir(model_id)
        with contextlib.suppress(FileNotFoundError), self.editing(directory):
            (directory / relative).unlink(missing_ok=True)

    def _checked_model(self, model_id: str) -> bool:
        """With object storage: is the model (still) published? Its local copy is
        fetched or updated when needed; a copy of a deleted model is dropped. A host
        trusts what it saw for `remote_check_s`, the most a deletion takes to reach it."""
        now = time.monotonic()
        if now - self._model_checked.get(model_id, -math.inf) < self.remote_check_s:
            return True
        if self._sync(self.model_dir(model_id)) is None:
            self._model_checked.pop(model_id, None)
            return False
        if len(self._model_checked) >= RECORD_CACHE_SIZE:
            self._model_checked.pop(next(iter(self._model_checked)))
        self._model_checked[model_id] = now
        return True

    def model_record(self, model_id: str) -> ModelRecord | None:
        try:
            if self.remote is not None and not self._checked_model(model_id):
                self._records.pop(model_id, None)
                return None
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
        if self.remote is not None:
            return [cast(ModelRecord, m) for m, _ in self._remote_listing("models", tenant)]
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
