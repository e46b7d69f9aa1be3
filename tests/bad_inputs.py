"""Malformed data, config and checkpoint files for tests/test_bad_input.py, built under a folder."""
from __future__ import annotations

import io
import os
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def _img(seed: int, size=(8, 8), mode: str = "RGB") -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    return im if mode == "RGB" else im.convert(mode)


def folder(root: Path, classes=("a", "b"), per_class: int = 3, size=(8, 8), splits=("train", "test"),
           modes=("RGB",)) -> Path:
    seed = 0
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                seed += 1
                _img(seed, size, modes[seed % len(modes)]).save(root / split / c / f"{i}.png")
    return root


def build(root: Path) -> dict[str, Path]:
    """Every bad input by name (plus a few good ones that need a documented recovery)."""
    p: dict[str, Path] = {}
    good = folder(root / "good")
    p["good"] = good
    with tarfile.open(root / "good.tar.gz", "w:gz") as tf:
        tf.add(good, arcname="good")
    data = (root / "good.tar.gz").read_bytes()
    (root / "truncated.tar.gz").write_bytes(data[: len(data) // 2])
    p["truncated_tar"] = root / "truncated.tar.gz"
    with zipfile.ZipFile(root / "good.zip", "w") as zf:
        for f in sorted(good.rglob("*")):
            zf.write(f, f.relative_to(root).as_posix())
    data = (root / "good.zip").read_bytes()
    (root / "truncated.zip").write_bytes(data[: len(data) // 2])
    p["truncated_zip"] = root / "truncated.zip"
    (root / "empty.tar").write_bytes(b"")
    p["empty_archive"] = root / "empty.tar"

    p["empty_class"] = folder(root / "empty_class")
    for f in (root / "empty_class" / "train" / "b").iterdir():
        f.unlink()
    p["mixed_sizes"] = folder(root / "mixed_sizes")
    _img(99, (12, 10)).save(root / "mixed_sizes" / "train" / "a" / "big.png")
    p["modes"] = folder(root / "modes", modes=("RGB", "L", "RGBA", "P", "LA", "1"))
    p["corrupt"] = folder(root / "corrupt")
    (root / "corrupt" / "train" / "a" / "junk.png").write_bytes(b"not a png at all")
    p["only_train"] = folder(root / "only_train", splits=("train",))
    p["extra_test_class"] = folder(root / "extra_test_class")
    folder(root / "extra_test_class", classes=("zebra",), splits=("test",))
    (root / "empty_dir").mkdir()
    p["empty_dir"] = root / "empty_dir"
    (root / "notes.txt").write_text("hello")
    p["not_archive"] = root / "notes.txt"
    p["no_images"] = root / "no_images"
    (root / "no_images" / "train" / "a").mkdir(parents=True)
    (root / "no_images" / "train" / "a" / "readme.txt").write_text("x")

    for name, text in {"bad_yaml": "train: [1, 2\n", "list_yaml": "- a\n- b\n",
                       "unknown_key_yaml": "train:\n  epoch: 3\n", "wrong_type_yaml": "train:\n  epochs: ten\n",
                       "section_scalar_yaml": "optim: 0.1\n", "preset_number_yaml": "preset: 3\n"}.items():
        (root / f"{name}.yaml").write_text(text)
        p[name] = root / f"{name}.yaml"
    return p


def build_faults(root: Path) -> dict[str, Path]:
    """Real symlinks, named pipes, archives with duplicate or oversized members, odd config files."""
    p: dict[str, Path] = {}

    def case(name: str) -> Path:
        p[name] = folder(root / name)
        return p[name]

    (case("link_to_root") / "train" / "a" / "all").symlink_to(root / "link_to_root", target_is_directory=True)
    (case("link_into_test") / "train" / "a" / "more").symlink_to("../../test/a", target_is_directory=True)
    (case("file_link_into_test") / "train" / "a" / "9.png").symlink_to("../../test/a/0.png")
    test = case("test_is_train") / "test"
    for f in sorted(test.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    test.rmdir()
    test.symlink_to("train", target_is_directory=True)
    shared = case("shared_pool")  # train/a and test/a both link to one folder inside the root
    (shared / "pool").mkdir()
    (shared / "train" / "a").rename(shared / "pool" / "a")
    (shared / "train" / "a").symlink_to("../pool/a", target_is_directory=True)
    for f in (shared / "test" / "a").iterdir():
        f.unlink()
    (shared / "test" / "a").rmdir()
    (shared / "test" / "a").symlink_to("../pool/a", target_is_directory=True)
    (case("self_loop") / "train" / "a" / "loop.png").symlink_to("loop.png")
    (case("dangling") / "train" / "a" / "gone.png").symlink_to("nowhere.png")
    (case("dangling_dir") / "train" / "b" / "more").symlink_to("/no/such/folder", target_is_directory=True)
    outside = folder(root / "outside_images", splits=("train",), classes=("owl",))
    (case("dir_link_outside") / "train" / "owl").symlink_to(outside / "train" / "owl", target_is_directory=True)
    (case("file_link_outside") / "train" / "a" / "9.png").symlink_to(outside / "train" / "owl" / "0.png")
    (case("dir_loop") / "train" / "a" / "up").symlink_to("..", target_is_directory=True)  # read once: loads
    (case("split_link_outside") / "test").rename(root / "elsewhere_test")
    (root / "split_link_outside" / "test").symlink_to(root / "elsewhere_test", target_is_directory=True)
    os.mkfifo(case("fifo_image") / "train" / "a" / "pipe.png")
    os.mkfifo(case("fifo_other") / "train" / "a" / "notes")  # no image extension: skipped
    with tarfile.open(root / "fifo.tar", "w") as tf:  # a FIFO member is not a file: skipped
        tf.add(root / "fifo_other", arcname="fifo")
    p["fifo_tar"] = root / "fifo.tar"

    good = folder(root / "archived")
    members = sorted(f for f in good.rglob("*") if f.is_file())
    with tarfile.open(root / "dup.tar.gz", "w:gz") as tf:
        tf.add(good, arcname="ds")
        tf.add(members[0], arcname="ds/" + members[0].relative_to(good).as_posix())  # as 'tar -r' appends it
    p["dup_tar"] = root / "dup.tar.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate it is asked to write
        with zipfile.ZipFile(root / "dup.zip", "w") as zf:
            for f in members + members[:1]:
                zf.write(f, "ds/" + f.relative_to(good).as_posix())
    p["dup_zip"] = root / "dup.zip"
    zeros = bytes(4 << 20)  # 4 MiB of zeros, a few KiB compressed: a bomb when the limit is lowered to 1 MiB
    with zipfile.ZipFile(root / "bomb.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for f in members:
            zf.write(f, "ds/" + f.relative_to(good).as_posix())
        zf.writestr("ds/train/a/huge.png", zeros)
    p["bomb_zip"] = root / "bomb.zip"
    with tarfile.open(root / "bomb.tar.gz", "w:gz") as tf:
        tf.add(good, arcname="ds")
        info = tarfile.TarInfo("ds/train/b/huge.png")
        info.size = len(zeros)
        tf.addfile(info, io.BytesIO(zeros))
    p["bomb_tar"] = root / "bomb.tar.gz"

    for name, data in {"duplicate_key_yaml": b"train:\n  epochs: 3\n  batch_size: 8\n  epochs: 5\n",
                       "latin1_yaml": "train:\n  epochs: 3  # \u00e9t\u00e9\n".encode("latin-1")}.items():
        (root / f"{name}.yaml").write_bytes(data)
        p[name] = root / f"{name}.yaml"
    (root / "config_dir.yaml").mkdir()
    p["config_dir"] = root / "config_dir.yaml"
    os.mkfifo(root / "fifo.yaml")
    p["fifo_yaml"] = root / "fifo.yaml"
    return p


def build_stream_faults(root: Path) -> dict[str, Path]:
    """Stream-mode inputs: a truncated JPEG among good ones, and a folder of large images."""
    p: dict[str, Path] = {}
    corrupt = folder(root / "stream_corrupt", per_class=4, size=(16, 16), splits=("train",))
    buf = io.BytesIO()
    _img(7, (64, 64)).save(buf, "JPEG", quality=90)
    (corrupt / "train" / "a" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    p["stream_corrupt"] = corrupt
    p["twelve"] = folder(root / "twelve", per_class=6, splits=("train",))
    return p


def build_runs(root: Path, pretrained: Path, finetuned: Path) -> dict[str, Path]:
    """Run folders damaged by hand, from a good pre-training and fine-tuning run: a checkpoint
    without its settings, with settings of the wrong type, weights of another architecture, no
    description, a bad epoch count; a semisup folder with a damaged plan, and one already used."""
    import shutil

    import torch

    p: dict[str, Path] = {}
    state = torch.load(pretrained / "checkpoint.pt", weights_only=True)
    variants = {
        "no_config": {k: v for k, v in state.items() if k != "config"},
        "text_config": {**state, "config": "nonsense"},
        "other_weights": {**state, "model": {k: v for k, v in state["model"].items() if "layer4" not in k}},
        "no_meta": {**state, "meta": None},
        "bad_epoch": {**state, "epoch": "x"},
    }
    for name, variant in variants.items():
        (root / name).mkdir()
        torch.save(variant, root / name / "checkpoint.pt")
        for f in ("backbone.pt", "backbone.json"):
            shutil.copy(pretrained / f, root / name / f)
        p[name] = root / name
    (root / "bad_plan").mkdir()
    (root / "bad_plan" / "semisup.yaml").write_text("finetune: 3\n")
    p["bad_plan"] = root / "bad_plan"
    (root / "used_recipe").mkdir()
    (root / "used_recipe" / "semisup.yaml").write_text("pretrained: null\n")
    p["used_recipe"] = root / "used_recipe"
    (root / "a_file").write_text("x")
    p["a_file"] = root / "a_file"
    p["pretrained"], p["finetuned"] = pretrained, finetuned
    return p
