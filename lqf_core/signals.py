"""Jacobian products of the linearized network from its layer signals, kept in memory.

A linearized layer's Jacobian row for input i and output c is Σ_p d_icp a_ipᵀ (gram.py),
so with every layer's unfolded inputs a and output gradients d recorded once,
    (J v)_ic  = Σ_layers Σ_p d_icp · (V a_ip)          (V: the layer's part of v)
    Jᵀ u      = Σ_i Σ_p (Σ_c u_ic d_icp) a_ipᵀ          (per layer)
are a few large matrix products per layer instead of a pass through the network. The
pass that records them is the one K-FAC needs anyway (C backward passes per batch), so
the factors come from it too. A layer whose explicit rows R_ic = Σ_p d_icp a_ipᵀ take
fewer numbers than a and d (a depthwise convolution: 9 weights per group against 9 or
more positions) keeps the rows instead, and J v, Jᵀ u are one matrix-vector product over
them. On MobileNetV2's 4-block suffix at 96 px, 1,000 items, a solver iteration (H v)
takes 0.47 s, against 0.75 s with every layer's a and d and about 2.5 s on the cached
linear maps (docs/method.md).

The price is memory: N · Σ_layers min(P (g k + C g o), C g o k) numbers, 2.9 GB in float32
at 1,000 items and 96 px (3.8 GB with a and d everywhere; the cached linear maps take
1.4 GB). So a fit uses them only up to `MAX_BYTES` and when there are at most
`EXACT_OUTPUTS_LIMIT` outputs (K-FAC's per-output seeds); otherwise it keeps the cached
linear maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lqf_core.gram import LayerSignals, covered_parameters
from lqf_core.kfac import (
    EXACT_OUTPUTS_LIMIT,
    FactorSums,
    KroneckerFactors,
    LayerTaps,
    jacobian_rows,
)
from lqf_core.linearize import LinearizedNet, batches

MAX_BYTES = 6 * 1024**3
# Inputs per batch of the recording pass: its C backward passes' gradients are held at
# once, and smaller batches recorded faster (MobileNetV2, 1,000 items at 96 px: 19.9 s at
# 64 against 22.9 s at 256; K-FAC's own pass took 15.7 and 14.8 s).
RECORD_BATCH = 64


@dataclass
class _Layer:
    """One layer's recorded signals, in whichever of two forms takes less memory."""

    weight: str
    bias: str | None
    weight_shape: torch.Size
    # (groups, N, P, k): unfolded inputs with a column of ones for a bias, laid out for
    # one matrix product per group over all items and positions
    inputs: torch.Tensor | None
    grads: torch.Tensor | None  # (N, C, groups, o, P): output gradients for every output c
    # (N, C, groups * o * k): the explicit Jacobian rows R_ic = Σ_p d_icp a_ipᵀ instead,
    # for a layer where they are smaller than a and d (a depthwise convolution: 9 weights
    # per group against 9 positions). Then J v and Jᵀ u are one matrix-vector product
    # each, over less memory: the products are memory-bound, and the depthwise layers'
    # batched matrix-vector products over a had been 40 % of H v (docs/method.md).
    rows: torch.Tensor | None = None
    groups: int = 1
    k: int = 0  # inputs per group, with the bias's column of ones

    def signals(self, name: str) -> LayerSignals:
        """The gram.py layout: a (N, g, k, P) (a view), d (N, C, g, o, P), or the rows."""
        if self.rows is not None:
            return LayerSignals(name, None, None, rows=self.rows)
        assert self.inputs is not None and self.grads is not None
        return LayerSignals(name, self.inputs.permute(1, 0, 3, 2), self.grads)

    def numel(self) -> int:
        return sum(t.numel() for t in (self.inputs, self.grads, self.rows) if t is not None)


def prefers_rows(groups: int, k: int, o: int, positions: int, num_outputs: int) -> bool:
    """Whether a layer's explicit Jacobian rows take fewer numbers than its signals."""
    return num_outputs * groups * o * k <= positions * (groups * k + num_outputs * groups * o)


class SignalProducts:
    """J v and Jᵀ u on N recorded inputs; `factors` are K-FAC's on the same inputs."""

    def __init__(self, lin: LinearizedNet, output0: torch.Tensor, layers: dict[str, _Layer],
                 sums: FactorSums, modules: dict[str, nn.Module]):
        self.lin, self.output0, self._layers = lin, output0, layers
        self._sums, self._modules = sums, modules

    @staticmethod
    def bytes_needed(lin: LinearizedNet, z: torch.Tensor) -> int:
        """The memory the signals of all of z take, from one input's."""
        return SignalProducts.record(lin, z[:1]).numel() * z.shape[0] * z.element_size()

    def numel(self) -> int:
        """How many numbers the recorded signals hold."""
        return sum(layer.numel() for layer in self._layers.values())

    def row_layers(self) -> list[str]:
        """The layers that keep their explicit Jacobian rows."""
        return [name for name, layer in self._layers.items() if layer.rows is not None]

    @staticmethod
    def fits(lin: LinearizedNet, z: torch.Tensor, num_outputs: int) -> bool:
        """Whether the signals can stand in for the network: every linearized weight in a
        conv or linear layer, per-output seeds, and the memory within MAX_BYTES."""
        covered = set(lin.space.names) <= covered_parameters(LayerTaps(lin))
        return (covered and num_outputs <= EXACT_OUTPUTS_LIMIT and z.shape[0] > 0
                and SignalProducts.bytes_needed(lin, z) <= MAX_BYTES)

    @staticmethod
    def record(lin: LinearizedNet, z: torch.Tensor, batch_size: int = RECORD_BATCH,
               on_batch: Callable[[int, int], None] | None = None) -> SignalProducts:
        """One pass over z: outputs at w0, every layer's signals, the K-FAC sums."""
        n = z.shape[0]
        layers: dict[str, _Layer] = {}
        outputs = []
        sums = FactorSums()
        with LayerTaps(lin) as taps, torch.enable_grad():
            all_batches = list(batches(n, batch_size))
            for index, sl in enumerate(all_batches):
                out, unfolded = taps.run(z[sl])
                per_output = [taps.output_grads(out[:, c].sum()) for c in range(out.shape[1])]
                sums.add(unfolded, per_output)
                for name, module in taps.layers.items():
                    a = unfolded[name].detach()  # (b, g, k, P)
                    if name not in layers:
                        layers[name] = _allocate(name, module, n, a, per_output[0][name],
                                                 len(per_output))
                    layer = layers[name]
                    if layer.rows is not None:
                        d = torch.stack([g[name].detach() for g in per_output], dim=1)
                        layer.rows[sl] = jacobian_rows(a, d)
                        continue
                    assert layer.inputs is not None and layer.grads is not None
                    layer.inputs[:, sl] = a.permute(1, 0, 3, 2)
                    for c, grads in enumerate(per_output):
                        layer.grads[sl, c] = grads[name].detach()
                outputs.append(out.detach())
                if on_batch is not None:
                    on_batch(index + 1, len(all_batches))
            modules = dict(taps.layers)
        return SignalProducts(lin, torch.cat(outputs), layers, sums, modules)

    def factors(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> list[KroneckerFactors]:
        return self._sums.factors(self._modules, reduce)

    def layer_signals(self) -> list[LayerSignals]:
        return [layer.signals(name) for name, layer in self._layers.items()]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """J v, (N, C)."""
        tensors = self.lin.space.unflatten(v)
        total = torch.zeros_like(self.output0)
        for layer in self._layers.values():
            if layer.rows is not None:
                moved = _weight_matrix(tensors, layer, layer.groups)  # (g, o, k)
                total += torch.matmul(layer.rows, moved.reshape(-1))
                continue
            assert layer.inputs is not None and layer.grads is not None
            g, n, p, k = layer.inputs.shape
            moved = _weight_matrix(tensors, layer, g)  # (g, o, k)
            h = torch.matmul(layer.inputs.reshape(g, n * p, k), moved.transpose(1, 2))
            h = h.view(g, n, p, -1).permute(1, 0, 3, 2).reshape(n, 1, -1)  # (n, 1, g o p)
            grads = layer.grads.view(n, layer.grads.shape[1], -1)  # (n, C, g o p)
            total += torch.bmm(h, grads.transpose(1, 2)).squeeze(1)
        return total

    def transpose(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀ u summed over the inputs, u (N, C) -> (P,)."""
        out: dict[str, torch.Tensor] = {}
        u = u.to(self.output0.dtype)
        for layer in self._layers.values():
            if layer.rows is not None:
                g = layer.groups
                flat = u.reshape(1, -1) @ layer.rows.reshape(u.numel(), -1)  # Σ_ic u_ic R_ic
                moved = flat.view(g, -1, layer.k)
            else:
                assert layer.inputs is not None and layer.grads is not None
                g, n, p, k = layer.inputs.shape
                grads = layer.grads.view(n, layer.grads.shape[1], -1)  # (n, C, g o p)
                t = torch.bmm(u[:, None, :], grads)  # (n, 1, g o p)
                t = t.view(n, g, -1, p).permute(1, 0, 3, 2).reshape(g, n * p, -1)
                moved = torch.matmul(t.transpose(1, 2), layer.inputs.reshape(g, n * p, k))
            if layer.bias is not None:
                out[layer.bias] = moved[:, :, -1].reshape(-1)
                moved = moved[:, :, :-1]
            out[layer.weight] = moved.reshape(layer.weight_shape)
        return self.lin.space.flatten(out)


def _allocate(name: str, module: nn.Module, n: int, a: torch.Tensor, d: torch.Tensor,
              num_outputs: int) -> _Layer:
    """Storage for all n inputs, from one batch's a (b, g, k, P) and d (b, g, o, P)."""
    _, g, k, p = a.shape
    o = d.shape[2]
    prefix = f"{name}." if name else ""
    bias = prefix + "bias" if getattr(module, "bias", None) is not None else None
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if prefers_rows(g, k, o, p, num_outputs):
        return _Layer(prefix + "weight", bias, weight.shape, None, None,
                      rows=d.new_empty(n, num_outputs, g * o * k), groups=g, k=k)
    return _Layer(prefix + "weight", bias, weight.shape,
                  a.new_empty(g, n, p, k), d.new_empty(n, num_outputs, g, o, p))


def _weight_matrix(tensors: dict[str, torch.Tensor], layer: _Layer, groups: int
                   ) -> torch.Tensor:
    """The layer's part of v as (groups, o, k), the bias as the last column."""
    weight = tensors[layer.weight]
    mat = weight.reshape(groups, weight.shape[0] // groups, -1)
    if layer.bias is not None:
        mat = torch.cat([mat, tensors[layer.bias].reshape(groups, -1, 1)], dim=2)
    return mat
