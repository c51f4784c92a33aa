"""`forget` jobs: a new version of a model, retrained without some of its items."""

from __future__ import annotations

from typing import Any

from lqf_core.unlearn import forget
from worker.jobs.models import model_items, new_model, parent_model, require_dataset
from worker.lifecycle import JobContext, Outcome


def compute_forget(job: dict[str, Any], context: JobContext) -> Outcome:
    parent = parent_model(job, context)
    manifest = require_dataset(context.artifacts, job)
    parent_ids = [*parent.info.get("train_item_ids", []), *parent.info.get("val_item_ids", [])]
    # Forget what was asked, and anything else the dataset has excluded since the parent
    # was trained: the new version must not keep items the dataset no longer allows.
    forgotten = {str(i) for i in job.get("forget_item_ids") or []}
    forgotten |= {str(i) for i in manifest.excluded} & set(parent_ids)
    remaining = [i for i in parent_ids if i not in forgotten]
    files, labels = model_items(parent, manifest, remaining,
                                context.artifacts.dataset_dir(job["dataset_id"]))
    model = forget(
        parent, files, labels, remaining, sorted(forgotten),
        progress=context.progress, should_stop=context.should_stop,
        weights_dir=context.settings.weights_dirs(), parent_id=job["parent_model_id"],
    )
    return new_model(model, parent.config, job)
