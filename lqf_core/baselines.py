"""Standard non-linear fine-tuning: the baseline a user would otherwise run.

Cross-entropy, Adam, the whole network or its last k blocks, BatchNorm statistics
frozen (eval mode: few-shot batches are too small to estimate them), early stopping on
the validation split when there is one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lqf_core.backbones import Backbone
from lqf_core.calibration import accuracy
from lqf_core.classifier import finetune_network
from lqf_core.config import TrainConfig
from lqf_core.errors import TrainingCancelled
from lqf_core.linearize import batches

EpochCallback = Callable[[int, int, dict[str, float]], None]


def trainable_parameters(net: nn.Sequential, train_blocks: int) -> list[nn.Parameter]:
    """All parameters (train_blocks == 0) or those of the last k feature blocks + head."""
    modules = list(net)
    # net = [*feature blocks, pool, head]
    chosen = modules if train_blocks == 0 else modules[-(train_blocks + 2):]
    params = [p for m in chosen for p in m.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def finetune(
    backbone: Backbone,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    config: TrainConfig,
    head_init: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    info: dict | None = None,
) -> nn.Sequential:
    """Fine-tune and return the network (best validation epoch when x_val is non-empty).

    The head starts from the linear probe (`head_init`): standard practice, and fairer
    than a random head on a few images.
    """
    net = finetune_network(backbone, num_classes).to(device)
    head = net[-1]
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.copy_(head_init[0])
        head.bias.copy_(head_init[1])
    params = trainable_parameters(net, config.train_blocks)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    has_val = x_val.shape[0] > 0

    def val_accuracy() -> float:
        with torch.no_grad():
            logits = torch.cat([net(x_val[sl].to(device)) for sl in batches(len(x_val), 256)])
        return accuracy(logits.cpu(), y_val)

    # Epoch 0 (the probe-initialised head) competes too: fine-tuning must not end below
    # its own starting point on validation.
    best_state, best_epoch, since_best = copy.deepcopy(net.state_dict()), 0, 0
    best_acc = val_accuracy() if has_val else -1.0
    n = x_train.shape[0]
    epochs_run = 0
    metrics: dict[str, float] = {"train_loss": 0.0}
    for epoch in range(1, config.epochs + 1):
        net.eval()  # frozen BatchNorm statistics; dropout-free backbones
        order = torch.randperm(n, generator=generator)
        total_loss = 0.0
        for sl in batches(n, config.batch_size):
            if should_stop is not None and should_stop():
                raise TrainingCancelled("cancelled during fine-tuning")
            idx = order[sl]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            with torch.enable_grad():
                loss = F.cross_entropy(net(xb), yb)
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
        metrics = {"train_loss": total_loss / n}
        if has_val:
            val_acc = val_accuracy()
            metrics["val_accuracy"] = val_acc
            if val_acc > best_acc:
                best_state, best_acc, since_best = copy.deepcopy(net.state_dict()), val_acc, 0
                best_epoch = epoch
            else:
                since_best += 1
        if on_epoch is not None:
            on_epoch(epoch, config.epochs, metrics)
        epochs_run = epoch
        if not torch.isfinite(torch.tensor(metrics["train_loss"])):
            break  # diverged: fall back to the best state seen so far
        if has_val and since_best >= config.patience:
            break
    if has_val or not torch.isfinite(torch.tensor(metrics["train_loss"])):
        net.load_state_dict(best_state)
    if info is not None:
        info.update(best_epoch=best_epoch if has_val else epochs_run, epochs_run=epochs_run)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
