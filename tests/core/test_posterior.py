"""Influence, self-influence, uncertainty and unlearning against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lqf_core.classifier import build_classifier
from lqf_core.config import TrainConfig
from lqf_core.errors import Cancelled, IncompatibleModelError, InvalidDataError
from lqf_core.posterior import LQFPosterior
from lqf_core.train import train_model
from lqf_core.unlearn import forget

from .factories import leave_one_out_changes

CONFIG = TrainConfig(backbone="tiny_cnn", image_size=16, val_fraction=0.0, suffix_blocks=1,
                     weight_decay=0.05, probe_l2=1.0, kappa=2.0, tol=1e-12, max_iters=2000,
                     use_kfac=False)  # plain CG ends in <= N*C + 1 steps on these tiny sets


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(12) % 3
    # class-dependent colour shift + noise: learnable but not trivially
    x = torch.randn(12, 3, 12, 12, generator=generator, dtype=torch.float64)
    x[:, 0] += (labels == 0).double().view(-1, 1, 1)
    x[:, 1] += (labels == 1).double().view(-1, 1, 1)
    x_test = torch.randn(4, 3, 12, 12, generator=generator, dtype=torch.float64)
    return x, labels, x_test


@pytest.fixture(scope="module")
def trained(backbone, data):
    x, labels, _ = data
    model = train_model(x, labels.tolist(), ["a", "b", "c"], CONFIG, backbone=backbone)
    prefix = backbone.split(CONFIG.suffix_blocks)[0]
    with torch.no_grad():
        z = prefix(x)
    return model, LQFPosterior(model, backbone, z, labels, tol=1e-10, max_iters=2000,
                               precondition=False), z


_DENSE_JACOBIANS: dict[int, torch.Tensor] = {}


def retrain_without(post: LQFPosterior, keep: torch.Tensor) -> torch.Tensor:
    """dw* of the quadratic at the same w0 without some items, by a dense direct solve.

    Sum-form prior kept fixed: lambda' = lambda * N / N'."""
    n, n_keep = post.n, int(keep.sum())
    if id(post) not in _DENSE_JACOBIANS:
        _DENSE_JACOBIANS[id(post)] = post.lin.jacobian(post.problem.z)
    jac = _DENSE_JACOBIANS[id(post)].view(n, -1, post.lin.num_params)[keep].flatten(0, 1)
    residual = (post.problem.targets - post.problem.output0)[keep]
    weight_decay = post.problem.weight_decay * n / n_keep
    # (J^T J / N' + l I)^-1 J^T r / N' = J^T (J J^T + N' l I)^-1 r: the same direct solve
    # in the N'C-dimensional dual, since P >> N'C here.
    gram = jac @ jac.T + n_keep * weight_decay * torch.eye(jac.shape[0], dtype=jac.dtype)
    return jac.T @ torch.linalg.solve(gram, residual.reshape(-1))


def test_model_solution_is_the_direct_solve(trained):
    _, post, _ = trained
    everything = torch.ones(post.n, dtype=torch.bool)
    expected = retrain_without(post, everything)
    assert float((post.delta - expected).norm() / expected.norm()) <= 1e-8


def test_exact_influence_equals_leave_one_out_retraining(backbone, data, trained):
    _, post, _ = trained
    _, _, x_test = data
    prefix = backbone.split(CONFIG.suffix_blocks)[0]
    with torch.no_grad():
        z_star = prefix(x_test[:1])
    influence = post.influence(z_star)
    actual_t = leave_one_out_changes(post, z_star, influence.output_class,
                                     lambda keep: retrain_without(post, keep))
    assert influence.exact is not None
    rel = float((influence.exact - actual_t).norm() / actual_t.norm())
    assert rel <= 1e-6
    pearson = np.corrcoef(influence.first_order.numpy(), actual_t.numpy())[0, 1]
    assert pearson >= 0.95


def test_self_influence_is_the_leave_one_out_residual(trained):
    _, post, _ = trained
    scores, loo_labels = post.self_influence()
    for i in (0, 7):
        keep = torch.ones(post.n, dtype=torch.bool)
        keep[i] = False
        dw = retrain_without(post, keep)
        loo_out = post.lin.forward(post.problem.z[i:i + 1], dw)[0]
        residual = post.problem.targets[i] - loo_out
        assert float(scores[i]) == pytest.approx(float((residual**2).sum()) / 4.0, rel=1e-6)
        assert int(loo_labels[i]) == int(loo_out.argmax())


def test_kfac_leverages_are_leverages_and_match_the_smw_form(trained):
    """K-FAC stands in for the curvature without item i: L = M (I + M)^-1, 0 <= L < I,
    and the LOO residual is (I + M) e with M = J_i K^-1 J_i^T / N."""
    _, post, _ = trained
    lev = post.leverages(exact=False)
    eig = torch.linalg.eigvalsh(0.5 * (lev + lev.transpose(1, 2)))
    assert float(eig.min()) >= -1e-9 and float(eig.max()) < 1
    assert post.leverages(exact=False) is lev  # computed once
    m = post.predictive_covariance(post.problem.z[:3], exact=False) / post.n
    m = 0.5 * (m + m.transpose(1, 2))
    expected = post.residuals[:3] + (m @ post.residuals[:3].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(post.loo_residuals(exact=False)[:3], expected)


def test_kfac_leverages_in_steps_equal_the_one_pass(trained, backbone, data):
    """The service computes them a few items at a time between queries (the posterior
    cache's second stage): the same numbers, cached once the last step is done."""
    model, post, z = trained
    stepped = LQFPosterior(model, backbone, z, data[1], tol=1e-10, max_iters=2000,
                           precondition=False)
    assert stepped.needs_kfac_leverages
    done = list(stepped.kfac_leverage_steps(batch_size=5))
    assert done == [5, 10, 12] and not stepped.needs_kfac_leverages
    torch.testing.assert_close(stepped.leverages(exact=False), post.leverages(exact=False))


def test_predictive_covariance_equals_dense_inverse_formula(trained, backbone, data):
    _, post, _ = trained
    prefix = backbone.split(CONFIG.suffix_blocks)[0]
    with torch.no_grad():
        z_star = prefix(data[2][:2])
    cov = post.predictive_covariance(z_star)
    jac = post.lin.jacobian(post.problem.z)
    lam, n = post.problem.weight_decay, post.n
    # Woodbury: H^-1 = (I - J^T (J J^T + N lam I)^-1 J) / lam, a direct solve in the dual.
    gram = jac @ jac.T + n * lam * torch.eye(jac.shape[0], dtype=jac.dtype)
    for i in range(2):
        j_star = post.lin.jacobian(z_star[i:i + 1])
        cross = jac @ j_star.T
        expected = (j_star @ j_star.T - cross.T @ torch.linalg.solve(gram, cross)) / lam
        torch.testing.assert_close(cov[i], expected, rtol=1e-7, atol=1e-10)
    approx = post.predictive_covariance(z_star, exact=False)
    assert approx.shape == cov.shape and torch.all(torch.diagonal(approx, dim1=1, dim2=2) > 0)


def test_posterior_refuses_other_training_data(trained, backbone):
    model, post, z = trained
    with pytest.raises(IncompatibleModelError, match="linearization point"):
        LQFPosterior(model, backbone, z[1:], post.labels[1:].cpu())


def forget_versus_fresh(parent, config, forgotten, backbone, data):
    """(the forget job's model, max |output difference| on training and test inputs
    from a fresh training on the remaining items)."""
    x, labels, x_test = data
    keep = [i for i in range(len(labels)) if str(i) not in forgotten]
    ids = [str(i) for i in keep]
    child = forget(parent, x[keep], labels[keep].tolist(), ids, forgotten, backbone=backbone)
    fresh = train_model(x[keep], labels[keep].tolist(), parent.class_names, config,
                        backbone=backbone, item_ids=ids)
    device, inputs = torch.device("cpu"), torch.cat([x, x_test])
    out_child = build_classifier(child, backbone, device).logits(inputs)
    out_fresh = build_classifier(fresh, backbone, device).logits(inputs)
    return child, float((out_child - out_fresh).abs().max())


@pytest.mark.parametrize("forgotten", [["4"], ["1", "9", "11"]])
def test_unlearning_equals_fresh_training_without_the_items(backbone, data, trained, forgotten):
    model, _, _ = trained
    child, difference = forget_versus_fresh(model, CONFIG, forgotten, backbone, data)
    assert difference <= 1e-6
    assert child.info["forgotten_item_ids"] == sorted(forgotten)
    # the parent's linearization point depended on the forgotten items: it moved
    assert not torch.equal(child.tensors["head.weight"], model.tensors["head.weight"])
    assert model.info["solver_converged"] and child.info["warm_started"]


def test_unlearning_an_early_stopped_model_replays_the_fresh_path(backbone, data):
    # Stopped after 3 iterations, far from the optimum: a warm start from the parent
    # would end elsewhere (and keep a trace of the forgotten items), so forget starts
    # from zero like a fresh job.
    x, labels, _ = data
    config = CONFIG.replace(max_iters=3)
    ids = [str(i) for i in range(len(labels))]
    parent = train_model(x, labels.tolist(), ["a", "b", "c"], config, backbone=backbone,
                         item_ids=ids)
    assert not parent.info["solver_converged"]
    child, difference = forget_versus_fresh(parent, config, ["2", "7"], backbone, data)
    assert difference <= 1e-6
    assert not child.info["warm_started"]


def test_forget_rejects_unknown_or_leaked_items(backbone, data, trained):
    model, _, _ = trained
    x, labels, _ = data
    ids = [str(i) for i in range(len(labels))]
    with pytest.raises(InvalidDataError, match="not in the model's training data"):
        forget(model, x, labels.tolist(), ids, ["nope"], backbone=backbone)
    with pytest.raises(InvalidDataError, match="still in the data"):
        forget(model, x, labels.tolist(), ids, ["3"], backbone=backbone)


def test_uncertainty_grows_away_from_the_data(trained, backbone, data):
    _, post, _ = trained
    prefix = backbone.split(CONFIG.suffix_blocks)[0]
    x = data[0]
    with torch.no_grad():
        z_in = prefix(x[:4])
        z_far = prefix(x[:4] * 25.0)  # far outside the training inputs
    near = post.uncertainty(z_in, exact=False)
    far = post.uncertainty(z_far, exact=False)
    torch.testing.assert_close(near.probabilities.sum(1), torch.ones(4, dtype=torch.float64))
    assert float(far.variance_ratio.min()) > float(near.variance_ratio.max())
    # ood_score is the entropy of the probabilities over log C.
    probs = near.probabilities
    entropy = -(probs * probs.log()).sum(1) / math.log(probs.shape[1])
    torch.testing.assert_close(near.ood_score, entropy)
    assert bool(((near.ood_score >= 0) & (near.ood_score <= 1)).all())
    torch.testing.assert_close(near.mean, post.outputs(z_in))


def test_a_query_stops_when_told_and_leaves_the_posterior_as_it_was(backbone, data):
    x, labels, x_test = data
    model = train_model(x, labels.tolist(), ["a", "b", "c"], CONFIG, backbone=backbone)
    with torch.no_grad():
        z = backbone.split(CONFIG.suffix_blocks)[0](x)
        z_test = backbone.split(CONFIG.suffix_blocks)[0](x_test)
    post = LQFPosterior(model, backbone, z, labels, tol=1e-10, max_iters=2000,
                        precondition=False)
    calls = {"n": 0, "allowed": 0}

    def stop_after_allowed() -> bool:
        calls["n"] += 1
        return calls["n"] > calls["allowed"]

    # (query, polls answered "go on" first): the K-FAC forms poll once per batch of items.
    for query, allowed in ((lambda: post.leverages(exact=True), 3),
                           (lambda: post.predictive_covariance(z_test, exact=True), 3),
                           (lambda: post.leverages(exact=False), 0)):
        calls.update(n=0, allowed=allowed)
        with post.interruptible(stop_after_allowed), pytest.raises(Cancelled):
            query()
        assert calls["n"] == allowed + 1  # stopped at the first poll that said so
    assert post._leverages == {}  # nothing half-computed was kept
    # Outside the block the same queries run to the end.
    assert post.leverages(exact=True).shape == (len(z), 3, 3)
