"""Figures for papers and reports: mixing-weight and PCK heatmaps, per-category bars, matches.

matplotlib is imported inside each function to keep `import dhf_cache` light, and only its
object API is used (`Figure` rendered by the Agg canvas): no pyplot state, no display, safe to
call from any thread. The correspondence drawing needs only PIL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dhf_cache.errors import UsageError
from dhf_cache.correspondence.points import as_points

CORRECT_COLOUR = (0, 200, 0)
WRONG_COLOUR = (230, 0, 0)
NEUTRAL_COLOUR = (255, 200, 0)

_SHORT = ((r"^up_blocks\.(\d+)", r"up\1"), (r"^down_blocks\.(\d+)", r"down\1"), (r"^mid_block", "mid"),
          (r"\.resnets\.(\d+)", r".r\1"), (r"\.attentions\.(\d+)", r".a\1"))


def short_layer_name(name: str) -> str:
    """`up_blocks.0.resnets.1` -> `up0.r1` (axis labels must fit 12 layers side by side)."""
    for pattern, repl in _SHORT:
        name = re.sub(pattern, repl, name)
    return name


def _figure(width: float, height: float):
    """A new matplotlib Figure on the Agg canvas (PNG without a display or pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _as_table(table, layer_names: Sequence[str], timesteps: Sequence[int], what: str) -> np.ndarray:
    """(T, L) float array, None -> NaN; refuses a shape that does not fit the labels."""
    if hasattr(table, "detach"):
        table = table.detach().cpu().numpy()
    rows = [[np.nan if v is None else float(v) for v in row] for row in table]
    arr = np.asarray(rows, dtype=np.float64)
    if arr.ndim != 2 or arr.shape != (len(timesteps), len(layer_names)):
        raise UsageError(
            f"{what}: table of shape {arr.shape} does not fit {len(timesteps)} timesteps x "
            f"{len(layer_names)} layers; pass a (T, L) table, rows = timesteps"
        )
    return arr


def _heatmap(arr: np.ndarray, layer_names, timesteps, colorbar_label: str, title: str | None,
             cmap: str, annotate: str | None):
    n_t, n_l = arr.shape
    fig = _figure(max(4.0, 0.6 * n_l + 2.2), max(3.0, 0.42 * n_t + 1.8))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_l), [short_layer_name(n) for n in layer_names], rotation=60, ha="right")
    ax.set_yticks(range(n_t), [str(t) for t in timesteps])
    ax.set_xlabel("layer")
    ax.set_ylabel("UNet timestep t (clean at top)")
    if title:
        ax.set_title(title)
    if annotate is not None and n_t * n_l <= 400:
        finite = arr[np.isfinite(arr)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(n_t):
            for j in range(n_l):
                if np.isfinite(arr[i, j]):
                    ax.text(j, i, format(arr[i, j], annotate), ha="center", va="center", fontsize=7,
                            color="white" if arr[i, j] < middle else "black")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return fig, ax


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def plot_mixing_weights(table, layer_names: Sequence[str], timesteps: Sequence[int], path: str | Path,
                        title: str | None = None) -> Path:
    """The paper's figure: softmaxed mixing weights as a timestep x layer heatmap.

    `table` is (T, L) from `AggregationNetwork.mixing_weights_table()` (rows clean first),
    `timesteps` the UNet t of each row (-1, 60, ..., 960). Weights are shown in percent of the
    total, so a uniform network reads 100 / (L*T) everywhere.
    """
    arr = _as_table(table, layer_names, timesteps, "mixing weights") * 100.0
    fig, _ = _heatmap(arr, layer_names, timesteps, "mixing weight (% of total)",
                      title or "Aggregation mixing weights", "viridis", ".1f" if arr.size <= 160 else None)
    return _save(fig, path)


def plot_pck_table(table, layer_names: Sequence[str], timesteps: Sequence[int], path: str | Path,
                   metric_label: str) -> Path:
    """PCK of each single (layer, timestep) map from the `--raw best` sweep, best cell boxed.

    `table` is (T, L) fractions in [0, 1] (None where a cell was not evaluated).
    """
    fractions = _as_table(table, layer_names, timesteps, "PCK table")
    if not np.isfinite(fractions).any():
        raise UsageError("PCK table: every cell is empty (None/NaN); nothing to plot")
    arr = fractions * 100.0
    fig, ax = _heatmap(arr, layer_names, timesteps, f"PCK (%) - {metric_label}",
                       f"Single layer x timestep: {metric_label}", "magma", ".0f")
    # the first maximum of the unscaled table in row-major order: report.best_cell's tie rule
    # (scaling by 100 first could round two values into a tie)
    i, j = np.unravel_index(np.nanargmax(fractions), fractions.shape)
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2.5))
    ax.set_title(f"Single layer x timestep: {metric_label}\nbest {short_layer_name(layer_names[j])} "
                 f"at t={timesteps[i]}: {arr[i, j]:.1f}%")
    return _save(fig, path)


def plot_category_bars(metrics: dict, path: str | Path, key: str = "bbox@0.1") -> Path:
    """Per-category PCK (per point) as bars, the overall per-point PCK as a dashed line.

    `metrics` is eval's metrics.json dict. Categories with nothing to average show no bar and "–".
    """
    overall = metrics.get("pck", {}).get(key)
    if overall is None:
        raise UsageError(f"key {key!r}: not in these metrics; they hold {', '.join(metrics.get('pck', {})) or 'none'}")
    categories = sorted(metrics.get("categories", {}))
    values = [(metrics["categories"][c].get(key) or {}).get("per_point") for c in categories]
    fig = _figure(max(4.0, 0.55 * len(categories) + 2.0), 4.0)
    ax = fig.subplots()
    x = np.arange(len(categories))
    heights = [100.0 * v if v is not None else 0.0 for v in values]
    bars = ax.bar(x, heights, color="#4c72b0")
    for bar, v in zip(bars, values):
        label = f"{100 * v:.1f}" if v is not None else "–"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, label, ha="center", va="bottom", fontsize=8)
    if overall.get("per_point") is not None:
        ax.axhline(100.0 * overall["per_point"], color="#dd8452", linestyle="--",
                   label=f"all points: {100 * overall['per_point']:.1f}")
        ax.legend(loc="upper right")
    ax.set_xticks(x, categories, rotation=45, ha="right")
    ax.set_ylim(0, 118)  # headroom for the labels and the legend above a 100% bar
    ax.set_ylabel(f"PCK {key} (%, per point)")
    ax.set_title(f"PCK {key} per category")
    return _save(fig, path)


def _points(points, what: str) -> np.ndarray:
    try:
        return as_points(points, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def draw_correspondences(src_image: Image.Image, trg_image: Image.Image, src_points, trg_points,
                         correct=None, path: str | Path | None = None, height: int | None = None) -> Image.Image:
    """Both images side by side at one height, a line from each source point to its match.

    Lines are green where `correct` is True, red where False, amber when `correct` is None.
    Points are [x, y] in each image's own pixels; pairs with a non-finite point are not drawn.
    `height` defaults to the taller image's, kept within [256, 1024] so lines stay visible.
    """
    src_pts, trg_pts = _points(src_points, "source points"), _points(trg_points, "target points")
    if src_pts.shape != trg_pts.shape:
        raise UsageError(f"draw_correspondences: {len(src_pts)} source points but {len(trg_pts)} target points")
    if correct is not None:
        correct = np.asarray(correct, dtype=bool).reshape(-1)
        if correct.shape[0] != src_pts.shape[0]:
            raise UsageError(f"draw_correspondences: {correct.shape[0]} correct flags for {src_pts.shape[0]} points")
    images = [im.convert("RGB") for im in (src_image, trg_image)]
    height = int(height or min(max(images[0].height, images[1].height, 256), 1024))
    scales = [height / im.height for im in images]
    resized = [im.resize((max(1, round(im.width * s)), height), Image.BILINEAR) for im, s in zip(images, scales)]
    canvas = Image.new("RGB", (resized[0].width + resized[1].width, height), (255, 255, 255))
    canvas.paste(resized[0], (0, 0))
    canvas.paste(resized[1], (resized[0].width, 0))
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(height / 256))
    radius = 2 * width + 1
    for k in range(src_pts.shape[0]):
        if not (np.isfinite(src_pts[k]).all() and np.isfinite(trg_pts[k]).all()):
            continue
        colour = NEUTRAL_COLOUR if correct is None else (CORRECT_COLOUR if correct[k] else WRONG_COLOUR)
        a = (src_pts[k, 0] * scales[0], src_pts[k, 1] * scales[0])
        b = (resized[0].width + trg_pts[k, 0] * scales[1], trg_pts[k, 1] * scales[1])
        draw.line([a, b], fill=colour, width=width)
        for x, y in (a, b):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(255, 255, 255))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path, format="PNG")
    return canvas


def plot_compare(result: dict, path: str | Path) -> Path:
    """`dhf-cache compare`: A - B per category and overall, with paired 95% intervals as error bars."""
    names = ["all"] + sorted(result["categories"])
    entries = [result["overall"]] + [result["categories"][c] for c in names[1:]]
    diffs = np.array([100.0 * e["difference"] if e["difference"] is not None else np.nan for e in entries])
    lo = np.array([100.0 * e["ci95"][0] if e.get("ci95") else np.nan for e in entries])
    hi = np.array([100.0 * e["ci95"][1] if e.get("ci95") else np.nan for e in entries])
    fig = _figure(6.0, max(2.5, 0.35 * len(names) + 1.2))
    ax = fig.subplots()
    y = np.arange(len(names))[::-1]
    colors = ["#4c72b0" if d >= 0 else "#dd8452" for d in np.nan_to_num(diffs)]
    ax.barh(y, np.nan_to_num(diffs), color=colors)
    ax.errorbar(np.nan_to_num(diffs), y, xerr=[np.nan_to_num(diffs - lo), np.nan_to_num(hi - diffs)], fmt="none",
                ecolor="black", capsize=3, linewidth=1)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(y, names)
    ax.set_xlabel(f"A − B, PCK {result['rule']} (percentage points)")
    ax.set_title("A − B with paired 95% bootstrap intervals")
    return _save(fig, path)
