import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import memory_collapse_size, nt_xent


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


# ---------------------------------------------------------------------------------------------
# DCL, DCLW, InfoNCE against a queue, and NT-Xent with a memory of extra negatives (issue 4)

from selfsup.losses import CONTRASTIVE_LOSSES, dcl, dclw, info_nce  # noqa: E402


def naive_pair_loss(z1, z2, t, *, decoupled=False, sigma=None, negatives=None):
    """Per-anchor loop over the 2N anchors: -w_i <z_i, z_j+>/t + log sum over the candidates
    (the other 2N-1, without the positive if decoupled, plus the extra negatives)."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    extra = [] if negatives is None else list(negatives.double())
    n2 = len(z)
    n = n2 // 2
    if sigma is not None:
        s = torch.tensor([torch.dot(z[i], z[i + n]).item() for i in range(n)], dtype=torch.double)
        weights = [2 - n * torch.exp(s[i] / sigma) / torch.exp(s / sigma).sum() for i in range(n)]
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        others = [k for k in range(n2) if k != i and not (decoupled and k == j)]
        sims = [torch.dot(z[i], z[k]) / t for k in others] + [torch.dot(z[i], e) / t for e in extra]
        w = weights[i % n] if sigma is not None else 1.0
        total = total - (w * torch.dot(z[i], z[j]) / t - torch.logsumexp(torch.stack(sims), 0))
    return total / n2


def naive_info_nce(q, k, queue, t, *, decoupled=False, sigma=None):
    q, k, queue = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1), queue.double()
    n = len(q)
    pos = [torch.dot(q[i], k[i]) for i in range(n)]
    if sigma is not None:
        s = torch.stack(pos)
        weights = [2 - n * torch.exp(s[i] / sigma) / torch.exp(s / sigma).sum() for i in range(n)]
    total = 0.0
    for i in range(n):
        candidates = ([] if decoupled else [pos[i] / t]) + [torch.dot(q[i], e) / t for e in queue]
        w = weights[i] if sigma is not None else 1.0
        total = total - (w * pos[i] / t - torch.logsumexp(torch.stack(candidates), 0))
    return total / n


def _unit(x):
    return F.normalize(x, dim=1)


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (8, 16, 0.1), (5, 4, 1.0)])
def test_dcl_and_dclw_match_naive_loop(n, d, t):
    g = torch.Generator().manual_seed(10 * n + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert dcl(z1, z2, t).item() == pytest.approx(naive_pair_loss(z1, z2, t, decoupled=True).item(), rel=1e-5)
    for sigma in (0.5, 2.0):
        expected = naive_pair_loss(z1, z2, t, decoupled=True, sigma=sigma).item()
        assert dclw(z1, z2, t, sigma=sigma).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss,options", [("nt_xent", {}), ("dcl", {"decoupled": True}),
                                          ("dclw", {"decoupled": True, "sigma": 0.5})])
def test_pair_losses_with_memory_negatives_match_naive_loop(loss, options):
    """SimCLRv2's memory: every anchor's candidates are the other 2N-1 batch embeddings and the
    K memory keys (for DCL/DCLW without the positive)."""
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    memory = _unit(torch.randn(12, 8, generator=g))
    got = CONTRASTIVE_LOSSES[loss](z1, z2, 0.2, **({"sigma": 0.5} if loss == "dclw" else {}), negatives=memory)
    assert got.item() == pytest.approx(naive_pair_loss(z1, z2, 0.2, negatives=memory, **options).item(), rel=1e-5)
    # and the memory matters
    assert got.item() != pytest.approx(CONTRASTIVE_LOSSES[loss](z1, z2, 0.2).item(), rel=1e-3)


@pytest.mark.parametrize("options", [{}, {"decoupled": True}, {"decoupled": True, "sigma": 0.5}])
def test_info_nce_matches_naive_loop(options):
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    queue = _unit(torch.randn(32, 16, generator=g))
    assert info_nce(q, k, queue, 0.2, **options).item() == pytest.approx(
        naive_info_nce(q, k, queue, 0.2, **options).item(), rel=1e-5)


def test_closed_forms_aligned_and_orthogonal_views():
    n, t = 6, 0.5
    e = torch.eye(2 * n + 4)
    z = e[:n] * 3.0  # mutually orthogonal, not normalised
    # aligned views: positive similarity 1, the 2N-2 negatives 0
    assert dcl(z, z.clone(), t).item() == pytest.approx(-1 / t + math.log(2 * n - 2), rel=1e-6)
    assert dclw(z, z.clone(), t).item() == pytest.approx(-1 / t + math.log(2 * n - 2), rel=1e-6)
    # mutually orthogonal views: every similarity 0
    z1, z2 = e[:n] * 2, e[n:2 * n] * 0.5
    assert dcl(z1, z2, 0.3).item() == pytest.approx(math.log(2 * n - 2), rel=1e-6)
    # InfoNCE: q = k, a queue orthogonal to every query
    queue = e[2 * n:]  # (4, D)
    k_size = len(queue)
    assert info_nce(z, z.clone(), queue, t).item() == pytest.approx(math.log(1 + k_size * math.exp(-1 / t)), rel=1e-6)
    assert info_nce(z, z.clone(), queue, t, decoupled=True).item() == pytest.approx(-1 / t + math.log(k_size), rel=1e-6)
    # the memory adds K orthogonal negatives: log(1 + (2N-2+K) e^{-1/t}) for NT-Xent
    assert nt_xent(z, z.clone(), t, negatives=queue).item() == pytest.approx(
        math.log(1 + (2 * n - 2 + k_size) * math.exp(-1 / t)), rel=1e-6)


def test_dclw_with_equal_positive_similarities_equals_dcl():
    g = torch.Generator().manual_seed(3)
    n, d, c = 8, 16, 0.6
    z1 = _unit(torch.randn(n, d, generator=g))
    u = torch.randn(n, d, generator=g)
    u = _unit(u - (u * z1).sum(1, keepdim=True) * z1)  # unit, orthogonal to z1 row-wise
    z2 = c * z1 + math.sqrt(1 - c * c) * u  # cos(z1_i, z2_i) = c for every i
    assert dclw(z1, z2, 0.1).item() == pytest.approx(dcl(z1, z2, 0.1).item(), rel=1e-6)
    # unequal similarities: the weights (mean 1) change the value
    z3 = torch.randn(n, d, generator=g)
    assert dclw(z1, z3, 0.1).item() != pytest.approx(dcl(z1, z3, 0.1).item(), rel=1e-4)


def test_dcl_and_dclw_gradients_match_naive_with_fixed_weights():
    """The naive loop computes DCLW's weights from plain numbers, so they carry no gradient."""
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(6, 5, dtype=torch.double, generator=g, requires_grad=True)
    z2 = torch.randn(6, 5, dtype=torch.double, generator=g, requires_grad=True)
    for ours, ref in [(dcl.__wrapped__(z1, z2, 0.2), naive_pair_loss(z1, z2, 0.2, decoupled=True)),
                      (dclw.__wrapped__(z1, z2, 0.2), naive_pair_loss(z1, z2, 0.2, decoupled=True, sigma=0.5))]:
        for a, b in zip(torch.autograd.grad(ours, [z1, z2]), torch.autograd.grad(ref, [z1, z2])):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["dcl", "dclw", "info_nce"])
def test_new_losses_give_finite_gradients_and_are_stable_in_bf16(name):
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(32, 16, generator=g)
    z2 = z1 + 0.01 * torch.randn(32, 16, generator=g)
    queue = _unit(torch.randn(64, 16, generator=g))
    fn = {"dcl": lambda a, b: dcl(a, b, 0.05), "dclw": lambda a, b: dclw(a, b, 0.05),
          "info_nce": lambda a, b: info_nce(a, b, queue, 0.05, decoupled=True)}[name]
    lin = torch.nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = lin(z1), lin(z2)
        assert a.dtype == torch.bfloat16
        low = fn(a, b)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    low.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in lin.parameters())
    assert low.item() == pytest.approx(fn(a.float(), b.float()).item(), rel=1e-4)


def test_info_nce_gradient_reaches_queries_not_the_queue():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    queue = _unit(torch.randn(16, 8)).requires_grad_()
    info_nce(q, k.detach(), queue.detach(), 0.2).backward()
    assert q.grad.abs().sum() > 0 and k.grad is None and queue.grad is None


from selfsup.losses import dino, distill, swav  # noqa: E402


def _naive_soft_ce(student, target_probs):
    total = 0.0
    for s, t in zip(student, target_probs):
        log_p = [x - math.log(sum(math.exp(v) for v in s.tolist())) for x in s.tolist()]
        total += -sum(ti * li for ti, li in zip(t.tolist(), log_p))
    return total / len(student)


def test_distill_matches_naive_and_equals_teacher_entropy_on_identical_logits():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    for tau in (0.2, 1.0):
        expected = _naive_soft_ce(s / tau, F.softmax(t / tau, 1))
        assert distill(s, t, tau).item() == pytest.approx(expected, rel=1e-5)
        q = F.softmax(t / tau, 1)
        entropy = -(q * q.log()).sum(1).mean().item()
        assert distill(t, t, tau).item() == pytest.approx(entropy, rel=1e-5)


def test_distill_gradient_reaches_student_not_teacher():
    s, t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    distill(s, t, 0.5).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_dino_centres_then_sharpens_the_teacher():
    torch.manual_seed(1)
    s, t, c = torch.randn(6, 9), torch.randn(6, 9), torch.randn(9)
    expected = _naive_soft_ce(s / 0.1, F.softmax((t - c) / 0.04, 1))
    assert dino(s, t, c, 0.1, 0.04).item() == pytest.approx(expected, rel=1e-5)
    # a constant added to every teacher logit changes nothing (softmax), the centre does
    assert dino(s, t + 3.0, c).item() == pytest.approx(dino(s, t, c).item(), rel=1e-5)


def test_swav_matches_naive():
    torch.manual_seed(2)
    scores, codes = torch.randn(5, 8), F.softmax(torch.randn(5, 8), 1)
    assert swav(scores, codes, 0.1).item() == pytest.approx(_naive_soft_ce(scores / 0.1, codes), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 0.3, 0.2])
def test_memory_collapse_size_is_where_a_collapsed_embedding_starts_to_win(temperature):
    """SimCLRv2's memory: online positives, stale memory negatives. Below memory_collapse_size a
    spread embedding (positives at cosine 0.5) has the lower NT-Xent, above it a collapsed one."""
    g = torch.Generator().manual_seed(0)
    n, d, a = 64, 128, 0.5
    z1 = F.normalize(torch.randn(n, d, generator=g), dim=1)
    noise = torch.randn(n, d, generator=g)
    noise = F.normalize(noise - (noise * z1).sum(1, keepdim=True) * z1, dim=1)
    z2 = a * z1 + (1 - a * a) ** 0.5 * noise  # unit, cosine a with z1
    u = F.normalize(torch.randn(1, d, generator=g), dim=1).expand(n, d)  # every image the same
    size = memory_collapse_size(n, temperature, a)
    for factor, collapse_wins in [(0.5, False), (2.0, True)]:
        memory = F.normalize(torch.randn(round(factor * size), d, generator=g), dim=1)
        gap = nt_xent(u, u, temperature, negatives=memory) - nt_xent(z1, z2, temperature, negatives=memory)
        assert (gap.item() < 0) == collapse_wins, (factor, gap.item())
    assert memory_collapse_size(n, 0.1) > 50 * memory_collapse_size(n, 0.5)  # the paper's T is far from it
