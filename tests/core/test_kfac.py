from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lqf_core.kfac import (
    KFACPreconditioner,
    compute_kfac_factors,
    form_via_positions,
    form_via_rows,
)
from lqf_core.linearize import LinearizedNet
from tests.core.factories import tiny_inputs, tiny_suffix_net


def test_one_linear_layer_kfac_equals_dense_gauss_newton():
    torch.manual_seed(0)
    net = nn.Linear(5, 3).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    lin = LinearizedNet(net)
    (factors,) = compute_kfac_factors(lin, x, batch_size=3)
    # vec order of [W | b] row by row == ParamSpace order after regrouping
    jac = lin.jacobian(x)
    dense = jac.T @ jac / x.shape[0]
    kron = torch.kron(factors.S[0], factors.A[0])
    # kron is over the augmented matrix [W | b] (3 x 6) flattened row-major; map it.
    order = [r * 6 + c for r in range(3) for c in range(5)] + [r * 6 + 5 for r in range(3)]
    torch.testing.assert_close(kron[order][:, order], dense, rtol=1e-10, atol=1e-12)


def test_conv_factors_equal_their_definitions():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1, stride=2, bias=True).double()
    net = nn.Sequential(conv, nn.Flatten()).eval()
    x = torch.randn(5, 2, 5, 5, dtype=torch.float64)
    lin = LinearizedNet(net)
    (factors,) = compute_kfac_factors(lin, x, batch_size=2)
    patches = F.unfold(x, 3, padding=1, stride=2)  # (n, 18, P)
    patches = torch.cat([patches, torch.ones_like(patches[:, :1])], dim=1)
    n, _, positions = patches.shape
    a_def = sum(patches[i, :, p, None] * patches[i, None, :, p]
                for i in range(n) for p in range(positions)) / (n * positions)
    # d f_c / d(conv output) is a one-hot: output c of the flattened map is one (channel, position).
    outputs = 4 * positions
    s_def = torch.zeros(4, 4, dtype=torch.float64)
    for _ in range(n):
        for c in range(outputs):
            g = torch.zeros(4, positions, dtype=torch.float64)
            g[c // positions, c % positions] = 1
            s_def += g @ g.T
    s_def /= n
    torch.testing.assert_close(factors.A[0], a_def)
    torch.testing.assert_close(factors.S[0], s_def)


def test_grouped_conv_gets_one_factor_pair_per_group():
    net = tiny_suffix_net()
    lin = LinearizedNet(net)
    factors = compute_kfac_factors(lin, tiny_inputs())
    depthwise = next(f for f in factors if f.weight_name == "3.weight")
    assert depthwise.groups == 4
    assert depthwise.A.shape == (4, 9, 9) and depthwise.S.shape == (4, 1, 1)


def test_preconditioner_is_the_exact_inverse_of_damped_kronecker_blocks():
    torch.manual_seed(0)
    net = nn.Linear(4, 3).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    lin = LinearizedNet(net)
    factors = compute_kfac_factors(lin, x)
    damping = 0.3
    precond = KFACPreconditioner(lin, factors, damping)
    # For one linear layer K-FAC is exact, so the preconditioner inverts H itself.
    jac = lin.jacobian(x)
    hessian = jac.T @ jac / x.shape[0] + damping * torch.eye(lin.num_params, dtype=torch.float64)
    v = torch.randn(lin.num_params, dtype=torch.float64)
    torch.testing.assert_close(precond(v), torch.linalg.solve(hessian, v), rtol=1e-9, atol=1e-11)


def test_output_forms_equal_the_preconditioner_applied_to_jacobian_rows():
    """J_i K^-1 J_i^T from layer signals == applying K^-1 to each dense Jacobian row."""
    torch.manual_seed(0)
    net = tiny_suffix_net()  # convolutions (one depthwise) and a linear head
    lin = LinearizedNet(net)
    z = tiny_inputs()
    precond = KFACPreconditioner(lin, compute_kfac_factors(lin, z), damping=0.1)
    forms = precond.output_forms(lin, z, batch_size=2)
    jac = lin.jacobian(z)  # rows ordered (item, output)
    n, c = forms.shape[:2]
    for i in range(n):
        rows = jac[i * c:(i + 1) * c]
        expected = rows @ torch.stack([precond(r) for r in rows]).T
        torch.testing.assert_close(forms[i], expected, rtol=1e-9, atol=1e-11)


def test_both_contraction_orders_of_a_layer_form_agree():
    torch.manual_seed(0)
    a_hat = torch.randn(3, 2, 5, 4, dtype=torch.float64)  # (n, groups, k, positions)
    d_hat = torch.randn(3, 6, 2, 7, 4, dtype=torch.float64)  # (n, C, groups, o, positions)
    inv = torch.rand(2, 7, 5, dtype=torch.float64)
    rows = torch.einsum("ncgmp,nglp->ncgml", d_hat, a_hat)  # R_c for each sample
    naive = torch.stack([
        torch.stack([torch.stack([(rows[s, i] * rows[s, j] * inv).sum() for j in range(6)])
                     for i in range(6)])
        for s in range(3)
    ])
    torch.testing.assert_close(form_via_rows(a_hat, d_hat, inv), naive)
    torch.testing.assert_close(form_via_positions(a_hat, d_hat, inv), naive)
