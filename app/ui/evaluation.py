"""What the model page shows about held-out items: confusion matrix, per-class accuracy
and reliability bins, from the outputs the training job stored (`info.heldout`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lqf_core.calibration import expected_calibration_error

RELIABILITY_BINS = 10


@dataclass
class Evaluation:
    # "val": held out of training; "loo": each item left out (exact solver); "cv": each
    # item's fold left out (cross-fitted calibration)
    split: str
    classes: list[str]
    confusion: list[list[int]]  # [true][predicted]
    per_class_accuracy: list[float | None]
    bins: list[dict]
    ece: float  # 15 equal-width bins, as lqf_core.calibration (the diagram draws 10)
    accuracy: float
    count: int


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor,
                     n_bins: int = RELIABILITY_BINS) -> list[dict]:
    """Equal-width confidence bins for the diagram: [{lo, hi, count, confidence, accuracy}]."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    bins = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        count = int(inside.sum())
        conf = float(confidence[inside].mean()) if count else 0.0
        acc = float(correct[inside].mean()) if count else 0.0
        bins.append({"lo": lo, "hi": hi, "count": count, "confidence": conf, "accuracy": acc})
    return bins


def evaluate(heldout: dict, labels: Sequence[int], classes: list[str],
             temperature: float) -> Evaluation:
    """`labels`: each held-out item's class index, in `heldout["item_ids"]` order."""
    logits = torch.tensor(heldout["logits"], dtype=torch.float64)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    probs = torch.softmax(logits / max(float(temperature), 1e-6), dim=1)
    return evaluation_of(heldout["split"], probs, y, classes)


def evaluation_of(split: str, probs: torch.Tensor, y: torch.Tensor,
                  classes: list[str]) -> Evaluation:
    c = len(classes)
    predicted = probs.argmax(dim=1)
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((y, predicted), torch.ones_like(y), accumulate=True)
    totals = confusion.sum(dim=1)
    per_class = [float(confusion[k, k] / totals[k]) if totals[k] else None for k in range(c)]
    # The ECE the training job reports (15 bins), so that the page agrees with the metrics.
    ece = expected_calibration_error(probs, y) if len(y) else 0.0
    return Evaluation(split, classes, confusion.tolist(), per_class, reliability_bins(probs, y),
                      ece,
                      float((predicted == y).double().mean()) if len(y) else 0.0, len(y))
