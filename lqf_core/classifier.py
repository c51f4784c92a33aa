"""Turn a TrainedModel plus its backbone into something that maps images to logits.

Training and serving build classifiers the same way, so a loaded artifact predicts
exactly what the freshly trained model did.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lqf_core.activations import swap_to_leaky
from lqf_core.backbones import Backbone
from lqf_core.config import Method
from lqf_core.errors import IncompatibleModelError
from lqf_core.linearize import LinearizedNet, batches
from lqf_core.model import TrainedModel


class Classifier:
    """images (n, 3, s, s) -> logits (n, C); `logits / temperature` gives probabilities."""

    def __init__(self, prefix: nn.Module, head_logits):  # type: ignore[no-untyped-def]
        self.prefix = prefix
        self._head_logits = head_logits

    def to(self, device: torch.device) -> Classifier:
        self.prefix.to(device)
        return self

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        out = [self._head_logits(self.prefix(x[sl])) for sl in batches(x.shape[0], batch_size)]
        return torch.cat(out) if out else torch.empty(0)


def lqf_network(backbone: Backbone, suffix_blocks: int, leaky_slope: float,
                head_weight: torch.Tensor, head_bias: torch.Tensor
                ) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, suffix + head) of the network LQF linearizes, at w0."""
    prefix, suffix = backbone.split(suffix_blocks)
    suffix = copy.deepcopy(suffix)
    swap_to_leaky(suffix, leaky_slope)
    head = nn.Linear(head_weight.shape[1], head_weight.shape[0], dtype=head_weight.dtype)
    with torch.no_grad():
        head.weight.copy_(head_weight)
        head.bias.copy_(head_bias)
    net = nn.Sequential(suffix, head).eval()
    return prefix, net


def finetune_network(backbone: Backbone, num_classes: int) -> nn.Sequential:
    """A fresh copy of the backbone blocks with a linear head: the fine-tuning network."""
    blocks = copy.deepcopy(backbone.blocks)
    return nn.Sequential(*blocks, nn.Linear(backbone.feature_dim, num_classes))


def trained_finetune_network(model: TrainedModel, backbone: Backbone) -> nn.Sequential:
    """The fine-tuned network of a finetune model, in eval mode (KeyError / RuntimeError
    when the tensors do not fit the backbone)."""
    net = finetune_network(backbone, model.num_classes)
    state = {k.removeprefix("net."): v for k, v in model.tensors.items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval()


def build_classifier(model: TrainedModel, backbone: Backbone, device: torch.device) -> Classifier:
    """Rebuild the trained predictor from its tensors on `device`."""
    t = model.tensors
    config = model.config
    try:
        if model.method == Method.LINEAR_PROBE:
            prefix = nn.Sequential(*backbone.blocks).eval().to(device)
            w, b = t["head.weight"].to(device), t["head.bias"].to(device)
            return Classifier(prefix, lambda f: f @ w.T + b)
        if model.method == Method.LQF:
            prefix, net = lqf_network(
                backbone, config.suffix, config.leaky_slope,
                t["head.weight"], t["head.bias"],
            )
            net.to(device)
            lin = LinearizedNet(net)
            delta = lin.space.flatten(
                {name: t[f"delta.{name}"] for name in lin.space.names}
            ).to(device)
            return Classifier(prefix.eval().to(device), lambda z: lin.forward(z, delta))
        if model.method == Method.FINETUNE:
            return Classifier(nn.Identity(), trained_finetune_network(model, backbone).to(device))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise IncompatibleModelError(
            f"saved {model.method.value} model does not fit backbone {backbone.name!r}: {exc}"
        ) from None
    raise IncompatibleModelError(f"unknown method {model.method!r}")
