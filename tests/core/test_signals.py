"""Jacobian products from recorded layer signals (signals.py) against the dense Jacobian,
and the fits that use them against the fits on cached linear maps (float64, tiny nets)."""

from __future__ import annotations

import pytest
import torch

from lqf_core import signals
from lqf_core.config import TrainConfig
from lqf_core.gram import gram_matrix, layer_signals
from lqf_core.kfac import compute_kfac_factors
from lqf_core.linearize import LinearizedNet
from lqf_core.lqf import QuadraticProblem, fit_lqf
from lqf_core.signals import SignalProducts

from .factories import colour_shifted_images, tiny_inputs, tiny_suffix_net, tiny_targets


def _recorded(n: int = 5, batch_size: int = 2) -> tuple[LinearizedNet, torch.Tensor,
                                                         SignalProducts]:
    lin = LinearizedNet(tiny_suffix_net(num_classes=3))
    z = tiny_inputs(n=n)
    return lin, z, SignalProducts.record(lin, z, batch_size=batch_size)  # several batches


@pytest.fixture(params=["smaller", "signals", "rows"])
def layer_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which form each layer's record takes: the smaller of the two (the tiny net's convs
    keep rows, its linear head signals), or every layer forced into one of them."""
    if request.param != "smaller":
        forced = request.param == "rows"
        monkeypatch.setattr(signals, "prefers_rows", lambda *_: forced)
    return str(request.param)


def test_the_smaller_form_is_chosen_per_layer():
    _, _, products = _recorded()
    forms = {name: layer.rows is not None for name, layer in products._layers.items()}
    # Two convolutions (one depthwise) on a small map: rows; the linear head: signals.
    assert forms == {"0": True, "3": True, "8": False}


def test_products_equal_the_dense_jacobian(layer_form: str):
    lin, z, products = _recorded()
    jac = lin.jacobian(z)
    generator = torch.Generator().manual_seed(3)
    v = torch.randn(lin.num_params, generator=generator, dtype=torch.float64)
    u = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    assert torch.allclose(products.forward(v), (jac @ v).view(5, 3), rtol=1e-10, atol=1e-12)
    assert torch.allclose(products.transpose(u), jac.T @ u.reshape(-1), rtol=1e-10,
                          atol=1e-12)
    assert torch.allclose(products.output0, lin.output0(z), rtol=1e-12, atol=1e-12)


def test_factors_and_gram_equal_those_of_their_own_passes(layer_form: str):
    lin, z, products = _recorded()
    for mine, theirs in zip(products.factors(), compute_kfac_factors(lin, z, batch_size=3),
                            strict=True):
        assert mine.weight_name == theirs.weight_name
        assert torch.allclose(mine.A, theirs.A, rtol=1e-10, atol=1e-12)
        assert torch.allclose(mine.S, theirs.S, rtol=1e-10, atol=1e-12)
    expected = gram_matrix(layer_signals(lin, z))
    assert torch.allclose(gram_matrix(products.layer_signals()), expected, rtol=1e-10,
                          atol=1e-12)


def test_the_quadratic_takes_its_products_from_the_signals_where_asked():
    lin = LinearizedNet(tiny_suffix_net(num_classes=3))
    z, targets = tiny_inputs(n=6), tiny_targets(n=6)
    with_signals = QuadraticProblem(lin, z, targets, 1e-2, batch_size=4, signals=True)
    with_maps = QuadraticProblem(lin, z, targets, 1e-2, batch_size=4)
    assert with_signals.products is not None and with_maps.products is None
    v = torch.randn(lin.num_params, generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64)
    assert torch.allclose(with_signals.hessian_matvec(v), with_maps.hessian_matvec(v),
                          rtol=1e-10, atol=1e-12)
    assert torch.allclose(with_signals.rhs(), with_maps.rhs(), rtol=1e-10, atol=1e-12)


def test_fits_on_signals_equal_fits_on_linear_maps(backbone, monkeypatch):
    x, labels, _ = colour_shifted_images(6, {1: (1, 1.0), 2: (2, -1.0)})
    base = {"backbone": "tiny_cnn", "image_size": 16, "suffix_blocks": 1, "probe_l2": 1.0,
            "kappa": 2.0}
    prefix = backbone.split(1)[0]
    with torch.no_grad():
        z = prefix(x)
    configs = [TrainConfig.from_dict({**base, "weight_decay": 1e-2, "max_iters": 5}),
               TrainConfig.from_dict({**base, "weight_decay": 1e-2, "regularizer": "kfac",
                                      "metric_strength": 3.0, "tol": 1e-8, "max_iters": 300}),
               TrainConfig.from_dict({**base, "weight_decay": 0.05, "solver": "exact"})]
    for config in configs:
        fit = fit_lqf(backbone, z, labels, 3, config, torch.device("cpu"))
        assert fit.info["jacobian_products"] == "signals"
        with monkeypatch.context() as patch:
            patch.setattr(signals, "MAX_BYTES", 0)  # the operator's "always the maps"
            on_maps = fit_lqf(backbone, z, labels, 3, config, torch.device("cpu"))
        assert on_maps.info["jacobian_products"] == "linear maps"
        scale = float(on_maps.delta.abs().max())
        assert float((fit.delta - on_maps.delta).abs().max()) <= 1e-8 * scale, config
