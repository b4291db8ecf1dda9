"""`build --fit pad`: images kept in their aspect ratio and padded to the square (SD+DINO,
GeoAware-SC), recorded in the spec; keypoints placed the same way for training and matching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import invoke
from dhf_cache.aggregator.losses import grid_keypoints
from dhf_cache.config import BuildSpec, FeatureSpace, ModelIdentity, Preprocessing
from dhf_cache.correspondence.matching import match_points, match_points_reference
from dhf_cache.datasets.images import fit_image, place_points, placement, preprocess, unplace_points
from dhf_cache.errors import UsageError


def test_placement_keeps_the_aspect_ratio_and_centres_the_image():
    assert placement((200, 100), 64, "pad") == (64, 32, 0, 16)
    assert placement((90, 300), 60, "pad") == (18, 60, 21, 0)
    assert placement((200, 100), 64, "stretch") == (64, 64, 0, 0)
    pts = np.array([[0.0, 0.0], [100.0, 50.0], [199.0, 99.0]])
    placed = place_points(pts, (200, 100), 64, "pad")
    np.testing.assert_allclose(placed, [[0, 16], [32, 32], [63.68, 47.68]])
    np.testing.assert_allclose(unplace_points(placed, 64, (200, 100), "pad"), pts)
    # stretch is METHOD.md's `x * (load / W)`, unchanged
    np.testing.assert_array_equal(place_points(pts, (200, 100), 64), pts * np.array([64 / 200, 64 / 100]))


def test_a_padded_image_is_the_resized_photo_on_black():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, size=(30, 80, 3), dtype=np.uint8))
    padded = np.asarray(fit_image(photo, 40, "pad"))
    w, h, left, top = placement(photo.size, 40, "pad")
    assert (w, h, left, top) == (40, 15, 0, 12)
    np.testing.assert_array_equal(padded[top:top + h, left:left + w], np.asarray(photo.resize((w, h), Image.BILINEAR)))
    assert padded[:top].max() == 0 and padded[top + h:].max() == 0
    x = preprocess(photo, 40, 48, "pad")
    assert x.shape == (3, 48, 48) and float(x[:, 0, 0].max()) == -1.0  # black is -1 in [-1, 1]


def test_pad_is_recorded_only_when_chosen_so_stretch_fingerprints_stay():
    assert "fit" not in Preprocessing().model_dump(mode="json")
    assert Preprocessing(fit="pad").model_dump(mode="json")["fit"] == "pad"
    old = {"load_size": 512, "image_size": 512, "resampling": "bilinear", "latent": "sample", "seed": 0}
    assert Preprocessing.model_validate(old).fit == "stretch"
    identity = ModelIdentity(unet_class="U", unet_sha256="a", vae_sha256="b", text_encoder_sha256="c")
    spec = BuildSpec(feature_space=FeatureSpace(model=identity, layers=("up_blocks.1.resnets.0",)))
    assert "fit" not in json.dumps(spec.model_dump(mode="json"))
    with pytest.raises(ValueError):
        Preprocessing(fit="crop")


def test_keypoints_reach_the_grid_and_the_match_through_the_padding():
    # 200 x 100 padded into a 64 square: the image spans rows 16..48
    kps = np.array([[100.0, 50.0], [0.0, 0.0], [199.0, 99.0]])
    grid = grid_keypoints(kps, (200, 100), 64, fit="pad", load_size=64)
    assert grid.tolist() == [[32, 32], [0, 16], [63, 48]]
    with pytest.raises(UsageError, match="load size"):
        grid_keypoints(kps, (200, 100), 64, fit="pad")
    # identical descriptor maps: every source point finds itself again, through pad's geometry
    torch.manual_seed(0)
    desc = torch.randn(32, 16, 16)
    pts = np.array([[20.0, 30.0], [150.0, 70.0], [100.0, 50.0]])
    found = match_points(desc, desc, pts, (200, 100), (200, 100), 64, fit="pad")
    np.testing.assert_allclose(found, pts, atol=200 / 64)  # within one load pixel
    np.testing.assert_allclose(found, match_points_reference(desc, desc, pts, (200, 100), (200, 100), 64, fit="pad"))
    with pytest.raises(UsageError, match="--match-at load"):
        match_points(desc, desc, pts, (200, 100), (200, 100), 64, match_at="original", fit="pad")


def test_a_padded_cache_is_built_trained_and_evaluated(tmp_path, mini_spair, tiny_dino_dir):
    cache = tmp_path / "pad.zarr"
    built = invoke("build", "--dataset", f"spair:{mini_spair}", "--cache", cache, "--model", tiny_dino_dir,
                   "--load-size", "56", "--image-size", "56", "--fit", "pad", "--device", "cpu", "--no-progress")
    assert built.exit_code == 0, built.output
    info = json.loads(invoke("info", str(cache), "--json").stdout)
    assert info["spec"]["preprocessing"]["fit"] == "pad"
    common = ["--cache", cache, "--dataset", f"spair:{mini_spair}", "--device", "cpu", "--no-progress"]
    run = tmp_path / "run"
    trained = invoke("train", *common, "--out", run, "--steps", "2", "--val-every", "2", "--val-pairs-per-category", "1",
                     "--projection-dim", "16", "--output-size", "8", "--norm-groups", "4")
    assert trained.exit_code == 0, trained.output
    scored = invoke("eval", *common, "--out", tmp_path / "e", "--checkpoint", run, "--protocol", "sd-dino",
                    "--load-size", "56", "--drawings", "0", "--bootstrap", "20")
    assert scored.exit_code == 0, scored.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    # SD+DINO's padded square is this cache's own square: matched there, as its protocol does
    assert metrics["matching"]["fit"] == "pad" and metrics["options"]["match_at"] == "load"
    differs = [n for n in metrics["notes"] if "differs from protocol sd-dino" in n]
    assert len(differs) == 1 and "load_size 56 (the protocol's: 840)" in differs[0] and "match_at" not in differs[0]
    assert any("padded to squares" in n for n in metrics["notes"])
    refused = invoke("eval", *common, "--out", tmp_path / "o", "--raw", "dinov2:layernorm", "--match-at", "original")
    assert refused.exit_code != 0 and "use --match-at load" in refused.output
    # a stretched source beside the padded one: their maps cover other pixels, so no fusion
    added = invoke("build", "--dataset", f"spair:{mini_spair}", "--cache", cache, "--model", tiny_dino_dir,
                   "--source", "stretched", "--load-size", "56", "--image-size", "56", "--device", "cpu", "--no-progress")
    assert added.exit_code == 0, added.output
    fused = invoke("train", *common, "--out", tmp_path / "fused", "--source", "dinov2,stretched", "--steps", "1")
    assert fused.exit_code == 2 and "made square differently (dinov2: fit pad, stretched: fit stretch)" in fused.output
