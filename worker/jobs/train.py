"""`train` jobs: a new model from a dataset's items."""

from __future__ import annotations

from typing import Any

from lqf_core.config import TrainConfig
from lqf_core.train import train_model
from worker.jobs.models import new_model, require_dataset
from worker.jobs.ranks import shard_launcher
from worker.lifecycle import JobContext, Outcome, job_device, job_store


def job_config(job: dict[str, Any], device: str) -> TrainConfig:
    """The job's hyperparameters (the user's overrides) over TrainConfig's defaults."""
    hyper = dict(job.get("hyperparameters") or {})
    return TrainConfig.from_dict({**hyper, "device": device, "method": job["method"],
                                  "backbone": job["backbone"], "seed": job["seed"]})


def compute_training(job: dict[str, Any], context: JobContext) -> Outcome:
    config = job_config(job, job_device(job, context.settings))
    require_dataset(context.artifacts, job)
    # Excluded (forgotten) items are skipped; item ids are recorded in the model so that
    # influence queries and unlearning can name them.
    paths, labels, class_names, ids = context.artifacts.training_items(job["dataset_id"])
    launcher = None
    if config.workers > 1 and context.settings.distributed == "workers":
        launcher = shard_launcher(job, context.settings, job_store(context.settings))
    model = train_model(
        paths, labels, class_names, config, progress=context.progress,
        should_stop=context.should_stop, weights_dir=context.settings.weights_dirs(),
        item_ids=ids, shard_launcher=launcher,
    )
    return new_model(model, config, job)
