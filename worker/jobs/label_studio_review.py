"""After a `label_studio_train` job: the new version's review of the annotated tasks,
written into Label Studio, then Label Studio's predict run for the other tasks.

Label Studio keeps only `result`, `score` and `model_version` of what /predict answers,
so a prediction's `mislabeling` and `neighbors` can only arrive through its own API
(`POST /api/predictions`, which takes every field). Each annotated task of the snapshot
(a training item of the new version, or one its job held out) gets one prediction of
that version:
* `result` / `score`: the served model's class for it and that class's probability, as
  /predict would answer;
* `mislabeling`: its mislabel score (lqf_core.review; exact for solver "exact" models);
* `neighbors`: the Label Studio task ids of the training items that most support the
  prediction.
Then the next NEXT_BATCH unlabeled tasks to label (lqf_core.active.select_batch over the
project's unlabeled tasks) get a prediction of that version whose `score` is below any
top-1 probability and rises with the pick order: sorted by prediction score, ascending,
the Data Manager lists the next batch first, in the order chosen, then the other tasks
from the least certain up.
Label Studio's predict run skips tasks that already hold a prediction of the current
version, so the run this step then starts (`retrieve_tasks_predictions`) predicts only
the others, through our /predict, and nothing is stored twice.

Best effort: the version exists whatever happens here; what happened (or the error) is
kept as the connection's `last_review`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from lqf_core.active import SignalNet, head_posterior_of, image_signals, select_batch
from lqf_core.config import Method
from lqf_core.errors import Cancelled, LQFError
from lqf_core.posterior import LQFPosterior
from lqf_core.review import image_features, review_items, training_posterior
from lqf_core.serving import Predictor
from state.artifacts import ArtifactStore, read_json
from state.connections import Connection, ConnectionStore, version_label
from state.ids import utc_now
from state.labelstudio import (
    ChoicesControl,
    LabelStudioFormatError,
    annotated_label,
    choices_prediction,
    parse_label_config,
    task_image,
)
from state.records import item_ids_of
from state.registry import Registry
from worker.config import WorkerSettings
from worker.jobs.label_studio_client import export_tasks, fetch_image
from worker.lifecycle import SHUTTING_DOWN, JobFailure, job_device

log = logging.getLogger("lqf.worker")

WRITE_TIMEOUT_S = 30.0
PREDICT_RUN_TIMEOUT_S = 600.0  # Label Studio's predict run is synchronous: ~0.14 s a task
NEIGHBORS = 5
NEIGHBORS_FOR = 100  # tasks (highest mislabel scores first) that get neighbors
# The next batch to label: this many unlabeled tasks, chosen among the first
# MAX_RANKED_TASKS of the project (each one's image is fetched and read).
NEXT_BATCH = 20
MAX_RANKED_TASKS = 5000
# The review's computation (posterior, scores, neighbors) stops past this: the worker has
# other jobs (about 3 minutes at 1,000 items of MobileNetV2 on two cores).
REVIEW_TIMEOUT_S = 900.0


class ReviewError(Exception):
    pass


def publish_review(job: dict[str, Any], model_id: str, artifacts: ArtifactStore,
                   settings: WorkerSettings) -> None:
    store = ConnectionStore(artifacts)
    conn = store.by_id(job["tenant"], job["connection_id"])
    if conn is None:
        return
    started = time.monotonic()
    failed = {"model_id": model_id, "model_version": None, "tasks": 0, "solver": None}
    try:
        review = _publish(conn, job, model_id, artifacts, settings)
    except (ReviewError, LabelStudioFormatError, LQFError, JobFailure) as exc:
        # LQFError: e.g. the snapshot no longer reproduces the model, a shutdown, or
        # REVIEW_TIMEOUT_S (Cancelled); JobFailure: a task's image could not be read
        review = {**failed, "error": f"{type(exc).__name__}: {exc}"}
    except httpx.HTTPError as exc:
        review = {**failed, "error": f"could not reach Label Studio at "
                                     f"{conn.label_studio_url} ({type(exc).__name__})"}
    review.update(seconds=round(time.monotonic() - started, 2), published_at=utc_now())
    log.info("label studio review", extra={"connection": conn.id, **review})
    with store.updating(conn.key) as c:
        c.last_review = review
        if review.get("error"):
            c.last_error = f"review of {model_id}: {review['error']}"


def _publish(conn: Connection, job: dict[str, Any], model_id: str, artifacts: ArtifactStore,
             settings: WorkerSettings) -> dict[str, Any]:
    entry = Registry(artifacts).get(conn.tenant, conn.name)
    current = entry.current() if entry is not None and entry.versions else None
    if current is None or current.model_id != model_id:
        raise ReviewError(f"{model_id} is not the version {conn.name} serves now; "
                          "Label Studio predicts with that one")
    label = version_label(conn.name, current.version)
    record = artifacts.model_record(model_id)
    if record is None:
        raise ReviewError(f"{model_id} was deleted")
    headers = {"Authorization": f"Token {conn.access_token}"} if conn.access_token else {}
    base = (conn.label_studio_url or "").rstrip("/") + "/"
    predictions: list[dict[str, Any]] = []
    queue: list[dict[str, Any]] = []
    solver, unlabeled = None, 0
    with httpx.Client(base_url=base, headers=headers, timeout=WRITE_TIMEOUT_S,
                      follow_redirects=False) as client:
        if record["method"] == Method.LQF.value:
            review = _review_predictions(conn, record["dataset_id"], model_id, label,
                                         artifacts, job, settings)
            predictions, solver = review.predictions, review.solver
            queue, unlabeled = _next_batch(conn, client, base, review, label)
        for prediction in predictions + queue:
            _expect(client.post("api/predictions", json=prediction), "storing a prediction")
        run = client.post("api/dm/actions", timeout=PREDICT_RUN_TIMEOUT_S,
                          params={"id": "retrieve_tasks_predictions", "project": conn.project},
                          json={"selectedItems": {"all": True, "excluded": []}})
        _expect(run, "its predict run")
        # Label Studio 1.23 shows, and sorts by the score of, only the predictions whose
        # model_version is the project's; adding a backend sets that to the backend's
        # title, which no prediction carries. The new version's predictions now exist,
        # so the project may select them.
        _expect(client.patch(f"api/projects/{conn.project}", json={"model_version": label}),
                "selecting the new version's predictions")
    return {"model_id": model_id, "model_version": label, "tasks": len(predictions),
            "solver": solver, "next_batch": len(queue), "unlabeled": unlabeled, "error": None}


@dataclass
class _Review:
    predictions: list[dict[str, Any]]
    solver: str
    predictor: Predictor
    posterior: LQFPosterior
    control: ChoicesControl
    should_stop: Callable[[], bool]


def _next_batch(conn: Connection, client: httpx.Client, base: str, review: _Review,
                label: str) -> tuple[list[dict[str, Any]], int]:
    """Predictions for the next NEXT_BATCH unlabeled tasks to label (lqf_core.active), with
    scores that sort them first, in pick order, below every other prediction's score ->
    (predictions, unlabeled tasks considered)."""
    tasks = [t for t in export_tasks(client, conn, all_tasks=True)
             if isinstance(t, dict) and annotated_label(t, review.control) is None]
    tasks = tasks[:MAX_RANKED_TASKS]
    model = review.predictor.model
    allowed = [c for c, name in enumerate(model.class_names)
               if not review.control.choices or name in review.control.choices]
    if not tasks or not allowed:  # no class the project could show
        return [], len(tasks)
    images = []
    for t in tasks:
        if review.should_stop():
            raise Cancelled("stopped while fetching the unlabeled tasks' images")
        images.append(fetch_image(client, base, task_image(t, review.control), t.get("id"))[0])
    head = head_posterior_of(review.posterior)
    pool = image_signals(review.predictor, images, should_stop=review.should_stop,
                         net=SignalNet.of_posterior(review.posterior))
    ranking = select_batch(head, pool, NEXT_BATCH, should_stop=review.should_stop)
    out = []
    for rank, i in enumerate(ranking.order):
        outputs = pool.outputs[i]
        predicted = max(allowed, key=lambda c: float(outputs[c]))
        # Below 1 / C, the least a top-1 probability (the other tasks' score) can be.
        score = (rank + 1) / ((len(ranking.order) + 1) * model.num_classes)
        out.append({**choices_prediction(model.class_names[predicted], score, review.control,
                                         label),
                    "task": tasks[i]["id"], "project": conn.project})
    return out, len(tasks)


def _review_predictions(conn: Connection, dataset_id: str, model_id: str, label: str,
                        artifacts: ArtifactStore, job: dict[str, Any],
                        settings: WorkerSettings) -> _Review:
    control = parse_label_config(conn.label_config or "")
    source = read_json(artifacts.local_dataset(dataset_id) / "source.json")
    task_of = {int(it["item_id"]): it["task_id"] for it in source["items"]}
    predictor = Predictor.load(artifacts.model_dir(model_id), job_device(job, settings),
                               settings.weights_dirs())
    deadline = time.monotonic() + REVIEW_TIMEOUT_S

    def should_stop() -> bool:
        return SHUTTING_DOWN.is_set() or time.monotonic() > deadline

    model = predictor.model
    manifest, root = artifacts.manifest(dataset_id), artifacts.dataset_dir(dataset_id)
    ids = item_ids_of(model.info, "train_item_ids")
    held_out_ids = item_ids_of(model.info, "val_item_ids")
    files, labels, _ = manifest.resolve(ids, model.class_names, root)
    built = training_posterior(predictor, files, labels, dtype=torch.float32,
                               should_stop=should_stop)
    held_files, held_labels, _ = manifest.resolve(held_out_ids, model.class_names, root)
    held_out = (image_features(predictor, built.prefix, held_files, should_stop),
                torch.tensor(held_labels)) if held_out_ids else None
    reviews, solver = review_items(built.posterior, held_out, top_k=NEIGHBORS,
                                   neighbors_for=NEIGHBORS_FOR, should_stop=should_stop)
    allowed = set(control.choices) or set(model.class_names)
    out = []
    for r in reviews:
        predicted = model.class_names[r.predicted]
        if predicted not in allowed:
            continue  # the project cannot show this class; /predict's rule picks another
        neighbors = None if r.neighbors is None else [task_of[ids[j]] for j in r.neighbors]
        item_id = held_out_ids[r.index] if r.held_out else ids[r.index]
        out.append({**choices_prediction(predicted, r.probability, control, label),
                    "task": task_of[item_id], "project": conn.project,
                    "mislabeling": r.mislabel_score, "neighbors": neighbors})
    return _Review(out, solver, predictor, built.posterior, control, should_stop)


def _expect(response: httpx.Response, what: str) -> None:
    if response.status_code >= 300:
        raise ReviewError(f"Label Studio answered {what} with HTTP {response.status_code}: "
                          f"{response.text[:200]}")
