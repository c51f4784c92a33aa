"""The kfac regularizer, mu/2 dw^T (K + lambda I) dw, against dense direct solves.

With M = K + lambda I (SPD, its inverse exact through the factors' eigenbases) the
optimum of  1/(2N) ||J dw - r||^2 + mu/2 dw^T M dw  is, by the push-through identity,
    dw* = M^-1 J^T (J M^-1 J^T + N mu I)^-1 r,
a direct solve in the N*C-dimensional dual that shares no code with the CG solver.
"""

from __future__ import annotations

import pytest
import torch

from lqf_core.config import Regularizer, TrainConfig
from lqf_core.errors import InvalidConfigError
from lqf_core.posterior import LQFPosterior

from .factories import colour_shifted_images, leave_one_out_changes, trained_with_posterior
from .test_posterior import forget_versus_fresh

CONFIG = TrainConfig(backbone="tiny_cnn", image_size=16, val_fraction=0.0, suffix_blocks=1,
                     weight_decay=0.05, probe_l2=1.0, kappa=2.0, tol=1e-11, max_iters=500,
                     regularizer=Regularizer.KFAC, metric_strength=1.0)


@pytest.fixture(scope="module")
def data():
    return colour_shifted_images(3, {0: (0, 1.0), 2: (2, 1.0)})


@pytest.fixture(scope="module")
def fitted(backbone, data):
    x, labels, _ = data
    return trained_with_posterior(backbone, x, labels, CONFIG, tol=1e-11, max_iters=500)


def dual_solve(post: LQFPosterior, keep: torch.Tensor, mu: float) -> torch.Tensor:
    """The optimum on the kept items, by the direct dual formula (M fixed)."""
    metric = post.curvature().kfac
    n_keep = int(keep.sum())
    jac = post.lin.jacobian(post.problem.z).view(post.n, -1, post.lin.num_params)
    jac = jac[keep].flatten(0, 1)
    residual = (post.problem.targets - post.problem.output0)[keep].reshape(-1)
    m_inv_jt = torch.stack([metric(row) for row in jac], dim=1)  # (P, n C)
    gram = jac @ m_inv_jt + n_keep * mu * torch.eye(jac.shape[0], dtype=jac.dtype)
    return m_inv_jt @ torch.linalg.solve(gram, residual)


def test_the_metric_is_the_inverse_of_the_preconditioner(fitted):
    _, post = fitted
    kfac = post.curvature().kfac
    v = torch.randn(post.lin.num_params, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    torch.testing.assert_close(kfac.matvec(kfac(v)), v, rtol=1e-9, atol=1e-9)
    assert float(v @ kfac.matvec(v)) > 0


def test_the_fit_converges_to_the_direct_solve(fitted):
    model, post = fitted
    assert model.info["solver_converged"] and model.info["relative_grad_norm"] <= 1e-11 * 1.5
    expected = dual_solve(post, torch.ones(post.n, dtype=torch.bool), CONFIG.metric_strength)
    assert float((post.delta - expected).norm() / expected.norm()) <= 1e-8
    # Few iterations: the preconditioned system is well conditioned.
    assert model.info["solver_iterations"] < post.lin.num_params


def test_exact_leave_one_out_equals_retraining_with_the_same_prior(fitted, backbone):
    """The closed form removes item i with the prior (N mu/2 dw^T M dw) kept fixed."""
    _, post = fitted
    z_star = post.problem.z[:1] * 0.5
    influence = post.influence(z_star)
    mu_without_one = CONFIG.metric_strength * post.n / (post.n - 1)
    actual_t = leave_one_out_changes(post, z_star, influence.output_class,
                                     lambda keep: dual_solve(post, keep, mu_without_one))
    assert influence.exact is not None
    assert float((influence.exact - actual_t).norm() / actual_t.norm()) <= 1e-6


def test_the_posterior_equals_the_dense_formula(fitted, backbone, data):
    """J_* H^-1 J_*^T with H = J^T J / N + mu M, by Woodbury in the dual:
    (A - B^T (N mu I + J M^-1 J^T)^-1 B) / mu, A = J_* M^-1 J_*^T, B = J M^-1 J_*^T."""
    _, post = fitted
    with torch.no_grad():
        z_star = backbone.split(CONFIG.suffix)[0](data[2][:2])
    cov = post.predictive_covariance(z_star)
    metric, mu = post.curvature().kfac, CONFIG.metric_strength
    jac = post.lin.jacobian(post.problem.z)
    m_inv_jt = torch.stack([metric(row) for row in jac], dim=1)
    gram = jac @ m_inv_jt + post.n * mu * torch.eye(jac.shape[0], dtype=jac.dtype)
    for i in range(2):
        j_star = post.lin.jacobian(z_star[i:i + 1])
        m_inv_js = torch.stack([metric(row) for row in j_star], dim=1)
        cross = jac @ m_inv_js
        expected = (j_star @ m_inv_js - cross.T @ torch.linalg.solve(gram, cross)) / mu
        torch.testing.assert_close(cov[i], expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("forgotten", [["4"], ["0", "5", "10"]])
def test_forgetting_equals_a_fresh_fit_and_starts_from_the_parent(fitted, backbone, data,
                                                                  forgotten):
    """The optimum is unique, so the forget job starts from its converged parent and still
    ends where a fresh job on the remaining items ends (K and the head refitted)."""
    model, _ = fitted
    child, difference = forget_versus_fresh(model, CONFIG, forgotten, backbone, data)
    assert difference <= 1e-6
    assert model.info["solver_converged"] and child.info["warm_started"]


def test_the_kfac_regularizer_needs_kfac_and_mse():
    with pytest.raises(InvalidConfigError, match="regularizer 'kfac' needs"):
        TrainConfig.from_dict({"regularizer": "kfac", "use_kfac": False})
    with pytest.raises(InvalidConfigError, match="metric_strength"):
        TrainConfig.from_dict({"regularizer": "kfac", "metric_strength": 0})
