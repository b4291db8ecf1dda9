"""`dhf-cache eval`: the protocol end to end, descriptor reuse, raw baselines, bad input, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL_NET, eval_args, invoke
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.datasets import open_dataset
from dhf_cache.correspondence.matching import match_points_reference



@pytest.fixture(scope="module")
def cache_copy(tmp_path_factory, train_cache) -> str:
    """A private copy of the training cache (eval writes descriptors into it)."""
    dst = tmp_path_factory.mktemp("eval-cache") / "cache.zarr"
    shutil.copytree(train_cache, dst)
    return str(dst)


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_copy, train_data) -> Path:
    out = tmp_path_factory.mktemp("eval-run") / "run"
    result = invoke("train", "--cache", cache_copy, "--dataset", f"spair:{train_data}", "--out", out, "--device",
                    "cpu", "--no-progress", "--steps", "30", "--val-every", "30", "--val-load-size", "64", *SMALL_NET)
    assert result.exit_code == 0, result.output
    return out


def test_checkpoint_eval_writes_every_output_and_reuses_descriptors(tmp_path, run, cache_copy, train_data):
    first = invoke(*eval_args(cache_copy, train_data, tmp_path / "a", "--checkpoint", run))
    assert first.exit_code == 0, first.output
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["descriptors"] == {"computed": 4, "reused": 0, "stored_in_cache": True}  # test split: 4 images
    second = invoke(*eval_args(cache_copy, train_data, tmp_path / "b", "--checkpoint", run, "--json"))
    assert second.exit_code == 0
    again = json.loads(second.stdout)
    assert again["descriptors"] == {"computed": 0, "reused": 4, "stored_in_cache": True}
    assert again["pck"] == metrics["pck"]  # stored fp16 descriptors give the same matches

    assert metrics["n_pairs"] == 4 and metrics["n_points"] > 0
    assert set(metrics["pck"]) == {f"{k}@{a}" for k in ("bbox", "img") for a in (0.05, 0.1, 0.15)}
    for values in metrics["pck"].values():
        assert set(values) == {"per_point", "per_image", "per_category_mean"}
        assert all(0 <= v <= 1 for v in values.values())
    assert set(metrics["categories"]) == {"cat", "person"}
    assert metrics["fingerprints"]["cache"] == FeatureCache.open(cache_copy).fingerprint
    assert len(metrics["fingerprints"]["checkpoint"]) == 64
    assert metrics["options"]["load_size"] == 64 and metrics["feature_source"] == "inversion"
    lines = [json.loads(l) for l in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert set(lines[0]) == {"pair", "category", "src_kps", "trg_kps", "pred_kps", "trg_bndbox", "trg_imsize", "flags"}
    assert len(lines[0]["pred_kps"]) == len(lines[0]["trg_kps"])
    for name in ("report.md", "pck_per_category.png", "mixing_weights.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert "per point" in (tmp_path / "a" / "report.md").read_text()
    drawings = sorted((tmp_path / "a" / "correspondences").glob("*.png"))
    assert len(drawings) == 4 and all(Image.open(p).size[0] > 64 for p in drawings)


def test_raw_baseline_follows_the_protocol_exactly(tmp_path, cache_copy, train_data):
    result = invoke(*eval_args(cache_copy, train_data, tmp_path, "--raw", "up_blocks.3.resnets.1@300"))
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(cache_copy)
    index = cache.index_of()
    pairs = {p.name: p for p in open_dataset(f"spair:{train_data}").pairs("test")}
    position = cache.timesteps.index(300)
    array = cache.feature_array("up_blocks.3.resnets.1")
    for line in (tmp_path / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        pair = pairs[row["pair"]]
        src = torch.from_numpy(array[index[pair.src], position].astype(np.float32))
        trg = torch.from_numpy(array[index[pair.trg], position].astype(np.float32))
        want = match_points_reference(src, trg, pair.src_kps, pair.src_size, pair.trg_size, 64)
        np.testing.assert_allclose(np.array(row["pred_kps"], dtype=float), want, atol=1.5)  # ties at borders
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["options"]["descriptor"] == "raw up_blocks.3.resnets.1@300"
    assert metrics["fingerprints"]["checkpoint"] is None and metrics["descriptors"] is None


def test_raw_best_sweeps_every_layer_and_timestep(tmp_path, cache_copy, train_data):
    result = invoke(*eval_args(cache_copy, train_data, tmp_path, "--raw", "best", "--limit-per-category", "1"))
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "raw_sweep.json").read_text())
    pck = np.array(table["pck"], dtype=float)
    assert pck.shape == (3, 12) and table["timesteps"] == [-1, 300, 800]
    assert table["best"]["pck"] == pytest.approx(np.nanmax(pck))
    best = table["best"]
    # chosen on the val split (the default), scored on test: the same as scoring that map by name
    assert table["selected_on"] == {"split": "val", "n_pairs": 2}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["options"]["select_split"] == "val" and "(chosen on the val split)" in metrics["options"]["descriptor"]
    assert metrics["n_pairs"] == 2  # one test pair per category
    named = invoke(*eval_args(cache_copy, train_data, tmp_path / "named", "--raw", f"{best['layer']}@{best['timestep']}",
                              "--limit-per-category", "1", "--drawings", "0"))
    assert named.exit_code == 0, named.output
    assert metrics["pck"] == json.loads((tmp_path / "named" / "metrics.json").read_text())["pck"]
    assert (tmp_path / "raw_sweep.png").stat().st_size > 0
    assert best["layer"] in (tmp_path / "report.md").read_text()
    # never chosen on the scored split
    same = invoke(*eval_args(cache_copy, train_data, tmp_path / "s", "--raw", "best", "--select-split", "test"))
    assert same.exit_code == 1 and "chosen on the pairs it is scored on" in same.output


def test_unknown_raw_layer_or_step_lists_the_valid_ones(tmp_path, cache_copy, train_data):
    out = tmp_path / "out"
    result = invoke(*eval_args(cache_copy, train_data, out, "--raw", "up_blocks.9.resnets.0@300"))
    assert result.exit_code == 1
    assert "up_blocks.3.resnets.2" in result.output and "timesteps: -1, 300, 800" in result.output
    result = invoke(*eval_args(cache_copy, train_data, out, "--raw", "up_blocks.0.resnets.0@260"))
    assert result.exit_code == 1 and "timestep 260 is not in the cache" in result.output
    result = invoke(*eval_args(cache_copy, train_data, out))
    assert result.exit_code == 1 and "exactly one of --checkpoint" in result.output
    result = invoke(*eval_args(cache_copy, train_data, out, "--checkpoint", tmp_path / "no-run"))
    assert result.exit_code == 1 and "no config.json there" in result.output
    assert not out.exists()  # refused before the output folder was made


def test_checkpoint_from_another_feature_space_is_refused_other_load_size_is_noted(
        tmp_path, run, train_data, tiny_model_dir):
    def build(cache, save_steps, load_size):
        return invoke("build", "--dataset", f"spair:{train_data}", "--split", "test", "--cache", cache,
                      "--model", tiny_model_dir, "--load-size", load_size, "--image-size", "64", "--steps", "10",
                      "--save-steps", save_steps, "--device", "cpu", "--no-progress")

    other_space = tmp_path / "other.zarr"
    assert build(other_space, "9,4,0", "64").exit_code == 0
    result = invoke(*eval_args(other_space, train_data, tmp_path / "x", "--checkpoint", run))
    assert result.exit_code == 1
    assert "does not fit the cache" in result.output and "save_steps" in result.output
    assert "timesteps [300]: not in the cache" in result.output
    assert not (tmp_path / "x").exists()

    other_load = tmp_path / "load48.zarr"
    assert build(other_load, "9,5,0", "48").exit_code == 0
    result = invoke(*eval_args(other_load, train_data, tmp_path / "y", "--checkpoint", run))
    assert result.exit_code == 0, result.output
    assert "other preprocessing than the training cache (allowed): load_size 64 -> 48" in result.output


def test_missing_test_images_are_listed(tmp_path, train_data, tiny_model_dir, run):
    cache = tmp_path / "partial.zarr"
    assert invoke("build", "--dataset", f"spair:{train_data}", "--split", "test", "--limit", "2", "--cache", cache,
                  "--model", tiny_model_dir, "--load-size", "64", "--image-size", "64", "--steps", "10",
                  "--save-steps", "9,5,0", "--device", "cpu", "--no-progress").exit_code == 0
    result = invoke(*eval_args(cache, train_data, tmp_path / "e", "--raw", "up_blocks.3.resnets.0@-1"))
    assert result.exit_code == 1
    assert "2 test images are not built" in result.output and "person/astronaut_" in result.output
    result = invoke(*eval_args(cache, train_data, tmp_path / "e", "--raw", "up_blocks.3.resnets.0@-1", "--skip-missing"))
    assert result.exit_code == 0 and json.loads((tmp_path / "e" / "metrics.json").read_text())["n_pairs"] == 2


def test_degenerate_keypoints_and_boxes_are_counted_not_fatal(tmp_path, train_data, tiny_model_dir):
    root = tmp_path / "mine"
    shutil.copytree(train_data / "JPEGImages", root / "imgs")
    a, b = "imgs/cat/chelsea_006.jpg", "imgs/cat/chelsea_007.jpg"
    w, h = Image.open(root / a).size
    pairs = {"pairs": [
        {"name": "normal", "src": a, "trg": b, "src_kps": [[10, 10], [30, 20]], "trg_kps": [[12, 11], [29, 22]],
         "category": "cat", "trg_bbox": [0, 0, w - 1, h - 1]},
        {"name": "outside", "src": a, "trg": b, "src_kps": [[-5, 10], [w + 40, 20]], "trg_kps": [[5, 5], [w + 30, 2]],
         "category": "cat"},
        {"name": "empty", "src": a, "trg": b, "src_kps": [], "trg_kps": [], "category": "cat"},
        {"name": "flat-box", "src": b, "trg": a, "src_kps": [[8, 8]], "trg_kps": [[9, 9]], "trg_bbox": [10, 10, 10, 10],
         "category": "dog"},
    ]}
    (root / "pairs.json").write_text(json.dumps(pairs))
    cache = tmp_path / "mine.zarr"
    build = invoke("build", "--dataset", f"pairs:{root / 'pairs.json'}", "--cache", cache, "--model", tiny_model_dir,
                   "--load-size", "64", "--image-size", "64", "--steps", "2", "--save-steps", "1,0", "--device",
                   "cpu", "--no-progress")
    assert build.exit_code == 0, build.output
    result = invoke("eval", "--cache", cache, "--dataset", f"pairs:{root / 'pairs.json'}", "--out", tmp_path / "e",
                    "--raw", "up_blocks.3.resnets.2@-1", "--load-size", "64", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_pairs"] == 4 and metrics["n_points"] == 5
    assert metrics["skipped"]["empty_pairs"] == 1
    assert metrics["skipped"]["invalid_bbox_pairs"] == 1
    assert metrics["skipped"]["gt_outside_image"] == 1
    assert metrics["categories"]["dog"]["bbox@0.1"]["per_point"] is None  # only a degenerate box
    assert metrics["categories"]["dog"]["img@0.1"]["n_points"] == 1


def test_threads_option_sets_torchs_threads(tmp_path, cache_copy, train_data):
    before = torch.get_num_threads()
    try:
        result = invoke(*eval_args(cache_copy, train_data, tmp_path, "--raw", "up_blocks.3.resnets.1@300", "--threads", "1"))
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
