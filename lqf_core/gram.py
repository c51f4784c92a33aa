"""The function-space Gram matrix J Jᵀ of the linearized network, exactly, without
forming J.

For N inputs and C outputs, J is (N·C) × P with P the linearized weights (1.5 M for
MobileNetV2's 4-block suffix), far too large to store. But a layer's Jacobian row for
input i and output c is a sum over its output positions p of outer products,
    J_l[(i, c)] = Σ_p d_{icp} a_{ip}ᵀ      (per group of a grouped convolution)
with a the layer's unfolded input (bias: a row of ones) and d = ∂f_c / ∂(layer output).
So the layer's block of J Jᵀ is
    K_l[(i, c), (j, e)] = Σ_p Σ_q (d_{icp} · d_{jeq}) (a_{ip} · a_{jq}).
`gram_matrix` builds each layer's block by whichever of two contractions is cheaper for
its shape: the explicit rows (a grouped layer with few weights per group, e.g. a
depthwise convolution) or the position pairs (a 1×1 convolution on a small feature map).
Both give the same numbers as the dense J Jᵀ (tests/core/test_gram.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lqf_core.errors import Cancelled
from lqf_core.kfac import LayerTaps, jacobian_rows
from lqf_core.linearize import LinearizedNet, batches


@dataclass
class LayerSignals:
    """One layer's inputs a (N, groups, k, positions) and output gradients
    d (N, C, groups, o, positions) over the N training inputs, or instead its explicit
    Jacobian rows (N, C, groups * o * k), where those were kept (signals.py)."""

    name: str
    inputs: torch.Tensor | None
    output_grads: torch.Tensor | None
    rows: torch.Tensor | None = None

    @property
    def items_and_outputs(self) -> tuple[int, int]:
        source = self.rows if self.rows is not None else self.output_grads
        assert source is not None
        return source.shape[0], source.shape[1]

    @property
    def rows_cost(self) -> int:
        """Multiply-adds of the explicit-rows contraction: (N C)^2 * (weights per layer)."""
        if self.rows is not None:
            n, c, weights = self.rows.shape
            return (n * c) ** 2 * weights
        assert self.inputs is not None and self.output_grads is not None
        n, c, g, o, _ = self.output_grads.shape
        return (n * c) ** 2 * g * o * self.inputs.shape[2]

    @property
    def positions_cost(self) -> int | None:
        """Multiply-adds of the position-pairs contraction (ungrouped layers with their
        signals only)."""
        if self.output_grads is None:
            return None
        n, c, g, o, p = self.output_grads.shape
        if g != 1:
            return None
        return (p * (p + 1) // 2) * (n * c) ** 2 * (o + 1)


def layer_signals(lin: LinearizedNet, z: torch.Tensor, batch_size: int = 64,
                  on_batch: Callable[[int, int], None] | None = None) -> list[LayerSignals]:
    """Every linearized layer's signals on the inputs z: C backward passes per batch.

    Memory: N * sum over layers of positions * (k + C * o) numbers (about 300 M at
    N = 1,000, C = 10 for MobileNetV2's 4-block suffix at 64 px)."""
    inputs: dict[str, list[torch.Tensor]] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    with LayerTaps(lin) as taps, torch.enable_grad():
        uncovered = set(lin.space.names) - covered_parameters(taps)
        if uncovered:
            raise NotImplementedError(f"the Gram matrix needs every linearized weight in a "
                                      f"conv or linear layer; not: {sorted(uncovered)}")
        all_batches = list(batches(z.shape[0], batch_size))
        for index, sl in enumerate(all_batches):
            out, unfolded = taps.run(z[sl])
            per_output = [taps.output_grads(out[:, c].sum()) for c in range(out.shape[1])]
            for name in taps.layers:
                inputs.setdefault(name, []).append(unfolded[name].detach())
                stacked = torch.stack([g[name] for g in per_output], dim=1).detach()
                grads.setdefault(name, []).append(stacked)
            if on_batch is not None:
                on_batch(index + 1, len(all_batches))
    return [LayerSignals(name, torch.cat(inputs[name]), torch.cat(grads[name]))
            for name in inputs]


def covered_parameters(taps: LayerTaps) -> set[str]:
    """The parameter names of the layers the taps record."""
    names = set()
    for name, module in taps.layers.items():
        prefix = f"{name}." if name else ""
        names.add(prefix + "weight")
        if getattr(module, "bias", None) is not None:
            names.add(prefix + "bias")
    return names


def gram_matrix(signals: list[LayerSignals], dtype: torch.dtype = torch.float64,
                should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """J Jᵀ, (N C, N C), rows ordered (item, output), accumulated in `dtype`.

    Products of two different positions come in transposed pairs; they are summed into
    one buffer whose transpose is added once at the end (a strided add of an (N C)^2
    matrix per pair cost more than the products themselves)."""
    n, c = signals[0].items_and_outputs
    first = signals[0].rows if signals[0].rows is not None else signals[0].output_grads
    assert first is not None
    device = first.device
    gram = torch.zeros(n * c, n * c, dtype=dtype, device=device)
    off_diagonal = torch.zeros_like(gram)
    for layer in signals:
        if should_stop is not None and should_stop():
            raise Cancelled("stopped while building the Gram matrix")
        positions = layer.positions_cost
        if positions is not None and positions < layer.rows_cost:
            _add_by_positions(gram, off_diagonal, layer)
        else:
            _add_by_rows(gram, layer)
    gram += off_diagonal
    gram += off_diagonal.T
    return gram


def _add_by_rows(gram: torch.Tensor, layer: LayerSignals) -> None:
    """Form each row R_ic = Σ_p d_icp a_ipᵀ (per group), unless kept, then R Rᵀ."""
    if layer.rows is not None:
        rows = layer.rows.flatten(0, 1)
    else:
        assert layer.inputs is not None and layer.output_grads is not None
        rows = jacobian_rows(layer.inputs, layer.output_grads).flatten(0, 1)
    gram.add_(rows @ rows.T)


def _add_by_positions(gram: torch.Tensor, off_diagonal: torch.Tensor,
                      layer: LayerSignals) -> None:
    """Σ_{p,q} (D_p D_qᵀ) ⊙ (A_p A_qᵀ expanded over outputs), each unordered pair once."""
    assert layer.inputs is not None and layer.output_grads is not None
    a = layer.inputs[:, 0]  # (N, k, P)
    d = layer.output_grads[:, :, 0]  # (N, C, o, P)
    n, c, _, num_positions = d.shape
    for p in range(num_positions):
        d_p = d[..., p].reshape(n * c, -1)
        for q in range(p, num_positions):
            block = d_p @ d[..., q].reshape(n * c, -1).T
            inputs = a[..., p] @ a[..., q].T  # (N, N)
            block.view(n, c, n, c).mul_(inputs[:, None, :, None])
            (gram if q == p else off_diagonal).add_(block)
