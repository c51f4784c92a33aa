"""`rank` jobs: which items of a dataset to label next under a model (lqf_core.active),
for pools too large for one request. The ranking is stored beside the model."""

from __future__ import annotations

import time
from typing import Any

from lqf_core.active import rank_files
from lqf_core.serving import Predictor
from lqf_core.train import Progress
from state.artifacts import ArtifactStore, ranking_file
from state.ids import utc_now
from state.records import item_ids_of
from worker.jobs.models import model_items, parent_model, require_dataset
from worker.lifecycle import JobContext, JobFailure, Outcome, Undo, job_device

# The pool's head features are held in memory (about 21 KB an item for MobileNetV2).
MAX_POOL = 50_000


def compute_rank(job: dict[str, Any], context: JobContext) -> Outcome:
    model_id, pool_id = job["parent_model_id"], job["pool_dataset_id"]
    artifacts = context.artifacts
    model = parent_model(job, context)
    ids = [str(i) for i in model.info.get("train_item_ids", [])]
    train_files, train_labels = model_items(
        model, require_dataset(artifacts, job), ids, artifacts.dataset_dir(job["dataset_id"]))
    if artifacts.dataset_meta(pool_id) is None:
        raise JobFailure("dataset_not_found", f"dataset {pool_id} was deleted before the job ran")
    labelled = set()
    if pool_id == job["dataset_id"]:  # the model's own dataset: the others are the pool
        labelled = set(item_ids_of(model.info, "train_item_ids", "val_item_ids"))
    pool = [it for it in artifacts.manifest(pool_id).active_items() if it.id not in labelled]
    if not pool:
        raise JobFailure("invalid_data", f"dataset {pool_id} has no items the model has not "
                                         "already learned from")
    if len(pool) > MAX_POOL:
        raise JobFailure("pool_too_large", f"{len(pool)} items to rank; the limit is {MAX_POOL}")
    predictor = Predictor(model, job_device(job, context.settings),
                          context.settings.weights_dirs())
    root = artifacts.dataset_dir(pool_id)
    started = time.monotonic()
    ranking = rank_files(predictor, train_files, train_labels, [root / it.file for it in pool],
                         int(job["batch_size"]),
                         progress=lambda done, total: context.progress(
                             Progress("features", done, total)),
                         should_stop=context.should_stop)
    seconds = time.monotonic() - started
    stored = {
        "model_id": model_id, "dataset_id": pool_id, "job_id": job["id"],
        "strategy": ranking.strategy, "pool_size": len(pool), "created_at": utc_now(),
        "seconds": seconds,
        "items": [{"item_id": pool[i].id, "score": score}
                  for i, score in zip(ranking.order, ranking.scores, strict=True)],
    }

    def store(artifacts: ArtifactStore) -> tuple[dict[str, str], Undo]:
        name = ranking_file(job["id"])
        artifacts.write_model_json(model_id, name, stored)
        return ({"ranking_url": f"/models/{model_id}/rankings/{job['id']}"},
                lambda: artifacts.delete_model_file(model_id, name))

    return Outcome({"seconds": seconds, "items": float(len(pool))}, store)
