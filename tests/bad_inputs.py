"""Malformed data, config and checkpoint files for tests/test_bad_input.py, built under a folder."""
from __future__ import annotations

import tarfile
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
