"""A fit shared by 2 processes (torch.distributed, gloo) equals the single-process fit:
every sum over items is split by items and reduced, so only rounding may differ."""

from __future__ import annotations

import os
import time

import pytest
import torch

from lqf_core.backbones import Backbone
from lqf_core.config import TrainConfig
from lqf_core.distributed import DistributedFitError, Shard, ranks, shard_slice
from lqf_core.errors import InvalidConfigError
from lqf_core.lqf import fit_lqf
from lqf_core.train import train_model
from tests.core.factories import separable_images

pytestmark = pytest.mark.slow

# The default objective, 10 iterations short of its tolerance: the ranks must take the same
# steps, not merely reach the same optimum.
CONFIG = TrainConfig(backbone="tiny_cnn", image_size=16, suffix_blocks=1, kappa=2.0,
                     device="cpu", max_iters=10, tol=1e-12)
NAMES = ["a", "b", "c"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return separable_images(21, seed=3)


def prefix_outputs(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.split(CONFIG.suffix)[0](x)


def _fit_part(backbone: Backbone, z: torch.Tensor, y: torch.Tensor, shard: Shard) -> None:
    fit_lqf(backbone, z, y, 3, CONFIG, CPU, shard=shard)


def _die(shard: Shard) -> None:
    os._exit(3)  # a rank lost mid-fit: gone without a word


def test_two_ranks_reach_the_single_process_fit(backbone, data):
    x, y = data
    z = prefix_outputs(backbone, x)
    single = fit_lqf(backbone, z, y, 3, CONFIG, CPU)
    own, other = shard_slice(len(y), 0, 2), shard_slice(len(y), 1, 2)
    with ranks(2, CPU, [rank_one_job(backbone, z[other], y[other])]) as shard:
        shared = fit_lqf(backbone, z[own], y[own], 3, CONFIG, CPU, shard=shard)
        assert shared.setup.problem.n == len(y)
    assert shared.info["solver_iterations"] == single.info["solver_iterations"] == 10
    scale = float(single.delta.abs().max())
    assert float((shared.delta - single.delta).abs().max()) <= 1e-9 * scale
    assert torch.allclose(shared.setup.head_weight, single.setup.head_weight, atol=1e-10)
    assert torch.allclose(shared.setup.head_bias, single.setup.head_bias, atol=1e-10)


def rank_one_job(backbone: Backbone, z: torch.Tensor, y: torch.Tensor):
    """A picklable rank-1 job (spawned processes cannot take closures)."""
    import functools

    return functools.partial(_fit_part, backbone, z, y)


def test_a_job_with_two_workers_makes_the_same_model(backbone, data):
    x, y = data
    config = CONFIG.replace(val_fraction=0.2)
    one = train_model(x, y.tolist(), NAMES, config, backbone=backbone)
    two = train_model(x, y.tolist(), NAMES, config.replace(workers=2), backbone=backbone)
    assert two.info["workers"] == 2 and two.info["train_item_ids"] == one.info["train_item_ids"]
    for name, tensor in one.tensors.items():
        assert torch.allclose(two.tensors[name], tensor, rtol=0, atol=1e-9), name
    assert two.temperature == pytest.approx(one.temperature, rel=1e-8)
    assert two.metrics["train_accuracy"] == one.metrics["train_accuracy"]
    assert two.metrics["val_accuracy"] == one.metrics["val_accuracy"]
    assert two.info["train_loss"] == pytest.approx(one.info["train_loss"], rel=1e-9)


def test_a_lost_rank_fails_the_fit_instead_of_hanging(backbone, data):
    x, y = data
    z = prefix_outputs(backbone, x)
    started = time.monotonic()
    with pytest.raises(DistributedFitError, match="stopped answering"):
        with ranks(2, CPU, [_die]) as shard:
            fit_lqf(backbone, z[:10], y[:10], 3, CONFIG, CPU, shard=shard)
    assert time.monotonic() - started < 60


def test_workers_need_the_pcg_solver():
    with pytest.raises(InvalidConfigError, match="workers > 1 needs"):
        TrainConfig.from_dict({"workers": 2, "solver": "exact"})
    with pytest.raises(InvalidConfigError, match="workers must be between 1 and 64"):
        TrainConfig.from_dict({"workers": 0})
