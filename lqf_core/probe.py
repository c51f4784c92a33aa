"""Linear probes on frozen features: the closed-form ridge probe and logistic regression.

The ridge probe also initialises the LQF head: a zero or random head would zero or
scramble the Jacobian of every earlier layer (docs/method.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def fit_ridge(
    features: torch.Tensor, targets: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with an unpenalised intercept.

    features (n, D), targets (n, C) -> weight (C, D), bias (C,). The penalty is
    `l2 * tr(Phi_c^T Phi_c) / D` (Phi_c: centred features), so `l2` does not depend on
    the scale of the features. Solved in float64, in the primal or dual form, whichever
    is smaller.
    """
    phi = features.double()
    y = targets.double()
    mean_phi = phi.mean(0)
    mean_y = y.mean(0)
    phi_c = phi - mean_phi
    y_c = y - mean_y
    n, d = phi_c.shape
    alpha = l2 * float((phi_c**2).sum()) / d + 1e-12
    if n >= d:
        gram = phi_c.T @ phi_c + alpha * torch.eye(d, dtype=phi.dtype, device=phi.device)
        weight_t = torch.linalg.solve(gram, phi_c.T @ y_c)
    else:
        gram = phi_c @ phi_c.T + alpha * torch.eye(n, dtype=phi.dtype, device=phi.device)
        weight_t = phi_c.T @ torch.linalg.solve(gram, y_c)
    weight = weight_t.T
    bias = mean_y - weight @ mean_phi
    return weight.to(features.dtype), bias.to(features.dtype)


@dataclass
class RidgeMoments:
    """The sums over items the ridge probe needs (float64): a distributed fit adds each
    rank's moments, then solves once (the primal form of `fit_ridge`)."""

    count: torch.Tensor       # (1,)
    sum_phi: torch.Tensor     # (D,)
    sum_y: torch.Tensor       # (C,)
    phi_phi: torch.Tensor     # (D, D)
    phi_y: torch.Tensor       # (D, C)

    @classmethod
    def of(cls, features: torch.Tensor, targets: torch.Tensor) -> RidgeMoments:
        phi, y = features.double(), targets.double()
        return cls(torch.tensor([float(len(phi))], dtype=torch.float64, device=phi.device),
                   phi.sum(0), y.sum(0), phi.T @ phi, phi.T @ y)

    def reduced(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> RidgeMoments:
        return RidgeMoments(*(reduce(t) for t in (self.count, self.sum_phi, self.sum_y,
                                                   self.phi_phi, self.phi_y)))


def fit_ridge_from_moments(m: RidgeMoments, l2: float, dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_ridge` from the moments of its data (equal up to rounding)."""
    n = float(m.count[0])
    mean_phi, mean_y = m.sum_phi / n, m.sum_y / n
    centred = m.phi_phi - n * torch.outer(mean_phi, mean_phi)
    d = centred.shape[0]
    alpha = l2 * float(centred.trace()) / d + 1e-12
    eye = torch.eye(d, dtype=centred.dtype, device=centred.device)
    weight_t = torch.linalg.solve(centred + alpha * eye,
                                  m.phi_y - n * torch.outer(mean_phi, mean_y))
    weight = weight_t.T
    bias = mean_y - weight @ mean_phi
    return weight.to(dtype), bias.to(dtype)


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
    max_iters: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with L2 on the weights, by L-BFGS.

    features (n, D) are standardised internally (the returned weights undo it), so `l2`
    means the same on every backbone. Returns weight (C, D), bias (C,).
    """
    phi = features.double()
    mean = phi.mean(0)
    std = phi.std(0).clamp_min(1e-6) if phi.shape[0] > 1 else torch.ones_like(mean)
    x = (phi - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=max_iters, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * l2 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    w = (weight.detach() / std)
    b = bias.detach() - w @ mean
    return w.to(features.dtype), b.to(features.dtype)
