from __future__ import annotations

import torch
from torch.func import functional_call, jacrev

from lqf_core.linearize import LinearizedNet, linearizable_parameters
from tests.core.factories import tiny_inputs, tiny_suffix_net


def dense_jacobian(net: torch.nn.Module, names: list[str], z: torch.Tensor) -> torch.Tensor:
    """J from torch.func.jacrev, flattened to (n * C, P) in ParamSpace order."""
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def f(moving: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(net, {**params, **buffers, **moving}, (z,))

    jac = jacrev(f)({n: params[n] for n in names})
    rows = f({}).numel()
    return torch.cat([jac[n].reshape(rows, -1) for n in names], dim=1)


def test_moves_conv_and_linear_weights_only():
    net = tiny_suffix_net()
    assert linearizable_parameters(net) == ["0.weight", "0.bias", "3.weight", "8.weight", "8.bias"]


def test_linearized_forward_equals_taylor_expansion_with_jacrev_jacobian():
    net = tiny_suffix_net()
    z = tiny_inputs()
    lin = LinearizedNet(net)
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(lin.num_params, dtype=torch.float64, generator=generator)
    jac = dense_jacobian(net, lin.space.names, z)
    expected = net(z).detach() + (jac @ delta).view(z.shape[0], -1)
    torch.testing.assert_close(lin.forward(z, delta), expected, rtol=1e-6, atol=1e-10)


def test_linearized_forward_at_zero_is_the_network():
    net = tiny_suffix_net()
    z = tiny_inputs()
    lin = LinearizedNet(net)
    zero = torch.zeros(lin.num_params, dtype=torch.float64)
    torch.testing.assert_close(lin.forward(z, zero), net(z).detach(), rtol=0, atol=1e-12)


def test_cached_linear_maps_match_jvp_and_vjp():
    net = tiny_suffix_net()
    z = tiny_inputs()
    lin = LinearizedNet(net)
    jac = dense_jacobian(net, lin.space.names, z)
    out0, forward_map, backward_map = lin.linear_maps(z)
    v = torch.randn(lin.num_params, dtype=torch.float64)
    u = torch.randn(z.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(out0, net(z).detach())
    torch.testing.assert_close(forward_map(v).reshape(-1), jac @ v)
    torch.testing.assert_close(backward_map(u), jac.T @ u.reshape(-1))
    torch.testing.assert_close(lin.vjp(z, u), jac.T @ u.reshape(-1))
    torch.testing.assert_close(lin.jacobian(z), jac)
    # Past its first calls the forward map replays a traced graph: the same map.
    for _ in range(forward_map.TRACE_AFTER):
        forward_map(v)
    assert forward_map._traced is not None
    torch.testing.assert_close(forward_map(v).reshape(-1), jac @ v)


def test_batchnorm_stays_in_eval_mode():
    net = tiny_suffix_net().train()
    lin = LinearizedNet(net)
    assert not net.training
    before = net[1].running_mean.clone()
    lin.forward(tiny_inputs(), torch.zeros(lin.num_params, dtype=torch.float64))
    torch.testing.assert_close(net[1].running_mean, before, rtol=0, atol=0)
