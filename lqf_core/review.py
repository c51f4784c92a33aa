"""What a labeling team reviews after a training run: for each labelled item, the served
model's prediction, how surprising its given label is, and the training items behind
the prediction.

* mislabel score: ||residual of the model that did not learn from the item||^2 / kappa^2.
  For a training item that is its leave-one-out residual (LQFPosterior.self_influence):
  exact where the model stores its leave-one-out outputs (solver "exact"); the
  cross-fitted residual where the job cross-fitted its temperature (the model then
  carries the scores, info["crossfit"]: the model trained without the item's fifth);
  else by the K-FAC leverages. For an item the job held out (the temperature's fifth) it
  is the served model's own residual, exact;
* neighbors: the other training items whose removal would lower the item's predicted
  output the most (first-order influence, K-FAC), strongest first. Each costs one pass
  over the training set, so only the `neighbors_for` items with the highest mislabel
  scores get them: those a reviewer opens first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lqf_core.errors import Cancelled
from lqf_core.posterior import LQFPosterior
from lqf_core.serving import Predictor

PREFIX_BATCH = 64


@dataclass(frozen=True)
class TrainingPosterior:
    posterior: LQFPosterior
    prefix: nn.Module  # the frozen part of the backbone, on the predictor's device


def prefix_features(prefix: nn.Module, x: torch.Tensor, device: torch.device,
                    should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), PREFIX_BATCH):
            if should_stop is not None and should_stop():
                raise Cancelled("stopped while computing features")
            out.append(prefix(x[i:i + PREFIX_BATCH].to(device)))
    return torch.cat(out)


def image_features(predictor: Predictor, prefix: nn.Module, files: Sequence[Path],
                   should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Prefix outputs of image files, preprocessed as the predictor does."""
    x = torch.stack([predictor.load_image(f) for f in files])
    return prefix_features(prefix, x, predictor.device, should_stop)


def training_posterior(predictor: Predictor, files: Sequence[Path], labels: Sequence[int],
                       dtype: torch.dtype = torch.float32,
                       should_stop: Callable[[], bool] | None = None) -> TrainingPosterior:
    """The posterior of the predictor's (LQF) model, rebuilt from its training images in
    `model.info['train_item_ids']` order (IncompatibleModelError if they no longer
    reproduce it)."""
    model = predictor.model
    prefix = predictor.backbone.split(model.config.suffix)[0].to(predictor.device)
    prefix.eval()
    z = image_features(predictor, prefix, files, should_stop)
    posterior = LQFPosterior(model, predictor.backbone, z, torch.tensor(list(labels)),
                             device=predictor.device, dtype=dtype, should_stop=should_stop)
    return TrainingPosterior(posterior, prefix)


@dataclass(frozen=True)
class ItemReview:
    index: int  # position in the training set, or in the held-out items
    held_out: bool
    predicted: int  # the served model's class for it
    probability: float  # of that class (temperature-scaled, as /predict answers)
    mislabel_score: float
    loo_label: int  # the class the model trained without it gives
    neighbors: list[int] | None  # training positions, strongest support first


def review_items(posterior: LQFPosterior,
                 held_out: tuple[torch.Tensor, torch.Tensor] | None = None, top_k: int = 5,
                 neighbors_for: int = 100, should_stop: Callable[[], bool] | None = None
                 ) -> tuple[list[ItemReview], str]:
    """A review of every training item, then of each held-out item (prefix outputs,
    class indices) -> (reviews, the solver of the training items' mislabel scores:
    "exact", "crossfit" or "kfac")."""
    kappa = posterior.model.config.kappa
    crossfit = posterior.model.info.get("crossfit")
    with posterior.interruptible(should_stop):
        if crossfit is not None and posterior.stored_loo_outputs is None:
            train_scores = torch.tensor(crossfit["scores"], dtype=posterior.problem.z.dtype,
                                        device=posterior.problem.z.device)
            train_loo = torch.tensor(crossfit["predicted"], device=train_scores.device)
        else:
            train_scores, train_loo = posterior.self_influence(exact=False)
        z_all, outputs = posterior.problem.z, posterior.train_outputs
        scores, loo_labels = train_scores, train_loo
        if held_out is not None and len(held_out[1]):
            z_out = held_out[0].to(z_all)
            out_outputs = posterior.outputs(z_out)
            targets = kappa * torch.nn.functional.one_hot(
                held_out[1].to(z_all.device), posterior.num_classes).to(out_outputs)
            z_all = torch.cat([z_all, z_out])
            outputs = torch.cat([outputs, out_outputs])
            scores = torch.cat([scores, ((targets - out_outputs) ** 2).sum(1) / kappa**2])
            loo_labels = torch.cat([loo_labels, out_outputs.argmax(1)])
        probabilities = torch.softmax(outputs.double() / posterior.model.temperature, dim=1)
        ranked = torch.argsort(scores, descending=True)[:neighbors_for].tolist()
        neighbors: dict[int, list[int]] = {}
        for i in ranked:
            influence = posterior.influence(z_all[i:i + 1], exact=False, with_loo=False)
            support = influence.first_order.detach().double().cpu()
            if i < posterior.n:
                support[i] = 0.0  # a training item is not its own neighbor
            order = torch.argsort(support)  # most negative first: removing it hurts most
            neighbors[i] = [int(j) for j in order[:top_k] if support[j] < 0]
    predicted = probabilities.argmax(1)
    solver = ("exact" if posterior.stored_loo_outputs is not None
              else "crossfit" if crossfit is not None else "kfac")
    n = posterior.n
    reviews = [ItemReview(index=i if i < n else i - n, held_out=i >= n,
                          predicted=int(predicted[i]),
                          probability=float(probabilities[i, predicted[i]]),
                          mislabel_score=float(scores[i]), loo_label=int(loo_labels[i]),
                          neighbors=neighbors.get(i)) for i in range(len(scores))]
    return reviews, solver
