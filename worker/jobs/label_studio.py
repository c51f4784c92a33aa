"""`label_studio_train` jobs: a Label Studio project's annotations -> a dataset snapshot
-> a model -> the next version of the connection's model name -> its review in Label
Studio (worker.jobs.label_studio_review).

The snapshot is an ordinary dataset of the tenant (so every query on the model works as
on any other) plus `source.json`: which Label Studio, which project, and for each item
the task id, the annotation id and the label it gave, so the training set can be traced
and reproduced. Files are fetched from the connection's Label Studio only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import shutil
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from lqf_core.data import IMAGE_SUFFIXES, open_image
from lqf_core.errors import InvalidDataError, TrainingCancelled
from lqf_core.train import Progress
from state.artifacts import ArtifactStore, write_json
from state.connections import Connection, ConnectionStore
from state.ids import new_id, utc_now
from state.labelstudio import (
    LabelStudioFormatError,
    annotated_label,
    parse_label_config,
    task_image,
)
from state.records import DatasetManifest, ManifestItem
from worker.jobs.label_studio_review import publish_review
from worker.jobs.train import compute_training
from worker.lifecycle import JobContext, JobFailure, Outcome, Undo

FETCH_TIMEOUT_S = 30.0
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_TASKS = 20_000


def compute_label_studio_training(job: dict[str, Any], context: JobContext) -> Outcome:
    dataset_id = import_project(_connection(job, context), context)
    outcome = compute_training({**job, "dataset_id": dataset_id}, context)

    def review(result: dict[str, str]) -> None:  # the new version's review -> Label Studio
        publish_review(job, result["model_id"], context.artifacts, context.settings)

    return dataclasses.replace(outcome, after_success=review)


def compute_label_studio_import(job: dict[str, Any], context: JobContext) -> Outcome:
    """Only the snapshot: a dataset to train on with POST /jobs."""
    dataset_id = import_project(_connection(job, context), context)
    items = float(len(context.artifacts.manifest(dataset_id).items))

    def store(artifacts: ArtifactStore) -> tuple[dict[str, str], Undo]:
        return ({"dataset_id": dataset_id},
                lambda: artifacts.remove(artifacts.dataset_dir(dataset_id)))

    return Outcome({"items": items}, store)


def _connection(job: dict[str, Any], context: JobContext) -> Connection:
    conn = ConnectionStore(context.artifacts.root).by_id(job["tenant"], job["connection_id"])
    if conn is None:
        raise JobFailure("connection_not_found",
                         f"Label Studio connection {job['connection_id']} was deleted")
    if not conn.label_studio_url or conn.project is None or not conn.label_config:
        raise JobFailure("not_set_up", "Label Studio has not called /setup on this "
                                       "connection yet: connect it in the project's settings")
    return conn


def import_project(conn: Connection, context: JobContext) -> str:
    """Export the project's annotated tasks, download their images, store the snapshot
    as a new dataset -> its id."""
    try:
        control = parse_label_config(conn.label_config or "")
    except LabelStudioFormatError as exc:
        raise JobFailure("invalid_label_config", str(exc)) from None
    context.progress(Progress("import", 0, 1))
    headers = {"Authorization": f"Token {conn.access_token}"} if conn.access_token else {}
    base = (conn.label_studio_url or "").rstrip("/") + "/"
    with httpx.Client(base_url=base, headers=headers, timeout=FETCH_TIMEOUT_S,
                      follow_redirects=False) as client:
        tasks = _export(client, conn)
        labelled = []
        for task in tasks:
            found = annotated_label(task, control) if isinstance(task, dict) else None
            if found is not None:
                labelled.append((task, *found))
        classes = sorted({label for _, _, label in labelled})
        if len(classes) < 2:
            raise JobFailure("invalid_data", f"project {conn.project} has {len(labelled)} "
                             f"annotated task(s) in {len(classes)} class(es) {classes}; "
                             "training needs at least 2 classes")
        artifacts = context.artifacts
        staging = artifacts.make_staging_dir("ls-import")
        try:
            (staging / "images").mkdir()
            items, provenance = [], []
            for index, (task, annotation_id, label) in enumerate(labelled):
                if context.should_stop():
                    raise TrainingCancelled("cancelled while importing")
                source = task_image(task, control)
                data, suffix = _fetch(client, base, source, task.get("id"))
                (staging / "images" / f"{index}{suffix}").write_bytes(data)
                items.append(ManifestItem(id=index, label=label,
                                          filename=f"task-{task.get('id')}{suffix}",
                                          file=f"images/{index}{suffix}"))
                provenance.append({"item_id": index, "task_id": task.get("id"),
                                   "annotation_id": annotation_id, "label": label,
                                   "image": source if not source.startswith("data:")
                                   else "data URI"})
                context.progress(Progress("import", index + 1, len(labelled)))
            dataset_id = new_id("ds")
            write_json(staging / "source.json", {
                "label_studio_url": conn.label_studio_url, "project": conn.project,
                "connection_id": conn.id, "exported_at": utc_now(), "items": provenance})
            artifacts.write_dataset(staging, DatasetManifest.new(items), {
                "id": dataset_id, "tenant": conn.tenant, "created_at": utc_now(),
                "name": f"{conn.name} (Label Studio project {conn.project})"})
            artifacts.commit(staging, artifacts.dataset_dir(dataset_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dataset_id


def _export(client: httpx.Client, conn: Connection) -> list[Any]:
    try:
        r = client.get(f"api/projects/{conn.project}/export", params={"exportType": "JSON"})
    except httpx.HTTPError as exc:
        raise JobFailure("label_studio_unreachable", f"could not reach Label Studio at "
                         f"{conn.label_studio_url} ({type(exc).__name__})") from None
    if r.status_code != 200:
        raise JobFailure("label_studio_error", f"Label Studio answered the export of project "
                         f"{conn.project} with HTTP {r.status_code}: {r.text[:200]}")
    tasks = r.json()
    if not isinstance(tasks, list) or len(tasks) > MAX_TASKS:
        raise JobFailure("label_studio_error", "the export is not a list of at most "
                         f"{MAX_TASKS} tasks")
    return tasks


def _fetch(client: httpx.Client, base: str, source: str, task_id: Any) -> tuple[bytes, str]:
    """(bytes, file suffix) of a task's image: a data URI, or a file on the connection's
    Label Studio (any other address is refused: no request goes where a task says)."""
    where = f"task {task_id}"
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise JobFailure("invalid_data", f"{where}: the data URI is not base64") from None
        suffix = "." + header.removeprefix("data:image/").split(";")[0]
    else:
        url = urljoin(base, source)
        if urlsplit(url)[:2] != urlsplit(base)[:2]:
            raise JobFailure("invalid_data", f"{where}: {source[:100]} is not on the connected "
                                             f"Label Studio ({base}); it is not fetched")
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise JobFailure("label_studio_error",
                                 f"{where}: {url} answered HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_IMAGE_BYTES:
                    raise JobFailure("invalid_data", f"{where}: image over {MAX_IMAGE_BYTES} B")
        data = bytes(body)
        suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    if suffix.lower() not in IMAGE_SUFFIXES:
        suffix = ".png"
    try:
        open_image(data, name=where)  # decodable, not a decompression bomb
    except InvalidDataError as exc:
        raise JobFailure("invalid_data", str(exc)) from None
    return data, suffix.lower()
