"""Leaky activations that LQF swaps in for ReLU / ReLU6 (paper §3.1).

A dead ReLU zeroes the Jacobian of everything before it, so the linearized model
could not move those weights. For ReLU6 (MobileNetV2) we use a leaky version of the
same clipped shape, leaky at both ends: at slope 0 it *is* ReLU6, so the swap changes
the pre-trained function as little as possible for a given slope.
"""

from __future__ import annotations

import torch
from torch import nn


class LeakyReLU6(nn.Module):
    """x < 0: s*x;  0 <= x <= 6: x;  x > 6: 6 + s*(x - 6)."""

    def __init__(self, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.negative_slope
        return torch.where(x < 0, s * x, torch.where(x > 6, 6 + s * (x - 6), x))

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


def swap_to_leaky(module: nn.Module, negative_slope: float) -> int:
    """Replace every ReLU / ReLU6 inside `module` in place; returns how many were swapped.

    With negative_slope == 0 nothing is changed (the "no Leaky-ReLU" ablation).
    """
    if negative_slope == 0:
        return 0
    swapped = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, LeakyReLU6(negative_slope))
                swapped += 1
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, nn.LeakyReLU(negative_slope))
                swapped += 1
    return swapped
