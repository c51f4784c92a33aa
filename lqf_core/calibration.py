"""Temperature scaling (Guo et al. 2017) and the calibration metrics we report."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T) on held-out data, with
    one pseudo-observation of a uniform label (Laplace's rule of succession).

    Without it, held-out outputs that are all classified right (an easy data set, a few
    items) make the NLL fall all the way to T -> 0: every later answer, on noise too,
    would be 100 % sure. The pseudo-observation is spread evenly over the held-out items'
    logits; it weighs 1 / (n + 1) of the objective, so with errors in the held-out items
    it moves T little, and with none the confidence settles near n / (n + 1).
    A log-spaced grid then a finer grid around the best point: robust, and cheap for the
    one scalar it fits.
    """
    if logits.shape[0] == 0:
        return 1.0
    logits = logits.double()
    n = logits.shape[0]

    def objective(t: float) -> float:
        log_probs = F.log_softmax(logits / t, dim=1)
        observed = -log_probs[torch.arange(n), labels].sum()
        pseudo = -log_probs.mean(dim=1).mean()  # a uniform label over the classes
        return float((observed + pseudo) / (n + 1))

    grid = torch.logspace(-3, 3, 121).tolist()
    best = min(grid, key=objective)
    fine = (best * torch.logspace(-0.05, 0.05, 41)).tolist()
    return float(min(fine, key=objective))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean()) if len(labels) else math.nan


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    picked = probs[torch.arange(len(labels)), labels].clamp_min(1e-12)
    # + 0.0: a certain right answer is an NLL of 0, not -0.
    return float(-picked.log().mean()) + 0.0 if len(labels) else math.nan


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (the usual 15)."""
    if len(labels) == 0:
        return math.nan
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = (confidence[in_bin].double().mean() - correct[in_bin].mean()).abs()
            ece += float(gap) * float(in_bin.double().mean())
    return ece
