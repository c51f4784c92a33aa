"""One entry point for every method: `train_model(images, labels, class_names, config)`.

It validates the data, splits off a stratified validation set, runs the method,
fits the softmax temperature on the validation set and returns a TrainedModel.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import lqf_core
from lqf_core.backbones import Backbone, WeightsDirs, load_backbone
from lqf_core.baselines import finetune
from lqf_core.calibration import (
    accuracy,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from lqf_core.classifier import build_classifier
from lqf_core.config import (
    CROSSFIT_CALIBRATION_MAX_ITEMS,
    CROSSFIT_FEW_PER_CLASS_MAX_ITEMS,
    DEFAULT_VAL_FRACTION,
    FEW_PER_CLASS,
    Calibration,
    Method,
    ProbeKind,
    Solver,
    TrainConfig,
)
from lqf_core.data import ImageSource, short_sides
from lqf_core.device import resolve_device
from lqf_core.distributed import Shard, ranks, shard_slice, usable_ranks
from lqf_core.errors import InvalidConfigError, InvalidDataError, TrainingCancelled
from lqf_core.linearize import batches
from lqf_core.lqf import PrefixCache, fit_lqf
from lqf_core.model import LOO_OUTPUTS, TrainedModel
from lqf_core.probe import fit_logistic, fit_ridge


@dataclass(frozen=True)
class Progress:
    """A progress report: `stage` in load|features|kfac|gram|solve|epoch|calibrate|done."""

    stage: str
    step: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]


class Reporter:
    """Forwards progress, at most every `interval` seconds except stage ends."""

    def __init__(self, callback: ProgressCallback | None, should_stop: Callable[[], bool] | None,
                 interval: float = 0.5):
        self.callback = callback
        self.should_stop = should_stop
        self.interval = interval
        self._last = 0.0

    def __call__(self, stage: str, step: int, total: int, **metrics: float) -> None:
        self.check_cancel()
        now = time.monotonic()
        if self.callback is None:
            return
        if step >= total or now - self._last >= self.interval:
            self._last = now
            self.callback(Progress(stage, step, total, dict(metrics)))

    def check_cancel(self) -> None:
        if self.check_cancel_flag():
            raise TrainingCancelled("training cancelled")

    def check_cancel_flag(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())


def validate_labels(num_images: int, labels: Sequence[int], class_names: Sequence[str]) -> None:
    if num_images != len(labels):
        raise InvalidDataError(f"got {num_images} images but {len(labels)} labels")
    if len(class_names) < 2:
        raise InvalidDataError(f"need at least 2 classes, got {len(class_names)}")
    bad = [y for y in labels if not 0 <= y < len(class_names)]
    if bad:
        raise InvalidDataError(f"labels must be in [0, {len(class_names)}), got {bad[:5]}")
    empty = [class_names[c] for c in range(len(class_names)) if c not in set(labels)]
    if empty:
        raise InvalidDataError(f"classes without any image: {empty}")


def split_by_item(labels: Sequence[int], item_ids: Sequence[str], fraction: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): about `fraction` of each class held out.

    Membership depends only on each item's id, the seed and its class size -- not on
    the order or on the other items -- so a job on a dataset with items removed holds
    out the same items (what exact unlearning needs). A class never loses its last
    training item.
    """
    labels_t = torch.as_tensor(list(labels))
    train, val = [], []
    for c in labels_t.unique().tolist():
        idx = (labels_t == c).nonzero().flatten().tolist()
        idx.sort(key=lambda i: hashlib.sha256(f"{seed}:{item_ids[i]}".encode()).hexdigest())
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        val.extend(idx[:k])
        train.extend(idx[k:])
    return (torch.tensor(sorted(train), dtype=torch.long),
            torch.tensor(sorted(val), dtype=torch.long))


def _features(module: torch.nn.Module, x: torch.Tensor, device: torch.device, batch_size: int,
              report: Reporter, stage: str) -> torch.Tensor:
    out = []
    total = x.shape[0]
    with torch.no_grad():
        for sl in batches(total, batch_size):
            out.append(module(x[sl].to(device)))
            report(stage, sl.stop, total)
    return torch.cat(out)


def _fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
              config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear probe: ridge on kappa * onehot targets, or logistic regression."""
    if config.method == Method.LINEAR_PROBE and config.probe == ProbeKind.LOGISTIC:
        return fit_logistic(features.cpu(), labels, num_classes, config.probe_l2)
    targets = config.kappa * F.one_hot(labels, num_classes).to(features.dtype)
    w, b = fit_ridge(features.cpu(), targets.cpu(), config.probe_l2)
    return w, b


def _train_linear_probe(backbone: Backbone, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        config: TrainConfig, device: torch.device, report: Reporter) -> dict:
    net = torch.nn.Sequential(*backbone.blocks).eval().to(device)
    feats = _features(net, x, device, config.batch_size, report, "features")
    w, b = _fit_head(feats, y, num_classes, config)
    return {"head.weight": w, "head.bias": b}


def _held_out_metrics(prefix: str, logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float) -> dict[str, float]:
    probs = F.softmax(logits / temperature, dim=1)
    return {f"{prefix}_accuracy": accuracy(logits, labels),
            f"{prefix}_nll": negative_log_likelihood(probs, labels),
            f"{prefix}_ece": expected_calibration_error(probs, labels)}


def _held_out_record(split: str, item_ids: list[str], logits: torch.Tensor) -> dict:
    """The held-out items' outputs (before the temperature), kept with the model so that
    a confusion matrix and a reliability diagram can be drawn without recomputing them."""
    return {"split": split, "item_ids": list(item_ids),
            "logits": [[round(float(v), 5) for v in row] for row in logits.tolist()]}


def load_inputs(images: Sequence[ImageSource] | torch.Tensor, backbone: Backbone,
                config: TrainConfig, report: Reporter) -> torch.Tensor:
    """Images -> the backbone's preprocessed tensor (n, 3, s, s) at config's input size and
    JPEG decoding; tensors pass through."""
    if isinstance(images, torch.Tensor):
        return images if images.dtype == torch.float64 else images.float()
    preprocess = backbone.preprocess(config.input_size, config.jpeg_decode)
    rows = []
    for i, image in enumerate(images):
        rows.append(preprocess.batch([image])[0])
        report("load", i + 1, len(images))
    return torch.stack(rows)


def _crossfit_pays(items: int, classes: int) -> bool:
    """Whether 5 more fits are worth the fifth's labels: in small jobs, and in jobs of few
    images a class, where the fifth is a large share of every class (config.py)."""
    return items <= CROSSFIT_CALIBRATION_MAX_ITEMS or (
        items <= CROSSFIT_FEW_PER_CLASS_MAX_ITEMS and items < FEW_PER_CLASS * classes)


def _calibration(config: TrainConfig, ids: Sequence[str],
                 labels: Sequence[int]) -> tuple[Calibration, float]:
    """(how this job calibrates, the fraction it holds out): leave-one-out (solver exact),
    cross-fitting (asked for, or by `_crossfit_pays` for LQF jobs that leave val_fraction
    unset) or a held-out fraction. TrainConfig.validate has refused the combinations that
    conflict."""
    lqf = config.method == Method.LQF
    if lqf and config.solver == Solver.EXACT:
        return Calibration.LOO, 0.0
    # Every job has 2 classes with images (validate_labels), so the class-dealt folds
    # (crossfit.assign_folds) always hold items in at least 2 folds.
    if config.calibration == Calibration.CROSSFIT:
        return Calibration.CROSSFIT, 0.0
    if config.val_fraction is not None:
        return Calibration.HOLDOUT, config.val_fraction
    # Cross-fitting where it pays (_crossfit_pays), on one process; a distributed job holds out.
    if (config.calibration is None and lqf and config.workers == 1
            and _crossfit_pays(len(ids), len(set(labels)))):
        return Calibration.CROSSFIT, 0.0
    return Calibration.HOLDOUT, DEFAULT_VAL_FRACTION


def _cross_fitted_outputs(backbone: Backbone, z: torch.Tensor, y: torch.Tensor,
                          num_classes: int, config: TrainConfig, ids: Sequence[str],
                          device: torch.device, report: Reporter, info: dict) -> torch.Tensor:
    """Each item's output from LQF fitted, as this job is, without the item's fold. The
    mislabel scores that come with them (crossfit.py) go into info["crossfit"], in
    train_item_ids order: the model's cross-fitted self-influence, at no further cost."""
    from lqf_core.crossfit import DEFAULT_FOLDS, cross_fit  # crossfit imports this module

    started = time.monotonic()
    result = cross_fit(backbone, z, y.to(device), num_classes, config, ids, device=device,
                       on_fold=lambda k, total: report("crossfit", k, total),
                       should_stop=report.check_cancel_flag)
    info["crossfit"] = {"folds": DEFAULT_FOLDS, "seconds": time.monotonic() - started,
                        "labels": y.tolist(), "scores": result.scores.tolist(),
                        "predicted": result.predicted.tolist()}
    return result.outputs


def _choose_image_size(images: Sequence[ImageSource] | torch.Tensor, backbone: Backbone,
                       config: TrainConfig) -> tuple[TrainConfig, dict]:
    """Resolve image_size by the backbone's rule on the images (a tensor keeps its own
    size) -> (config, what the model records about the choice)."""
    if isinstance(images, torch.Tensor):
        size = int(images.shape[-1])
        return config.replace(image_size=size), {"rule": "the input tensor's size",
                                                 "image_size": size}
    sides = short_sides(images)
    size = backbone.auto_image_size(sides)
    rule = backbone.input_sizes
    return config.replace(image_size=size), {
        "rule": f"median short side rounded to {rule.step} px, within "
                f"[{rule.smallest}, {rule.largest}]",
        "median_short_side": sorted(sides)[len(sides) // 2] if sides else None,
        "images_looked_at": len(sides), "image_size": size}


def prefix_outputs(prefix: torch.nn.Module, x: torch.Tensor, ids: Sequence[str],
                   cache: PrefixCache | None, device: torch.device, batch_size: int,
                   report: Reporter) -> torch.Tensor:
    """Frozen-prefix outputs z, computed once (and reused across jobs through `cache`)."""
    if cache is None:
        return _features(prefix, x, device, batch_size, report, "features")
    missing = [i for i, item in enumerate(ids) if item not in cache]
    if missing:
        fresh = _features(prefix, x[missing], device, batch_size, report, "features")
        cache.update({ids[i]: row.cpu() for i, row in zip(missing, fresh, strict=True)})
    return torch.stack([cache[item] for item in ids]).to(device)


def _train_lqf(backbone: Backbone, z: torch.Tensor, y: torch.Tensor, num_classes: int,
               config: TrainConfig, device: torch.device, report: Reporter,
               warm_start: TrainedModel | None, shard: Shard | None = None
               ) -> tuple[dict, dict, torch.Tensor, torch.Tensor | None]:
    """(tensors, info, training-set logits, leave-one-out logits of the exact solver).
    With `shard`, z and y are this rank's items and the logits are theirs."""
    curvature_stage = "gram" if config.solver == Solver.EXACT else "kfac"
    history: list[dict[str, float]] = []

    def on_step(i: int, metrics: dict[str, float]) -> None:
        history.append({"iteration": i, **metrics})
        total = expected_iterations(i, metrics.get("relative_grad_norm"),
                                    config.resolved_tol, config.resolved_max_iters)
        report("solve", i, total, **metrics)

    fit = fit_lqf(backbone, z, y, num_classes, config, device,
                  on_kfac=lambda i, n: report(curvature_stage, i, n),
                  on_step=on_step, should_stop=report.check_cancel_flag, warm_start=warm_start,
                  shard=shard)
    outputs = fit.setup.problem.outputs(fit.delta)
    info = {**fit.info, "train_loss": fit.setup.problem.loss(fit.delta, outputs)}
    if history:  # the solver's curve, for the dashboard (every iteration, not throttled)
        info["solver_history"] = history
    tensors = fit.setup.tensors(fit.delta)
    if fit.loo_outputs is not None:
        tensors[LOO_OUTPUTS] = fit.loo_outputs.detach().cpu()
    return tensors, info, outputs.detach(), fit.loo_outputs


def expected_iterations(iteration: int, relative_grad_norm: float | None, tol: float,
                        max_iters: int) -> int:
    """Where a solve that stops at `tol` will end, from its geometric rate so far: the
    progress total of the solve stage. max_iters alone would leave a converged solve's
    bar at a tenth (45 of 500 iterations) when it ends."""
    if relative_grad_norm is None or iteration < 1 or not 0 < relative_grad_norm < 1:
        return max_iters
    if relative_grad_norm <= tol:
        return iteration
    rate = math.log(relative_grad_norm) / iteration  # log of the mean reduction per step
    return min(max_iters, max(iteration + 1, math.ceil(math.log(tol) / rate)))


def _fit_rank(shard: Shard, backbone: Backbone, x: torch.Tensor, y: torch.Tensor,
              num_classes: int, config: TrainConfig, device: torch.device, report: Reporter,
              warm_start: TrainedModel | None) -> tuple[dict, dict, float]:
    """One rank's part of a distributed LQF fit on its items (x, y): the prefix pass, then
    `_train_lqf` and the number of training items predicted right, whose sums over items
    are completed across the ranks -> (tensors, info, correct). Every rank runs exactly
    this, so their collectives line up."""
    prefix = backbone.split(config.suffix)[0].to(device)
    z = _features(prefix, x, device, config.batch_size, report, "features")
    tensors, info, outputs, _ = _train_lqf(backbone, z, y.to(device), num_classes, config,
                                           device, report, warm_start, shard)
    correct = shard.total(float((outputs.argmax(1).cpu() == y).sum()))
    return tensors, info, correct


def fit_shard(backbone: Backbone, images: Sequence[ImageSource] | torch.Tensor,
              labels: list[int], num_classes: int, config: TrainConfig,
              warm_start: TrainedModel | None, shard: Shard) -> None:
    """Ranks 1..W-1 of a distributed fit (a child process, or a worker elsewhere that was
    sent its share): load its items, then `_fit_rank`. `config` is rank 0's, resolved."""
    report = Reporter(None, None)
    device = resolve_device(config.device)
    x = load_inputs(images, backbone, config, report)
    _fit_rank(shard, backbone, x, torch.as_tensor(labels, dtype=torch.long), num_classes,
              config, device, report, warm_start)


def _subset(images: Sequence[ImageSource] | torch.Tensor, index: Sequence[int]
            ) -> Sequence[ImageSource] | torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[list(index)]
    return [images[i] for i in index]


@dataclass(frozen=True)
class RankShard:
    """What a rank on another host is sent: its items (ids, class indices)."""

    item_ids: list[str]
    labels: list[int]


@dataclass(frozen=True)
class ShardLauncher:
    """Runs ranks 1..W-1 of distributed fits elsewhere (a service's other workers):
    `start(address, config, num_classes, shards)` makes rank r fit `shards[r - 1]` with
    `fit_shard`, joining rank 0 at `address`, and returns a context that ends with the
    fit. `host` is the address other hosts reach this one at."""

    start: Callable[[str, TrainConfig, int, list[RankShard]], AbstractContextManager[None]]
    host: str = "127.0.0.1"


def _train_lqf_on_ranks(backbone: Backbone, images: Sequence[ImageSource] | torch.Tensor,
                        labels: Sequence[int], ids: Sequence[str], fit_idx: list[int],
                        num_classes: int, config: TrainConfig, device: torch.device,
                        report: Reporter, warm_start: TrainedModel | None,
                        launcher: ShardLauncher | None) -> tuple[dict, dict, float]:
    """LQF fitted by `config.workers` processes, each on a shard of the training items
    -> (tensors, info, training accuracy). Rank 0 is this process; the others are its
    children on this host, or (`launcher`) workers elsewhere."""
    # The model records how many ranks shared the fit (info.workers); the result does not
    # depend on it beyond rounding.
    local_limit = usable_ranks(device) if launcher is None else config.workers
    world = min(config.workers, len(fit_idx), local_limit)
    parts = [fit_idx[shard_slice(len(fit_idx), r, world)] for r in range(world)]
    helpers = [functools.partial(fit_shard, backbone, _subset(images, part),
                                 [labels[i] for i in part], num_classes, config, warm_start)
               for part in parts[1:]] if launcher is None else []
    shards = [RankShard([ids[i] for i in part], [labels[i] for i in part])
              for part in parts[1:]]
    remote = None if launcher is None else (lambda address, _world: launcher.start(
        address, config.replace(device=str(device)), num_classes, shards))
    started = time.monotonic()
    with ranks(world, device, helpers, remote,
               "127.0.0.1" if launcher is None else launcher.host) as shard:
        x = load_inputs(_subset(images, parts[0]), backbone, config, report)
        y = torch.as_tensor([labels[i] for i in parts[0]], dtype=torch.long)
        tensors, info, correct = _fit_rank(shard, backbone, x, y, num_classes, config, device,
                                           report, warm_start)
    info.update(workers=world, ranks_on="this host" if launcher is None else "other workers",
                distributed_seconds=time.monotonic() - started)
    return tensors, info, correct / len(fit_idx)


def train_model(
    images: Sequence[ImageSource] | torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    config: TrainConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    weights_dir: WeightsDirs = None,
    backbone: Backbone | None = None,
    item_ids: Sequence[str] | None = None,
    prefix_cache: PrefixCache | None = None,
    warm_start: TrainedModel | None = None,
    shard_launcher: ShardLauncher | None = None,
) -> TrainedModel:
    """Train `config.method` on labelled images and return the model.

    images: PIL images / paths / bytes, or an already preprocessed tensor (n, 3, s, s).
    labels: class indices into `class_names`. item_ids: stable ids of the images (their
    positions by default); they decide the validation split and are recorded in the
    model so that queries can name training items. Progress is reported every ~0.5 s;
    `should_stop` is polled between steps and raises TrainingCancelled when it says so.
    prefix_cache (LQF): frozen-prefix outputs by item id, reused and filled.
    warm_start (LQF): a model of the same config whose solution starts the solver; the
    optimum reached is the same (to the tolerance), only sooner -- see unlearn.py.
    shard_launcher (LQF, workers > 1): where ranks 1..W-1 run; None: child processes.
    """
    config.validate()
    validate_labels(len(images), labels, class_names)
    ids = [str(i) for i in range(len(images))] if item_ids is None else [str(i) for i in item_ids]
    if len(set(ids)) != len(ids):
        raise InvalidDataError(f"item ids must be unique, got {len(ids) - len(set(ids))} repeats")
    report = Reporter(progress, should_stop)
    started = time.monotonic()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    if backbone is None:
        backbone = load_backbone(config.backbone, weights_dir)
    if config.weight_decay is None:
        config = config.replace(weight_decay=config.ridge)
    if config.method == Method.LQF:
        config = config.resolved_solver_settings()
    if config.suffix_blocks is None:
        config = config.replace(suffix_blocks=backbone.default_suffix_blocks)
    assert config.suffix_blocks is not None
    if config.method == Method.LQF and config.suffix_blocks > backbone.num_feature_blocks:
        raise InvalidConfigError(
            f"suffix_blocks={config.suffix_blocks} but {backbone.name} has "
            f"{backbone.num_feature_blocks} feature blocks"
        )
    size_rule: dict | None = None
    if config.image_size is None:
        config, size_rule = _choose_image_size(images, backbone, config)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    num_classes = len(class_names)
    # The exact solver's leave-one-out outputs, or cross-fitted ones, replace the held-out
    # fifth: such a job trains on every item.
    calibration, val_fraction = _calibration(config, ids, labels)
    fit_idx, val_idx = split_by_item(labels, ids, val_fraction, config.seed)
    distributed = config.method == Method.LQF and config.workers > 1
    if distributed:  # each rank loads its own share of the training images
        x_fit = torch.empty(0)
        x_val = load_inputs(_subset(images, val_idx.tolist()), backbone, config,
                            report)
    else:
        x = load_inputs(images, backbone, config, report)
        x_fit, x_val = x[fit_idx], x[val_idx]
    y_fit, y_val = y[fit_idx], y[val_idx]
    info: dict = {
        "num_train": len(fit_idx),
        "num_val": len(val_idx),
        "train_item_ids": [ids[i] for i in fit_idx],
        "val_item_ids": [ids[i] for i in val_idx],
    }
    if size_rule is not None:
        info["image_size_rule"] = size_rule

    info["calibration"] = calibration.value
    loo_logits: torch.Tensor | None = None
    cv_logits: torch.Tensor | None = None
    if config.method == Method.LINEAR_PROBE:
        tensors = _train_linear_probe(backbone, x_fit, y_fit, num_classes, config, device, report)
    elif distributed:
        tensors, lqf_info, train_accuracy = _train_lqf_on_ranks(
            backbone, images, labels, ids, fit_idx.tolist(), num_classes, config, device,
            report, warm_start, shard_launcher)
        info.update(lqf_info)
    elif config.method == Method.LQF:
        prefix = backbone.split(config.suffix)[0].to(device)
        z_fit = prefix_outputs(prefix, x_fit, info["train_item_ids"], prefix_cache, device,
                               config.batch_size, report)
        tensors, lqf_info, train_logits, loo_logits = _train_lqf(
            backbone, z_fit, y_fit, num_classes, config, device, report, warm_start)
        info.update(lqf_info)
        if calibration == Calibration.CROSSFIT:
            cv_logits = _cross_fitted_outputs(backbone, z_fit, y_fit, num_classes, config,
                                              info["train_item_ids"], device, report, info)
    else:
        probe_config = config.replace(method=Method.LINEAR_PROBE, probe=ProbeKind.LOGISTIC)
        probe = _train_linear_probe(backbone, x_fit, y_fit, num_classes, probe_config,
                                    device, report)
        epochs: list[dict[str, float]] = []

        def on_epoch(epoch: int, total: int, metrics: dict[str, float]) -> None:
            epochs.append({"epoch": epoch, **metrics})
            report("epoch", epoch, total, **metrics)

        net = finetune(
            backbone, x_fit, y_fit, x_val, y_val, num_classes, config,
            (probe["head.weight"].to(device), probe["head.bias"].to(device)), device,
            on_epoch=on_epoch, should_stop=report.check_cancel_flag, info=info,
        )
        info["epoch_history"] = epochs
        tensors = {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}

    model = TrainedModel(Method(config.method), config, list(class_names), tensors, info=info)
    classifier = build_classifier(model, backbone, device)
    report("calibrate", 0, 1)
    if len(val_idx) > 0:
        val_logits = classifier.logits(x_val.to(device)).cpu().double()
        model.temperature = fit_temperature(val_logits, y_val)
        model.metrics.update(_held_out_metrics("val", val_logits, y_val, model.temperature))
        model.info["heldout"] = _held_out_record("val", info["val_item_ids"], val_logits)
    elif loo_logits is not None or cv_logits is not None:
        # Each item's output from a model trained without it (without the item itself, or
        # without its fold): an honest held-out set of size N.
        split, held = ("loo", loo_logits) if loo_logits is not None else ("cv", cv_logits)
        assert held is not None
        held = held.cpu().double()
        model.temperature = fit_temperature(held, y_fit)
        model.metrics.update(_held_out_metrics(split, held, y_fit, model.temperature))
        model.info["heldout"] = _held_out_record(split, info["train_item_ids"], held)
    if not distributed:
        if config.method != Method.LQF:  # LQF has them from the solve, without the prefix
            train_logits = classifier.logits(x_fit.to(device))
        train_accuracy = accuracy(train_logits.cpu(), y_fit)
    model.metrics["train_accuracy"] = train_accuracy
    model.metrics["train_seconds"] = time.monotonic() - started
    model.info.update(
        backbone_weights=backbone.weights_id,
        lqf_core_version=lqf_core.__version__,
        torch_version=torch.__version__,
    )
    report("done", 1, 1, **model.metrics)
    return model
