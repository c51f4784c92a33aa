"""What the model page shows about held-out items: confusion matrix, per-class accuracy
and reliability bins, from the outputs the training job stored (`info.heldout`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RELIABILITY_BINS = 10


@dataclass
class Evaluation:
    split: str  # "val": held out of training; "loo": each item left out (exact solver)
    classes: list[str]
    confusion: list[list[int]]  # [true][predicted]
    per_class_accuracy: list[float | None]
    bins: list[dict]
    ece: float
    accuracy: float
    count: int


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor,
                     n_bins: int = RELIABILITY_BINS) -> tuple[list[dict], float]:
    """Equal-width confidence bins -> ([{lo, hi, count, confidence, accuracy}], ECE)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    bins, ece, n = [], 0.0, max(len(labels), 1)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        count = int(inside.sum())
        conf = float(confidence[inside].mean()) if count else 0.0
        acc = float(correct[inside].mean()) if count else 0.0
        ece += count / n * abs(acc - conf)
        bins.append({"lo": lo, "hi": hi, "count": count, "confidence": conf, "accuracy": acc})
    return bins, ece


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
    bins, ece = reliability_bins(probs, y)
    return Evaluation(split, classes, confusion.tolist(), per_class, bins, ece,
                      float((predicted == y).double().mean()) if len(y) else 0.0, len(y))
