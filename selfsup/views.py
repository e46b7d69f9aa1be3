"""``selfsup views``: a few training images next to the views a method makes of them (issue 25 §3).

Each row is one image: first as decoded (after ``data.image_size``), then ``views`` random views
drawn by the method's own augmentations, its recipe with the ``aug.*`` overrides, as training
draws them (column j is the method's view j, cycling: BYOL's view 1, view 2, view 1, ...; DINO's
two global crops, then its local crops). The views are denormalised for display, and every tile
is scaled up (nearest neighbour) to a cell of at least :data:`MIN_CELL` pixels, so a user sees
what the model is asked to be invariant to before training on it.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import Config, ConfigError
from .feed import load_images
from .files import write_atomic
from .methods import check_config
from .train import build_method

#: The smallest side of a cell, in pixels: 32x32 views are drawn 3x larger.
MIN_CELL = 96
#: Pixels between cells and around the grid; the height of the header row of view names.
PAD, HEADER = 4, 14


def cell_side(view_side: int) -> int:
    """The side of a cell for views of ``view_side`` pixels: an integer zoom of it, >= MIN_CELL."""
    return view_side * max(1, math.ceil(MIN_CELL / view_side))


def grid_size(images: int, views: int, view_side: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid of ``images`` rows and ``1 + views`` columns."""
    cell = cell_side(view_side)
    return PAD + (1 + views) * (cell + PAD), HEADER + PAD + images * (cell + PAD)


def view_names(n: int, global_crops: int) -> list[str]:
    """The names of a method's ``n`` views, as the ``aug.*`` sections that reach them."""
    return [("view1", "view2")[i % 2] if i < global_crops else "local" for i in range(n)]


def draw_views(cfg: Config, *, images: int = 6, views: int = 4,
               seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """The images and their views: uint8 (N, H, W, 3) as decoded, V arrays uint8 (N, S_v, S_v, 3)
    (local crops are smaller), and the V column names."""
    if images < 1 or views < 1:
        raise ConfigError(f"--images and --views must be at least 1, got {images} and {views}")
    if cfg.data.stream:
        raise ConfigError("selfsup views reads in-memory sources: pass --set data.stream=false (and "
                          "data.image_size=N), on a small sample of the folder if it is large")
    check_config(cfg)
    data = load_images(cfg)
    method = build_method(cfg)
    augmentations = method.augmentations(data.size, data.mean, data.std)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.images), generator=generator)[:images].sort().values.numpy()  # (N,)
    batch = torch.from_numpy(np.ascontiguousarray(np.asarray(data.images)[pick]))  # (N, H, W, 3) uint8
    mean = torch.tensor(data.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(1, 3, 1, 1)
    drawn = []
    with torch.no_grad():
        for j in range(views):
            x = augmentations[j % len(augmentations)](batch, generator)  # (N, 3, S_v, S_v) normalised
            pixels = (x * std + mean).clamp_(0, 1).mul_(255).round_().to(torch.uint8)  # denormalised
            drawn.append(pixels.permute(0, 2, 3, 1).contiguous().numpy())  # (N, S_v, S_v, 3)
    names = view_names(len(augmentations), cfg.multicrop.global_crops)
    return batch.numpy(), drawn, [names[j % len(names)] for j in range(views)]


def _tile(image: np.ndarray, cell: int) -> Image.Image:
    """``image`` (H, W, 3) uint8 scaled to fit a ``cell`` square: enlarged by nearest neighbour
    (the pixels stay visible), shrunk by Lanczos."""
    h, w = image.shape[:2]
    zoom = cell / max(h, w)
    size = (max(1, round(w * zoom)), max(1, round(h * zoom)))
    return Image.fromarray(image).resize(size, Image.NEAREST if zoom >= 1 else Image.LANCZOS)


def render_grid(decoded: np.ndarray, drawn: list[np.ndarray], names: list[str]) -> Image.Image:
    """The grid of :func:`draw_views`' arrays as an RGB image of :func:`grid_size`."""
    side = max(v.shape[1] for v in drawn)
    cell = cell_side(side)
    canvas = Image.new("RGB", grid_size(len(decoded), len(drawn), side), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    for c, name in enumerate(["image", *(f"{n} ({v.shape[1]} px)" for n, v in zip(names, drawn))]):
        pen.text((PAD + c * (cell + PAD), 1), name, fill=(0, 0, 0))
    for r in range(len(decoded)):
        y = HEADER + PAD + r * (cell + PAD)
        for c, image in enumerate([decoded[r], *(v[r] for v in drawn)]):
            canvas.paste(_tile(image, cell), (PAD + c * (cell + PAD), y))
    return canvas


def write_views(cfg: Config, out: str | Path, *, images: int = 6, views: int = 4, seed: int = 0) -> Path:
    """Draw the grid of ``images`` x ``views`` for ``cfg`` and write it to ``out`` (a PNG, atomically)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out '{out}' must name a .png file")
    grid = render_grid(*draw_views(cfg, images=images, views=views, seed=seed))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write(buffer.getvalue()))
    return out
