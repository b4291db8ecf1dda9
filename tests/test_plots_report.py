"""Figures and report.md: each plot draws real content, the report shows every number correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dhf_cache.errors import UsageError
from dhf_cache.reports.plots import (
    CORRECT_COLOUR,
    NEUTRAL_COLOUR,
    WRONG_COLOUR,
    draw_correspondences,
    plot_category_bars,
    plot_mixing_weights,
    plot_pck_table,
    short_layer_name,
)
from dhf_cache.reports.report import render_report, write_report

LAYERS = [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]
TIMESTEPS = [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _count_near(arr: np.ndarray, colour, tol: int = 12) -> int:
    return int((np.abs(arr.astype(int) - np.array(colour)).max(axis=-1) <= tol).sum())


def test_short_layer_names():
    assert short_layer_name("up_blocks.0.resnets.1") == "up0.r1"
    assert short_layer_name("down_blocks.3.resnets.0") == "down3.r0"
    assert short_layer_name("mid_block.resnets.1") == "mid.r1"
    assert short_layer_name("up_blocks.2.attentions.2") == "up2.a2"


def test_mixing_weights_heatmap(tmp_path):
    logits = torch.randn(len(TIMESTEPS) * len(LAYERS), generator=torch.Generator().manual_seed(0))
    table = torch.softmax(logits, 0).view(len(TIMESTEPS), len(LAYERS))
    path = plot_mixing_weights(table, LAYERS, TIMESTEPS, tmp_path / "fig" / "mixing.png", title="run x")
    arr = _rgb(path)
    h, w = arr.shape[:2]
    assert w > h > 300  # 12 layer columns are wider than 11 timestep rows
    assert abs(w / h - (0.6 * 12 + 2.2) / (0.42 * 11 + 1.8)) < 0.05
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 100  # a colour map and text, not a blank canvas
    assert _count_near(arr, (68, 1, 84), tol=20) > 50  # viridis' darkest cells are drawn


def test_mixing_weights_shape_must_fit_labels(tmp_path):
    with pytest.raises(UsageError, match=r"does not fit 11 timesteps x 12 layers"):
        plot_mixing_weights(np.ones((12, 11)), LAYERS, TIMESTEPS, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_pck_table_marks_the_best_cell(tmp_path):
    table = np.full((3, 4), 0.2).tolist()
    table[1][2] = 0.7
    table[0][0] = None  # not evaluated: left blank
    layers, steps = LAYERS[:4], [-1, 300, 800]
    arr = _rgb(plot_pck_table(table, layers, steps, tmp_path / "raw.png", "bbox@0.1 per point"))
    assert arr.shape[1] >= 4 * 0.6 * 100
    assert _count_near(arr, (0, 255, 255), tol=30) > 40  # the cyan box around the best cell
    with pytest.raises(UsageError, match="every cell is empty"):
        plot_pck_table([[None] * 4] * 3, layers, steps, tmp_path / "empty.png", "m")


def test_category_bars(tmp_path):
    metrics = {
        "pck": {"bbox@0.1": {"per_point": 0.5, "per_image": 0.4, "per_category_mean": 0.45}},
        "categories": {
            "cat": {"bbox@0.1": {"per_point": 0.8, "per_image": 0.7, "n_pairs": 3, "n_points": 20}},
            "dog": {"bbox@0.1": {"per_point": 0.2, "per_image": 0.3, "n_pairs": 2, "n_points": 10}},
            "bus": {"bbox@0.1": {"per_point": None, "per_image": None, "n_pairs": 0, "n_points": 0}},
        },
    }
    arr = _rgb(plot_category_bars(metrics, tmp_path / "bars.png"))
    assert _count_near(arr, (76, 114, 176), tol=4) > 500  # the bars
    assert _count_near(arr, (221, 132, 82), tol=30) > 50  # the overall line
    with pytest.raises(UsageError, match=r"key 'img@0.1': not in these metrics; they hold bbox@0.1"):
        plot_category_bars(metrics, tmp_path / "x.png", key="img@0.1")


def test_draw_correspondences_colours_lines_and_scales(tmp_path):
    a = Image.new("RGB", (64, 48), (128, 128, 128))
    b = Image.new("L", (80, 64), 90)  # another mode and size: converted and scaled to one height
    src = np.array([[10.0, 10.0], [50.0, 40.0], [30.0, 20.0]])
    trg = np.array([[20.0, 10.0], [60.0, 50.0], [np.nan, np.nan]])  # the third match failed
    out = draw_correspondences(a, b, src, trg, correct=[True, False, True], path=tmp_path / "m.png")
    assert out.size == (round(64 * 256 / 48) + 256 * 80 // 64, 256)
    saved = _rgb(tmp_path / "m.png")
    assert saved.shape == (256, out.size[0], 3)
    sa, sb = 256 / 48, 256 / 64
    for (p, q), colour in zip([(src[0], trg[0]), (src[1], trg[1])], [CORRECT_COLOUR, WRONG_COLOUR]):
        x0, y0 = p * sa
        x1, y1 = np.array([64 * sa, 0]) + q * sb
        mx, my = round((x0 + x1) / 2), round((y0 + y1) / 2)
        patch = saved[my - 1:my + 2, mx - 1:mx + 2]
        assert _count_near(patch, colour, tol=0) >= 3, (colour, patch)
    assert _count_near(saved, NEUTRAL_COLOUR, tol=0) == 0
    assert _count_near(saved, CORRECT_COLOUR, tol=0) > 100 and _count_near(saved, WRONG_COLOUR, tol=0) > 100
    neutral = np.asarray(draw_correspondences(a, b, src[:2], trg[:2]))
    assert _count_near(neutral, NEUTRAL_COLOUR, tol=0) > 100 and _count_near(neutral, CORRECT_COLOUR, tol=0) == 0
    with pytest.raises(UsageError, match="2 correct flags for 3 points"):
        draw_correspondences(a, b, src, trg, correct=[True, False])


METRICS = {
    "n_pairs": 30, "n_points": 340,
    "pck": {
        "bbox@0.1": {"per_point": 0.6123, "per_image": 0.5987, "per_category_mean": 0.5871, "n_pairs": 29, "n_points": 330},
        "bbox@0.05": {"per_point": 0.4012, "per_image": 0.3955, "per_category_mean": None, "n_pairs": 29, "n_points": 330},
        "img@0.1": {"per_point": 0.7234, "per_image": 0.7111, "per_category_mean": 0.7049, "n_pairs": 30, "n_points": 340},
    },
    "categories": {
        "cat": {"bbox@0.1": {"per_point": 0.7, "per_image": 0.65, "n_pairs": 20, "n_points": 240},
                "bbox@0.05": {"per_point": 0.5, "per_image": 0.45, "n_pairs": 20, "n_points": 240},
                "img@0.1": {"per_point": 0.8, "per_image": 0.75, "n_pairs": 20, "n_points": 240},
                "n_pairs": 20, "n_points": 240},
        "aeroplane": {"bbox@0.1": {"per_point": None, "per_image": None, "n_pairs": 0, "n_points": 0},
                      "bbox@0.05": {"per_point": None, "per_image": None, "n_pairs": 0, "n_points": 0},
                      "img@0.1": {"per_point": 0.333, "per_image": 0.3, "n_pairs": 10, "n_points": 100},
                      "n_pairs": 10, "n_points": 100},
    },
    "skipped": {"empty_pairs": 1, "invalid_bbox_pairs": 1},
    "fingerprints": {"checkpoint": "c" * 64, "cache": {"feature_space": "f" * 64, "preprocessing": "p" * 64, "spec": "s" * 64}},
    "options": {"split": "test", "alphas": [0.05, 0.1], "load_size": 224, "refine": "none", "limit_per_category": None,
                "descriptor": "checkpoint runs/x"},
    "feature_source": "inversion", "notes": ["a note for the reader"], "descriptors": {"computed": 12, "reused": 3},
}


def _row(text: str, first_cell: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_has_every_key_and_averaging(tmp_path):
    path = write_report(tmp_path, METRICS)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    header = _row(text, "averaging")
    assert header == ["averaging", "bbox@0.05", "bbox@0.1", "img@0.1"]  # bbox first, then by alpha
    assert _row(text, "per point") == ["per point", "40.1", "61.2", "72.3"]
    assert _row(text, "per image") == ["per image", "39.6", "59.9", "71.1"]
    assert _row(text, "per category") == ["per category", "–", "58.7", "70.5"]
    assert "reference implementation's average" in text
    assert "unweighted mean over categories" in text


def test_report_categories_protocol_fingerprints():
    text = render_report(METRICS)
    assert _row(text, "category") == ["category", "bbox@0.05", "bbox@0.1", "img@0.1", "n_pairs", "n_points"]
    assert _row(text, "aeroplane") == ["aeroplane", "–", "–", "33.3", "10", "100"]
    assert _row(text, "cat") == ["cat", "50.0", "70.0", "80.0", "20", "240"]
    assert text.index("| aeroplane |") < text.index("| cat |")
    for expected in ("load size: 224 px", "refine: `none`", "alphas: 0.05, 0.1", "split: `test`",
                     "pairs: 30", "points: 340", "| empty_pairs | 1 |", "| invalid_bbox_pairs | 1 |",
                     "checkpoint: `" + "c" * 64 + "`", "cache feature_space: `" + "f" * 64 + "`",
                     "cache spec: `" + "s" * 64 + "`", "a note for the reader", "12 computed, 3 reused",
                     "descriptor: `checkpoint runs/x`"):
        assert expected in text, expected
    assert "None" not in text and "nan" not in text


def test_report_raw_table_marks_the_best(tmp_path):
    raw = {"layers": LAYERS[:3], "timesteps": [-1, 300], "metric": "bbox@0.1 per point",
           "pck": [[0.1, 0.25, None], [0.3, 0.55, 0.2]],
           "best": {"layer": LAYERS[1], "timestep": 300, "pck": 0.55}}
    text = write_report(tmp_path / "sub" / "r.md", METRICS, raw_table=raw).read_text()
    assert _row(text, "t \\ layer") == ["t \\ layer", "up0.r0", "up0.r1", "up0.r2"]
    assert _row(text, "-1") == ["-1", "10.0", "25.0", "–"]
    assert _row(text, "300") == ["300", "30.0", "**55.0** ★", "20.0"]
    assert text.count("★") == 2  # the cell and the line naming it
    assert "Best (★): `up_blocks.0.resnets.1` at t = 300: 55.0%" in text
    assert "(bbox@0.1 per point, %)" in text
    with pytest.raises(UsageError, match="2 rows"):
        render_report(METRICS, {**raw, "pck": [[0.1, 0.2, 0.3]]})


def test_report_refuses_metrics_without_pck():
    with pytest.raises(UsageError, match="no 'pck' section"):
        render_report({"n_pairs": 3})
