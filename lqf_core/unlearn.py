"""Exact unlearning: a new model version that never saw the forgotten items.

Design (docs/method.md): everything that depends on the training data is recomputed on the
remaining items -- the validation split (decided per item id, so the remaining items
keep their side), the ridge head that is part of the linearization point w0, the
quadratic around it and its K-FAC factors.

The solver's starting point comes from the parent (its weights w0' + dw') only when
the parent's solve converged: then both runs end at the same optimum, to the solver's
tolerance (the default objective converges). When it stopped at `max_iters` first (the
isotropic regularizer's budget is an early stop, docs/method.md), the end point depends on
the start, and a start fitted on the forgotten items would leave their trace in the
result. Then the job runs exactly the path a fresh job takes, from zero. The frozen
prefix outputs of the remaining items depend on their images only and are reused
(`prefix_cache`); the forgotten items' entries are dropped from it.

Linear probes are refit in closed form; fine-tuned networks have no shortcut and are
retrained from the pre-trained weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lqf_core.backbones import Backbone, WeightsDirs
from lqf_core.config import Method, Solver
from lqf_core.data import ImageSource
from lqf_core.errors import InvalidDataError
from lqf_core.lqf import PrefixCache
from lqf_core.model import TrainedModel
from lqf_core.train import ProgressCallback, train_model


def forget(
    parent: TrainedModel,
    images: Sequence[ImageSource] | torch.Tensor,
    labels: Sequence[int],
    item_ids: Sequence[str],
    forgotten_ids: Sequence[str],
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    weights_dir: WeightsDirs = None,
    backbone: Backbone | None = None,
    prefix_cache: PrefixCache | None = None,
    parent_id: str | None = None,
) -> TrainedModel:
    """Retrain `parent` without `forgotten_ids`.

    images / labels / item_ids: the parent's training data *without* the forgotten
    items (the caller owns the data). Returns a model whose metadata names the parent
    and what was forgotten.
    """
    forgotten = [str(i) for i in forgotten_ids]
    if not forgotten:
        raise InvalidDataError("no item ids to forget")
    known = set(parent.info.get("train_item_ids", [])) | set(parent.info.get("val_item_ids", []))
    unknown = sorted(set(forgotten) - known)
    if unknown:
        raise InvalidDataError(f"items not in the model's training data: {unknown[:10]}")
    leaked = sorted(set(forgotten) & {str(i) for i in item_ids})
    if leaked:
        raise InvalidDataError(f"forgotten items still in the data given: {leaked[:10]}")
    if prefix_cache is not None:
        for item in forgotten:
            prefix_cache.pop(item, None)
    converged = bool(parent.info.get("solver_converged"))
    # The exact solver is direct: it has no starting point to reuse.
    direct = parent.config.solver == Solver.EXACT
    warm = parent if parent.method == Method.LQF and converged and not direct else None
    model = train_model(
        images, labels, parent.class_names, parent.config,
        progress=progress, should_stop=should_stop, weights_dir=weights_dir,
        backbone=backbone, item_ids=item_ids, prefix_cache=prefix_cache, warm_start=warm,
    )
    model.info["forgotten_item_ids"] = sorted(
        set(forgotten) | set(parent.info.get("forgotten_item_ids", []))
    )
    model.info["parent_id"] = parent_id
    model.info["warm_started"] = warm is not None
    return model
