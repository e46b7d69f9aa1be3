"""The ``selfsup`` command: parses arguments, builds a config, calls the library."""
from __future__ import annotations

import argparse
import functools
import logging
import math
import sys

from . import __version__
from .errors import CheckpointError, ConfigError, DataError, Interrupted, TrainingError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    from .backbones import NAMES as BACKBONE_NAMES  # every encoder, the ViTs included (imports torch)

    p = _Parser(prog="selfsup", description="Self-supervised visual representation learning.")
    p.add_argument("--version", action="version", version=f"selfsup {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pre = sub.add_parser("pretrain", help="pre-train a backbone without labels")
    pre.add_argument("--method", help="simclr, moco, ... (see --list-presets; default: the preset's, else simclr)")
    pre.add_argument("--data", help="digits | cifar10 | cifar100 | stl10 | an image folder (train/test splits, "
                                    "class folders, or any images) | .tar/.tar.gz/.zip | a .txt/.csv list of images")
    pre.add_argument("--eval-data", help="a labelled source (as --data) for the kNN monitor when --data has no "
                                         "labels (eval.data)")
    pre.add_argument("--out", help="run folder for config, metrics and checkpoints")
    pre.add_argument("--backbone", help=" | ".join(BACKBONE_NAMES))
    pre.add_argument("--epochs", type=int)
    pre.add_argument("--batch-size", type=int, help="global batch size (split over ranks)")
    pre.add_argument("--preset", help="a named recipe, e.g. digits-simclr, cifar10-simclr")
    pre.add_argument("--config", help="a YAML file of settings (applied after the preset)")
    pre.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help="override any setting, e.g. --set optim.lr=0.5 train.seed=1")
    pre.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    pre.add_argument("--seed", type=int)
    pre.add_argument("--unlabeled", action="store_true", default=None,
                     help="STL-10: also pre-train on the 100k unlabelled images")
    pre.add_argument("--skip-corrupt", action="store_true", default=None,
                     help="skip undecodable images (counted) instead of stopping")
    pre.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                     help="batch-norm statistics over the global batch when distributed (default: "
                          "the method's; on for SimCLR, as in the paper)")
    pre.add_argument("--teacher", help="--method distill: the frozen teacher, a selfsup run folder or its "
                                       "checkpoint.pt (distill.teacher)")
    pre.add_argument("--max-minutes", type=float, help="stop at the first epoch end after this long")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    pre.add_argument("--data-changed-ok", action="store_true",
                     help="--resume even though the data changed since the checkpoint (images added or removed)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument("--list-presets", action="store_true", help="print the presets and exit")

    ev = sub.add_parser("eval", help="evaluate a pre-trained backbone")
    ev.add_argument("protocol", choices=["knn", "linear"])
    ev.add_argument("--checkpoint", required=True, help="run folder, checkpoint.pt or backbone.pt")
    ev.add_argument("--data", required=True, help="a labelled source with a test split")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--random-init", action="store_true",
                    help="evaluate the same architecture at random initialisation (the baseline)")
    ev.add_argument("--k", type=int, default=200, help="kNN neighbours")
    ev.add_argument("--t", type=float, default=0.1, help="kNN temperature")
    ev.add_argument("--features", choices=["backbone", "head"], default="backbone",
                    help="kNN on the pooled backbone features or on the method's projection output "
                         "(head: as the MoCo CIFAR demo; needs the run's checkpoint.pt)")
    ev.add_argument("--protocol", dest="protocol_name", choices=["simclr", "moco", "fast"],
                    help="linear: simclr (Nesterov, lr 0.1 x B/256, cosine) or moco (lr 30, steps at "
                         "60/80 %%), both on crop + flip through the frozen backbone, 100 epochs, batch "
                         "256; fast: pre-extracted standardised features (default: the run's method: "
                         "moco -> moco, else simclr)")
    ev.add_argument("--epochs", type=int, help="linear epochs (default: the protocol's, 100)")
    ev.add_argument("--lr", type=float, help="linear learning rate at batch 256 (default: the protocol's)")
    ev.add_argument("--batch-size", type=int, default=512, help="feature extraction batch")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--skip-corrupt", action="store_true")

    ex = sub.add_parser("export", help="write a run's backbone for torchvision/timm or as safetensors")
    ex.add_argument("run", help="run folder, checkpoint.pt or backbone.pt")
    ex.add_argument("--format", default="torchvision", choices=["torchvision", "timm", "safetensors"],
                    help="torchvision: a ResNet's .pt state_dict in torchvision's layout (+ .json); timm: a ViT's, "
                         "in timm's; safetensors: the same tensors, description in the metadata "
                         "(pip install safetensors)")
    ex.add_argument("--out", help="the file to write (default: RUN/backbone-torchvision.pt, RUN/backbone-timm.pt "
                                  "or RUN/backbone.safetensors)")

    rep = sub.add_parser("report", help="an HTML page of a run: curves, evaluations, t-SNE, neighbours")
    rep.add_argument("run", help="run folder (metrics.jsonl, backbone.pt)")
    rep.add_argument("--out", help="the HTML file (default: RUN/report/index.html; PNGs beside it)")
    rep.add_argument("--data", help="the labelled data for the embedding map and the neighbour grid "
                                    "(default: the run's own data source)")
    rep.add_argument("--points", type=int, default=2000, help="test images in the t-SNE map")
    rep.add_argument("--queries", type=int, default=8, help="query images in the neighbour grid")
    rep.add_argument("--k", type=int, default=8, help="neighbours shown per query")
    rep.add_argument("--device", default="auto")
    rep.add_argument("--seed", type=int, default=0)
    _embed_parser(sub)
    _views_parser(sub)
    _semisup_parsers(sub)
    return p


def _views_parser(sub) -> None:
    vw = sub.add_parser("views", help="a grid of a few images and the views a method trains on (a PNG)")
    vw.add_argument("--data", help="as for pretrain (default: the preset's, else digits)")
    vw.add_argument("--out", required=True, help="the PNG to write, e.g. views.png")
    vw.add_argument("--preset", help="a named recipe, as for pretrain")
    vw.add_argument("--method", help="simclr, moco, byol, dino, ... (default: the preset's, else simclr)")
    vw.add_argument("--config", help="a YAML file of settings, e.g. a run's config.yaml")
    vw.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="any setting, e.g. --set aug.vflip_p=0.5 aug.rot90_p=0.75 aug.view2.solarize_p=0")
    vw.add_argument("--teacher", help="--method distill: the frozen teacher (distill.teacher)")
    vw.add_argument("--images", type=int, default=6, help="rows: images picked at random (by --seed)")
    vw.add_argument("--views", type=int, default=4, help="columns of views, cycling through the method's views")
    vw.add_argument("--seed", type=int, default=0, help="picks the images and draws the views")


def _embed_parser(sub) -> None:
    em = sub.add_parser("embed", help="write one embedding per image of a source (.csv, .npy or .parquet)")
    em.add_argument("run", help="run folder, checkpoint.pt or backbone.pt")
    em.add_argument("--data", help="digits | cifar10 | ... | image folder (a split layout: one split; any other "
                                   "folder: every image under it) | .tar/.tar.gz/.zip of a split layout "
                                   "(default: the run's own data source)")
    em.add_argument("--out", required=True, help="the file: .csv (path, label, f0..), .npy (+ .paths.txt, "
                                                 ".labels.txt beside it) or .parquet (pip install pyarrow)")
    em.add_argument("--split", help="the split of a split layout to embed (default train)")
    em.add_argument("--features", choices=["backbone", "head"], default="backbone",
                    help="the pooled backbone features, or the run's projection head on top (needs checkpoint.pt)")
    em.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    em.add_argument("--skip-corrupt", action="store_true",
                    help="leave out (and name) images that cannot be decoded instead of stopping")
    em.add_argument("--random-init", action="store_true",
                    help="the same network untrained (seed 0): the baseline a trained run is compared with")
    em.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    em.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    em.add_argument("--no-progress", action="store_true", help="no progress bar")


def _step_options(q: argparse.ArgumentParser, what: str) -> None:
    q.add_argument("--data", help="the labelled source (with a test split) the teacher/pre-training used")
    q.add_argument("--out", help="run folder (default runs/<step>-<time>)")
    q.add_argument("--epochs", type=int)
    q.add_argument("--batch-size", type=int)
    q.add_argument("--lr", type=float, help="base learning rate, scaled by lr_scaling")
    q.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    q.add_argument("--seed", type=int)
    q.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"any {what} setting, e.g. --set weight_decay=0 eval_every=5 (see selfsup/semisup.py)")
    q.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly (--epochs and the lr schedule may change)")
    q.add_argument("--data-changed-ok", action="store_true",
                   help="--resume even though the data changed since the checkpoint")


def _semisup_parsers(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a pre-trained run on a labelled subset (SimCLRv2)")
    ft.add_argument("--checkpoint", help="the pre-training run folder (required unless --resume)")
    ft.add_argument("--labels", help="1%%, 10%%, a count per class (50) or a file of image indices (default 10%%)")
    ft.add_argument("--label-seed", type=int, help="seed of the labelled subset (default 0)")
    ft.add_argument("--from-head-layer", type=int, dest="head_layers",
                    help="projection-head layers kept under the classifier (SimCLRv2: 1; 0: encoder only)")
    ft.add_argument("--random-init", action="store_true", default=None,
                    help="the same network untrained: the supervised-only baseline")
    _step_options(ft, "fine-tuning")

    ds = sub.add_parser("distill", help="distil a fine-tuned teacher into a student on all images")
    ds.add_argument("--teacher", help="a fine-tuned run folder (required unless --resume)")
    ds.add_argument("--student", help="resnet18 | resnet34 | resnet50 (default resnet18)")
    ds.add_argument("--width", type=float, help="the student's width (default: the teacher's)")
    ds.add_argument("--temperature", type=float, help="tau: 1.0 big-to-small (default), 0.1 self-distillation")
    ds.add_argument("--alpha", type=float, help="weight of the distillation term; 1 - alpha weighs the "
                                                "labelled cross-entropy (default 1: distillation only)")
    ds.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                    help="crop + flip per step (default); --no-augment caches the teacher's logits once")
    _step_options(ds, "distillation")

    ss = sub.add_parser("semisup", help="SimCLRv2's recipe: pre-train -> fine-tune -> distil, and "
                                        "the supervised-only baseline, into one table")
    ss.add_argument("--data", help="the labelled source (required unless --resume)")
    ss.add_argument("--labels", default="1%", help="as for finetune (default 1%%)")
    ss.add_argument("--out", help="folder for the steps' runs and results.md/json")
    ss.add_argument("--pretrained", help="start from this pre-training run instead of pre-training")
    ss.add_argument("--preset", help="pre-training preset (default: the defaults with a 3-layer head)")
    ss.add_argument("--from-head-layer", type=int, dest="head_layers", default=1)
    ss.add_argument("--student", help="the distillation student (default resnet18 at the teacher's width)")
    ss.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    ss.add_argument("--no-progress", action="store_true", help="no progress bar while pre-training")
    ss.add_argument("--resume", action="store_true",
                    help="continue the recipe in --out with its own settings, each step where it stopped")
    ss.add_argument("--data-changed-ok", action="store_true",
                    help="--resume even though the data changed since the steps' checkpoints")
    ss.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="STEP.KEY=VALUE",
                    help="settings per step: pretrain.model.width=0.25 finetune.epochs=30 "
                         "distill.temperature=0.1 ...")


def _step_overrides(a: argparse.Namespace) -> dict:
    return {"data": a.data, "out": a.out, "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
            "device": a.device, "seed": a.seed}


def _resume_changes(sets: list[str], flags: dict, where: set[str], file: dict | None = None) -> dict:
    """What a ``--resume`` command line asks to change, as dotted keys, each later layer winning:
    a ``--config`` file's settings, the ``--set`` items, the ``flags`` (all flat); except ``where``
    the run runs, which is always taken (the resume refuses the other keys unless it allows them)."""
    from .config import flatten, parse_set

    changes = dict(file or {})
    for item in sets or []:
        changes.update(flatten(parse_set(item)))
    changes.update(flags)
    return {k: v for k, v in changes.items() if k not in where}


def _run_step(a: argparse.Namespace, cls, run, required: str, **flags) -> dict:
    """A fine-tuning or distillation from the command line: a fresh run of the flags' settings,
    or with ``--resume`` the run in ``--out``, where every other flag asks for a change
    (refused by name unless resume allows it)."""
    from .semisup import step_config

    overrides = {**flags, **_step_overrides(a)}
    if not a.resume:
        if overrides[required] is None:
            raise ConfigError(f"--{required} is required (or --resume with --out, to continue a run)")
        return run(step_config(cls, a.sets, **overrides))
    if not a.out:
        raise ConfigError("--resume needs --out DIR (the run to continue)")
    changes = _resume_changes(a.sets, {k: v for k, v in overrides.items() if v is not None}, {"out", "device"})
    return run(cls(out=a.out, device=a.device or "auto"), resume=True, changes=changes,
               data_changed_ok=a.data_changed_ok)


def _finetune(a: argparse.Namespace) -> int:
    from .semisup import FinetuneConfig, finetune

    result = _run_step(a, FinetuneConfig, finetune, "checkpoint", checkpoint=a.checkpoint, labels=a.labels,
                       label_seed=a.label_seed, head_layers=a.head_layers, random_init=a.random_init)
    print(f"fine-tuned test top-1: {result['test_top1']:.2f}% -> {result['out']}")
    return 0


def _distill(a: argparse.Namespace) -> int:
    from .semisup import StudentConfig, distill

    result = _run_step(a, StudentConfig, distill, "teacher", teacher=a.teacher, student=a.student, width=a.width,
                       temperature=a.temperature, alpha=a.alpha, augment=a.augment)
    print(f"student test top-1: {result['test_top1']:.2f}% (teacher {result['teacher_top1']:.2f}%) "
          f"-> {result['out']}")
    return 0


def _semisup(a: argparse.Namespace) -> int:
    import time

    from .config import resolve
    from .methods import check_config
    from .semisup import StudentConfig, FinetuneConfig, semisup, step_config

    if a.resume:  # the recipe's own settings (semisup.yaml); only where it runs may change
        if not a.out:
            raise ConfigError("--resume needs --out DIR (the semisup run to continue)")
        given = [flag for flag, v in (("--data", a.data), ("--pretrained", a.pretrained), ("--preset", a.preset),
                                      ("--student", a.student), ("--set", a.sets),
                                      ("--labels", a.labels != "1%" or None),
                                      ("--from-head-layer", a.head_layers != 1 or None)) if v]
        if given:
            raise ConfigError(f"--resume continues '{a.out}' with its own settings ({given[0]} cannot change); "
                              f"start a new recipe in another --out to change them")
        ft = FinetuneConfig(device=a.device or "auto")
        semisup(a.out, pretrain_cfg=None, pretrained=None, finetune_cfg=ft, distill_cfg=StudentConfig(), resume=True,
                data_changed_ok=a.data_changed_ok)
        print(f"-> {a.out}/results.md")
        return 0
    if not a.data:
        raise ConfigError("--data is required (or --resume with --out, to continue a recipe)")
    sets: dict[str, list[str]] = {"pretrain": [], "finetune": [], "distill": []}
    for item in a.sets:
        step, _, rest = item.partition(".")
        if step not in sets or not rest:
            raise ConfigError(f"--set {item}: name the step first, e.g. pretrain.model.width=0.25, "
                              f"finetune.epochs=30 or distill.temperature=0.1")
        sets[step].append(rest)
    common = {"data": a.data, "device": a.device}
    pre = None
    if a.pretrained is None:
        pre_sets = ([] if a.preset else ["model.proj_layers=3"]) + sets["pretrain"]
        overrides: dict = {"data": {"source": a.data}, "train": {}}
        if a.device:
            overrides["train"]["device"] = a.device
        if a.no_progress:
            overrides["train"]["progress"] = False
        pre = check_config(resolve(preset_name=a.preset, sets=pre_sets, overrides=overrides))
    ft = step_config(FinetuneConfig, sets["finetune"], labels=a.labels, head_layers=a.head_layers, **common)
    ds = step_config(StudentConfig, sets["distill"], student=a.student, **common)
    out = a.out or f"runs/semisup-{time.strftime('%Y%m%d-%H%M%S')}"
    semisup(out, pretrain_cfg=pre, pretrained=a.pretrained, finetune_cfg=ft, distill_cfg=ds)
    print(f"-> {out}/results.md")
    return 0


def _pretrain_overrides(a: argparse.Namespace) -> dict:
    """The settings that pretrain's flags name, as a nested dict for :func:`config.resolve`
    (``selfsup views`` has some of these flags: the ones it lacks count as not given)."""
    overrides: dict = {"data": {}, "model": {}, "train": {}, "distill": {}, "eval": {}}
    for flag, section, key in [("data", "data", "source"), ("eval_data", "eval", "data"),
                               ("backbone", "model", "backbone"),
                               ("epochs", "train", "epochs"), ("batch_size", "train", "batch_size"),
                               ("device", "train", "device"), ("seed", "train", "seed"),
                               ("unlabeled", "data", "unlabeled"), ("skip_corrupt", "data", "skip_corrupt"),
                               ("max_minutes", "train", "max_minutes"), ("sync_bn", "model", "sync_bn"),
                               ("teacher", "distill", "teacher")]:
        if getattr(a, flag, None) is not None:
            overrides[section][key] = getattr(a, flag)
    if getattr(a, "method", None) is not None:
        overrides["method"] = a.method
    if a.out is not None and a.command == "pretrain":  # views' --out is its PNG
        overrides["out"] = a.out
    if getattr(a, "no_progress", False):
        overrides["train"]["progress"] = False
    return overrides


def _views(a: argparse.Namespace) -> int:
    from .config import resolve
    from .views import write_views

    cfg = resolve(preset_name=a.preset, file=a.config, sets=a.sets, overrides=_pretrain_overrides(a))
    path = write_views(cfg, a.out, images=a.images, views=a.views, seed=a.seed)
    print(f"{a.images} images x {a.views} views of {cfg.method} -> {path}")
    return 0


def _pretrain(a: argparse.Namespace) -> int:
    from . import distributed as D
    from .config import flatten, resolve
    from .presets import load_yaml, preset_names, read_preset
    from .resume import WHERE
    from .train import pretrain

    if a.list_presets:
        for name in preset_names():
            print(f"{name}: {read_preset(name)['about']}")
        return 0
    overrides = _pretrain_overrides(a)
    if a.resume:
        if not a.out:
            raise ConfigError("--resume needs --out DIR (the run to continue)")
        from .config import Config
        cfg = Config(out=a.out)
        cfg.train.device = a.device or "auto"
        cfg.train.progress = not a.no_progress
        cfg.train.max_minutes = a.max_minutes
    else:
        cfg = resolve(preset_name=a.preset, file=a.config, sets=a.sets, overrides=overrides)
    if a.resume:  # the saved settings hold: flags naming a different run are a mistake, not an override
        expect = {k: v for k, v in [("method", a.method), ("model.backbone", a.backbone), ("preset", a.preset)]
                  if v is not None}
        where = set(WHERE)
        changes = _resume_changes(a.sets, flatten(overrides), where, flatten(load_yaml(a.config)) if a.config else None)
        pretrain(cfg, resume=True, expect=expect, changes=changes, data_changed_ok=a.data_changed_ok)
    else:
        pretrain(cfg)
    D.cleanup()  # leave the torchrun process group cleanly (no-op in a single process)
    return 0


def _eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_run
    from .train import load_projector

    for flag, ok in (("--k", a.k >= 1), ("--t", math.isfinite(a.t) and a.t > 0),
                     ("--epochs", a.epochs is None or a.epochs >= 1),
                     ("--lr", a.lr is None or (math.isfinite(a.lr) and a.lr > 0)), ("--batch-size", a.batch_size >= 1)):
        if not ok:
            raise ConfigError(f"{flag} must be a positive finite number, got {getattr(a, flag[2:].replace('-', '_'))}")
    head = None  # kNN on head features: the run's projection head, built when the backbone is loaded
    if a.protocol == "knn" and a.features == "head":
        head = functools.partial(load_projector, a.checkpoint, random_init=a.random_init)
    result, path = evaluate_run(a.checkpoint, a.protocol, data=a.data, device=a.device, random_init=a.random_init,
                                k=a.k, temperature=a.t, head=head, protocol=a.protocol_name, epochs=a.epochs,
                                lr=a.lr, batch_size=a.batch_size, seed=a.seed, skip_corrupt=a.skip_corrupt)
    linear = a.protocol == "linear"
    what = f"linear ({result['linear_protocol']})" if linear else f"knn ({a.features} features)"
    print(f"{what} top-1{' (random init)' if a.random_init else ''}: {result['top1']:.2f}% -> {path}")
    return 0


def _export(a: argparse.Namespace) -> int:
    from .export import export_backbone

    path = export_backbone(a.run, a.format, a.out)
    print(f"{a.format} weights -> {path}")
    return 0


def _report(a: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(a.run, out=a.out, data=a.data, points=a.points, queries=a.queries, k=a.k,
                        device=a.device, seed=a.seed)
    print(f"report -> {path}")
    return 0


def _embed(a: argparse.Namespace) -> int:
    from .embeddings import embed_to_file

    result = embed_to_file(a.run, a.data, a.out, split=a.split, features=a.features, normalize=a.normalize,
                           random_init=a.random_init, skip_corrupt=a.skip_corrupt, batch_size=a.batch_size,
                           device=a.device,
                           progress=not a.no_progress)
    print(f"{len(result.paths)} embeddings of {result.vectors.shape[1]} dimensions ({a.features}) -> {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # data decoding/cache notes
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # a usage error (already printed as one line), --help or --version
        return e.code if isinstance(e.code, int) else 2
    try:
        commands = {"pretrain": _pretrain, "eval": _eval, "export": _export, "report": _report, "embed": _embed, "views": _views,
                    "finetune": _finetune, "distill": _distill, "semisup": _semisup}
        return commands[args.command](args)
    except (ConfigError, DataError, CheckpointError, TrainingError, ValueError) as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1
    except OSError as e:  # a file-system failure no check foresaw (read-only, full, gone): one line, the file named
        where = f" '{e.filename}'" if e.filename else ""
        print(f"selfsup: error: could not read or write{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # SIGTERM / SIGINT: checkpoint written; 143 / 130 as a shell would report
        print(f"selfsup: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("selfsup: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
