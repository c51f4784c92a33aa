"""`self_influence` jobs: a model's cross-fitted mislabel scores, stored beside it."""

from __future__ import annotations

import time
from typing import Any

from lqf_core.crossfit import DEFAULT_FOLDS, cross_fit_model
from state.artifacts import SELF_INFLUENCE_FILE, ArtifactStore
from worker.jobs.crossfit_ranking import crossfit_ranking
from worker.jobs.models import model_items, parent_model, require_dataset
from worker.lifecycle import JobContext, Outcome, Undo


def compute_self_influence(job: dict[str, Any], context: JobContext) -> Outcome:
    model_id, dataset_id = job["parent_model_id"], job["dataset_id"]
    model = parent_model(job, context)
    ids = [str(i) for i in model.info.get("train_item_ids", [])]
    files, labels = model_items(model, require_dataset(context.artifacts, job), ids,
                                context.artifacts.dataset_dir(dataset_id))
    started = time.monotonic()
    result = cross_fit_model(model, files, labels, ids, folds=DEFAULT_FOLDS,
                             progress=context.progress, should_stop=context.should_stop,
                             weights_dir=context.settings.weights_dirs())
    seconds = time.monotonic() - started
    scores = crossfit_ranking(model_id, job["id"], model.class_names, ids, labels,
                              result.scores.tolist(), result.predicted.tolist(), seconds)

    def store(artifacts: ArtifactStore) -> tuple[dict[str, str], Undo]:
        artifacts.write_model_json(model_id, SELF_INFLUENCE_FILE, scores)
        return {"model_id": model_id}, lambda: artifacts.delete_model_file(
            model_id, SELF_INFLUENCE_FILE)

    return Outcome({"seconds": seconds, "items": float(len(ids))}, store)
