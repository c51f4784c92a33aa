from __future__ import annotations

import pytest
import torch

from lqf_core.errors import TrainingCancelled
from lqf_core.linearize import LinearizedNet
from lqf_core.lqf import QuadraticProblem, kfac_preconditioner, solve_quadratic
from lqf_core.solve import conjugate_gradient
from tests.core.factories import tiny_inputs, tiny_suffix_net, tiny_targets


def dense_problem(problem: QuadraticProblem) -> tuple[torch.Tensor, torch.Tensor]:
    jac = problem.lin.jacobian(problem.z)
    n = problem.n
    hessian = jac.T @ jac / n + problem.weight_decay * torch.eye(jac.shape[1], dtype=jac.dtype)
    rhs = jac.T @ (problem.targets - problem.output0).reshape(-1) / n
    return hessian, rhs


@pytest.fixture(params=[True, False], ids=["cached", "uncached"])
def problem(request: pytest.FixtureRequest) -> QuadraticProblem:
    lin = LinearizedNet(tiny_suffix_net())
    return QuadraticProblem(lin, tiny_inputs(), tiny_targets(), weight_decay=1e-2, batch_size=4,
                            cache=request.param)


def test_cg_matches_direct_solve_on_random_spd():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(30, 30, generator=generator, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=generator, dtype=torch.float64)
    result = conjugate_gradient(lambda v: a @ v, b, tol=1e-12, max_iters=200)
    expected = torch.linalg.solve(a, b)
    assert result.converged
    assert float((result.x - expected).norm() / expected.norm()) <= 1e-9


def test_hessian_matvec_and_rhs_equal_dense(problem: QuadraticProblem):
    hessian, rhs = dense_problem(problem)
    v = torch.randn(problem.lin.num_params, dtype=torch.float64)
    torch.testing.assert_close(problem.hessian_matvec(v), hessian @ v)
    torch.testing.assert_close(problem.rhs(), rhs)


@pytest.mark.parametrize("use_kfac", [True, False])
def test_solver_optimum_equals_direct_solve_of_normal_equations(problem, use_kfac):
    hessian, rhs = dense_problem(problem)
    expected = torch.linalg.solve(hessian, rhs)
    precond = kfac_preconditioner(problem) if use_kfac else None
    result = solve_quadratic(problem, precond, tol=1e-10, max_iters=500)
    assert result.converged, result.history[-5:]
    assert result.relative_residual <= 1e-10 * 1.5
    assert float((result.x - expected).norm() / expected.norm()) <= 1e-5


def test_loss_is_exactly_quadratic_in_delta_w(problem: QuadraticProblem):
    hessian, rhs = dense_problem(problem)
    generator = torch.Generator().manual_seed(5)
    loss0 = problem.loss(torch.zeros(problem.lin.num_params, dtype=torch.float64))
    for _ in range(3):
        dw = torch.randn(problem.lin.num_params, generator=generator, dtype=torch.float64)
        expected = loss0 - float(rhs @ dw) + 0.5 * float(dw @ hessian @ dw)
        assert problem.loss(dw) == pytest.approx(expected, rel=1e-10)


def test_solver_reports_cancellation(problem: QuadraticProblem):
    with pytest.raises(TrainingCancelled):
        solve_quadratic(problem, None, tol=1e-12, max_iters=50, should_stop=lambda: True)


def test_the_solve_stage_totals_where_the_solver_will_stop():
    from lqf_core.train import expected_iterations

    # a residual falling tenfold per iteration reaches 1e-4 at iteration 4
    assert expected_iterations(2, 1e-2, 1e-4, 500) == 4
    assert expected_iterations(45, 9e-5, 1e-4, 500) == 45  # reached: the stage ends
    assert expected_iterations(1, 0.9, 1e-4, 50) == 50  # never beyond the budget
    assert expected_iterations(3, None, 1e-4, 10) == 10  # no norm (the CE ablation)


def test_a_converged_fit_reports_a_solve_stage_that_ends_full(backbone):
    from lqf_core.config import TrainConfig
    from lqf_core.train import train_model
    from tests.core.factories import separable_images

    x, labels = separable_images(18, seed=1)
    seen = []
    config = TrainConfig(backbone="tiny_cnn", image_size=16, val_fraction=0.0,
                         suffix_blocks=1, device="cpu")
    model = train_model(x, labels.tolist(), ["a", "b", "c"], config, backbone=backbone,
                        progress=seen.append)
    solve = [p for p in seen if p.stage == "solve"]
    assert model.info["solver_converged"] and model.info["solver_iterations"] < 500
    assert solve[-1].step == solve[-1].total == model.info["solver_iterations"]
