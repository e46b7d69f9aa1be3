"""selfsup against lightly on the same work: accuracy at equal steps and images/s (issue 14).

    bash benchmarks/peers/setup.sh                         # once: the peer's own environment
    python benchmarks/peers/run.py --methods simclr,byol --seeds 0,1 --steps 390 --width 0.25
    python benchmarks/peers/run.py --steps 5 --width 0.125 --test-images 1000 \\
        --jsonl /tmp/peers-tiny.jsonl --doc none           # a tiny check of the harness

For each method and seed, interleaved (selfsup, then lightly): ``python -m selfsup pretrain``
with the method's preset (the TABLE below, plus the run's size as ``--set``) in this
environment, then ``benchmarks/peers/lightly_side.py`` in the peer environment, which builds
the same backbone (ours, from the checkout measured) from the same initial weights and trains it
with lightly's loss, heads, transforms + DataLoader and momentum helpers on the same images,
batch, steps, optimiser, lr schedule and hyperparameters (read from the selfsup run's
config.yaml). Both backbones are then scored by the same evaluator, ``selfsup eval knn``
(k=200, T=0.1). Every run is appended to a JSON-lines file; the table in docs/peers.md is
rebuilt from it. ``--steps`` is steps of ``--batch``: a whole number of epochs of CIFAR-10's
50 000 training images (195 steps at batch 256), or fewer steps than one epoch, which train one
epoch on a class-balanced subset of that many batches.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# method -> (selfsup preset, extra --set items). The ONE place that maps a method onto selfsup's
# settings: the lightly side reads every hyperparameter from the resolved config of this run.
TABLE: dict[str, tuple[str, list[str]]] = {
    "simclr": ("cifar10-simclr", []),
    "moco": ("cifar10-moco-v2", ["moco.mlp=true"]),  # MoCo v2's MLP head (the preset's default is the demo's fc)
    "byol": ("cifar10-byol", []),
    "simsiam": ("cifar10-simsiam", []),
    # SwAV freezes its prototypes and DINO its last layer for the first epoch of a long run; a peer run
    # is one short epoch, so that would freeze them throughout: a tenth of it (lightly's DINO head
    # freezes whole epochs only, so DINO's is off on both sides)
    "swav": ("cifar10-swav", ["swav.freeze_prototypes_epochs=0.1"]),
    "dino": ("cifar10-dino", ["dino.freeze_last_layer_epochs=0"]),
    "dcl": ("cifar10-simclr-dcl", []),
    "dclw": ("cifar10-simclr-dclw", []),
    "barlow_twins": ("cifar10-barlow-twins", []),
    "vicreg": ("cifar10-vicreg", []),
    # the preset's support set of 65536 fills after 256 steps of 256, so in a peer run of 100 steps the
    # neighbours would be the random initial vectors throughout; 8192 fills after 32 steps of 256 and is a
    # multiple of the batch (selfsup's queue takes whole batches); lightly's bank reads the same size
    "nnclr": ("cifar10-nnclr", ["nnclr.support_size=8192"]),
    # as dino's row; 8x8 patches (16 tokens) instead of the preset's 4x4 (64), which a CPU trains ~10x slower
    "dino_vit": ("cifar10-dino-vit-tiny", ["dino.freeze_last_layer_epochs=0", "model.patch_size=8"]),
}
NAMES = {"simclr": "SimCLR", "moco": "MoCo v2", "byol": "BYOL", "simsiam": "SimSiam", "swav": "SwAV (multi-crop)",
         "dino": "DINO", "dcl": "DCL", "dclw": "DCLW", "barlow_twins": "Barlow Twins", "vicreg": "VICReg",
         "nnclr": "NNCLR", "dino_vit": "DINO (ViT-Tiny/8)"}
# the lightly side's recipe of a row whose key is not one (the same method on another backbone)
PEER_METHOD = {"dino_vit": "dino"}


def default_data() -> Path:
    """../shared/data/cifar10-jpeg.tar.gz beside the repository, or beside its main checkout
    when this is a git worktree."""
    roots = [REPO]
    common = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--path-format=absolute", "--git-common-dir"],
                            capture_output=True, text=True).stdout.strip()
    if common:
        roots.append(Path(common).parent)
    for root in roots:
        path = root.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
        if path.exists():
            return path
    return roots[0].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(TABLE), help="comma-separated, from: " + ", ".join(TABLE))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=390, help="optimiser steps per run (default 390 = 2 epochs at 256)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--device", default="cpu", help="cpu | cuda (both sides, and the kNN evaluation)")
    p.add_argument("--precision", default="auto", help="train.precision of both sides (auto: bf16 with AMX or AVX512-BF16)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both sides")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the lightly side's DataLoader workers")
    p.add_argument("--data", default=str(default_data()), help="the CIFAR-10 JPEG archive (../shared/data)")
    p.add_argument("--test-images", type=int, default=0, help="cap the test split (0: all 10 000)")
    p.add_argument("--checkout", default=str(REPO), help="the selfsup checkout measured (PYTHONPATH)")
    p.add_argument("--venv", default=os.environ.get("PEERS_VENV", "/work/peers-venv"))
    p.add_argument("--peer-python", help="the lightly side's interpreter (default: VENV/bin/python)")
    p.add_argument("--work", default="/tmp/selfsup-peers", help="run folders, data subsets, logs")
    p.add_argument("--jsonl", default=str(REPO / "benchmarks" / "peers" / "runs.jsonl"))
    p.add_argument("--doc", default=str(REPO / "docs" / "peers.md"), help="the Markdown page to rebuild; 'none'")
    p.add_argument("--table-only", action="store_true", help="rebuild --doc from --jsonl and stop")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in a.methods if m not in TABLE]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(TABLE)}")
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.peer_python = a.peer_python or str(Path(a.venv) / "bin" / "python")
    return a


# ------------------------------------------------------------------------------------------ data

def plan(steps: int, batch: int, n_train: int) -> tuple[int, int]:
    """(epochs, training images) that give exactly ``steps`` steps of ``batch`` with drop_last."""
    per_epoch = n_train // batch
    if steps < per_epoch:
        return 1, steps * batch
    epochs = round(steps / per_epoch)
    if epochs * per_epoch != steps:
        raise SystemExit(f"--steps {steps}: use fewer than {per_epoch} steps or a multiple of {per_epoch} "
                         f"(an epoch of {n_train} images at batch {batch})")
    return epochs, n_train


def subset_archive(src: Path, dest: Path, train_per_class: int | None, test_per_class: int | None) -> Path:
    """The first images of each class of ``src`` (a CIFAR-10 JPEG tar) as an image folder."""
    if (dest / "done").exists():
        return dest
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(src) as tf:
        for member in tf:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3:
                continue
            split, label = parts[-3], parts[-2]
            limit = train_per_class if split == "train" else test_per_class
            key = (split, label)
            if limit is not None and counts.get(key, 0) >= limit:
                continue
            counts[key] = counts.get(key, 0) + 1
            out = dest / split / label / parts[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(member).read())
    (dest / "done").write_text(json.dumps({"/".join(k): v for k, v in sorted(counts.items())}))
    return dest


# ------------------------------------------------------------------------------------- the runs

def run_logged(cmd: list[str], log: Path, env: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return time.perf_counter() - t0, rc


def knn(run: Path, source: str, env: dict, log: Path, device: str) -> float | None:
    _, rc = run_logged([sys.executable, "-m", "selfsup", "eval", "knn", "--checkpoint", str(run), "--data", source,
                        "--device", device], log, env)
    f = run / "eval_knn.json"
    return json.loads(f.read_text())["top1"] if rc == 0 and f.exists() else None


def one_pair(a, method: str, seed: int, source: str, epochs: int, images_npy: Path, mean, std, size: int,
             env: dict, common: dict) -> list[dict]:
    import torch
    from selfsup.backbones import is_vit
    from selfsup.config import resolve
    from selfsup.optim import scale_lr
    from selfsup.device import autocast_dtype
    from selfsup.train import backbone_spec, build_method

    preset, extra = TABLE[method]
    # --width is a ResNet's (a ViT's width is fixed); a ViT's position embeddings need the views' side
    # before a path's images are read (a built-in source's is known)
    vit = is_vit(resolve(preset_name=preset, sets=extra).model.backbone)
    sets = [f"data.source={source}", f"train.epochs={epochs}", f"train.batch_size={a.batch}", f"train.seed={seed}",
            f"aug.size={size}" if vit else f"model.width={a.width}", f"train.precision={a.precision}",
            f"train.device={a.device}", "eval.knn_every=0", f"train.checkpoint_every={epochs}", "train.progress=false",
            *extra]
    cfg = resolve(preset_name=preset, sets=sets)
    root = Path(a.work) / f"{method}-s{seed}-{a.steps}st-w{a.width:g}"
    if root.exists():
        import shutil
        shutil.rmtree(root)
    root.mkdir(parents=True)
    torch.manual_seed(seed)  # one initial backbone, loaded by both sides: the one selfsup builds from cfg
    init = build_method(cfg).backbone
    meta = backbone_spec(cfg, size, mean, std).to_json()
    torch.save(init.state_dict(), root / "init.pt")
    (root / "init.json").write_text(json.dumps(meta, indent=1))
    records = []

    # selfsup
    out = root / "selfsup"
    cmd = [sys.executable, "-m", "selfsup", "pretrain", "--preset", preset, "--out", str(out), "--no-progress",
           "--set", *sets, f"model.init_from={root / 'init.pt'}"]
    load0 = os.getloadavg()
    wall, rc = run_logged(cmd, root / "selfsup.log", env)
    load1 = os.getloadavg()
    rec = {**common, "side": "selfsup", "method": method, "backbone": cfg.model.backbone, "seed": seed, "rc": rc,
           "wall_s": round(wall, 1),
           "load_before": load0, "load_after": load1, "command": " ".join(cmd)}
    if rc == 0:
        epochs_m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        epochs_m = [e for e in epochs_m if "images_per_s" in e]
        per_epoch = (a.steps // epochs) * a.batch
        seconds = sum(per_epoch / e["images_per_s"] for e in epochs_m)
        rec.update(seconds=round(seconds, 2), images_per_s=round(a.steps * a.batch / seconds, 1),
                   losses=[e["loss"] for e in epochs_m], knn=knn(out, source, env, root / "selfsup-knn.log", a.device),
                   precision=str(autocast_dtype(cfg.train.precision, torch.device(a.device))))
        cfg_dict = __import__("yaml").safe_load((out / "config.yaml").read_text())
    else:
        cfg_dict = cfg.to_dict()
    records.append(rec)
    print(f"{method} seed {seed} selfsup: " + summary(rec), flush=True)

    # lightly
    out = root / "lightly"
    dtype = autocast_dtype(cfg.train.precision, torch.device(a.device))
    spec = {"method": PEER_METHOD.get(method, method), "config": cfg_dict, "out": str(out), "checkout": a.checkout,
            "init": str(root / "init.pt"),
            "meta": meta, "images": str(images_npy), "mean": list(mean), "std": list(std), "size": size,
            "seed": seed, "device": a.device, "threads": a.threads, "workers": a.workers, "flush_denormal": True,
            "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
            "peak_lr": scale_lr(cfg.optim.lr, a.batch, cfg.optim.lr_scaling)}
    (root / "lightly_spec.json").write_text(json.dumps(spec, indent=1))
    cmd = [a.peer_python, str(Path(__file__).with_name("lightly_side.py")),
           str(root / "lightly_spec.json")]
    load0 = os.getloadavg()
    wall, rc = run_logged(cmd, root / "lightly.log", env)
    load1 = os.getloadavg()
    rec = {**common, "side": "lightly", "method": method, "backbone": cfg.model.backbone, "seed": seed, "rc": rc,
           "wall_s": round(wall, 1),
           "load_before": load0, "load_after": load1, "command": " ".join(cmd), "precision": spec["precision"]}
    if rc == 0:
        res = json.loads((out / "lightly_result.json").read_text())
        rec.update(seconds=round(res["seconds"], 2), images_per_s=round(res["images_per_s"], 1), losses=res["losses"],
                   peer_torch=res["torch"], lightly=res["lightly"], knn=knn(out, source, env, root / "lightly-knn.log", a.device))
    records.append(rec)
    print(f"{method} seed {seed} lightly: " + summary(rec), flush=True)
    return records


def summary(rec: dict) -> str:
    if rec["rc"] != 0:
        return f"FAILED (rc {rec['rc']}), see its log"
    knn_s = f"{rec['knn']:.2f}%" if rec.get("knn") is not None else "kNN failed"
    return (f"kNN {knn_s}, {rec['images_per_s']:.0f} img/s, loss {rec['losses'][-1]:.4f}, "
            f"load {rec['load_before'][0]:.1f} -> {rec['load_after'][0]:.1f}")


# ------------------------------------------------------------------------------------- the page

def hardware() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "amx": "amx_tile" in flags, "avx512_bf16": "avx512_bf16" in flags}


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def config_of(r: dict) -> tuple:
    return r["steps"], r["width"], r["batch"], r.get("device", "cpu")


def cpu_kind(r: dict) -> str:
    """The CPU kind a record ran on, as the speed columns name it (img/s differ by kind, kNN in fp32 not)."""
    hw = r["hardware"]
    isa = "AMX" if hw["amx"] else "AVX512-BF16" if hw["avx512_bf16"] else "AVX2"
    return f"{hw['cpu']} {isa}"


def seeds_by_kind(records: list[dict]) -> str:
    """"KIND (N cores): seed(s) 0, 1; ..." over ``records``."""
    kinds: dict[str, set] = {}
    for r in records:
        kinds.setdefault(f"{cpu_kind(r)} ({r['hardware']['cores']} cores)", set()).add(r["seed"])
    return "; ".join(f"{k}: seed(s) {', '.join(map(str, sorted(v)))}" for k, v in sorted(kinds.items())) or "–"


def meets_rule(ko: list[float], kp: list[float]) -> str:
    """§2 of issue 14: selfsup's mean kNN >= lightly's mean - 1 sd (the pooled sd of both sides' seeds)."""
    if len(ko) < 2 or len(kp) < 2:
        return "needs 2 seeds"
    sd = ((statistics.variance(ko) + statistics.variance(kp)) / 2) ** 0.5
    return "yes" if statistics.mean(ko) >= statistics.mean(kp) - sd else f"no (sd {sd:.2f})"


def table(records: list[dict], steps: int, width: float, batch: int, device: str = "cpu", main: bool = True) -> str:
    """One row per method: kNN mean ± sd over every seed; img/s and the ratio per CPU kind (A, B, ...).
    ``main``: the page's own size, with a row for every method; another size lists only the methods run at it."""
    kinds: list[str] = []
    rows = ["| method | steps | selfsup kNN % | lightly kNN % | Δ (pp) | selfsup ≥ lightly − 1 sd | selfsup img/s "
            "| lightly img/s | speed ratio | seeds | load (1-min avg) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in TABLE:
        last = {}  # a rerun of a (method, seed, side) replaces the earlier record
        for r in records:
            if r["method"] == method and config_of(r) == (steps, width, batch, device) and r["rc"] == 0 \
                    and r.get("knn") is not None:
                last[r["seed"], r["side"]] = r
        seeds = sorted({s for s, side in last if side == "selfsup"} & {s for s, side in last if side == "lightly"})
        ours = [last[s, "selfsup"] for s in seeds]
        peer = [last[s, "lightly"] for s in seeds]
        if not seeds:
            tried = {r["side"] for r in records if r["method"] == method and config_of(r) == (steps, width, batch, device)}
            if not main and not tried:
                continue
            got = {side: [r for r in last.values() if r["side"] == side] for side in ("selfsup", "lightly")}
            elsewhere = {r["side"] for r in records if r["method"] == method and r["rc"] == 0
                         and config_of(r) != (steps, width, batch, device)}  # e.g. a ViT row at a CPU's size
            cell = lambda side: (mean_sd([r["knn"] for r in got[side]]) if got[side]  # noqa: E731
                                 else "failed (see runs.jsonl)" if side in tried
                                 else "at another size: see below" if main and side in elsewhere else "not run yet")
            rows.append(f"| {NAMES[method]} | {steps} | {cell('selfsup')} | {cell('lightly')} | | | | | | | |")
            continue
        ko, kp = [r["knn"] for r in ours], [r["knn"] for r in peer]
        so, sp, ratio = [], [], []
        for kind in sorted({cpu_kind(r) for r in ours}):
            if kind not in kinds:
                kinds.append(kind)
            tag = chr(ord("A") + kinds.index(kind))
            pairs = [(o, q) for o, q in zip(ours, peer) if cpu_kind(o) == kind]
            mo = statistics.mean(o["images_per_s"] for o, _ in pairs)
            mp = statistics.mean(q["images_per_s"] for _, q in pairs)
            so.append(f"{tag}: {mo:.0f}")
            sp.append(f"{tag}: {mp:.0f}")
            ratio.append(f"{tag}: {mo / mp:.2f}×")
        rs = ours + peer
        loads = [r["load_before"][0] for r in rs] + [r["load_after"][0] for r in rs]
        rows.append(f"| {NAMES[method]} | {steps} | {mean_sd(ko)} | {mean_sd(kp)} | "
                    f"{statistics.mean(ko) - statistics.mean(kp):+.2f} | {meets_rule(ko, kp)} | {' · '.join(so)} | "
                    f"{' · '.join(sp)} | {' · '.join(ratio)} | {len(seeds)} | {min(loads):.1f}–{max(loads):.1f} |")
    legend = "; ".join(f"{chr(ord('A') + i)} = {k}" for i, k in enumerate(kinds))
    return "\n".join(rows) + (f"\n\nCPU kinds of the speed columns: {legend}." if kinds else "")


def write_doc(path: Path, records: list[dict], a) -> None:
    main_cfg = (a.steps, a.width, a.batch, a.device)
    sel = [r for r in records if config_of(r) == main_cfg]
    hw = sel[-1]["hardware"] if sel else hardware()
    ours_torch = sorted({r["torch"] for r in sel}) or ["–"]
    peer_torch = sorted({r["peer_torch"] for r in sel if r.get("peer_torch")}) or ["–"]
    dates = sorted({r["date"] for r in sel}) or ["–"]
    precisions = sorted({"fp32" if r.get("precision") in (None, "None") else str(r["precision"]) for r in sel}) or ["–"]
    commits = sorted({r["commit"] for r in sel}) or ["–"]
    text = f"""# selfsup against lightly: the same work, side by side

This page is written by `benchmarks/peers/run.py` from `benchmarks/peers/runs.jsonl` (every run,
raw). **It compares implementations at equal steps, not final accuracy**: each run is
{a.steps} steps of batch {a.batch} (CIFAR-10, ResNet-18 width {a.width:g}, CIFAR stem; the
{NAMES["dino_vit"]} row: a ViT-Tiny of 8x8 patches, whose width `--width` does not change; on a CPU it
runs at 100 steps of batch 64, under "Other sizes"), a few minutes of training, far from any
recipe's reported accuracy.

For each method and seed the two sides run one after the other (selfsup, then lightly), on the same
data (the CIFAR-10 JPEG archive in `shared/data`), the same backbone architecture and the same
initial weights (ours: the runner builds it from the seed, saves it, and both sides load it), the
same batch, steps, optimiser, lr schedule and hyperparameters (the lightly side reads them from
the selfsup run's `config.yaml`; the method → preset table is `TABLE` in `benchmarks/peers/run.py`).
The lightly side is lightly {', '.join(sorted({r['lightly'] for r in sel if r.get('lightly')})) or '1.6.0'}'s own
loss, heads, transforms (torchvision, through a `DataLoader` with {a.workers} workers), momentum
helpers, `LARS` and `CosineWarmupScheduler` (`benchmarks/peers/lightly_side.py`), in its own
environment (`benchmarks/peers/setup.sh`). Both backbones are scored by the same evaluator,
`selfsup eval knn` (k = 200, T = 0.1, backbone features, train split as the bank, test split as
the queries). img/s: training images per second of the training loop (selfsup: its per-epoch
`images_per_s`; lightly: the loop including its DataLoader), {a.threads} torch threads on each side,
the same autocast precision ({', '.join(precisions)}) and flush-denormal setting on each side.
Speed ratio = selfsup img/s / lightly img/s. The load column is the machine's 1-minute load
average before and after the runs of that row: the machine was shared, so speed figures taken
under load above about {hw['cores']} are noisy.

{table(records, *main_cfg)}

- Hardware: {seeds_by_kind(sel)}.
  kNN is pooled over all seeds (both sides in the same precision on every kind); img/s and the
  speed ratio are given per CPU kind, because they differ by kind.
- torch: selfsup side {', '.join(ours_torch)}; lightly side {', '.join(peer_torch)}.
- Date(s): {', '.join(dates)}; selfsup commit(s): {', '.join(commits)}.
- Command: `python benchmarks/peers/run.py --methods {','.join(a.methods)} --seeds {','.join(map(str, a.seeds))} --steps {a.steps} --width {a.width:g} --batch {a.batch}`
  (after `bash benchmarks/peers/setup.sh`). Rows marked "not run yet" have no measurement.
- Known differences that are the peer's own design, kept: lightly's heads (e.g. its SimCLR head has
  BN in every layer), its transforms' jitter/solarisation defaults where selfsup's config has no
  field for them, its momentum update before the step, no split BN in MoCo (lightly's
  `batch_shuffle` on one process), its BYOL/SimSiam loss as `NegativeCosineSimilarity`, and the
  DataLoader pipeline (PIL per image) against selfsup's batched tensor augmentation. Under bf16
  autocast lightly's losses run in bf16, selfsup's in fp32. Barlow Twins and VICReg: the last Linear
  of lightly's heads has a bias (selfsup's none; inert, as both losses centre every dimension).
  NNCLR: lightly's `NTXentLoss` between the neighbours and the predictions is SimCLR's symmetric
  loss over 2N - 1 candidates (the other neighbours among the negatives), selfsup's the paper's
  over the N predictions; lightly's bank queues the second view's projections, selfsup's the
  first's. DINO's weight-decay cosine (ViT: 0.04 -> 0.4) by lightly's `cosine_schedule` reaches its
  end at the last step, selfsup's (as DINO's `cosine_scheduler`) a step later. Barlow Twins, VICReg
  and NNCLR train on BYOL's two views on both sides (lightly's `BYOLTransform`, not its
  `VICRegTransform`), the recipe selfsup uses for them.
"""
    others = sorted({config_of(r) for r in records} - {main_cfg})
    if others:
        text += ("\n## Other sizes in runs.jsonl\n\nRuns of other sizes, each its own table. Runs of a few steps "
                 "(fewer than 100) are checks that the harness runs end to end on both sides, not comparisons: "
                 "at that length kNN is near its random-initialisation value and img/s is dominated by start-up.\n")
        for steps, width, batch, device in others:
            rs = [r for r in records if config_of(r) == (steps, width, batch, device)]
            text += (f"\n### {steps} steps of batch {batch}, width {width:g}, {device}"
                     f"{' (harness check)' if steps < 100 else ''}; {rs[0]['train_images']} training and "
                     f"{rs[0]['test_images']} test images; {', '.join(sorted({r['date'] for r in rs}))}\n\n"
                     + table(records, steps, width, batch, device, main=False) + "\n")
    path.write_text(text)


# -------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    a = parse_args(argv)
    jsonl = Path(a.jsonl)
    if a.table_only:
        records = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
        write_doc(Path(a.doc), records, a)
        print(f"-> {a.doc}")
        return
    sys.path.insert(0, a.checkout)
    import numpy as np
    import torch
    from selfsup.data import load_data

    if not Path(a.peer_python).exists():
        raise SystemExit(f"no peer interpreter {a.peer_python}: run benchmarks/peers/setup.sh first")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    epochs, n_images = plan(a.steps, a.batch, 50000)
    source = Path(a.data)
    if n_images < 50000 or a.test_images:
        source = subset_archive(source, work / "data" / f"cifar10-train{n_images}-test{a.test_images or 'all'}",
                                -(-n_images // 10) if n_images < 50000 else None, a.test_images // 10 or None)
    splits = load_data(str(source))
    images = np.asarray(splits.train.images)
    if len(images) // a.batch * epochs != a.steps:
        raise SystemExit(f"{source} has {len(images)} training images: not {a.steps} steps of {a.batch}")
    images_npy = work / "data" / (source.name.split(".")[0] + f"-{len(images)}-train.npy")
    images_npy.parent.mkdir(parents=True, exist_ok=True)
    if not images_npy.exists():
        np.save(images_npy, images)
    mean, std = splits.train.mean_std()
    size = splits.train.image_size[0]
    env = {**os.environ, "PYTHONPATH": a.checkout + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(a.threads)}
    commit = subprocess.run(["git", "-C", a.checkout, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", a.checkout, "status", "--porcelain", "--", "selfsup"], capture_output=True,
                           text=True).stdout.strip()
    common = {"date": dt.date.today().isoformat(), "device": a.device, "steps": a.steps, "batch": a.batch, "width": a.width,
              "epochs": epochs, "train_images": len(images), "test_images": len(splits.test.images),
              "threads": a.threads, "workers": a.workers, "torch": torch.__version__, "hardware": hardware(),
              "commit": commit + ("+dirty" if dirty else ""), "data": str(source)}
    print(f"{a.steps} steps = {epochs} epoch(s) of {len(images)} images at batch {a.batch}; width {a.width:g}; "
          f"methods {a.methods}; seeds {a.seeds}; logs under {work}", flush=True)
    for seed in a.seeds:
        for method in a.methods:
            for rec in one_pair(a, method, seed, str(source), epochs, images_npy, mean, std, size, env, common):
                with open(jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    if a.doc != "none":
        records = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
        write_doc(Path(a.doc), records, a)
        print(f"-> {a.doc}")


if __name__ == "__main__":
    main()
