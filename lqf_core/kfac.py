"""K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) for LQF.

The LQF Hessian is the Gauss-Newton matrix of the linearized model,
    H = J^T J / N + lambda I,
and it is constant, so its Kronecker factors are computed once. For a layer with
weight W (out x in) [+ bias, as an extra input column] and groups g:
    A_g = mean over samples i and positions p of  a a^T                  (in_g x in_g)
    S_g = mean over samples i of  sum_p sum_c  d_c d_c^T                  (out_g x out_g)
where a are the (unfolded) layer inputs and d_c = d f_c / d(layer output) for every
network output c. Then the layer's block of J^T J / N is approximately  S (x) A  (exact
for a single linear layer). The preconditioner applies (S (x) A + lambda I)^-1 exactly
through the eigendecompositions of the two factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lqf_core.linearize import LinearizedNet, batches

# Above this many outputs, sum_c d_c d_c^T is estimated with random output directions.
EXACT_OUTPUTS_LIMIT = 64
RANDOM_OUTPUT_PROBES = 16


@dataclass
class KroneckerFactors:
    """Factors of one layer. A: (groups, k, k); S: (groups, o, o)."""

    weight_name: str
    bias_name: str | None
    groups: int
    A: torch.Tensor
    S: torch.Tensor


def _layers(lin: LinearizedNet) -> dict[str, nn.Module]:
    """Conv2d / Linear modules whose weight is linearized, by module name."""
    out = {}
    for name, module in lin.net.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            weight = f"{name}.weight" if name else "weight"
            if weight in lin.params0:
                out[name] = module
    return out


def _unfold_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input -> (n, groups, k, positions), with a row of ones for the bias."""
    if isinstance(module, nn.Linear):
        a = x.reshape(x.shape[0], 1, -1, 1)
    else:
        assert isinstance(module, nn.Conv2d)
        if not isinstance(module.padding, tuple) or module.padding_mode != "zeros":
            raise ValueError(
                f"K-FAC supports zero-padded convolutions with explicit padding, got {module}"
            )
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        a = cols.reshape(x.shape[0], module.groups, -1, cols.shape[-1])
    if module.bias is not None:
        ones = torch.ones_like(a[:, :, :1, :])
        a = torch.cat([a, ones], dim=2)
    return a


def _output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """d f / d(layer output) -> (n, groups, o, positions)."""
    groups = module.groups if isinstance(module, nn.Conv2d) else 1
    return g.reshape(g.shape[0], groups, g.shape[1] // groups, -1)


def compute_kfac_factors(
    lin: LinearizedNet,
    z: torch.Tensor,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[KroneckerFactors]:
    """Kronecker factors of J^T J / N over the N inputs z (the cached prefix outputs)."""
    layers = _layers(lin)
    n_total = z.shape[0]
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def save(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs[name] = args[0].detach()
            outputs[name] = out

        return hook

    handles = [m.register_forward_hook(save(n)) for n, m in layers.items()]
    sums_a: dict[str, torch.Tensor] = {}
    sums_s: dict[str, torch.Tensor] = {}
    counts_a: dict[str, int] = {}
    params = dict(lin.net.named_parameters())
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in lin.params0)
        all_batches = list(batches(n_total, batch_size))
        for index, sl in enumerate(all_batches):
            with torch.enable_grad():
                out = lin.net(z[sl])
                num_outputs = out.shape[1]
                if num_outputs <= EXACT_OUTPUTS_LIMIT:
                    directions = [None] * num_outputs
                else:
                    directions = [
                        torch.randn(out.shape, generator=generator, dtype=out.dtype)
                        for _ in range(RANDOM_OUTPUT_PROBES)
                    ]
                names = list(layers)
                for c, direction in enumerate(directions):
                    seed = out[:, c].sum() if direction is None else (out * direction).sum()
                    seed = seed / (1.0 if direction is None else len(directions) ** 0.5)
                    grads = torch.autograd.grad(
                        seed, [outputs[n] for n in names], retain_graph=True
                    )
                    for name, g in zip(names, grads, strict=True):
                        d = _output_grads(layers[name], g)
                        s = torch.einsum("ngop,ngqp->goq", d, d)
                        sums_s[name] = sums_s[name] + s if name in sums_s else s
            for name in names:
                a = _unfold_input(layers[name], inputs[name])
                aa = torch.einsum("ngkp,ngjp->gkj", a, a)
                sums_a[name] = sums_a[name] + aa if name in sums_a else aa
                counts_a[name] = counts_a.get(name, 0) + a.shape[0] * a.shape[-1]
            inputs.clear()
            outputs.clear()
            if on_batch is not None:
                on_batch(index + 1, len(all_batches))
    finally:
        for handle in handles:
            handle.remove()
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])

    factors = []
    for name, module in layers.items():
        prefix = f"{name}." if name else ""
        bias = prefix + "bias" if module.bias is not None else None
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        factors.append(
            KroneckerFactors(
                weight_name=prefix + "weight",
                bias_name=bias,
                groups=groups,
                A=sums_a[name] / counts_a[name],
                S=sums_s[name] / n_total,
            )
        )
    return factors


class KFACPreconditioner:
    """v -> (K + lambda I)^-1 v, with K block-diagonal over layers, each block S (x) A.

    Parameters not covered by a layer (none, for conv/linear suffixes) are scaled by
    1 / lambda.
    """

    def __init__(self, lin: LinearizedNet, factors: list[KroneckerFactors], damping: float):
        self.space = lin.space
        self.damping = damping
        self.blocks = []
        for f in factors:
            eig_a, vec_a = torch.linalg.eigh(f.A)
            eig_s, vec_s = torch.linalg.eigh(f.S)
            # Clamp: factors are PSD up to round-off.
            scale = eig_s.clamp_min(0)[:, :, None] * eig_a.clamp_min(0)[:, None, :] + damping
            self.blocks.append((f, vec_a, vec_s, 1.0 / scale))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        tensors = self.space.unflatten(v)
        out = {k: t / self.damping for k, t in tensors.items()}
        for f, vec_a, vec_s, inv_scale in self.blocks:
            w = tensors[f.weight_name]
            groups = f.groups
            mat = w.reshape(groups, w.shape[0] // groups, -1)  # (g, o, k)
            if f.bias_name is not None:
                b = tensors[f.bias_name].reshape(groups, -1, 1)
                mat = torch.cat([mat, b], dim=2)
            rotated = vec_s.transpose(1, 2) @ mat @ vec_a
            mat = vec_s @ (rotated * inv_scale) @ vec_a.transpose(1, 2)
            if f.bias_name is not None:
                out[f.bias_name] = mat[:, :, -1].reshape(tensors[f.bias_name].shape)
                mat = mat[:, :, :-1]
            out[f.weight_name] = mat.reshape(w.shape)
        return self.space.flatten(out)
