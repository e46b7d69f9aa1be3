"""Your own images, measured (issue 25 §6): a flat, unlabelled folder of mixed sizes and formats
made from CIFAR-10's training images, pre-trained on as a user would, then the test images
embedded and scored outside selfsup with the labels selfsup never saw.

1. ``--train`` CIFAR-10 training images (class-balanced, seeded) rewritten at a random side of
   20-300 px (aspect kept within 3:4-4:3) in a random format and mode (JPEG, PNG RGB / palette /
   RGBA / 16-bit grey, WebP, TIFF, BMP, greyscale JPEG), flat in one folder, no labels;
2. ``selfsup pretrain --data <folder>`` (``--preset``, ``--set``), timed, its monitors read back;
3. ``selfsup embed`` of the 10 000 test images (a flat folder, their labels kept aside) with the
   trained run and with the same network untrained (``--random-init``);
4. k-NN retrieval precision: the share of each test image's 10 nearest neighbours (cosine, the
   test set itself, the query left out) that share its class, trained against random init.

Decoding speed (the cache's first fill, images/s per core) comes from the run's log; the
torchvision comparison is ``benchmarks/decode_peer.py`` in the peer environment.

    python benchmarks/own_images.py --work /tmp/own --epochs 10
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
FORMATS = ("jpeg", "png", "png-palette", "png-rgba", "png-16bit-grey", "webp", "tiff", "bmp", "jpeg-grey")


def rewrite(im: Image.Image, rng: np.random.Generator, path_stem: Path) -> Path:
    """``im`` at a random size (shorter side 20-300 px, aspect 3:4-4:3) in a random format."""
    side = int(rng.integers(20, 301))
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    w, h = (side, round(side * aspect)) if aspect >= 1 else (round(side / aspect), side)
    im = im.resize((w, h), Image.BICUBIC)
    fmt = FORMATS[int(rng.integers(len(FORMATS)))]
    if fmt == "png-palette":
        im, ext = im.convert("P", palette=Image.ADAPTIVE), ".png"
    elif fmt == "png-rgba":
        im, ext = im.convert("RGBA"), ".png"
    elif fmt == "png-16bit-grey":
        im, ext = Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257), ".png"
    elif fmt == "jpeg-grey":
        im, ext = im.convert("L"), ".jpg"
    else:
        ext = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "tiff": ".tif", "bmp": ".bmp"}[fmt]
    out = path_stem.with_suffix(ext)
    im.save(out, **({"quality": 90} if ext == ".jpg" else {}))
    return out


def build(work: Path, n_train: int, seed: int) -> tuple[Path, Path, np.ndarray]:
    """The mixed training folder and the flat test folder (``<index>.jpg``), and the test labels."""
    train_dir, test_dir = work / "my_images", work / "test_images"
    labels_file = work / "test_labels.npy"
    if train_dir.is_dir() and test_dir.is_dir() and labels_file.exists():
        return train_dir, test_dir, np.load(labels_file)
    rng = np.random.default_rng(seed)
    train_dir.mkdir(parents=True, exist_ok=True)
    test_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(ARCHIVE) as tf:  # names first, then one sequential pass (a .tar.gz cannot seek back cheaply)
        names = [m.name for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
    train = sorted(name for name in names if "/train/" in name)
    test = sorted(name for name in names if "/test/" in name)
    classes = sorted({name.split("/")[-2] for name in test})
    per_class = n_train // len(classes)
    chosen = []
    for c in classes:
        of_class = [name for name in train if name.split("/")[-2] == c]
        chosen += [of_class[i] for i in sorted(rng.choice(len(of_class), per_class, replace=False))]
    slot = {name: k for k, name in enumerate(chosen[i] for i in rng.permutation(len(chosen)))}  # shuffled names
    test_index = {name: k for k, name in enumerate(test)}
    labels = [0] * len(test)
    with tarfile.open(ARCHIVE, mode="r|gz") as tf:
        for m in tf:
            if m.name in slot:
                with Image.open(tf.extractfile(m)) as im:
                    rewrite(im.convert("RGB"), rng, train_dir / f"{slot[m.name]:05d}")
            elif m.name in test_index:
                k = test_index[m.name]
                (test_dir / f"{k:05d}.jpg").write_bytes(tf.extractfile(m).read())
                labels[k] = classes.index(m.name.split("/")[-2])
    np.save(labels_file, np.asarray(labels))
    return train_dir, test_dir, np.asarray(labels)


def precision_at_k(vectors: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's k nearest other rows (cosine) with its label, in %."""
    z = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    hits = []
    for lo in range(0, len(z), 1000):
        sims = z[lo:lo + 1000] @ z.T  # (m, N)
        sims[np.arange(len(sims)), np.arange(lo, lo + len(sims))] = -np.inf  # not itself
        nearest = np.argpartition(-sims, k, axis=1)[:, :k]
        hits.append((labels[nearest] == labels[lo:lo + len(sims), None]).mean(1))
    return 100 * float(np.concatenate(hits).mean())


def selfsup(*args: str) -> float:
    """Run the selfsup command; returns its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "selfsup", *args], check=True, cwd=REPO)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/own_images")
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--preset", default="cifar10-simclr-small")
    p.add_argument("--set", dest="sets", nargs="*", default=["data.image_size=32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here too")
    a = p.parse_args()
    work = Path(a.work)
    t0 = time.perf_counter()
    train_dir, test_dir, labels = build(work, a.train, a.seed)
    built = time.perf_counter() - t0
    out = work / "runs" / "mine"
    cache = work / "cache"
    os.environ["SELFSUP_CACHE"] = str(cache)
    result = {"cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name")), platform.processor()),
              "train_images": len(list(train_dir.iterdir())), "test_images": len(labels),
              "build_s": built, "preset": a.preset, "sets": a.sets, "epochs": a.epochs}
    if not (out / "checkpoint.pt").exists():
        result["pretrain_s"] = selfsup("pretrain", "--data", str(train_dir), "--preset", a.preset, "--out", str(out),
                                       "--epochs", str(a.epochs), "--no-progress", "--set", *a.sets)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result["monitors"] = [{k: r[k] for k in ("epoch", "loss", "feature_std", "effective_rank", "alignment",
                                              "uniformity", "images_per_s") if k in r} for r in rows]
    for name, extra in (("trained", []), ("random_init", ["--random-init"])):
        emb = work / f"test-{name}.npy"
        result[f"embed_{name}_s"] = selfsup("embed", str(out), "--data", str(test_dir), "--out", str(emb),
                                            "--no-progress", *extra)
        order = [int(Path(line).stem) for line in emb.with_suffix(".paths.txt").read_text().splitlines()]
        result[f"precision_at_10_{name}"] = precision_at_k(np.load(emb), labels[order])
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
