"""What several job kinds share: the model a derived job starts from, and storing a
new model version with its record."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lqf_core.artifacts import load_model, save_model
from lqf_core.config import TrainConfig
from lqf_core.model import TrainedModel
from state.artifacts import ArtifactStore, read_json, write_json
from state.ids import new_id, utc_now
from state.records import DatasetManifest, ItemsGone, ModelRecord, item_ids_of
from state.registry import Registry
from worker.jobs.crossfit_ranking import crossfit_ranking
from worker.lifecycle import JobContext, JobFailure, Outcome, Undo, job_device

# What a client may want to know of how a model was fitted (its info holds more: item ids,
# histories, cross-fitted scores, which stay in the artifact).
TRAINING_FACTS = ("num_train", "num_val", "calibration", "image_size_rule", "solver",
                  "solver_iterations", "relative_grad_norm", "solver_converged",
                  "jacobian_products", "num_linearized_params", "workers", "warm_started",
                  "epochs_run", "best_epoch", "backbone_weights", "lqf_core_version",
                  "torch_version")


def training_summary(model: TrainedModel) -> dict[str, Any]:
    """The model's fit facts for its record (GET /models/{ref}: `training`)."""
    summary = {k: model.info[k] for k in TRAINING_FACTS if k in model.info}
    summary["temperature"] = float(model.temperature)
    return summary


def require_dataset(artifacts: ArtifactStore, job: dict[str, Any]) -> DatasetManifest:
    if artifacts.dataset_meta(job["dataset_id"]) is None:
        raise JobFailure("dataset_not_found",
                         f"dataset {job['dataset_id']} was deleted before the job ran")
    return artifacts.manifest(job["dataset_id"])


def parent_model(job: dict[str, Any], context: JobContext) -> TrainedModel:
    """The model a forget or self-influence job works on, on the job's device; the model
    and its dataset must still exist."""
    model_id = job["parent_model_id"]
    if context.artifacts.model_record(model_id) is None:
        raise JobFailure("model_not_found", f"model {model_id} was deleted before the job ran")
    require_dataset(context.artifacts, job)
    model = load_model(context.artifacts.model_dir(model_id))
    model.config = model.config.replace(device=job_device(job, context.settings))
    return model


def model_items(model: TrainedModel, manifest: DatasetManifest, ids: list[str],
                root: Path) -> tuple[list[Path], list[int]]:
    """(image files, class indices) of a model's items (lqf_core's string ids)."""
    try:
        files, labels, _ = manifest.resolve([int(i) for i in ids], model.class_names, root)
    except ItemsGone as exc:
        raise JobFailure("invalid_data", str(exc)) from None
    return files, labels


def new_model(model: TrainedModel, config: TrainConfig, job: dict[str, Any]) -> Outcome:
    """The outcome of `job`, which made a model: stored, then (when the job names one) the
    next version of its model name."""
    def store(artifacts: ArtifactStore) -> tuple[dict[str, str], Undo]:
        model_id = _store_model(artifacts, job, config, model)
        name = job.get("model_name")
        registry = Registry(artifacts)
        if name:
            try:
                version = registry.add_version(job["tenant"], name, model_id, job["id"])
                directory = artifacts.model_dir(model_id)
                with artifacts.editing(directory):
                    path = directory / "record.json"
                    write_json(path, {**read_json(path), "name": name, "version": version})
            except BaseException:
                artifacts.remove(artifacts.model_dir(model_id))
                raise

        def undo() -> None:
            if name:
                registry.remove_version(job["tenant"], name, model_id)
            artifacts.remove(artifacts.model_dir(model_id))

        # A label_studio_train job's snapshot is named too (its record had none yet).
        return {"model_id": model_id, "dataset_id": job["dataset_id"]}, undo

    return Outcome(dict(model.metrics), store)


def _store_model(artifacts: ArtifactStore, job: dict[str, Any], config: TrainConfig,
                 model: TrainedModel) -> str:
    """Write the model and its record to staging, then rename into place -> model id."""
    model_id = new_id("mdl")
    model.info.update(job_id=job["id"], dataset_id=job["dataset_id"], tenant=job["tenant"],
                      model_id=model_id)
    staging = artifacts.make_staging_dir("model")
    try:
        version = save_model(model, staging)
        record: ModelRecord = {
            "id": model_id,
            "tenant": job["tenant"],
            "job_id": job["id"],
            "dataset_id": job["dataset_id"],
            "method": config.method.value,
            "backbone": config.backbone,
            "classes": list(model.class_names),
            "metrics": {k: float(v) for k, v in model.metrics.items()},
            # What trained it: the job's settings with every default resolved (image size,
            # regularizer, solver budget, ...), so a client can see what it got.
            "hyperparameters": model.config.to_dict(),
            "model_version": version,
            "created_at": utc_now(),
            "parent_id": model.info.get("parent_id"),
            "forgotten_item_ids": item_ids_of(model.info, "forgotten_item_ids"),
            "training": training_summary(model),
        }
        write_json(staging / "record.json", record)
        crossfit = model.info.get("crossfit")
        if crossfit is not None:
            # The job cross-fitted its temperature: its mislabel ranking comes with it.
            write_json(staging / artifacts.self_influence_path(model_id).name, crossfit_ranking(
                model_id, job["id"], model.class_names, model.info["train_item_ids"],
                crossfit["labels"], crossfit["scores"], crossfit["predicted"],
                crossfit["seconds"]))
        artifacts.commit(staging, artifacts.model_dir(model_id))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model_id
