"""Batch selection (lqf_core.active) against the dense posterior of a tiny float64 model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lqf_core.active import (
    HEAD,
    ConditionedKernel,
    HeadPosterior,
    cold_start_batch,
    flip_log_probability,
    head_posterior_of,
    lqf_signals,
    select_batch,
)
from lqf_core.config import Regularizer, TrainConfig
from lqf_core.errors import InvalidDataError

from .factories import colour_shifted_images, trained_with_posterior

CONFIG = TrainConfig(backbone="tiny_cnn", image_size=16, val_fraction=0.0, suffix_blocks=1,
                     weight_decay=0.05, probe_l2=1.0, kappa=2.0, max_iters=10)


@pytest.fixture(scope="module", params=[Regularizer.ISOTROPIC, Regularizer.KFAC])
def ranked(request, backbone):
    config = dataclasses.replace(CONFIG, regularizer=request.param)
    x, labels, pool_x = colour_shifted_images(3, {0: (0, 1.0), 1: (1, 1.0)}, n=12, num_test=9)
    model, post = trained_with_posterior(backbone, x, labels, config)
    with torch.no_grad():
        pool_z = backbone.split(config.suffix)[0](pool_x)
    train = lqf_signals(model, backbone, post.problem.z)
    head = HeadPosterior.of(model, train, labels)
    pool = lqf_signals(model, backbone, pool_z)
    return model, post, head, train, pool, pool_z


def head_columns(post) -> torch.Tensor:
    """Positions of the head's weight and bias in the flat parameter vector."""
    space, start, columns = post.lin.space, 0, []
    for name, numel in zip(space.names, space.numels, strict=True):
        if name in (f"{HEAD}.weight", f"{HEAD}.bias"):
            columns.extend(range(start, start + numel))
        start += numel
    return torch.tensor(columns)


def dense_head_covariance(post, model, noise: float, observed: torch.Tensor | None):
    """sigma^2 (J_h^T J_h + prior_h + J_o^T J_o)^-1: the head block's conditional posterior
    from the dense Jacobian and the objective's dense Hessian, after observing the
    outputs of the prefix outputs `observed`."""
    cols = head_columns(post)
    n = post.n
    jac = post.lin.jacobian(post.problem.z)[:, cols]
    precision = jac.T @ jac
    prior = n * model.config.ridge * torch.eye(len(cols), dtype=torch.float64)
    if model.config.regularizer == Regularizer.KFAC:
        # the penalty mu/2 dw^T (K + lambda I) dw, K's head block exact: J_h^T J_h / N
        prior = model.config.metric_strength * (precision + prior)
    precision = precision + prior
    if observed is not None:
        j_obs = post.lin.jacobian(observed)[:, cols]
        precision = precision + j_obs.T @ j_obs
    return noise * torch.linalg.inv(precision), cols


def test_served_outputs_and_head_features(ranked):
    _, post, _, train, pool, pool_z = ranked
    torch.testing.assert_close(train.outputs, post.train_outputs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pool.outputs, post.outputs(pool_z), rtol=1e-10, atol=1e-10)
    assert torch.all(pool.features[:, -1] == 1)  # the bias's input


def test_the_head_posterior_of_a_built_posterior_is_the_same(ranked):
    _, post, head, _, _, _ = ranked
    again = head_posterior_of(post)
    torch.testing.assert_close(again.covariance, head.covariance, rtol=1e-10, atol=1e-12)
    assert again.noise == head.noise


def test_pool_covariance_equals_the_dense_posteriors_head_block(ranked):
    model, post, head, _, pool, pool_z = ranked
    assert head.noise == pytest.approx(post.noise_variance(), rel=1e-12)
    dense, cols = dense_head_covariance(post, model, head.noise, None)
    j_pool = post.lin.jacobian(pool_z)[:, cols]
    output_cov = j_pool @ dense @ j_pool.T  # (m C, m C)
    k = pool.features @ head.covariance @ pool.features.T
    c = model.num_classes
    expected = torch.kron(k, torch.eye(c, dtype=torch.float64))  # classes independent, alike
    torch.testing.assert_close(output_cov, expected, rtol=1e-8, atol=1e-10)


def test_conditioned_variances_equal_the_dense_posterior_after_observing_the_picks(ranked):
    model, post, head, _, pool, pool_z = ranked
    kernel = ConditionedKernel(pool.features, head.covariance, head.noise, max_picks=3)
    picks: list[int] = []
    for s in (4, 0, 7):
        kernel.condition(s)
        picks.append(s)
        dense, cols = dense_head_covariance(post, model, head.noise, pool_z[picks])
        j_pool = post.lin.jacobian(pool_z)[:, cols]
        variances = torch.diagonal(j_pool @ dense @ j_pool.T).view(len(pool_z), -1)
        for cls in range(model.num_classes):
            torch.testing.assert_close(kernel.variance, variances[:, cls], rtol=1e-8,
                                       atol=1e-12)


def test_each_pick_maximises_the_flip_probability_given_the_earlier_picks(ranked):
    model, post, head, _, pool, pool_z = ranked
    ranking = select_batch(head, pool, batch_size=5)
    assert ranking.strategy == "posterior" and len(set(ranking.order)) == 5
    for t, (s, score) in enumerate(zip(ranking.order, ranking.scores, strict=True)):
        earlier = ranking.order[:t]
        observed = pool_z[earlier] if earlier else None
        dense, cols = dense_head_covariance(post, model, head.noise, observed)
        j_pool = post.lin.jacobian(pool_z)[:, cols]
        variance = torch.diagonal(j_pool @ dense @ j_pool.T).view(len(pool_z), -1)[:, 0]
        log_p = flip_log_probability(pool.outputs, variance)
        log_p[earlier] = -torch.inf
        assert s == int(log_p.argmax())
        assert score == pytest.approx(float(log_p[s].exp()), rel=1e-8)
        # brute force: Phi(-margin / sqrt(2 var)) of the served outputs
        top = torch.sort(pool.outputs[s], descending=True).values
        normal = torch.distributions.Normal(0.0, 1.0)
        flip = float(normal.cdf(-(top[0] - top[1]) / torch.sqrt(2 * variance[s])))
        assert score == pytest.approx(flip, rel=1e-6)


def test_a_pick_lowers_the_variance_of_its_near_duplicates_most(ranked):
    _, _, head, _, pool, _ = ranked
    # The pool twice over: picking item 0 must shrink its copy's variance as its own.
    features = torch.cat([pool.features, pool.features[:1]])
    kernel = ConditionedKernel(features, head.covariance, head.noise, max_picks=1)
    before = kernel.variance.clone()
    kernel.condition(0)
    drop = (before - kernel.variance) / before
    assert drop[-1] == pytest.approx(float(drop[0]), rel=1e-10)
    assert float(drop[-1]) >= float(drop[1:-1].max())


def test_cold_start_picks_typical_items_of_every_cluster_before_outliers():
    generator = torch.Generator().manual_seed(0)
    axis = torch.eye(8, dtype=torch.float64)
    big = 3 * axis[0] + 0.3 * torch.randn(40, 8, generator=generator, dtype=torch.float64)
    small = 3 * axis[1] + 0.3 * torch.randn(15, 8, generator=generator, dtype=torch.float64)
    outliers = -3 * axis[2:5]  # one of a kind each
    features = torch.cat([big, small, outliers])
    ranking = cold_start_batch(features, batch_size=2)
    assert ranking.strategy == "cold_start"
    assert ranking.order[0] < 40 and 40 <= ranking.order[1] < 55  # the larger cluster first
    centre = torch.nn.functional.normalize(features, dim=1)[:40].mean(0)
    closeness = torch.nn.functional.normalize(features[:40], dim=1) @ centre
    assert int(closeness.argsort(descending=True)[:5].eq(ranking.order[0]).sum()) == 1
    assert cold_start_batch(features, batch_size=2).order == ranking.order  # deterministic
    assert ranking.scores[0] >= ranking.scores[1] > 0
    five = cold_start_batch(features, batch_size=5)
    assert len(set(five.order)) == 5


def test_batch_size_is_checked_and_clipped_to_the_pool(ranked):
    _, _, head, _, pool, _ = ranked
    with pytest.raises(InvalidDataError, match="batch_size"):
        select_batch(head, pool, batch_size=0)
    assert len(select_batch(head, pool, batch_size=100).order) == len(pool.outputs)
