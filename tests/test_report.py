"""`selfsup report` checked in a real headless browser, and TensorBoard logging."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.cli import main

pytest.importorskip("matplotlib", reason="the report draws with matplotlib: pip install -e '.[test]'")

TINY = ["--data", "digits", "--batch-size", "128", "--device", "cpu", "--no-progress",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_k=20", "optim.warmup_epochs=1"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags that let Chromium run headless in a container without a sandbox, GPU or network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Appended to a copy of the page: after load, write each <img>'s decode state into the DOM.
PROBE = ('<script>window.addEventListener("load", () => { const p = document.createElement("pre");'
         ' p.id = "probe"; p.textContent = JSON.stringify([...document.images].map(i => [i.complete,'
         ' i.naturalWidth, i.naturalHeight])); document.body.appendChild(p); });</script>')


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-epoch digits run with TensorBoard on, a kNN evaluation beside it, and its report."""
    out = tmp_path_factory.mktemp("report") / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "2", *TINY, "train.tensorboard=true"]) == 0
    assert main(["eval", "knn", "--checkpoint", str(out), "--data", "digits", "--k", "20", "--device", "cpu"]) == 0
    assert main(["report", str(out), "--device", "cpu", "--points", "300", "--queries", "4", "--k", "5"]) == 0
    return out


def test_report_page_embeds_curves_map_and_neighbours_with_the_eval_table(run):
    page = (run / "report" / "index.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 3
    for name in ("curves.png", "tsne.png", "neighbours.png"):
        with Image.open(run / "report" / name) as im:
            assert im.width > 300 and im.height > 200
    top1 = json.loads((run / "eval_knn.json").read_text())["top1"]
    assert "eval_knn.json" in page and f"{top1:.4g}" in page and "t-SNE map of test-set features" in page


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile per run
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=90)


@pytest.fixture
def page(request) -> Path:
    """The tiny run's report, or the report of the run named by $SELFSUP_REPORT_RUN (docs/results.md
    checks a CIFAR-10 run's report this way)."""
    other = os.environ.get("SELFSUP_REPORT_RUN")
    return Path(other) / "report" / "index.html" if other else request.getfixturevalue("run") / "report" / "index.html"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium; .ci/run "
                                             "installs it)")
def test_report_opened_in_headless_chromium_shows_its_figures(page, tmp_path):
    probe = tmp_path / "probe.html"  # the figures are embedded, so the copy may live anywhere
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--dump-dom", probe.as_uri())
    assert '<pre id="probe">' in dom.stdout, dom.stderr[-2000:]
    images = json.loads(dom.stdout.split('<pre id="probe">')[1].split("</pre>")[0])
    assert len(images) == 3 and all(done and w > 0 and h > 0 for done, w, h in images), images

    shot = tmp_path / "shot.png"
    _chromium("--window-size=1200,2400", f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[:2] == (2400, 1200)
    ink = (pixels < 200).any(-1)                                  # not near-white
    assert ink.mean() > 0.05                                     # the figures, not a blank page
    colourful = (pixels.max(-1).astype(int) - pixels.min(-1)) > 60  # the coloured curve, map, frames
    assert colourful.mean() > 0.002
    assert ink[1200:].mean() > 0.02                              # also below the fold: map and grid


def test_tensorboard_logs_the_epoch_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/knn_top1"} <= set(events.Tags()["scalars"])
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)


def test_missing_optional_packages_give_an_install_hint(tmp_path, monkeypatch, capsys, run):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if absent
    assert main(["pretrain", "--out", str(tmp_path / "tb"), "--epochs", "1", *TINY, "train.tensorboard=true"]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(run)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no metrics.jsonl" in err[0]


def test_report_of_an_unlabelled_source_shows_the_label_free_figures(run, tmp_path, capsys):
    from selfsup.data import load_data

    loose = tmp_path / "loose"  # a nested folder of images: no splits, no classes
    digits = load_data("digits", image_size=16).train
    for i in range(40):
        (loose / f"part{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i]).save(loose / f"part{i % 3}" / f"{i:03d}.png")
    shutil.copy(loose / "part0" / "000.png", loose / "copy-of-000.png")  # a duplicate: the most similar pair
    out = tmp_path / "page" / "index.html"
    assert main(["report", str(run), "--data", str(loose), "--out", str(out), "--device", "cpu",
                 "--queries", "3", "--k", "4"]) == 0
    page = out.read_text()
    assert page.count('<img src="data:image/png;base64,') == 4  # curves, map, neighbours, pairs
    assert "are left out" in page and "PCA and t-SNE map of the features of 41 images" in page
    first_pair = page.split("most similar pairs among the 41 images")[1].split("</tr>")[1]
    assert "<td>1</td>" in first_pair and "copy-of-000.png" in first_pair and "part0/000.png" in first_pair
    for name in ("map.png", "neighbours.png", "pairs.png"):
        with Image.open(out.parent / name) as im:
            assert im.width > 200 and im.height > 100
    assert "features=backbone" in page                       # knn_features, read as text ...
    assert "not a number" not in capsys.readouterr().err     # ... and silently (issue 25 §5)
