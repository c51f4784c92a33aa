"""Temperature scaling (Guo et al. 2017) and the calibration metrics we report."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T) on held-out data.

    A log-spaced grid then a finer grid around the best point: robust, and cheap for the
    one scalar it fits.
    """
    if logits.shape[0] == 0:
        return 1.0
    logits = logits.double()

    def nll(t: float) -> float:
        return float(F.cross_entropy(logits / t, labels))

    grid = torch.logspace(-3, 3, 121).tolist()
    best = min(grid, key=nll)
    fine = (best * torch.logspace(-0.05, 0.05, 41)).tolist()
    return float(min(fine, key=nll))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean()) if len(labels) else math.nan


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    picked = probs[torch.arange(len(labels)), labels].clamp_min(1e-12)
    return float(-picked.log().mean()) if len(labels) else math.nan


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
