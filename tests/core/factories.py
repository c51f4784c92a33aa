"""Seeded tiny float64 networks and inputs for the tests against the math."""

from __future__ import annotations

import torch
from torch import nn

from lqf_core.activations import LeakyReLU6
from lqf_core.posterior import LQFPosterior
from lqf_core.train import train_model


def tiny_suffix_net(num_classes: int = 3, seed: int = 0) -> nn.Sequential:
    """conv(3x3, bias) - BN - LeakyReLU - depthwise conv - BN - LeakyReLU6 - pool - linear.

    Covers what the MobileNetV2 suffix has (grouped convs, BatchNorm with non-trivial
    running statistics, both leaky activations) in float64.
    """
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=True),
        nn.BatchNorm2d(4),
        nn.LeakyReLU(0.1),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
        nn.BatchNorm2d(4),
        LeakyReLU6(0.1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    ).double()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def separable_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 images (n, 3, 12, 12), labels of 3 classes): class c shifts channel c."""
    x, labels, _ = colour_shifted_images(seed, {c: (c, 1.5) for c in range(3)}, n)
    return x, labels


def tiny_inputs(n: int = 6, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=generator, dtype=torch.float64)


def tiny_targets(n: int = 6, num_classes: int = 3, kappa: float = 2.0,
                 seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=generator)]
    return kappa * torch.nn.functional.one_hot(labels, num_classes).double()


def leave_one_out_changes(post, z_star: torch.Tensor, k: int, retrain) -> torch.Tensor:
    """Actual change of test output k when each training item is left out: `retrain(keep)`
    gives dw on the kept items (keep: a boolean mask over the N items), (N,)."""
    base = post.outputs(z_star)[0, k]
    changes = []
    for i in range(post.n):
        keep = torch.ones(post.n, dtype=torch.bool)
        keep[i] = False
        changes.append(float(post.lin.forward(z_star, retrain(keep))[0, k] - base))
    return torch.tensor(changes, dtype=torch.float64)


def colour_shifted_images(seed: int, shifts: dict[int, tuple[int, float]], n: int = 12,
                          num_test: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (n, 3, 12, 12), labels (n,), test images): noise plus, for each channel in
    `shifts`, `sign` added where the label is `cls` -- learnable, not trivially."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = torch.randn(n, 3, 12, 12, generator=generator, dtype=torch.float64)
    for channel, (cls, sign) in shifts.items():
        x[:, channel] += sign * (labels == cls).double().view(-1, 1, 1)
    test = torch.randn(num_test, 3, 12, 12, generator=generator, dtype=torch.float64)
    return x, labels, test


def trained_with_posterior(backbone, x: torch.Tensor, labels: torch.Tensor, config,
                           **posterior_options):
    """(a model trained on x with every item's id, its LQFPosterior on the same items)."""
    model = train_model(x, labels.tolist(), ["a", "b", "c"], config, backbone=backbone,
                        item_ids=[str(i) for i in range(len(labels))])
    with torch.no_grad():
        z = backbone.split(config.suffix)[0](x)
    return model, LQFPosterior(model, backbone, z, labels, **posterior_options)
