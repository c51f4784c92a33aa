"""The review sent to a labeling tool (lqf_core.review), against brute force on a tiny
float64 exact-solver model with one label flipped."""

from __future__ import annotations

import pytest
import torch

from lqf_core.config import Solver
from lqf_core.posterior import LQFPosterior
from lqf_core.review import review_items
from lqf_core.train import train_model

from .factories import colour_shifted_images, trained_with_posterior
from .test_exact import CONFIG, dense_dual_optimum

FLIPPED = 4  # a class-1 item labelled class 2


@pytest.fixture(scope="module")
def flipped(backbone):
    # Strong class signal, so that one flipped label stands out.
    x, labels, _ = colour_shifted_images(7, {1: (1, 3.0), 2: (2, -3.0)}, n=15)
    assert int(labels[FLIPPED]) == 1
    labels = labels.clone()
    labels[FLIPPED] = 2
    _, post = trained_with_posterior(backbone, x, labels, CONFIG)
    return post, post.problem.z, labels


def test_mislabel_scores_are_the_leave_one_out_surprise_of_retraining(flipped):
    post, z, labels = flipped
    reviews, solver = review_items(post, top_k=3)
    assert solver == "exact"  # the exact solver stores its leave-one-out outputs
    n, kappa = len(labels), post.model.config.kappa
    jacobian = post.lin.jacobian(z)
    for r in reviews:
        keep = torch.ones(n, dtype=torch.bool)
        keep[r.index] = False
        retrained = dense_dual_optimum(post.setup, keep, n * CONFIG.weight_decay, jacobian)
        loo_output = post.lin.forward(z[r.index:r.index + 1], retrained)[0]
        surprise = float(((post.problem.targets[r.index] - loo_output) ** 2).sum()) / kappa**2
        assert r.mislabel_score == pytest.approx(surprise, rel=1e-8)
        assert r.loo_label == int(loo_output.argmax())
    worst = max(reviews, key=lambda r: r.mislabel_score)
    assert worst.index == FLIPPED and worst.loo_label == 1  # the model without it says 1


def test_neighbors_are_the_strongest_supporters_of_the_prediction(flipped):
    post, _, _ = flipped
    reviews, _ = review_items(post, top_k=3, neighbors_for=4)
    with_neighbors = [r for r in reviews if r.neighbors is not None]
    top4 = sorted(reviews, key=lambda r: -r.mislabel_score)[:4]
    assert {r.index for r in with_neighbors} == {r.index for r in top4}
    for r in with_neighbors:
        influence = post.influence(post.problem.z[r.index:r.index + 1], exact=False,
                                   with_loo=False)
        assert influence.output_class == r.predicted
        support = influence.first_order.clone()
        support[r.index] = 0.0
        expected = [int(j) for j in torch.argsort(support)[:3] if support[j] < 0]
        assert r.neighbors == expected and r.index not in r.neighbors
    # The served model fits the flipped label (why the score must be leave-one-out).
    assert reviews[FLIPPED].predicted == 2 and reviews[FLIPPED].neighbors


def test_the_served_probabilities_match_the_classifier(flipped, backbone):
    post, z, _ = flipped
    reviews, _ = review_items(post, neighbors_for=0)
    logits = post.outputs(z) / post.model.temperature
    probs = torch.softmax(logits, dim=1)
    for r in reviews:
        assert r.predicted == int(probs[r.index].argmax())
        assert r.probability == pytest.approx(float(probs[r.index].max()), rel=1e-9)


def test_items_the_job_held_out_are_scored_by_the_served_model(backbone):
    x, labels, _ = colour_shifted_images(3, {1: (1, 2.0), 2: (2, -2.0)}, n=16)
    config = CONFIG.replace(solver=Solver.PCG, val_fraction=0.25)
    ids = [str(i) for i in range(len(labels))]
    model = train_model(x, labels.tolist(), ["a", "b", "c"], config, backbone=backbone,
                        item_ids=ids)
    fit = [int(i) for i in model.info["train_item_ids"]]
    held = [int(i) for i in model.info["val_item_ids"]]
    assert held
    prefix = backbone.split(config.suffix)[0]
    with torch.no_grad():
        z = prefix(x)
    post = LQFPosterior(model, backbone, z[fit], labels[fit])
    reviews, solver = review_items(post, (z[held], labels[held]), top_k=2)
    assert solver == "kfac" and len(reviews) == len(labels)
    outputs = post.outputs(z[held])
    for r in (r for r in reviews if r.held_out):
        target = 2.0 * torch.nn.functional.one_hot(labels[held[r.index]], 3).double()
        residual = float(((target - outputs[r.index]) ** 2).sum()) / 4.0
        assert r.mislabel_score == pytest.approx(residual, rel=1e-9)
        assert r.neighbors is not None and len(r.neighbors) <= 2


def test_a_cross_fitted_job_is_reviewed_with_its_cross_fitted_scores(backbone):
    from lqf_core.crossfit import cross_fit_model

    x, labels, _ = colour_shifted_images(7, {1: (1, 3.0), 2: (2, -3.0)}, n=15)
    labels = labels.clone()
    labels[FLIPPED] = 2
    config = CONFIG.replace(solver=Solver.PCG, val_fraction=None)  # 15 items: cross-fit
    ids = [str(i) for i in range(len(labels))]
    model = train_model(x, labels.tolist(), ["a", "b", "c"], config, backbone=backbone,
                        item_ids=ids)
    assert model.info["calibration"] == "crossfit" and model.info["train_item_ids"] == ids
    with torch.no_grad():
        z = backbone.split(config.suffix)[0](x)
    reviews, solver = review_items(LQFPosterior(model, backbone, z, labels), top_k=2)
    assert solver == "crossfit"
    expected = cross_fit_model(model, x, labels.tolist(), ids, backbone=backbone)
    assert [r.mislabel_score for r in reviews] == pytest.approx(expected.scores.tolist(),
                                                                rel=1e-9)
    assert [r.loo_label for r in reviews] == expected.predicted.tolist()
