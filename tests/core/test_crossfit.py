"""Cross-fitted mislabel scores against brute force: each fold's answers are those of a
fresh training run without that fold."""

from __future__ import annotations

import pytest
import torch

from lqf_core.classifier import build_classifier
from lqf_core.config import Calibration, Regularizer, TrainConfig
from lqf_core.crossfit import assign_folds, cross_fit_model
from lqf_core.errors import InvalidConfigError, InvalidDataError
from lqf_core.train import train_model
from tests.core.factories import separable_images

# The library's defaults (the K-FAC-metric ridge solved to tol), in float64 on a tiny network.
DEFAULT = TrainConfig(backbone="tiny_cnn", image_size=16, val_fraction=0.0, suffix_blocks=1,
                      kappa=2.0, device="cpu")
# The isotropic early stop (K-FAC PCG, 10 iterations).
CONFIG = DEFAULT.replace(regularizer=Regularizer.ISOTROPIC, max_iters=10)
# The default objective, converged to round-off.
CONVERGED = DEFAULT.replace(tol=1e-10, max_iters=2000)
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def data():
    return separable_images(18, seed=1)


@pytest.mark.parametrize("config", [CONFIG, CONVERGED], ids=["early-stop", "converged"])
def test_each_fold_is_scored_by_a_fresh_training_run_without_it(backbone, data, config):
    x, labels = data
    ids = [f"item-{i}" for i in range(len(labels))]
    model = train_model(x, labels.tolist(), NAMES, config, backbone=backbone, item_ids=ids)
    assert model.info["solver_converged"] == (config is CONVERGED)
    result = cross_fit_model(model, x, labels.tolist(), ids, folds=3, backbone=backbone)
    assert torch.equal(result.folds, assign_folds(ids, labels.tolist(), 3, config.seed))
    assert len(result.folds.unique()) == 3
    for k in range(3):
        held = result.folds == k
        keep = [i for i, h in zip(ids, held.tolist(), strict=True) if not h]
        fresh = train_model(x[~held], labels[~held].tolist(), NAMES, config,
                            backbone=backbone, item_ids=keep)
        logits = build_classifier(fresh, backbone, torch.device("cpu")).logits(x[held])
        assert torch.allclose(result.outputs[held], logits, rtol=0, atol=1e-6)
    targets = config.kappa * torch.nn.functional.one_hot(labels, 3).double()
    expected = ((targets - result.outputs) ** 2).sum(1) / config.kappa**2
    assert torch.allclose(result.scores, expected)
    assert torch.equal(result.predicted, result.outputs.argmax(1))


def test_folds_are_stratified_by_class_and_depend_only_on_the_items():
    labels = [0] * 5 + [1] * 7 + [2] * 2
    ids = [f"item-{i}" for i in range(len(labels))]
    folds = assign_folds(ids, labels, 5, seed=3)
    for c, n in ((0, 5), (1, 7), (2, 2)):
        per_fold = torch.bincount(folds[torch.tensor(labels) == c], minlength=5)
        assert int(per_fold.max()) - int(per_fold.min()) <= 1
        assert int(per_fold.sum()) == n
    assert torch.bincount(folds, minlength=5).tolist() == [3, 3, 3, 3, 2]
    # Shuffled input, the same folds item by item.
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = assign_folds([ids[i] for i in order], [labels[i] for i in order], 5, seed=3)
    assert shuffled.tolist() == [int(folds[i]) for i in order]
    assert not torch.equal(assign_folds(ids, labels, 5, seed=4), folds)  # the seed deals


def test_a_flipped_label_scores_highest(backbone, data):
    x, labels = data
    noisy = labels.clone()
    noisy[4] = (noisy[4] + 1) % 3  # the model trained without item 4 says its true class
    model = train_model(x, noisy.tolist(), NAMES, CONFIG, backbone=backbone)
    assert model.metrics["train_accuracy"] == 1.0  # it fits the wrong label
    result = cross_fit_model(model, x, noisy.tolist(), [str(i) for i in range(18)], folds=3,
                             backbone=backbone)
    assert int(result.scores.argmax()) == 4
    assert int(result.predicted[4]) == int(labels[4])


def test_cross_fit_refuses_bad_requests(backbone, data):
    x, labels = data
    ids = [str(i) for i in range(18)]
    model = train_model(x, labels.tolist(), NAMES, CONFIG, backbone=backbone)
    with pytest.raises(InvalidDataError, match="training items"):
        cross_fit_model(model, x[:17], labels[:17].tolist(), ids[:17], backbone=backbone)
    with pytest.raises(InvalidDataError, match="at least 2"):
        cross_fit_model(model, x, labels.tolist(), ids, folds=1, backbone=backbone)
    probe = train_model(x, labels.tolist(), NAMES, CONFIG.replace(method="linear_probe"),
                        backbone=backbone)
    with pytest.raises(InvalidDataError, match="lqf"):
        cross_fit_model(probe, x, labels.tolist(), ids, backbone=backbone)


def test_a_small_default_job_trains_on_every_item_and_calibrates_on_cross_fitted_outputs(
        backbone, data):
    from lqf_core.calibration import fit_temperature
    from lqf_core.config import CROSSFIT_CALIBRATION_MAX_ITEMS
    from lqf_core.crossfit import DEFAULT_FOLDS

    x, labels = data
    ids = [f"item-{i}" for i in range(len(labels))]
    unset = DEFAULT.replace(val_fraction=None)
    model = train_model(x, labels.tolist(), NAMES, unset, backbone=backbone, item_ids=ids)
    assert model.info["calibration"] == "crossfit"
    assert model.info["num_val"] == 0 and model.info["train_item_ids"] == ids
    # the held-out outputs are those of cross-fitting the served model, by definition
    expected = cross_fit_model(model, x, labels.tolist(), ids, folds=DEFAULT_FOLDS,
                               backbone=backbone).outputs
    heldout = model.info["heldout"]
    assert heldout["split"] == "cv" and heldout["item_ids"] == ids
    logits = torch.tensor(heldout["logits"], dtype=torch.float64)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert model.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert {"cv_accuracy", "cv_nll", "cv_ece"} <= set(model.metrics)
    # the served model is the one trained on every item
    every = train_model(x, labels.tolist(), NAMES, DEFAULT, backbone=backbone, item_ids=ids)
    assert model.tensors.keys() == every.tensors.keys()
    assert all(torch.equal(t, every.tensors[name]) for name, t in model.tensors.items())

    # an explicit fraction holds out, and so does a job too large for cross-fitting
    explicit = train_model(x, labels.tolist(), NAMES, DEFAULT.replace(val_fraction=0.2),
                           backbone=backbone, item_ids=ids)
    assert explicit.info["calibration"] == "holdout" and explicit.info["num_val"] > 0
    n = CROSSFIT_CALIBRATION_MAX_ITEMS + 1
    big = train_model(torch.randn(n, 3, 12, 12, dtype=torch.float64),
                      (torch.arange(n) % 3).tolist(), NAMES, unset.replace(max_iters=1),
                      backbone=backbone)
    assert big.info["calibration"] == "holdout" and big.info["num_val"] == pytest.approx(
        0.2 * n, abs=3)
    # ... unless the job asks: then every item at any size, and a fifth when asked
    asked = train_model(torch.randn(n, 3, 12, 12, dtype=torch.float64),
                        (torch.arange(n) % 3).tolist(), NAMES,
                        unset.replace(max_iters=1, calibration=Calibration.CROSSFIT),
                        backbone=backbone)
    assert asked.info["calibration"] == "crossfit" and asked.info["num_train"] == n
    small = train_model(x, labels.tolist(), NAMES,
                        unset.replace(calibration=Calibration.HOLDOUT), backbone=backbone,
                        item_ids=ids)
    assert small.info["calibration"] == "holdout"
    assert small.info["val_item_ids"] == explicit.info["val_item_ids"]


@pytest.mark.parametrize(("values", "message"), [
    ({"calibration": "crossfit", "val_fraction": 0.2}, "leave val_fraction unset"),
    ({"calibration": "crossfit", "method": "finetune"}, "needs method 'lqf' with solver 'pcg'"),
    ({"calibration": "crossfit", "workers": 2}, "and workers 1"),
    ({"calibration": "holdout", "val_fraction": 0.0}, "val_fraction 0 skips calibration"),
    ({"calibration": "holdout", "solver": "exact", "regularizer": "isotropic"},
     "leave calibration unset or 'loo'"),
    ({"calibration": "loo"}, "needs method 'lqf' with solver 'exact'"),
    ({"calibration": "folds"}, "calibration must be one of"),
])
def test_a_calibration_that_conflicts_with_the_job_is_refused(values, message):
    with pytest.raises(InvalidConfigError, match=message):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize(("items", "classes", "expected"), [
    (500, 2, "crossfit"),  # small: always
    (501, 10, "holdout"),  # 50 images a class: the fifth costs little
    (600, 100, "crossfit"),  # 6 a class: a fifth is one image of every class
    (1000, 101, "crossfit"),
    (1000, 100, "holdout"),  # 10 a class
    (1001, 500, "holdout"),  # above the few-per-class limit: 5 more fits cost too much
])
def test_an_unset_calibration_cross_fits_small_jobs_and_jobs_of_few_images_a_class(
        items, classes, expected):
    from lqf_core.train import _calibration

    ids = [f"item-{i}" for i in range(items)]
    labels = [i % classes for i in range(items)]
    config = TrainConfig(val_fraction=None)
    assert _calibration(config, ids, labels)[0] == expected
    # a distributed job, an explicit fraction and an explicit choice keep theirs
    assert _calibration(config.replace(workers=2), ids, labels)[0] == "holdout"
    assert _calibration(config.replace(val_fraction=0.1), ids, labels) == ("holdout", 0.1)
    asked = config.replace(calibration=Calibration.HOLDOUT)
    assert _calibration(asked, ids, labels) == ("holdout", 0.2)
