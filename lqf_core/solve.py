"""Preconditioned conjugate gradient for the LQF normal equations H x = b.

Because the LQF loss is an exact quadratic, the solver stops at a stated tolerance on
the relative gradient norm ||H x - b|| / ||b|| instead of "after n epochs".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lqf_core.errors import TrainingCancelled

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SolveResult:
    x: torch.Tensor
    iterations: int
    relative_residual: float  # ||H x - b|| / ||b||: the final relative gradient norm
    converged: bool
    history: list[float]


def conjugate_gradient(
    matvec: MatVec,
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    preconditioner: MatVec | None = None,
    tol: float = 1e-6,
    max_iters: int = 1000,
    callback: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_iterate: Callable[[int, torch.Tensor], None] | None = None,
) -> SolveResult:
    """Solve H x = b for symmetric positive definite H (given as `matvec`).

    Stops when ||b - H x|| <= tol * ||b|| or after `max_iters` H-products.
    `preconditioner` applies M^-1 with M ~ H (symmetric positive definite, fixed).
    `on_iterate(i, x)` sees every iterate (e.g. to study accuracy along the path).
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    b_norm = float(b.norm())
    if b_norm == 0:
        return SolveResult(torch.zeros_like(b), 0, 0.0, True, [0.0])
    r = b - matvec(x) if x0 is not None else b.clone()
    rel = float(r.norm()) / b_norm
    history = [rel]
    if rel <= tol:
        return SolveResult(x, 0, rel, True, history)
    z = preconditioner(r) if preconditioner is not None else r
    p = z.clone()
    rz = torch.dot(r, z)
    iterations = 0
    for iterations in range(1, max_iters + 1):
        if should_stop is not None and should_stop():
            # A Cancelled: a training job's stop, or a query's deadline (the posterior's solves).
            raise TrainingCancelled("stopped during the solve")
        hp = matvec(p)
        alpha = rz / torch.dot(p, hp)
        x = x + alpha * p
        r = r - alpha * hp
        rel = float(r.norm()) / b_norm
        history.append(rel)
        if callback is not None:
            callback(iterations, rel)
        if on_iterate is not None:
            on_iterate(iterations, x)
        if rel <= tol:
            break
        z = preconditioner(r) if preconditioner is not None else r
        rz_next = torch.dot(r, z)
        p = z + (rz_next / rz) * p
        rz = rz_next
    # The recursive residual drifts from the true one in float32: report the true one.
    true_rel = float((b - matvec(x)).norm()) / b_norm
    return SolveResult(x, iterations, true_rel, true_rel <= tol * 1.5, history)
