"""``selfsup report RUN``: one HTML page to judge a pre-training run by.

The page shows the loss, learning-rate, kNN and effective-rank curves of ``metrics.jsonl``,
the evaluation table (every ``eval_*.json`` beside the run, and its last epoch), a t-SNE map of
test-set features coloured by class, and a grid of test queries with their nearest training
images (cosine, as the kNN monitor ranks them). A source without labels or without a labelled
test split (a folder of unlabelled images) gets the label-free figures instead, on a seeded
sample of ``--points`` of its images: a 2-D map (PCA always, t-SNE beside it when the sample
has at most :data:`TSNE_MAX` images), seeded queries with their nearest neighbours, and the
most similar pairs (likely near-duplicates). The PNGs are written beside the page *and* embedded
in it as base64, so the HTML file alone can be mailed or archived. Figures use matplotlib
(``pip install 'selfsup[report]'``) with its Agg backend: no display needed.

Odd input files do not stop the report: a line of ``metrics.jsonl`` that is not a JSON object
(cut short by a kill, say) with a whole-number ``epoch`` and a numeric ``loss``, is left out,
and so is a value there that is not a number, and an ``eval_*.json`` that is not an object with
a numeric ``top1``; each is named (file and line) in a note on stderr and on the page. The
trainer's text fields (:data:`runs.TEXT_FIELDS`) are read silently and shown as text.
Non-finite values (NaN, inf) are shown as they are, with a note. A ``metrics.jsonl`` with no
usable line, and an ``--out`` that is a folder or cannot be written, are one-line errors.
"""
from __future__ import annotations

import base64
import html
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .data import DataError, load_data
from .device import resolve_device
from .errors import CheckpointError, ConfigError, TrainingError
from .embeddings import Listing, list_images
from .evaluate import extract_features, nearest_neighbours
from .files import write_atomic, write_text_atomic
from .runs import EVAL_GLOB, METRICS, is_number, load_backbone, read_metrics

TSNE_MAX = 5000  # t-SNE beside PCA up to this many points; above, PCA alone (t-SNE is O(n log n) but slow)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("selfsup report needs matplotlib: pip install matplotlib "
                          "(or pip install 'selfsup[report]')") from None
    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt
    return plt


def _read_eval(path: Path, notes: list[str]) -> dict | None:
    """An ``eval_*.json`` result, or None (with a note) when it is not one."""
    try:
        e = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:
        notes.append(f"{path} is not readable JSON ({getattr(err, 'strerror', None) or str(err)[:80]}); left out")
        return None
    if not isinstance(e, dict) or not is_number(e.get("top1")):
        what = f"top1={e.get('top1')!r}" if isinstance(e, dict) else f"a JSON {type(e).__name__}"
        notes.append(f"{path} is not an evaluation result (an object with a numeric top1; got {what}); left out")
        return None
    if not math.isfinite(e["top1"]):
        notes.append(f"{path}: top1={e['top1']} (not finite)")
    return e


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot become the page before any work is done."""
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; pass the HTML file to write, e.g. {out / 'index.html'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out '{out}' lies under '{parent}', which is a file, not a folder")


def _curves(plt, rows: list[dict], path: Path) -> None:
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    panels = [("loss", "training loss"), ("lr", "learning rate (end of epoch)"), ("knn_top1", "kNN top-1 (%)"),
              ("effective_rank", "effective rank (collapse monitor)")]
    for ax, (key, title) in zip(axes, panels):
        pts = [(e, r[key]) for e, r in zip(epochs, rows) if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(plt, fig, path)


def _tsne(plt, features: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, seed: int) -> None:
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, init="pca", perplexity=float(min(30, len(features) - 1)),
              random_state=seed).fit_transform(features)  # (n, 2)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        m = labels == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(c % cmap.N), label=name)
    ax.set_title(f"t-SNE of {len(features)} test-set features")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=8, loc="best", ncols=2 if len(classes) > 10 else 1)
    fig.tight_layout()
    _savefig(plt, fig, path)


def _image_grid(plt, rows: list[list[tuple[np.ndarray, str, str]]], path: Path) -> None:
    """One row of images per list, each cell (image, title, frame colour); the first is the query."""
    width = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(1.3 * width, 1.45 * len(rows)), squeeze=False)
    for r, cells in enumerate(rows):
        for j in range(width):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(cells):
                ax.axis("off")
                continue
            img, title, colour = cells[j]
            ax.imshow(img, interpolation="nearest")
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(1 if j == 0 else 2.5)
            ax.set_title(title, fontsize=7, color=colour)
    fig.tight_layout()
    _savefig(plt, fig, path)


def _neighbour_grid(plt, queries: np.ndarray, q_labels: np.ndarray, neighbours: np.ndarray,
                    n_labels: np.ndarray, classes: list[str], path: Path) -> None:
    """Rows: a query test image, then its k nearest training images (green: same class)."""
    _image_grid(plt, [[(queries[r], f"query: {classes[q_labels[r]]}", "black")]
                      + [(img, classes[label], "green" if label == q_labels[r] else "red")
                         for img, label in zip(neighbours[r], n_labels[r])] for r in range(len(queries))], path)


def _short(path: str, n: int = 16) -> str:
    return path if len(path) <= n else "…" + path[-(n - 1):]


def _label_free(plt, backbone, spec, listing: Listing, figures: Path, *, device: torch.device, points: int,
                queries: int, k: int, seed: int) -> list[str]:
    """The figures that need no labels, on a seeded sample of ``points`` images of ``listing``:
    a 2-D map, seeded queries with their nearest neighbours, and the most similar pairs."""
    if not len(listing):
        raise DataError(f"no images in {listing.where}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(listing), min(points, len(listing)), replace=False)).tolist()
    rows, chunks = [], []
    for r, b in listing.batches(spec.data_image_size or spec.image_size, 256, idx, skip_corrupt=True):
        rows, chunks = rows + r, chunks + [b]
    if not chunks:
        raise DataError(f"none of the sampled images of {listing.where} could be decoded (first: {listing.skipped[0]})")
    images = np.concatenate(chunks)  # (n, S, S, 3)
    paths = [listing.paths[i] for i in rows]
    feats = extract_features(backbone, images, size=spec.image_size, mean=spec.mean, std=spec.std,
                             device=device)  # (n, D)
    n = len(images)
    xy = feats.cpu().numpy().astype(np.float64)
    xy -= xy.mean(0)
    maps = [("PCA", xy @ np.linalg.svd(xy, full_matrices=False)[2][:2].T)]  # (n, 2): the top two components
    if 3 <= n <= TSNE_MAX:
        from sklearn.manifold import TSNE
        maps.append(("t-SNE", TSNE(n_components=2, init="pca", perplexity=float(min(30, n - 1)),
                                   random_state=seed).fit_transform(xy)))
    fig, axes = plt.subplots(1, len(maps), figsize=(6.5 * len(maps), 6), squeeze=False)
    for ax, (name, pts) in zip(axes[0], maps):
        ax.scatter(pts[:, 0], pts[:, 1], s=6)
        ax.set_title(f"{name} of {n} images' features")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    _savefig(plt, fig, figures / "map.png")
    which = " and ".join(name for name, _ in maps)
    why = "" if len(maps) > 1 else f" (t-SNE only up to {TSNE_MAX} images)" if n > TSNE_MAX else ""
    html_parts = [_embed(figures / "map.png", f"{which} map of the features of {n} images, no labels{why}")]
    if listing.skipped:
        html_parts.append(f"<p>{len(listing.skipped)} sampled image(s) could not be decoded and are left out: "
                          f"{html.escape(', '.join(listing.skipped[:5]))}{', ...' if len(listing.skipped) > 5 else ''}</p>")
    if n < 2:
        return html_parts + ["<p>One image only: no neighbours and no pairs.</p>"]

    sims, nn = nearest_neighbours(feats, feats, k=min(k, n - 1) + 1)  # (n, k+1): itself among them
    sims, nn = sims.cpu().numpy(), nn.cpu().numpy()
    others = [[(j, s) for j, s in zip(nn[i], sims[i]) if j != i][:k] for i in range(n)]  # (n, <=k)
    rows = [[(images[q], f"query: {_short(paths[q])}", "black")]
            + [(images[j], f"{s:.3f}", "steelblue") for j, s in others[q]]
            for q in sorted(rng.choice(n, min(queries, n), replace=False).tolist())]
    _image_grid(plt, rows, figures / "neighbours.png")
    pairs = sorted({(min(i, j), max(i, j)): s for i in range(n) for j, s in others[i][:1]}.items(),
                   key=lambda p: -p[1])[:queries]  # each image's nearest other, the closest first
    _image_grid(plt, [[(images[i], _short(paths[i]), "black"), (images[j], f"{s:.3f}", "steelblue")]
                      for (i, j), s in pairs], figures / "pairs.png")
    table = _table(["cosine similarity", "image", "image"], [[float(s), paths[i], paths[j]] for (i, j), s in pairs])
    return html_parts + [
        _embed(figures / "neighbours.png", f"{len(rows)} seeded query images and their {k} nearest neighbours "
                                           "(cosine similarity above each)"),
        _embed(figures / "pairs.png", "the most similar pairs of images (likely near-duplicates)"),
        f"<p>The most similar pairs among the {n} images:</p>{table}"]


def _savefig(plt, fig, path: Path) -> None:
    try:
        write_atomic(path, lambda f: fig.savefig(f, dpi=90, format="png"))  # a failed write keeps the old figure
    except OSError as e:
        raise TrainingError(f"cannot write the report's figure '{path}': {e.strerror or e}") from None
    finally:
        plt.close(fig)


def _embed(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption>' \
           f'{html.escape(alt)} ({html.escape(path.name)})</figcaption></figure>'


def _table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(run: str | Path, *, out: str | Path | None = None, data: str | None = None,
                 points: int = 2000, queries: int = 8, k: int = 8, device: str = "auto",
                 seed: int = 0) -> Path:
    """Write ``<run>/report/index.html`` (or ``out``) with its PNGs beside it; returns the page."""
    for name, value, low in (("--points", points, 2), ("--queries", queries, 1), ("--k", k, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    plt = _pyplot()
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"run folder '{run}' does not exist")
    notes: list[str] = []
    rows = read_metrics(run, notes)
    out = Path(out) if out else run / "report" / "index.html"
    _check_out(out)
    figures = out.parent
    try:
        figures.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the report's folder '{figures}': {e.strerror or e}") from None
    _curves(plt, rows, figures / "curves.png")
    sections = [_embed(figures / "curves.png", "loss, learning rate and kNN top-1 per epoch")]

    backbone, spec = load_backbone(run)
    source = data or spec.data
    dev = resolve_device(device)
    backbone.to(dev)
    try:
        splits = load_data(source, image_size=spec.data_image_size)
    except DataError:  # not a labelled layout (a folder of unlabelled images, say): listed below instead
        splits = None
    if splits is None or splits.test is None or len(splits.train.classes) < 2:
        sections.append(f"<p>'{html.escape(str(source))}' has no labels or no labelled test split: the map "
                        f"coloured by class and the test queries' neighbours with their classes, which need "
                        f"them, are left out. Shown instead, without labels:</p>")
        sections += _label_free(plt, backbone, spec, list_images(str(source), image_size=spec.data_image_size),
                                figures, device=dev, points=points, queries=queries, k=k, seed=seed)
    else:
        kw = dict(size=spec.image_size, mean=spec.mean, std=spec.std, device=dev)
        rng = np.random.default_rng(seed)
        test_idx = np.sort(rng.choice(len(splits.test), min(points, len(splits.test)), replace=False))
        test_images = np.asarray(splits.test.images[test_idx])              # (n, H, W, 3) uint8
        test_labels = np.asarray(splits.test.labels)[test_idx]
        test_f = extract_features(backbone, test_images, **kw)              # (n, D)
        train_f = extract_features(backbone, splits.train.images, **kw)     # (N, D)
        _tsne(plt, test_f.cpu().numpy(), test_labels, splits.train.classes, figures / "tsne.png", seed)
        pick = rng.choice(len(test_idx), min(queries, len(test_idx)), replace=False)
        _, nn_idx = nearest_neighbours(train_f, test_f[torch.as_tensor(pick, device=dev)], k=k)  # (q, k)
        nn_idx = nn_idx.cpu().numpy()
        train_labels = np.asarray(splits.train.labels)
        _neighbour_grid(plt, test_images[pick], test_labels[pick], np.asarray(splits.train.images[nn_idx.ravel()])
                        .reshape(*nn_idx.shape, *test_images.shape[1:]), train_labels[nn_idx],
                        splits.train.classes, figures / "neighbours.png")
        sections += [_embed(figures / "tsne.png", "t-SNE map of test-set features, coloured by class"),
                     _embed(figures / "neighbours.png", f"test queries and their {k} nearest training "
                                                        f"images (green: same class)")]

    evals = []
    for path in sorted(run.glob(EVAL_GLOB)):
        if (e := _read_eval(path, notes)) is None:
            continue
        details = ", ".join(f"{key}={e[key]}" for key in ("linear_protocol", "features", "k", "t", "epochs", "lr")
                            if key in e)
        evals.append([path.name, e.get("protocol", "?"), e.get("top1", float("nan")), details,
                      "yes" if e.get("random_init") else "no"])
    notes_html = ("<h2>Notes on the input files</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                  + "</ul>") if notes else ""
    last = rows[-1]
    if "knn_top1" in last:
        evals.append([f"{METRICS} (last epoch)", "knn (monitor)", last["knn_top1"],
                      f"epoch {last['epoch']}, features={last.get('knn_features', 'backbone')}", "no"])
    if "linear_top1" in last:
        evals.append([f"{METRICS} (last epoch)", "linear (online probe)", last["linear_top1"],
                      f"epoch {last['epoch']}", "no"])
    summary = _table(["epoch", "loss", "kNN top-1", "images/s", "feature std", "effective rank"],
                     [[r["epoch"], r["loss"], r.get("knn_top1", "-"), r.get("images_per_s", "-"),
                       r.get("feature_std", "-"), r.get("effective_rank", "-")] for r in rows[-1:]])
    title = f"{spec.method or '?'} / {spec.backbone} (width {spec.width:g}) on {spec.data or '?'}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>selfsup report: {html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:4px 10px;text-align:left}}
img{{max-width:100%}}figure{{margin:1.5em 0}}figcaption{{color:#555;font-size:90%}}</style></head>
<body><h1>selfsup report</h1><p>{html.escape(title)}; run folder <code>{html.escape(str(run))}</code>,
{len(rows)} epoch(s) logged.</p>
<h2>Last epoch</h2>{summary}
<h2>Evaluations</h2>{_table(["source", "protocol", "top-1 (%)", "settings", "random init"], evals)
                     if evals else "<p>none yet: run selfsup eval knn|linear --checkpoint RUN</p>"}
<h2>Figures</h2>{"".join(sections)}
{notes_html}
</body></html>
"""
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        write_text_atomic(page, out)
    except OSError as e:
        raise TrainingError(f"cannot write the report '{out}': {e.strerror or e}") from None
    return out
