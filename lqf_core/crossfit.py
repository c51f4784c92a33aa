"""Mislabel scores by cross-fitting: each item's residual under a model fitted without it.

Why not the closed form. On the converged default, the leave-one-out residual
(I - L_ii)^-1 e_i of posterior.py with K-FAC leverages comes close: on 100-shot
Fashion-MNIST with 10 % of the labels flipped it found 0.787 and 0.738 of them in its top
10 % (two draws) against cross-fitting's 0.787 and 0.800, at a tenth of the cost. But it
is K-FAC's leave-one-out, not the exact one (exact leverages need N x C CG solves), and
on the isotropic early stop, which fits every flipped label (e_i ~ 0, I - L_ii ~ 0), it
ranked them below the training loss (docs/benchmarks.md). Cross-fitting is exact for
what it asks, and stays the default ranking.

Each fold's solve starts from zero. Starting it from the converged fit on every item
(its optimum is unique, so the end point would not change) made 5- to 25-shot jobs
slower, not faster (1.9-2.1x the early stop's time against 1.7-1.8x; docs/benchmarks.md).

Cross-fitting asks the question directly. The training items are split into `folds`
groups, class by class (`assign_folds`); for each fold,
LQF is fitted exactly as a training job fits it (ridge head at w0, linearization, K-FAC,
the same PCG budget) on the other folds, and it predicts the fold. Every score comes
from a model that never saw the item:
    score_i = ||kappa onehot(y_i) - f_{-fold(i)}(x_i)||^2 / kappa^2
and the label that model gives is argmax f_{-fold(i)}(x_i). It leaves out a fold, not
one item: with 5 folds each model sees 80 % of the items. Cost: `folds` fits on
(folds - 1) / folds of the items, about (folds - 1) training jobs after the prefix pass.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lqf_core.backbones import Backbone, WeightsDirs, load_backbone
from lqf_core.config import Method, TrainConfig
from lqf_core.data import ImageSource
from lqf_core.device import resolve_device
from lqf_core.errors import InvalidDataError
from lqf_core.lqf import PrefixCache, fit_lqf
from lqf_core.model import TrainedModel
from lqf_core.train import (
    ProgressCallback,
    Reporter,
    load_inputs,
    prefix_outputs,
)

DEFAULT_FOLDS = 5


def assign_folds(item_ids: Sequence[str], labels: Sequence[int], folds: int,
                 seed: int) -> torch.Tensor:
    """Each item's fold (N,), stratified by class: a class of n items puts n // folds or
    one more in every fold, so each fold's model sees (folds - 1) / folds of every class.

    Folds drawn by a hash of the id alone (before session 28) are not: with 5 images a
    class, some fold models kept 2 of a class and others all 5. At 20-100 classes of 5
    images their temperature came out 1.26-1.39x the one fitted on dev images (dev ECE
    0.102 on the mean); dealt by class, 1.08-1.20x (ECE 0.073, a held-out fifth's 0.078;
    docs/benchmarks.md, "Many classes").

    The items are ordered class by class, each class by a hash of (seed, id), and dealt
    to the folds in turn; so the folds depend only on the set of (id, label) pairs, never
    on the order given, and a job without some items gets the folds a fresh job on the
    rest gets (what exact unlearning needs).
    """
    def key(i: int) -> str:
        return hashlib.sha256(f"crossfit:{seed}:{item_ids[i]}".encode()).hexdigest()

    order = sorted(range(len(item_ids)), key=lambda i: (int(labels[i]), key(i)))
    fold = torch.empty(len(item_ids), dtype=torch.long)
    for position, i in enumerate(order):
        fold[i] = position % folds
    return fold


@dataclass(frozen=True)
class CrossFit:
    """Held-out answers for N items (in the order given)."""

    outputs: torch.Tensor  # (N, C): f of the model fitted without the item's fold
    folds: torch.Tensor  # (N,)
    scores: torch.Tensor  # (N,): squared held-out residual / kappa^2
    predicted: torch.Tensor  # (N,): the class that model gives


def cross_fit(backbone: Backbone, z: torch.Tensor, labels: torch.Tensor, num_classes: int,
              config: TrainConfig, item_ids: Sequence[str], folds: int = DEFAULT_FOLDS,
              device: torch.device | None = None,
              on_fold: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> CrossFit:
    """Cross-fitted LQF on prefix outputs z (N, ...) with labels (N,)."""
    n = z.shape[0]
    if folds < 2:
        raise InvalidDataError(f"folds must be at least 2, got {folds}")
    if len(item_ids) != n or len(labels) != n:
        raise InvalidDataError(f"got {n} inputs, {len(labels)} labels, {len(item_ids)} ids")
    device = device or z.device
    fold = assign_folds([str(i) for i in item_ids], labels.tolist(), folds, config.seed)
    used = fold.unique().tolist()
    if len(used) < 2:
        raise InvalidDataError(f"cross-fitting needs items in at least 2 folds; the {n} "
                               "items all fall in one")
    labels = labels.to(device)
    outputs = torch.zeros(n, num_classes, dtype=z.dtype, device=device)
    for step, k in enumerate(used):
        held = (fold == k).to(device)
        torch.manual_seed(config.seed)  # as train_model does (K-FAC's output probes)
        fit = fit_lqf(backbone, z[~held], labels[~held], num_classes, config, device,
                      should_stop=should_stop)
        with torch.no_grad():
            outputs[held] = fit.setup.lin.forward(z[held], fit.delta).to(outputs)
        if on_fold is not None:
            on_fold(step + 1, len(used))
    targets = config.kappa * F.one_hot(labels, num_classes).to(outputs)
    scores = ((targets - outputs) ** 2).sum(1) / config.kappa**2
    return CrossFit(outputs.cpu(), fold, scores.cpu(), outputs.argmax(1).cpu())


def cross_fit_model(
    model: TrainedModel,
    images: Sequence[ImageSource] | torch.Tensor,
    labels: Sequence[int],
    item_ids: Sequence[str],
    *,
    folds: int = DEFAULT_FOLDS,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    weights_dir: WeightsDirs = None,
    backbone: Backbone | None = None,
    prefix_cache: PrefixCache | None = None,
) -> CrossFit:
    """Mislabel scores of an lqf model's training items (`model.info['train_item_ids']`,
    given here with their images and labels), refitting at the model's config."""
    if model.method != Method.LQF:
        raise InvalidDataError(f"cross-fitting refits lqf models, this one is "
                               f"{model.method.value}")
    ids = [str(i) for i in item_ids]
    expected = [str(i) for i in model.info.get("train_item_ids", [])]
    if sorted(ids) != sorted(expected):
        raise InvalidDataError("the items given are not the model's training items "
                               f"({len(ids)} given, {len(expected)} in the model)")
    report = Reporter(progress, should_stop)
    started = time.monotonic()
    config = model.config
    device = resolve_device(config.device)
    if backbone is None:
        backbone = load_backbone(config.backbone, weights_dir)
    x = load_inputs(images, backbone, config, report)
    prefix = backbone.split(config.suffix)[0].to(device)
    z = prefix_outputs(prefix, x, ids, prefix_cache, device, config.batch_size, report)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    result = cross_fit(backbone, z, y, model.num_classes, config, ids, folds, device,
                       on_fold=lambda k, total: report("crossfit", k, total),
                       should_stop=report.check_cancel_flag)
    report("done", 1, 1, seconds=time.monotonic() - started)
    return result
