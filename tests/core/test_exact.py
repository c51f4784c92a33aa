"""The exact function-space solver (gram.py, exact.py) against dense brute force.

Float64, tiny networks: the Gram matrix equals J Jᵀ from the dense Jacobian; the served
model is the optimum of the LQF objective (a dense primal solve); its leave-one-out
outputs equal retraining without each item (prior strength N λ and w0 fixed); forgetting
equals a fresh job.
"""

from __future__ import annotations

import pytest
import torch

from lqf_core.config import Solver, TrainConfig
from lqf_core.errors import InvalidConfigError
from lqf_core.exact import DualFactor
from lqf_core.gram import LayerSignals, _add_by_positions, _add_by_rows, gram_matrix, layer_signals
from lqf_core.linearize import LinearizedNet
from lqf_core.lqf import fit_lqf
from lqf_core.model import LOO_OUTPUTS

from .factories import (
    colour_shifted_images,
    tiny_inputs,
    tiny_suffix_net,
    trained_with_posterior,
)
from .test_posterior import forget_versus_fresh

CONFIG = TrainConfig(backbone="tiny_cnn", image_size=16, suffix_blocks=1, weight_decay=0.05,
                     probe_l2=1.0, kappa=2.0, solver=Solver.EXACT)


@pytest.fixture(scope="module")
def data():
    return colour_shifted_images(5, {1: (1, 1.0), 2: (2, -1.0)})


def test_gram_matrix_equals_the_dense_jacobian_product():
    lin = LinearizedNet(tiny_suffix_net(num_classes=3))
    z = tiny_inputs(n=5)
    jac = lin.jacobian(z)
    signals = layer_signals(lin, z, batch_size=2)  # several batches
    assert torch.allclose(gram_matrix(signals), jac @ jac.T, rtol=1e-10, atol=1e-10)


def test_both_contractions_give_the_same_layer_block():
    lin = LinearizedNet(tiny_suffix_net(num_classes=3))
    signals = layer_signals(lin, tiny_inputs(n=4))
    ungrouped = next(s for s in signals if s.inputs.shape[1] == 1 and s.inputs.shape[-1] > 1)
    by_rows = torch.zeros(12, 12, dtype=torch.float64)
    _add_by_rows(by_rows, ungrouped)
    diagonal, off = torch.zeros_like(by_rows), torch.zeros_like(by_rows)
    _add_by_positions(diagonal, off, ungrouped)
    assert torch.allclose(diagonal + off + off.T, by_rows, rtol=1e-10, atol=1e-12)
    assert isinstance(ungrouped, LayerSignals)


@pytest.fixture(scope="module")
def exact_fit(backbone, data):
    x, labels, _ = data
    with torch.no_grad():
        z = backbone.split(CONFIG.suffix)[0](x)
    fit = fit_lqf(backbone, z, labels, 3, CONFIG, torch.device("cpu"))
    return z, labels, fit


def dense_optimum(setup, keep: torch.Tensor, prior: float) -> torch.Tensor:
    """argmin 1/2 Σ_kept ||f0 + J dw - Y||² + prior/2 ||dw||², by a dense primal solve."""
    problem = setup.problem
    n, c = problem.targets.shape
    jac = setup.lin.jacobian(problem.z).view(n, c, -1)[keep].flatten(0, 1)
    residual = (problem.targets - problem.output0)[keep].reshape(-1)
    hessian = jac.T @ jac + prior * torch.eye(jac.shape[1], dtype=jac.dtype)
    return torch.linalg.solve(hessian, jac.T @ residual)


def dense_dual_optimum(setup, keep: torch.Tensor, prior: float,
                       jacobian: torch.Tensor) -> torch.Tensor:
    """The same optimum by the push-through identity dw = Jᵀ (J Jᵀ + prior I)⁻¹ r, on the
    dense Jacobian (P is in the thousands here; the kept N C in the tens)."""
    problem = setup.problem
    n, c = problem.targets.shape
    jac = jacobian.view(n, c, -1)[keep].flatten(0, 1)
    residual = (problem.targets - problem.output0)[keep].reshape(-1)
    gram = jac @ jac.T + prior * torch.eye(jac.shape[0], dtype=jac.dtype)
    return jac.T @ torch.linalg.solve(gram, residual)


def test_the_exact_fit_is_the_optimum_of_the_objective(exact_fit):
    _, labels, fit = exact_fit
    n = len(labels)
    everything = torch.ones(n, dtype=torch.bool)
    direct = dense_optimum(fit.setup, everything, n * CONFIG.weight_decay)
    assert torch.allclose(fit.delta, direct, rtol=1e-9, atol=1e-10)
    dual = dense_dual_optimum(fit.setup, everything, n * CONFIG.weight_decay,
                              fit.setup.lin.jacobian(fit.setup.problem.z))
    assert torch.allclose(dual, direct, rtol=1e-9, atol=1e-10)
    assert fit.info["relative_grad_norm"] <= 1e-9
    assert fit.info["solver_converged"] and fit.info["solver"] == "exact"


def test_leave_one_out_outputs_equal_retraining_without_the_item(exact_fit):
    z, labels, fit = exact_fit
    n = len(labels)
    prior = n * CONFIG.weight_decay  # held fixed: docs/method.md's LOO convention
    assert fit.loo_outputs is not None
    jacobian = fit.setup.lin.jacobian(z)
    for i in range(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        retrained = dense_dual_optimum(fit.setup, keep, prior, jacobian)
        actual = fit.setup.lin.forward(z[i:i + 1], retrained)[0]
        assert torch.allclose(fit.loo_outputs[i], actual, rtol=1e-8, atol=1e-9)


def test_dual_factor_restores_the_gram_matrix_it_shifts():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    gram = m @ m.T
    before = gram.clone()
    factor = DualFactor.factor(gram, num_items=3, weight_decay=0.5)
    assert torch.allclose(gram, before, rtol=0, atol=1e-12)
    inverse = torch.linalg.inv(before + 1.5 * torch.eye(6, dtype=torch.float64))
    blocks = factor.diagonal_blocks()
    for i in range(3):
        assert torch.allclose(blocks[i], inverse[2 * i:2 * i + 2, 2 * i:2 * i + 2])


@pytest.fixture(scope="module")
def exact_job(backbone, data):
    """A training job of the exact solver on `data`, and its posterior."""
    x, labels, _ = data
    return trained_with_posterior(backbone, x, labels, CONFIG)


def test_a_job_with_the_exact_solver_trains_on_every_item(data, exact_job):
    _, labels, _ = data
    model, _ = exact_job
    assert model.info["num_val"] == 0 and model.info["num_train"] == len(labels)
    assert {"loo_accuracy", "loo_nll", "loo_ece"} <= set(model.metrics)
    assert model.temperature > 0
    assert model.info["solver_converged"]


def test_the_posterior_of_an_exact_model_serves_its_stored_leave_one_out(data, exact_job):
    _, labels, _ = data
    model, post = exact_job
    stored = model.tensors[LOO_OUTPUTS]
    assert stored.shape == (len(labels), 3)
    assert torch.allclose(post.loo_residuals(), post.problem.targets - stored)
    scores, loo_labels = post.self_influence()
    assert torch.equal(loo_labels, stored.argmax(1))
    assert torch.allclose(scores, ((post.problem.targets - stored) ** 2).sum(1) / 4.0)


@pytest.mark.parametrize("forgotten", [["3"], ["0", "7", "10"]])
def test_forgetting_equals_a_fresh_exact_job(backbone, data, exact_job, forgotten):
    parent, _ = exact_job
    child, difference = forget_versus_fresh(parent, CONFIG, forgotten, backbone, data)
    assert difference <= 1e-9
    assert not child.info["warm_started"]  # a direct solve has no start to reuse


def test_the_exact_solver_refuses_other_objectives():
    with pytest.raises(InvalidConfigError, match="exact"):
        TrainConfig.from_dict({"solver": "exact", "loss": "ce"})
    with pytest.raises(InvalidConfigError, match="exact"):
        TrainConfig.from_dict({"solver": "exact", "regularizer": "kfac"})
