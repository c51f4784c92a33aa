"""The temperature fit and the calibration metrics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lqf_core.calibration import fit_temperature, negative_log_likelihood


def _plain_nll_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    grid = torch.logspace(-3, 3, 2401, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return float(grid[nll.argmin()])


def test_held_out_outputs_all_right_give_a_finite_temperature() -> None:
    # Every held-out item classified right: the plain NLL falls all the way to T -> 0.
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    logits = F.one_hot(labels, 4).double() * 5 + 0.5 * torch.randn(40, 4, generator=generator,
                                                                   dtype=torch.float64)
    assert bool((logits.argmax(1) == labels).all())
    assert _plain_nll_temperature(logits, labels) < 2e-3
    temperature = fit_temperature(logits, labels)
    confidence = torch.softmax(logits / temperature, 1).max(1).values
    assert temperature > 0.3
    # About the rule of succession's n / (n + 1) on average, never certain.
    assert 0.9 < float(confidence.mean()) < 0.995
    assert float(confidence.max()) < 1 - 1e-6


def test_with_errors_the_temperature_is_near_the_plain_maximum_likelihood() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (400,), generator=generator)
    logits = F.one_hot(labels, 5).double() * 2 + torch.randn(400, 5, generator=generator,
                                                             dtype=torch.float64)
    assert float((logits.argmax(1) != labels).double().mean()) > 0.1
    plain = _plain_nll_temperature(logits, labels)
    assert math.isclose(fit_temperature(logits, labels), plain, rel_tol=0.03)


def test_a_certain_right_answer_has_an_nll_of_plus_zero() -> None:
    nll = negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert nll == 0.0 and math.copysign(1.0, nll) == 1.0
