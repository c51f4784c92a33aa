"""`label_studio_train` jobs: a Label Studio project's annotations -> a dataset snapshot
-> a model -> the next version of the connection's model name -> its review in Label
Studio (worker.jobs.label_studio_review).

The snapshot is an ordinary dataset of the tenant (so every query on the model works as
on any other) plus `source.json`: which Label Studio, which project, and for each item
the task id, the annotation id and the label it gave, so the training set can be traced
and reproduced. Files are fetched from the connection's Label Studio only.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any

import httpx

from lqf_core.errors import TrainingCancelled
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
from worker.jobs.label_studio_client import FETCH_TIMEOUT_S, export_tasks, fetch_image
from worker.jobs.label_studio_review import publish_review
from worker.jobs.train import compute_training
from worker.lifecycle import JobContext, JobFailure, Outcome, Undo


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
    conn = ConnectionStore(context.artifacts).by_id(job["tenant"], job["connection_id"])
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
        tasks = export_tasks(client, conn)
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
                data, suffix = fetch_image(client, base, source, task.get("id"))
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
