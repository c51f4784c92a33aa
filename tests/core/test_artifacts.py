from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lqf_core.artifacts import load_model, save_model
from lqf_core.config import TrainConfig
from lqf_core.errors import IncompatibleModelError
from lqf_core.serving import Predictor
from lqf_core.train import train_model
from tests.core.images import coloured_images

FAST = {"backbone": "tiny_cnn", "image_size": 24, "max_iters": 15, "epochs": 3}


@pytest.fixture(scope="module")
def data():
    return coloured_images(per_class=10)


@pytest.mark.parametrize("method", ["lqf", "linear_probe", "finetune"])
def test_save_load_predict_is_bit_identical(tmp_path, data, method):
    images, labels, names = data
    model = train_model(images, labels, names, TrainConfig.from_dict({**FAST, "method": method}))
    fresh = Predictor(model, device="cpu")
    version = save_model(model, tmp_path / "m")
    loaded = Predictor.load(tmp_path / "m", device="cpu")
    assert loaded.model_version == version
    assert loaded.class_names == names
    x = torch.stack([fresh.preprocess(im) for im in images])
    assert np.array_equal(fresh.predict_batch(x), loaded.predict_batch(x))
    # a trained model separates the colours well above chance (1/3)
    accuracy = (fresh.predict_batch(x).argmax(1) == np.array(labels)).mean()
    assert accuracy >= 0.9


def test_loaded_metadata_round_trips(tmp_path, data):
    images, labels, names = data
    model = train_model(images, labels, names, TrainConfig.from_dict({**FAST, "seed": 3}))
    model.info["dataset_id"] = "ds-1"
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert loaded.temperature == model.temperature
    assert loaded.metrics == pytest.approx(model.metrics)
    assert loaded.info["dataset_id"] == "ds-1"
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["backbone"] == "tiny_cnn" and meta["versions"]["torch"] == torch.__version__
    # the solver settings it ran with are recorded, not left to a later default
    assert (meta["config"]["regularizer"], meta["config"]["tol"]) == ("kfac", 1e-4)
    assert model.info["solver_converged"]
    assert meta["config"]["jpeg_decode"] == "scaled"
    # a model saved before the regularizer (and the model version) was recorded was
    # fitted on the isotropic ridge, and one saved before jpeg_decode decoded in full
    del meta["config"]["regularizer"], meta["config"]["jpeg_decode"], meta["model_version"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    old = load_model(tmp_path).config
    assert (old.regularizer, old.jpeg_decode) == ("isotropic", "full")


def test_corrupt_or_foreign_artifacts_fail_clearly(tmp_path, data):
    images, labels, names = data
    model = train_model(images, labels, names, TrainConfig.from_dict(FAST))
    save_model(model, tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(IncompatibleModelError, match="content hash"):
        load_model(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleModelError, match="format version 99"):
        load_model(tmp_path)
    with pytest.raises(IncompatibleModelError, match="not a saved model"):
        load_model(tmp_path / "missing")


def test_the_version_names_what_is_served_not_only_the_tensors(tmp_path, data):
    images, labels, names = data
    model = train_model(images, labels, names, TrainConfig.from_dict(FAST))
    first = save_model(model, tmp_path / "a")
    assert save_model(model, tmp_path / "b") == first  # same model, same version
    model.temperature *= 2  # same tensors, other probabilities
    assert save_model(model, tmp_path / "c") != first
    assert Predictor.load(tmp_path / "c", device="cpu").model_version != first
    # an edited temperature no longer matches the version it was saved under
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    meta["temperature"] = 0.5
    (tmp_path / "a" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleModelError, match="metadata was edited"):
        load_model(tmp_path / "a")


@pytest.mark.parametrize("method", ["lqf", "finetune"])
def test_the_model_keeps_its_curve_and_its_held_out_outputs(data, method):
    """What the dashboard draws: every solver iteration (or epoch), and the held-out
    items' outputs, which must be the served model's own."""
    images, labels, names = data
    config = TrainConfig.from_dict({**FAST, "method": method, "val_fraction": 0.2})
    model = train_model(images, labels, names, config)
    if method == "lqf":
        history = model.info["solver_history"]
        assert [h["iteration"] for h in history] == list(range(1, len(history) + 1))
        assert len(history) == model.info["solver_iterations"]
        assert history[-1]["relative_grad_norm"] == pytest.approx(
            model.info["relative_grad_norm"], rel=0.5)  # the recursive estimate vs the true one
    else:
        epochs = model.info["epoch_history"]
        assert [e["epoch"] for e in epochs] == list(range(1, model.info["epochs_run"] + 1))
        assert all({"train_loss", "val_accuracy"} <= set(e) for e in epochs)
    heldout = model.info["heldout"]
    assert heldout["split"] == "val" and heldout["item_ids"] == model.info["val_item_ids"]
    predictor = Predictor(model, device="cpu")
    x = torch.stack([predictor.preprocess(images[int(i)]) for i in heldout["item_ids"]])
    logits = torch.tensor(heldout["logits"], dtype=torch.float64)
    probs = torch.softmax(logits / model.temperature, dim=1).numpy()
    assert np.allclose(probs, predictor.predict_batch(x), atol=1e-4)
