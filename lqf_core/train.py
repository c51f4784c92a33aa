"""One entry point for every method: `train_model(images, labels, class_names, config)`.

It validates the data, splits off a stratified validation set, runs the method,
fits the softmax temperature on the validation set and returns a TrainedModel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import lqf_core
from lqf_core.backbones import Backbone, load_backbone
from lqf_core.baselines import finetune
from lqf_core.calibration import (
    accuracy,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from lqf_core.classifier import build_classifier, lqf_network
from lqf_core.config import LQFLoss, Method, ProbeKind, TrainConfig
from lqf_core.data import ImageSource
from lqf_core.errors import InvalidDataError, TrainingCancelled
from lqf_core.linearize import LinearizedNet, batches
from lqf_core.lqf import QuadraticProblem, fit_cross_entropy, kfac_preconditioner, solve_quadratic
from lqf_core.model import TrainedModel
from lqf_core.probe import fit_logistic, fit_ridge


@dataclass(frozen=True)
class Progress:
    """A progress report: `stage` in load|features|kfac|solve|epoch|calibrate|done."""

    stage: str
    step: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]

# Inputs per linearized pass in the solver: large batches amortise per-call overhead.
SOLVER_BATCH = 256


class _Reporter:
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): about `fraction` of each class held out,
    never a class's last training item."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _features(module: torch.nn.Module, x: torch.Tensor, device: torch.device, batch_size: int,
              report: _Reporter, stage: str) -> torch.Tensor:
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
                        config: TrainConfig, device: torch.device, report: _Reporter) -> dict:
    net = torch.nn.Sequential(*backbone.blocks).eval().to(device)
    feats = _features(net, x, device, config.batch_size, report, "features")
    w, b = _fit_head(feats, y, num_classes, config)
    return {"head.weight": w, "head.bias": b}


def _train_lqf(backbone: Backbone, x: torch.Tensor, y: torch.Tensor, num_classes: int,
               config: TrainConfig, device: torch.device, report: _Reporter) -> tuple[dict, dict]:
    prefix, suffix = backbone.split(config.suffix_blocks)
    prefix = prefix.to(device)
    # Cache the frozen prefix once: every solver iteration reuses it.
    z = _features(prefix, x, device, config.batch_size, report, "features")
    dim = backbone.feature_dim
    # Head initialisation: ridge probe on the (leaky) suffix features at w0.
    _, net0 = lqf_network(backbone, config.suffix_blocks, config.leaky_slope,
                          torch.zeros(num_classes, dim), torch.zeros(num_classes))
    suffix_only = net0[0].to(device)
    phi = torch.cat([suffix_only(z[sl]) for sl in batches(len(z), 256)]).detach()
    w0, b0 = _fit_head(phi, y, num_classes, config)
    _, net = lqf_network(backbone, config.suffix_blocks, config.leaky_slope, w0, b0)
    net.to(device)
    lin = LinearizedNet(net)
    targets = config.kappa * F.one_hot(y, num_classes).to(z.dtype).to(device)
    problem = QuadraticProblem(lin, z, targets, config.weight_decay, batch_size=SOLVER_BATCH)
    precond = None
    if config.use_kfac:
        precond = kfac_preconditioner(problem, on_batch=lambda i, n: report("kfac", i, n))
    info: dict = {"num_linearized_params": lin.num_params}
    if config.loss == LQFLoss.MSE:
        result = solve_quadratic(
            problem, precond, config.tol, config.max_iters,
            callback=lambda i, r: report("solve", i, config.max_iters, relative_grad_norm=r),
            should_stop=report.check_cancel_flag,
        )
        delta = result.x
        info.update(solver_iterations=result.iterations,
                    relative_grad_norm=result.relative_residual,
                    solver_converged=result.converged)
    else:
        delta = fit_cross_entropy(
            problem, y.to(device), precond, config.max_iters,
            callback=lambda i, loss: report("solve", i, config.max_iters, loss=loss),
            should_stop=report.check_cancel_flag,
        )
    info["train_loss"] = problem.loss(delta)
    tensors = {"head.weight": w0.cpu(), "head.bias": b0.cpu()}
    tensors.update({f"delta.{k}": v.detach().cpu() for k, v in lin.space.unflatten(delta).items()})
    return tensors, info


def train_model(
    images: Sequence[ImageSource] | torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    config: TrainConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    weights_dir: str | Path | None = None,
    backbone: Backbone | None = None,
) -> TrainedModel:
    """Train `config.method` on labelled images and return the model.

    images: PIL images / paths / bytes, or an already preprocessed tensor (n, 3, s, s).
    labels: class indices into `class_names`. Progress is reported every ~0.5 s;
    `should_stop` is polled between steps and raises TrainingCancelled when it says so.
    """
    config.validate()
    validate_labels(len(images), labels, class_names)
    report = _Reporter(progress, should_stop)
    started = time.monotonic()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    if backbone is None:
        backbone = load_backbone(config.backbone, weights_dir)
    if config.method == Method.LQF and config.suffix_blocks > backbone.num_feature_blocks:
        from lqf_core.errors import InvalidConfigError

        raise InvalidConfigError(
            f"suffix_blocks={config.suffix_blocks} but {backbone.name} has "
            f"{backbone.num_feature_blocks} feature blocks"
        )
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        preprocess = backbone.preprocess(config.image_size)
        rows = []
        for i, image in enumerate(images):
            rows.append(preprocess.batch([image])[0])
            report("load", i + 1, len(images))
        x = torch.stack(rows)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    num_classes = len(class_names)
    fit_idx, val_idx = stratified_split(y, config.val_fraction, config.seed)
    x_fit, y_fit, x_val, y_val = x[fit_idx], y[fit_idx], x[val_idx], y[val_idx]
    info: dict = {"num_train": len(fit_idx), "num_val": len(val_idx)}

    if config.method == Method.LINEAR_PROBE:
        tensors = _train_linear_probe(backbone, x_fit, y_fit, num_classes, config, device, report)
    elif config.method == Method.LQF:
        tensors, lqf_info = _train_lqf(backbone, x_fit, y_fit, num_classes, config, device, report)
        info.update(lqf_info)
    else:
        probe = _train_linear_probe(backbone, x_fit, y_fit, num_classes,
                                    config.replace(method=Method.LINEAR_PROBE, probe=ProbeKind.LOGISTIC),
                                    device, report)
        net = finetune(
            backbone, x_fit, y_fit, x_val, y_val, num_classes, config,
            (probe["head.weight"].to(device), probe["head.bias"].to(device)), device,
            on_epoch=lambda e, n, m: report("epoch", e, n, **m),
            should_stop=report.check_cancel_flag,
        )
        tensors = {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}

    model = TrainedModel(Method(config.method), config, list(class_names), tensors, info=info)
    classifier = build_classifier(model, backbone, device)
    report("calibrate", 0, 1)
    if len(val_idx) > 0:
        val_logits = classifier.logits(x_val.to(device)).cpu().double()
        model.temperature = fit_temperature(val_logits, y_val)
        probs = F.softmax(val_logits / model.temperature, dim=1)
        model.metrics.update(
            val_accuracy=accuracy(val_logits, y_val),
            val_nll=negative_log_likelihood(probs, y_val),
            val_ece=expected_calibration_error(probs, y_val),
        )
    train_logits = classifier.logits(x_fit.to(device)).cpu()
    model.metrics["train_accuracy"] = accuracy(train_logits, y_fit)
    model.metrics["train_seconds"] = time.monotonic() - started
    model.info.update(
        backbone_weights=backbone.weights_sha,
        lqf_core_version=lqf_core.__version__,
        torch_version=torch.__version__,
    )
    report("done", 1, 1, **model.metrics)
    return model
