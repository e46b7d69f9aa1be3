"""SwAV (issue 5): Sinkhorn-Knopp, the swapped-prediction loss, the prototypes and the queue."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import distributed as D
from selfsup.loop import backward_step
from selfsup.cli import main
from selfsup.config import Config, ConfigError, resolve
from selfsup.losses import sinkhorn, swav
from selfsup.methods import StepInfo, check_config
from selfsup.optim import build_optimizer
from selfsup.train import build_method

from gloo import run_ranks

B, K, SIZE = 8, 12, 16


def _cosine_scores(b=64, k=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, 16, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    return z @ c.T  # (b, k) in [-1, 1]


def _naive_sinkhorn(scores, epsilon, iterations):
    """SwAV's distributed_sinkhorn on one process, written out on the (K, B) transpose."""
    q = torch.exp(scores.double() / epsilon).T  # (K, B)
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T.float()


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp and the loss

def test_sinkhorn_matches_swavs_algorithm_and_balances_prototypes():
    scores = _cosine_scores()
    b, k = scores.shape
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3), _naive_sinkhorn(scores, 0.05, 3), rtol=1e-4, atol=1e-7)
    deviation = []
    for iterations in (1, 3, 10, 50):
        q = sinkhorn(scores, 0.05, iterations)
        torch.testing.assert_close(q.sum(1), torch.ones(b), atol=1e-5, rtol=0)  # rows sum to 1
        deviation.append(((q.sum(0) - b / k).abs().max() / (b / k)).item())  # worst prototype, relative
    assert deviation[0] > deviation[1] > deviation[2] > deviation[3]
    assert deviation[1] > 0.1  # after 3 iterations the partition is still far from equal
    assert deviation[3] < 1e-3  # ... and within 0.1% after 50


def test_sinkhorn_is_finite_at_small_epsilon_under_bf16_and_shift_invariant():
    scores = _cosine_scores()
    scores[0] = 1.0  # extremes of the cosine range
    scores[1] = -1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(scores.bfloat16(), 0.02, 3)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(len(q)), atol=1e-5, rtol=0)
    torch.testing.assert_close(sinkhorn(scores + 7.0, 0.05, 3), sinkhorn(scores, 0.05, 3))
    assert not sinkhorn(scores.requires_grad_(), 0.05, 3).requires_grad


def test_swav_loss_is_cross_entropy_of_the_codes_and_codes_get_no_gradient():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(B, K, generator=g, requires_grad=True)
    codes = torch.softmax(torch.randn(B, K, generator=g), dim=1).requires_grad_()
    naive = sum(-(codes[i] * torch.log(torch.softmax(scores[i] / 0.1, 0))).sum() for i in range(B)) / B
    loss = swav(scores, codes, 0.1)
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)
    loss.backward()
    assert scores.grad is not None and codes.grad is None
    one_hot = F.one_hot(torch.arange(B) % K, K).float()
    assert swav(one_hot * 100, one_hot, 1.0).item() == pytest.approx(0.0, abs=1e-6)  # confident and right


# ---------------------------------------------------------------------------------------------
# The method

def _cfg(**swav) -> Config:
    cfg = Config(method="swav")
    cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim = 0.125, 16, 8
    cfg.train.batch_size, cfg.train.epochs = B, 2
    cfg.multicrop.local_crops, cfg.multicrop.local_size = 2, 8
    cfg.swav.prototypes = K
    for key, value in {"freeze_prototypes_epochs": 0.0, **swav}.items():
        setattr(cfg.swav, key, value)
    return cfg


def _views(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, s, s, generator=g) for s in (SIZE, SIZE, 8, 8)]


def _at(step, total=8, local_batch=B):
    """The loop's StepInfo for ``_cfg``'s runs: train.epochs 2, so total // 2 steps an epoch."""
    return StepInfo(step, total, max(1, total // 2), local_batch, 0)


def _step(method, optimizer, step, total=8, seed=None):
    method.on_step_start(_at(step, total))
    out = method(_views(step if seed is None else seed))
    backward_step(optimizer, out["loss"], frozen=method.frozen_now())  # the trainer's: frozen gradients dropped
    method.on_step_end(_at(step, total))
    return out


def test_prototypes_are_unit_after_every_step_and_frozen_steps_leave_them_unchanged():
    torch.manual_seed(0)
    method = build_method(_cfg(freeze_prototypes_steps=2))
    optimizer = build_optimizer("sgd", method.param_groups(0.5), lr=0.5, weight_decay=1e-3)
    c = method.prototypes.weight
    torch.testing.assert_close(c.norm(dim=1), torch.ones(K))
    start = c.detach().clone()
    backbone = [p.detach().clone() for p in method.backbone.parameters()]
    for step in range(2):  # frozen: no gradient, so neither the step nor weight decay moves them
        _step(method, optimizer, step)
        assert c.grad is None
        torch.testing.assert_close(c, start, atol=1e-6, rtol=0)  # renormalising rounds, nothing more
    assert any(not torch.equal(a, b) for a, b in zip(backbone, method.backbone.parameters()))
    _step(method, optimizer, 2)
    assert c.grad is not None and not torch.allclose(c, start)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(K))


@pytest.mark.parametrize("swav,frozen", [({"freeze_prototypes_epochs": 1.0}, 4), ({"freeze_prototypes_epochs": 0.5}, 2),
                                         ({"freeze_prototypes_epochs": 1.0, "freeze_prototypes_steps": 3}, 3),
                                         ({"freeze_prototypes_epochs": 0.0}, 0)])
def test_prototypes_freeze_for_epochs_of_the_runs_own_steps(swav, frozen):
    """SwAV's freeze_prototypes_niters (313 at batch 4096: one ImageNet epoch) as epochs, counted in
    the steps per epoch the loop hands over (8 steps, 2 epochs: 4 a epoch), or exact steps."""
    assert Config().swav.freeze_prototypes_epochs == 1.0  # the default: about one epoch, as SwAV's
    torch.manual_seed(0)
    method = build_method(_cfg(**swav))
    optimizer = build_optimizer("sgd", method.param_groups(0.5), lr=0.5)
    for step in range(frozen + 1):
        _step(method, optimizer, step)
        assert method.frozen_now() == ([method.prototypes.weight] if step < frozen else [])
        assert (method.prototypes.weight.grad is None) == (step < frozen), step


def test_frozen_prototypes_leave_every_other_gradient_as_a_detach_would():
    """Dropping C's gradient after backward changes nothing upstream: the gradients of the
    backbone and head equal those of a forward in which C takes no gradient at all."""
    grads = []
    for c_learns in (True, False):
        torch.manual_seed(0)
        method = build_method(_cfg(freeze_prototypes_steps=2))
        method.prototypes.weight.requires_grad_(c_learns)
        method.on_step_start(_at(0))
        method(_views())["loss"].backward()
        grads.append({n: p.grad for n, p in method.named_parameters() if not n.startswith("prototypes")})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)


def test_forward_reads_only_what_changes_once_a_run():
    """A compiled forward is rebuilt when a Python value it reads changes: the step decides two
    booleans, the queue filling and the queue in use, each of which turns on once."""
    method = build_method(_cfg(queue_length=2 * B, queue_start_epoch=1))
    seen = []
    for step in range(8):  # 4 steps an epoch: filling from step 4, full from step 6
        method.on_step_start(_at(step))
        seen.append((method.queue_filling, method.queue_full))
    assert seen == [(False, False)] * 4 + [(True, False)] * 2 + [(True, True)] * 2


def test_loss_swaps_codes_of_global_crops_over_every_other_crop():
    torch.manual_seed(0)
    method = build_method(_cfg())
    views = _views()
    out = method(views)
    with torch.no_grad():  # the same loss written out from the method's own pieces
        feats = [method.backbone(v) for v in (torch.cat(views[:2]), torch.cat(views[2:]))]
        z = F.normalize(method.projector(torch.cat(feats)), dim=1)
        scores = (z @ method.prototypes.weight.T).split(B)
        expected = 0.0
        for s in range(2):
            q = _naive_sinkhorn(scores[s], 0.05, 3)
            expected += sum(swav(scores[t], q, 0.1) for t in range(4) if t != s) / 3
        expected /= 2
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(2 * B))  # the global crops


def test_queue_fills_from_its_epoch_and_joins_sinkhorn_once_full():
    torch.manual_seed(0)
    # 4 steps per epoch (total 8 over 2 epochs); the queue starts at epoch 1 = step 4 and holds 2 batches
    method = build_method(_cfg(queue_length=2 * B, queue_start_epoch=1))
    optimizer = build_optimizer("sgd", method.param_groups(0.0), lr=0.0)  # lr 0: the model stays put
    assert method.queue.shape == (2, 2 * B, 8)
    calls = []
    import selfsup.methods.swav as swav_module
    real = swav_module.sinkhorn
    swav_module.sinkhorn = lambda out, *a: calls.append(out.shape[0]) or real(out, *a)
    try:
        for step in range(4):
            _step(method, optimizer, step)
        assert method.queue.abs().sum() == 0 and set(calls) == {B}  # not yet started
        calls.clear()
        out = _step(method, optimizer, 4)
        first = out["embedding"][:B]
        torch.testing.assert_close(method.queue[0, :B], first)  # the newest batch in front
        assert method.queue[:, B:].abs().sum() == 0
        _step(method, optimizer, 5)
        torch.testing.assert_close(method.queue[0, B:], first)  # shifted back by one batch
        assert set(calls) == {B}  # filling, not yet used
        calls.clear()
        queued = method.queue.clone()
        method.on_step_start(_at(6))
        out = method(_views(6))
        assert set(calls) == {3 * B}  # queue (2B) re-scored + the batch; codes of the last B rows
    finally:
        swav_module.sinkhorn = real
    with torch.no_grad():  # the codes equal Sinkhorn over [queue ; batch], last B rows
        z = out["embedding"]
        c = method.prototypes.weight
        scores = [z[s * B:(s + 1) * B] @ c.T for s in range(2)]
        q0 = real(torch.cat([queued[0] @ c.T, scores[0]]), 0.05, 3)[-B:]
        assert not torch.allclose(q0, real(scores[0], 0.05, 3), atol=1e-4)  # the queue matters


def test_queue_length_must_be_a_multiple_of_the_global_batch():
    with pytest.raises(ConfigError, match="multiple of the global batch"):
        check_config(resolve(overrides={"method": "swav", "train": {"batch_size": 64}, "swav": {"queue_length": 100}}))
    check_config(resolve(overrides={"method": "swav", "train": {"batch_size": 64}, "swav": {"queue_length": 128}}))


def test_swav_trains_through_the_cli_and_resumes_exactly(tmp_path):
    """Two epochs, the queue filling from epoch 1 and in use once full, prototypes frozen for the
    first steps; stopped after epoch 1 and resumed, the run ends bit-for-bit where it would."""
    from selfsup import checkpoint as ckpt

    tiny = ["--epochs", "2", "--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress",
            "--set", "data.image_size=8", "model.width=0.125", "model.proj_hidden=32", "swav.temperature=0.1",
            "swav.prototypes=20", "swav.freeze_prototypes_steps=5", "swav.queue_length=128",
            "swav.queue_start_epoch=1", "multicrop.local_crops=2", "multicrop.local_size=6",
            "eval.knn_k=20", "eval.knn_every=0", "optim.warmup_epochs=0"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["pretrain", "--method", "swav", "--out", str(full), *tiny]) == 0
    assert main(["pretrain", "--method", "swav", "--out", str(split), "--max-minutes", "0", *tiny]) == 0
    assert main(["pretrain", "--out", str(split), "--resume", "--device", "cpu", "--no-progress"]) == 0
    a, b = ckpt.load(full / "checkpoint.pt")["model"], ckpt.load(split / "checkpoint.pt")["model"]
    assert a["queue"].abs().sum() > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] > 0 and m["effective_rank"] > 2 and 0 < m["code_entropy"] <= math.log(20) + 1e-4
               for m in metrics) and "knn_top1" in metrics[-1]


# ---------------------------------------------------------------------------------------------
# Two gloo ranks: Sinkhorn over the global batch, the queue of global batches

WORLD = 2


def _rank_work() -> dict:
    n = B // WORLD
    mine = slice(D.rank() * n, (D.rank() + 1) * n)
    scores = _cosine_scores(b=B, k=K)
    cfg = _cfg(queue_length=2 * B, queue_start_epoch=0)
    torch.manual_seed(0)
    method = build_method(cfg)
    method.on_step_start(_at(0, local_batch=n))
    views = [v[mine] for v in _views()]
    out = method(views)
    return {"codes": sinkhorn(scores[mine], 0.05, 3), "queue": method.queue.clone(),
            "embedding": out["embedding"], "own": method._own_rows(method.queue[0])}


def test_sinkhorn_and_queue_across_two_ranks(tmp_path):
    ranks = run_ranks(_rank_work, WORLD, tmp_path)
    n = B // WORLD
    full = sinkhorn(_cosine_scores(b=B, k=K), 0.05, 3)  # one process holding the global batch
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["codes"], full[r * n:(r + 1) * n], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[0]["queue"], ranks[1]["queue"])  # the same global queue everywhere
    newest = torch.cat([res["embedding"][:n] for res in ranks])  # first global crop, rank order
    torch.testing.assert_close(ranks[0]["queue"][0, :B], newest)
    for res in ranks:  # each rank re-scores the rows it pushed
        torch.testing.assert_close(res["own"][:n], res["embedding"][:n])
