"""The network linearized around its pre-trained weights w0 (LQF paper, eq. 2).

    f_lin(z; w0 + dw) = f(z; w0) + J(z) dw,     J(z) = d f(z; w) / d w  at w0

`net` is the suffix of the backbone plus the head; `z` is the cached output of the
frozen prefix. Only the parameters in `param_names` move; everything else (BatchNorm
affine and running statistics, in eval mode) stays at w0 in primal and tangent alike.
Parameter vectors are flat tensors laid out by `ParamSpace` so that the solvers can
work with plain vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, jvp, linearize, vjp


class ParamSpace:
    """Flat-vector layout of a set of named parameters (dict <-> 1-D tensor)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.numels = [params[n].numel() for n in self.names]
        self.size = sum(self.numels)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(vector, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}


def linearizable_parameters(net: nn.Module) -> list[str]:
    """Names of the weights LQF moves: every Conv2d / Linear weight and bias.

    BatchNorm affine parameters stay at w0: with running statistics they only rescale
    the following convolution, which is already free to move.
    """
    names = []
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            prefix = f"{module_name}." if module_name else ""
            names.append(prefix + "weight")
            if module.bias is not None:
                names.append(prefix + "bias")
    return names


class LinearizedNet:
    """f_lin over a fixed network. Shapes: z (n, ...) -> outputs (n, C); vectors (P,)."""

    def __init__(self, net: nn.Module, param_names: Sequence[str] | None = None):
        net.eval()  # BatchNorm with running statistics in primal and tangent
        self.net = net
        names = list(param_names) if param_names is not None else linearizable_parameters(net)
        all_params = dict(net.named_parameters())
        missing = [n for n in names if n not in all_params]
        if missing:
            raise ValueError(f"parameters not in the network: {missing}")
        self.params0 = {n: all_params[n].detach() for n in names}
        self.frozen = {n: p.detach() for n, p in all_params.items() if n not in self.params0}
        self.frozen.update({n: b.detach() for n, b in net.named_buffers()})
        self.space = ParamSpace(self.params0)

    @property
    def num_params(self) -> int:
        return self.space.size

    def _call(self, params: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, {**self.frozen, **params}, (z,))

    def output0(self, z: torch.Tensor) -> torch.Tensor:
        """f(z; w0), (n, C)."""
        with torch.no_grad():
            return self._call(self.params0, z)

    def jvp(self, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(z; w0), J(z) v): both (n, C), one forward-mode pass."""
        tangent = self.space.unflatten(v)
        result = jvp(lambda p: self._call(p, z), (self.params0,), (tangent,))
        return result[0], result[1]

    def forward(self, z: torch.Tensor, delta_w: torch.Tensor) -> torch.Tensor:
        """f_lin(z; w0 + delta_w), (n, C).

        Forward-mode AD with dual tensors: the same numbers as `jvp`, with less
        per-call overhead than torch.func's transform (it matters for serving).
        """
        primal, tangent = self._dual(z, delta_w)
        return primal + tangent

    def _dual(self, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(z; w0), J(z) v) by one pass of dual tensors."""
        tangents = self.space.unflatten(v)
        with torch.no_grad(), fwAD.dual_level():
            params = {n: fwAD.make_dual(p, tangents[n]) for n, p in self.params0.items()}
            primal, tangent = fwAD.unpack_dual(self._call(params, z))
            return primal, tangent

    def vjp(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """J(z)^T u for u (n, C) -> (P,)."""
        pullback = vjp(lambda p: self._call(p, z), self.params0)[1]
        grads = pullback(u)[0]
        return self.space.flatten(grads)

    def linear_maps(self, z: torch.Tensor) -> tuple[
        torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]
    ]:
        """(f(z; w0), v -> J v, u -> J^T u) for reuse by every solver iteration.

        The backward map keeps the primal graph, built once. The forward map: see
        `_ForwardMap`.
        """
        def call(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return self._call(p, z)

        out0, vjp_fn = vjp(call, self.params0)[:2]
        space = self.space

        def backward_map(u: torch.Tensor) -> torch.Tensor:
            return space.flatten(vjp_fn(u)[0])

        return out0.detach(), _ForwardMap(self, z), backward_map

    def jacobian(self, z: torch.Tensor) -> torch.Tensor:
        """Dense J(z), (n * C, P). For tests and tiny models only."""
        rows = []
        out0 = self.output0(z)
        for i in range(out0.shape[0]):
            for c in range(out0.shape[1]):
                u = torch.zeros_like(out0)
                u[i, c] = 1
                rows.append(self.vjp(z, u))
        return torch.stack(rows)


class _ForwardMap:
    """v -> J(z) v for one batch z, as cheap as the number of calls allows.

    A dual-tensor pass recomputes the primal. A traced `torch.func.linearize` graph
    replays only the tangent, about twice as fast, but tracing costs as much as ten or
    more dual passes (MobileNetV2's 4-block suffix, batch 256: 3.9 s to trace, 0.16 s a
    replay, 0.33 s a dual pass). So the first TRACE_AFTER calls use dual passes -- a
    10-iteration training solve never traces -- and later calls (long CG solves,
    a posterior serving many queries) use the trace: the same map (bit-identical here).
    """

    TRACE_AFTER = 20

    def __init__(self, lin: LinearizedNet, z: torch.Tensor):
        self.lin, self.z = lin, z
        self.calls = 0
        self._traced: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self._traced is None and self.calls > self.TRACE_AFTER:
            _, self._traced = linearize(lambda p: self.lin._call(p, self.z), self.lin.params0)
        if self._traced is not None:
            return self._traced(self.lin.space.unflatten(v))
        return self.lin._dual(self.z, v)[1]


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
