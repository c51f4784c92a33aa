"""On CUDA the method gives what it gives on the CPU (skipped where there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from lqf_core.active import head_posterior_of, lqf_signals, select_batch
from lqf_core.classifier import build_classifier
from lqf_core.config import TrainConfig
from lqf_core.posterior import LQFPosterior
from lqf_core.train import train_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIG = TrainConfig(backbone="tiny_cnn", image_size=16, val_fraction=0.0, suffix_blocks=1,
                     weight_decay=0.05, probe_l2=1.0, kappa=2.0, max_iters=30)


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 3
    x = torch.randn(24, 3, 12, 12, generator=generator, dtype=torch.float64)
    x[:, 0] += (labels == 0).double().view(-1, 1, 1)
    return x, labels


@pytest.mark.parametrize("regularizer", ["isotropic", "kfac"])
def test_training_and_queries_on_cuda_match_the_cpu(backbone, data, regularizer):
    x, labels = data
    outputs, leverages, batches = {}, {}, {}
    for device in ("cpu", "cuda"):
        config = CONFIG.replace(device=device, regularizer=regularizer, tol=1e-10,
                                max_iters=200 if regularizer == "kfac" else 30)
        model = train_model(x, labels.tolist(), ["a", "b", "c"], config, backbone=backbone)
        classifier = build_classifier(model, backbone, torch.device(device))
        outputs[device] = classifier.logits(x.to(device)).cpu()
        prefix = backbone.split(CONFIG.suffix)[0].to(device)
        with torch.no_grad():
            z = prefix(x.to(device))
        post = LQFPosterior(model, backbone, z, labels, device=torch.device(device))
        leverages[device] = post.leverages(exact=False).cpu()
        pool = lqf_signals(model, backbone, z.flip(0))
        batches[device] = select_batch(head_posterior_of(post), pool, 5).order
        backbone.blocks = [b.cpu() for b in backbone.blocks]
    torch.testing.assert_close(outputs["cuda"], outputs["cpu"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leverages["cuda"], leverages["cpu"], rtol=1e-5, atol=1e-7)
    assert batches["cuda"] == batches["cpu"]
