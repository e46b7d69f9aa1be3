import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import nt_xent


def naive_nt_xent(z1, z2, t):
    """Per-anchor loop straight from SimCLR eq. (1): l(i, j) over all 2N anchors, averaged."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sims = [torch.dot(z[i], z[k]) / t for k in range(n2) if k != i]
        total = total - (torch.dot(z[i], z[j]) / t - torch.logsumexp(torch.stack(sims), 0))
    return total / n2


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (8, 16, 0.1), (5, 4, 1.0), (16, 32, 0.05)])
def test_nt_xent_matches_naive_loop(n, d, t):
    g = torch.Generator().manual_seed(n * d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert nt_xent(z1, z2, t).item() == pytest.approx(naive_nt_xent(z1, z2, t).item(), rel=1e-5, abs=1e-6)


def test_nt_xent_closed_form_identical_views():
    n, t = 6, 0.5
    z = torch.eye(n) * 3.0  # mutually orthogonal, not normalised
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_closed_form_orthogonal_views():
    n = 5
    e = torch.eye(2 * n)
    z1, z2 = e[:n] * 2, e[n:] * 0.5  # every pair orthogonal: all similarities 0
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(math.log(2 * n - 1), rel=1e-6)


def test_nt_xent_symmetric_in_views():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    assert nt_xent(z1, z2).item() == pytest.approx(nt_xent(z2, z1).item(), rel=1e-6)


def test_nt_xent_gradient_flows_to_both_views():
    z1 = torch.randn(8, 16, requires_grad=True)
    z2 = torch.randn(8, 16, requires_grad=True)
    nt_xent(z1, z2, 0.1).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_nt_xent_gradient_matches_naive():
    z1 = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    z2 = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    g_ours = torch.autograd.grad(nt_xent(z1, z2, 0.2), [z1, z2])
    g_ref = torch.autograd.grad(naive_nt_xent(z1, z2, 0.2), [z1, z2])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_nt_xent_stable_at_low_temperature_and_in_bf16():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(64, 32, generator=g)
    z2 = z1 + 0.01 * torch.randn(64, 32, generator=g)
    loss = nt_xent(z1, z2, 0.05)
    assert torch.isfinite(loss)
    lin = torch.nn.Linear(32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = lin(z1), lin(z2)
        assert a.dtype == torch.bfloat16
        low = nt_xent(a, b, 0.05)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    low.backward()
    assert all(torch.isfinite(p.grad).all() for p in lin.parameters())
    # bf16 inputs give nearly the fp32 value (the loss computes in fp32)
    assert low.item() == pytest.approx(nt_xent(a.float(), b.float(), 0.05).item(), rel=1e-4)
