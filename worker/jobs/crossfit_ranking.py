"""The stored form of a model's cross-fitted mislabel ranking (`self_influence.json`),
written by a self-influence job or, for a job that cross-fitted its temperature, with
the model itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lqf_core.crossfit import DEFAULT_FOLDS
from state.ids import utc_now


def crossfit_ranking(model_id: str, job_id: str, names: Sequence[str], ids: Sequence[str],
                     labels: Sequence[int], scores: Sequence[float],
                     predicted: Sequence[int], seconds: float) -> dict[str, Any]:
    """The stored self-influence ranking: items by cross-fitted mislabel score, highest
    first (the order of `ids`, `labels`, `scores` and `predicted` is the same)."""
    order = sorted(range(len(ids)), key=lambda i: -scores[i])
    return {
        "model_id": model_id, "method": "crossfit", "folds": DEFAULT_FOLDS,
        "job_id": job_id, "created_at": utc_now(), "seconds": seconds,
        "items": [{"item_id": int(ids[i]), "label": names[labels[i]],
                   "predicted_label": names[predicted[i]], "score": float(scores[i])}
                  for i in order],
    }
