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

from collections.abc import Callable, Iterable
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
    out: dict[str, nn.Module] = {}
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


class LayerTaps:
    """Forward hooks that record each linearized layer's input and output."""

    def __init__(self, lin: LinearizedNet):
        self.lin = lin
        self.layers = _layers(lin)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> LayerTaps:
        def save(name: str) -> Callable:
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                self.inputs[name] = args[0].detach()
                self.outputs[name] = out

            return hook

        self.handles = [m.register_forward_hook(save(n)) for n, m in self.layers.items()]
        params = dict(self.lin.net.named_parameters())
        self.saved_flags = {n: p.requires_grad for n, p in params.items()}
        for n, p in params.items():
            p.requires_grad_(n in self.lin.params0)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        for n, p in self.lin.net.named_parameters():
            p.requires_grad_(self.saved_flags[n])

    def run(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(network outputs with graph, unfolded layer inputs (n, g, k, positions))."""
        self.inputs.clear()
        self.outputs.clear()
        out = self.lin.net(z)
        unfolded = {n: _unfold_input(m, self.inputs[n]) for n, m in self.layers.items()}
        return out, unfolded

    def output_grads(self, seed: torch.Tensor) -> dict[str, torch.Tensor]:
        """d seed / d(layer output) of every layer, (n, g, o, positions)."""
        names = list(self.layers)
        grads = torch.autograd.grad(seed, [self.outputs[n] for n in names], retain_graph=True)
        return {n: _output_grads(self.layers[n], g) for n, g in zip(names, grads, strict=True)}


class FactorSums:
    """Running sums of the Kronecker factors over batches of inputs."""

    def __init__(self) -> None:
        self.a: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.positions: dict[str, int] = {}
        self.inputs = 0

    def add(self, unfolded: dict[str, torch.Tensor],
            output_grads: Iterable[dict[str, torch.Tensor]]) -> None:
        """One batch: each layer's unfolded inputs (n, g, k, P) and, per output seed,
        its output gradients (n, g, o, P)."""
        for grads in output_grads:
            for name, d in grads.items():
                s = torch.einsum("ngop,ngqp->goq", d, d)
                self.s[name] = self.s[name] + s if name in self.s else s
        for name, a in unfolded.items():
            aa = torch.einsum("ngkp,ngjp->gkj", a, a)
            self.a[name] = self.a[name] + aa if name in self.a else aa
            self.positions[name] = self.positions.get(name, 0) + a.shape[0] * a.shape[-1]
        self.inputs += next(iter(unfolded.values())).shape[0]

    def factors(self, layers: dict[str, nn.Module],
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> list[KroneckerFactors]:
        """The factors (means); `reduce` completes the sums across the ranks of a
        distributed fit (distributed.py)."""
        sums_a, sums_s = dict(self.a), dict(self.s)
        n_total, positions = self.inputs, dict(self.positions)
        if reduce is not None:
            for sums in (sums_a, sums_s):
                for name in sums:
                    sums[name] = reduce(sums[name])
            counts = reduce(torch.tensor([n_total, *positions.values()], dtype=torch.float64))
            n_total = int(counts[0])
            positions = {name: int(c)
                         for name, c in zip(positions, counts[1:].tolist(), strict=True)}
        factors = []
        for name, module in layers.items():
            prefix = f"{name}." if name else ""
            bias = prefix + "bias" if module.bias is not None else None
            groups = module.groups if isinstance(module, nn.Conv2d) else 1
            factors.append(KroneckerFactors(
                weight_name=prefix + "weight", bias_name=bias, groups=groups,
                A=sums_a[name] / positions[name], S=sums_s[name] / n_total))
        return factors


def compute_kfac_factors(
    lin: LinearizedNet,
    z: torch.Tensor,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[KroneckerFactors]:
    """Kronecker factors of J^T J / N over the N inputs z (the cached prefix outputs).
    `reduce` completes sums over this process's inputs across the ranks of a
    distributed fit (distributed.py)."""
    sums = FactorSums()
    with LayerTaps(lin) as taps, torch.enable_grad():
        all_batches = list(batches(z.shape[0], batch_size))
        for index, sl in enumerate(all_batches):
            out, unfolded = taps.run(z[sl])
            num_outputs = out.shape[1]
            if num_outputs <= EXACT_OUTPUTS_LIMIT:
                seeds = [out[:, c].sum() for c in range(num_outputs)]
            else:
                seeds = [
                    (out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum()
                    / RANDOM_OUTPUT_PROBES**0.5
                    for _ in range(RANDOM_OUTPUT_PROBES)
                ]
            # A generator: one seed's gradients are held at a time.
            sums.add(unfolded, (taps.output_grads(seed) for seed in seeds))
            if on_batch is not None:
                on_batch(index + 1, len(all_batches))
    return sums.factors(taps.layers, reduce)


class KFACPreconditioner:
    """v -> (K + lambda I)^-1 v, with K block-diagonal over layers, each block S (x) A;
    `matvec` applies K + lambda I itself.

    Parameters not covered by a layer (none, for conv/linear suffixes) are scaled by
    1 / lambda (by lambda in `matvec`).
    """

    def __init__(self, lin: LinearizedNet, factors: list[KroneckerFactors], damping: float):
        self.space = lin.space
        self.damping = damping
        self.blocks = []
        self._scales: list[torch.Tensor] = []
        for f in factors:
            eig_a, vec_a = torch.linalg.eigh(f.A)
            eig_s, vec_s = torch.linalg.eigh(f.S)
            # Clamp: factors are PSD up to round-off.
            scale = eig_s.clamp_min(0)[:, :, None] * eig_a.clamp_min(0)[:, None, :] + damping
            self.blocks.append((f, vec_a, vec_s, 1.0 / scale))
            self._scales.append(scale)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(v, inverse=True)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """(K + lambda I) v."""
        return self._apply(v, inverse=False)

    def _apply(self, v: torch.Tensor, inverse: bool) -> torch.Tensor:
        tensors = self.space.unflatten(v)
        rest = 1 / self.damping if inverse else self.damping
        out = {k: t * rest for k, t in tensors.items()}
        for (f, vec_a, vec_s, inv), scale in zip(self.blocks, self._scales, strict=True):
            inv_scale = inv if inverse else scale
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

    def output_forms(self, lin: LinearizedNet, z: torch.Tensor, batch_size: int = 32,
                     on_batch: Callable[[], None] | None = None) -> torch.Tensor:
        """J(z_i) K^-1 J(z_i)^T for every input, (n, C, C), with K^-1 this preconditioner.

        The same numbers as applying `self` to each of the C rows of J(z_i), but without
        forming them: a layer's row is  sum_p d_p a_p^T  over its output positions p, so
        in the factors' eigenbases the form needs only the layer's inputs a and output
        gradients d. For n inputs this costs C backward passes per batch and small
        contractions, instead of n * C gradients and preconditioner applications.
        """
        covered = {f.weight_name for f, *_ in self.blocks} | {
            f.bias_name for f, *_ in self.blocks if f.bias_name is not None
        }
        if set(self.space.names) - covered:
            raise NotImplementedError("output_forms needs every parameter in a K-FAC block")
        by_weight = {f.weight_name: (vec_a, vec_s, inv) for f, vec_a, vec_s, inv in self.blocks}
        forms = []
        with LayerTaps(lin) as taps, torch.enable_grad():
            for sl in batches(z.shape[0], batch_size):
                if on_batch is not None:
                    on_batch()  # e.g. raises to stop
                out, unfolded = taps.run(z[sl])
                grads = [taps.output_grads(out[:, c].sum()) for c in range(out.shape[1])]
                total = out.new_zeros(out.shape[0], out.shape[1], out.shape[1])
                for name in taps.layers:
                    vec_a, vec_s, inv = by_weight[f"{name}.weight" if name else "weight"]
                    a_hat = torch.einsum("ngkp,gkl->nglp", unfolded[name], vec_a)
                    # One rotation for every output: a larger product than C small ones.
                    d = torch.stack([g[name] for g in grads], dim=1)  # (n, C, g, o, p)
                    d_hat = torch.einsum("ncgop,gom->ncgmp", d, vec_s)
                    total += _layer_form(a_hat.detach(), d_hat.detach(), inv)
                forms.append(total.detach())
        return torch.cat(forms)


def _layer_form(a_hat: torch.Tensor, d_hat: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """sum_{m,l} R_c[m,l] R_d[m,l] inv[m,l] with R_c = sum_p d_hat[c,:,p] a_hat[:,p]^T, per
    sample: (n, C, C). Two orders of contraction; the cheaper one for this layer's shape."""
    _, c, g, o, p = d_hat.shape
    k = a_hat.shape[2]
    rows_cost = c * g * o * k * (p + c)
    positions_cost = g * o * p * p * (k + c * c)
    if rows_cost <= positions_cost:
        return form_via_rows(a_hat, d_hat, inv)
    return form_via_positions(a_hat, d_hat, inv)


def form_via_rows(a_hat: torch.Tensor, d_hat: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Forms the rotated Jacobian rows R_c (n, C, g, o, k) explicitly."""
    rows = jacobian_rows(a_hat, d_hat)
    return torch.bmm(rows * inv.reshape(1, 1, -1), rows.transpose(1, 2))


def jacobian_rows(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """A layer's Jacobian rows R_ic = Σ_p d_icp a_ipᵀ per group, from its inputs
    a (n, g, k, P) and output gradients d (n, C, g, o, P) -> (n, C, g * o * k).

    One matmul batched over items and groups, with the outputs stacked as rows: no
    broadcast of a over the C outputs (which torch would materialise), and no
    three-operand einsum (contracted left to right through broadcasts, ten times slower
    here). On MobileNetV2's depthwise layers this is 4x faster than a broadcast matmul."""
    n, c, g, o, p = d.shape
    k = a.shape[2]
    d_rows = d.permute(0, 2, 1, 3, 4).reshape(n, g, c * o, p)
    rows = torch.matmul(d_rows, a.transpose(-1, -2))  # (n, g, C o, k)
    return rows.reshape(n, g, c, o, k).permute(0, 2, 1, 3, 4).reshape(n, c, -1)


def form_via_positions(a_hat: torch.Tensor, d_hat: torch.Tensor,
                       inv: torch.Tensor) -> torch.Tensor:
    """Pairs up output positions first: cheaper when there are few of them."""
    n, c, g, o, p = d_hat.shape
    k = a_hat.shape[2]  # inputs per group
    products = a_hat.unsqueeze(4) * a_hat.unsqueeze(3)  # (n, g, k, p, q)
    products = products.permute(1, 0, 3, 4, 2).reshape(g, n * p * p, k)
    pairs = torch.bmm(products, inv.transpose(1, 2)).view(g, n, p, p, o)
    t = torch.einsum("ncgmp,gnpqm->ncgqm", d_hat, pairs)
    return torch.bmm(t.reshape(n, c, -1), d_hat.transpose(3, 4).reshape(n, c, -1).transpose(1, 2))
