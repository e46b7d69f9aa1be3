"""SimCLRv2's semi-supervised steps: label subsets, fine-tuning, distillation, the semisup command."""
import copy
import json

import numpy as np
import pytest
import torch

from selfsup import checkpoint as ckpt
from selfsup import config
from selfsup import labels as L
from selfsup import semisup as S
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.data import DataError, load_data
from selfsup.evaluate import extract_features
from selfsup.norm import SplitBatchNorm2d
from selfsup.optim import build_optimizer
from selfsup.runs import BackboneSpec
from selfsup.train import build_method

TINY_PRE = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress", "--epochs", "2",
            "--set", "data.image_size=8", "model.width=0.125", "model.proj_layers=3", "eval.knn_every=0",
            "eval.knn_k=20", "optim.warmup_epochs=1"]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", image_size=8)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("semisup") / "pre"
    assert main(["pretrain", "--out", str(out), *TINY_PRE]) == 0
    return out


# --------------------------------------------------------------------------------------------
# label subsets


def test_subsets_are_class_balanced_deterministic_and_from_the_training_split(digits):
    train, test = digits.train, digits.test
    counts = np.bincount(train.labels)
    idx = L.select("10%", train.labels, 10, seed=0)
    assert np.array_equal(np.bincount(train.labels[idx], minlength=10), np.rint(counts * 0.1))
    assert np.array_equal(idx, L.select("10%", train.labels, 10, seed=0))       # a rerun: same images
    assert not np.array_equal(idx, L.select("10%", train.labels, 10, seed=1))   # the seed draws them
    assert len(np.unique(idx)) == len(idx) and idx.max() < len(train)
    test_images = {im.tobytes() for im in test.images}
    assert not any(train.images[i].tobytes() in test_images for i in idx)       # disjoint from test
    per_class = L.select("7", train.labels, 10, seed=3)
    assert np.bincount(train.labels[per_class]).tolist() == [7] * 10


def test_written_subset_reads_back_identically(digits, tmp_path):
    idx = L.select("1%", digits.train.labels, 10, seed=5)
    L.write_indices(tmp_path / "labels.txt", idx, about="test")
    assert np.array_equal(L.select(str(tmp_path / "labels.txt"), digits.train.labels, 10), idx)


@pytest.mark.parametrize("spec, message", [
    ("0%", r"in \(0%, 100%\]"), ("101%", r"in \(0%, 100%\]"), ("0.01%", "gives no image of class"),
    ("1000", "has only"), ("0", "at least 1"), ("many", "neither a fraction"), ("x%", "not a percentage")])
def test_impossible_requests_are_clear_errors(digits, spec, message):
    with pytest.raises(DataError, match=message):
        L.select(spec, digits.train.labels, 10)


@pytest.mark.parametrize("text, message", [
    ("3\nfour\n", r"labels.txt:2: 'four' is not an image index"),
    ("3\n99999\n", r"labels.txt:2: index 99999 is out of range"),
    ("# header\n3\n5\n3\n", r"labels.txt:4: index 3 is listed twice \(first on line 2\)"),
    ("# nothing\n", "lists no image index")])
def test_bad_index_files_name_file_and_line(digits, tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        L.select(str(path), digits.train.labels, 10)


# --------------------------------------------------------------------------------------------
# fine-tuning


def _spec(**classifier) -> BackboneSpec:
    """A fine-tuned classifier's spec; its architecture fields go unread when the network is given."""
    return BackboneSpec(backbone="resnet18", width=0.125, cifar_stem=True, image_size=8, mean=(0.5,) * 3,
                        std=(0.5,) * 3, **classifier)


def test_classifier_from_head_layer_1_holds_exactly_that_layer_and_a_zero_classifier():
    cfg = resolve(sets=["model.width=0.125", "model.proj_layers=3"])
    method = build_method(cfg)
    model = S.build_classifier(_spec(head_layers=1, num_classes=10), method)
    ids = lambda m: {id(p) for p in m.parameters()}  # noqa: E731
    layers = method.projector.layers
    assert ids(model) == ids(method.backbone) | ids(layers[0]) | ids(model.fc)
    assert not ids(model) & (ids(layers[1]) | ids(layers[2]))
    assert [type(m).__name__ for m in model.head[0]] == ["Linear", "BatchNorm1d", "ReLU"]
    assert model.fc.in_features == layers[0][0].out_features
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0
    model.eval()
    assert torch.count_nonzero(model(torch.randn(4, 3, 8, 8))) == 0  # every class equally likely
    assert len(S.build_classifier(_spec(head_layers=0, num_classes=3), method).head) == 0


def test_new_classifier_is_outside_lars_adaptation_and_weight_decay():
    method = build_method(resolve(sets=["model.width=0.125", "model.proj_layers=3"]))
    model = S.build_classifier(_spec(head_layers=1, num_classes=10), method)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    groups = model.param_groups(0.0)  # fine-tuning's weight decay
    (fc_group,) = [g for g in groups if id(model.fc.weight) in ids(g["params"])]
    (bias_group,) = [g for g in groups if id(model.fc.bias) in ids(g["params"])]
    assert fc_group["lars_exclude"] and fc_group["weight_decay"] == 0.0
    assert bias_group["lars_exclude"] and bias_group["weight_decay"] == 0.0
    adapted = [g for g in groups if not g["lars_exclude"]]
    assert adapted and not ids(model.fc.parameters()) & ids(p for g in adapted for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # with weight decay (distillation's student): L2 on the classifier's weight, none on its bias
    groups = model.param_groups(1e-4)
    assert [g["weight_decay"] for g in groups if id(model.fc.weight) in ids(g["params"])] == [1e-4]
    assert [g["weight_decay"] for g in groups if id(model.fc.bias) in ids(g["params"])] == [0.0]


def test_classifier_steps_are_plain_momentum_sgd_at_the_lars_lr():
    torch.manual_seed(0)
    method = build_method(resolve(sets=["model.width=0.125", "model.proj_layers=3"]))
    model = S.build_classifier(_spec(head_layers=1, num_classes=10), method)
    lr, m, wd = 0.3, 0.9, 1e-2
    opt = build_optimizer("lars", model.param_groups(wd), lr=lr, momentum=m, weight_decay=wd)
    g1, g2 = torch.randn_like(model.fc.weight), torch.randn_like(model.fc.weight)
    b1, b2 = torch.randn_like(model.fc.bias), torch.randn_like(model.fc.bias)
    for g, b in ((g1, b1), (g2, b2)):
        opt.zero_grad(set_to_none=True)
        model.fc.weight.grad, model.fc.bias.grad = g.clone(), b.clone()
        opt.step()
    # from W0 = 0: v1 = lr*g1, W1 = -lr*g1; v2 = m*v1 + lr*(g2 + wd*W1), W2 = W1 - v2
    w1 = -lr * g1
    w2 = w1 - (m * lr * g1 + lr * (g2 + wd * w1))
    assert torch.allclose(model.fc.weight, w2, atol=1e-6)
    assert torch.allclose(model.fc.bias, -lr * b1 - (m * lr * b1 + lr * b2), atol=1e-6)  # no decay


def test_finetune_cli_trains_evaluates_and_its_run_evaluates_with_eval(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(pretrained), "--labels", "10", "--from-head-layer", "1",
                 "--out", str(out), "--epochs", "2", "--batch-size", "32", "--device", "cpu"]) == 0
    assert "fine-tuned test top-1" in capsys.readouterr().out
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(0 <= m["test_top1"] <= 100 for m in metrics)
    idx = L.read_indices(out / L.LABELS_FILE, 1437)
    assert np.bincount(load_data("digits", image_size=8).train.labels[idx]).tolist() == [10] * 10
    assert json.loads((out / "backbone.json").read_text())["head_layers"] == 1
    for protocol in ("knn", "linear"):  # the foundation's evaluations read the fine-tuned encoder
        assert main(["eval", protocol, "--checkpoint", str(out), "--data", "digits", "--k", "20",
                     "--epochs", "2", "--device", "cpu"]) == 0
        name = {"knn": "knn", "linear": "linear_simclr"}[protocol]  # a SimCLR run: SimCLR's protocol
        assert 0 < json.loads((out / f"eval_{name}.json").read_text())["top1"] <= 100
    # the fine-tuned classifier reloads with the weights it was saved with
    model, meta, _ = S.load_classifier(out)
    assert torch.equal(model.fc.weight, torch.load(out / "checkpoint.pt")["model"]["fc.weight"])
    assert main(["finetune", "--checkpoint", str(pretrained), "--out", str(out), "--device", "cpu"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", str(pretrained), "--labels", "1000", "--device", "cpu",
                 "--out", str(tmp_path / "x")]) == 2
    assert "has only" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# distillation


def test_student_reproduces_its_teacher_and_the_teacher_stays_frozen(pretrained, tmp_path, monkeypatch):
    teacher_run = tmp_path / "teacher"
    S.finetune(S.step_config(S.FinetuneConfig, ["optimizer=sgd", "lr_scaling=none", "crop_scale_min=1.0"],
                             checkpoint=str(pretrained), labels="100%", head_layers=0, epochs=10,
                             batch_size=128, lr=0.1, eval_every=10, out=str(teacher_run), device="cpu"))
    held = {}

    def spy(run):
        model, meta, folder = real(run)
        held["teacher"], held["before"] = model, copy.deepcopy(model.state_dict())
        return model, meta, folder

    real = S.load_classifier
    monkeypatch.setattr(S, "load_classifier", spy)
    result = S.distill(S.step_config(S.StudentConfig, teacher=str(teacher_run), out=str(tmp_path / "student"),
                                     epochs=6, batch_size=64, lr=2.0, augment=False, device="cpu"))
    teacher = held["teacher"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # weights and BN statistics untouched
        assert torch.equal(value, held["before"][key]), key
    student, meta, _ = real(tmp_path / "student")
    test = load_data("digits", image_size=8).test
    kw = dict(size=meta.image_size, mean=meta.mean, std=meta.std, device=torch.device("cpu"))
    agree = (extract_features(student, test.images, **kw).argmax(1)
             == extract_features(teacher, test.images, **kw).argmax(1)).float().mean().item()
    assert result["teacher_top1"] > 80 and agree > 0.85


# --------------------------------------------------------------------------------------------
# the whole recipe


def test_semisup_command_runs_every_step_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "semisup"
    sets = ["pretrain.data.image_size=8", "pretrain.model.width=0.125", "pretrain.train.epochs=1",
            "pretrain.train.batch_size=64", "pretrain.eval.knn_k=20", "pretrain.optim.warmup_epochs=0",
            "finetune.epochs=1", "finetune.batch_size=32", "distill.epochs=1", "distill.batch_size=64"]
    assert main(["semisup", "--data", "digits", "--labels", "5", "--out", str(out), "--device", "cpu",
                 "--no-progress", "--set", *sets]) == 0
    table = json.loads((out / "results.json").read_text())
    steps = [r["step"] for r in table["rows"]]
    assert steps == ["1. pre-train (kNN monitor, all labels)", "2. fine-tune", "supervised only (random init)",
                     "3. distil (student)"]
    assert all(0 <= r["top1"] <= 100 for r in table["rows"])
    assert "| 2. fine-tune |" in (out / "results.md").read_text()
    # the baseline and the fine-tuning trained on the very same images
    assert (out / "finetune" / L.LABELS_FILE).read_text().splitlines()[1:] == \
        (out / "supervised" / L.LABELS_FILE).read_text().splitlines()[1:]
    assert json.loads((out / "supervised" / "backbone.json").read_text())["random_init"] is True
    assert main(["eval", "knn", "--checkpoint", str(out / "distill"), "--data", "digits", "--k", "20",
                 "--device", "cpu"]) == 0
    assert main(["semisup", "--data", "digits", "--out", str(out), "--set", "finetune.nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err


def test_a_moco_run_fine_tunes_with_plain_batch_norm_at_any_labelled_count(tmp_path, capsys):
    """MoCo's split BN (8 groups) emulates devices during pre-training only: fine-tuning uses plain
    BN, so 7 labels per class (70 images, batches not a multiple of 8) train."""
    pre = tmp_path / "moco"
    assert main(["pretrain", "--method", "moco", "--out", str(pre), *TINY_PRE, "--epochs", "1",
                 "--set", "moco.queue_size=128", "moco.shuffle_bn_groups=8"]) == 0
    assert isinstance(build_method(config.from_dict(ckpt.load(pre / "checkpoint.pt")["config"])).backbone.bn1,
                      SplitBatchNorm2d)
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(pre), "--labels", "7", "--out", str(out), "--epochs", "1",
                 "--batch-size", "30", "--device", "cpu"]) == 0
    assert "fine-tuned test top-1" in capsys.readouterr().out
    method = build_method(config.from_dict(ckpt.load(pre / "checkpoint.pt")["config"]))
    classifier = S.build_classifier(BackboneSpec.from_json(json.loads((out / "backbone.json").read_text()), out),
                                  method)
    assert not any(isinstance(m, SplitBatchNorm2d) for m in classifier.modules())
    assert sum(type(m) is torch.nn.BatchNorm2d for m in classifier.modules()) > 0
