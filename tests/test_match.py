"""`dhf-cache match` and the Python API: on-the-fly descriptors equal the cached ones, the
model is checked against the checkpoint, and bad input gets clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import SMALL_NET, cli
from dhf_cache.api import Hyperfeatures, check_points, grid_points
from dhf_cache.aggregator.checkpoint import read_json, write_json
from dhf_cache.cli import main as _register  # noqa: F401
from dhf_cache.cli.app import app
from dhf_cache.cli.match_cmd import parse_points
from dhf_cache.config import Preprocessing
from dhf_cache.datasets import open_dataset
from dhf_cache.errors import CacheError, CheckpointError, UsageError
from dhf_cache.datasets.images import load_image
from dhf_cache.sources.onthefly import derive_save_steps, pixel_id

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_cache, train_data) -> Path:
    """A tiny P=32 aggregator trained for a few steps on `train_cache`."""
    out = tmp_path_factory.mktemp("runs") / "match-run"
    result = runner.invoke(app, ["train", "--cache", train_cache, "--dataset", f"spair:{train_data}", "--out", str(out),
                                 "--device", "cpu", "--no-progress", "--val-load-size", "64", *SMALL_NET,
                                 "--steps", "6", "--val-every", "6", "--lr", "3e-3"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def test_pair(train_data):
    pair = open_dataset(f"spair:{train_data}").pairs("test")[0]
    return pair, train_data / "JPEGImages" / pair.src, train_data / "JPEGImages" / pair.trg


@pytest.fixture(scope="module")
def hf(run) -> Hyperfeatures:
    """The API over `run`, backbone loaded once for the module (read-only)."""
    return Hyperfeatures.from_checkpoint(run, device="cpu")


def match_args(run: Path, a: Path, b: Path, out: Path, *extra: str) -> list[str]:
    return ["match", str(a), str(b), "--checkpoint", str(run), "--out", str(out), "--device", "cpu",
            "--load-size", "64", *extra]


def test_match_writes_png_and_returns_points(run, test_pair, tmp_path):
    pair, a, b = test_pair
    result = runner.invoke(app, match_args(run, a, b, tmp_path / "grid.png", "--grid", "3", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    size_a, size_b = load_image(a).size, load_image(b).size
    assert summary["size_a"] == list(size_a) and summary["size_b"] == list(size_b)
    pts_a, pts_b = np.array(summary["points_a"]), np.array(summary["points_b"])
    np.testing.assert_allclose(pts_a, grid_points(size_a, 3))
    assert pts_b.shape == (9, 2) and np.isfinite(pts_b).all()
    assert (pts_b >= 0).all() and (pts_b[:, 0] < size_b[0]).all() and (pts_b[:, 1] < size_b[1]).all()
    with Image.open(tmp_path / "grid.png") as im:
        assert im.format == "PNG" and im.height == 256
        assert im.width == round(size_a[0] * 256 / size_a[1]) + round(size_b[0] * 256 / size_b[1])
    # chosen points, plain output: one line per match
    result = runner.invoke(app, match_args(run, a, b, tmp_path / "pts.png", "--points", "10,20; 30.5,40"))
    assert result.exit_code == 0, result.output
    lines = [l for l in result.stdout.splitlines() if "->" in l]
    assert len(lines) == 2 and "A (   10.0,    20.0)" in lines[0] and "A (   30.5,    40.0)" in lines[1]
    assert (tmp_path / "pts.png").stat().st_size > 1000


def test_matching_an_image_with_itself_finds_the_same_points(hf, test_pair):
    _, a, _ = test_pair
    image = load_image(a)
    pts_a, pts_b = hf.match(image, image, grid=4, load_size=64)
    step = max(image.size) / 64  # one load-size pixel in image pixels
    err = np.linalg.norm(pts_a - pts_b, axis=1)
    assert np.median(err) <= 1.5 * step, err


def test_onthefly_descriptors_equal_cached_ones(hf, test_pair, train_cache):
    pair, a, b = test_pair
    ids = [pair.src, pair.trg]
    fresh = hf.extractor.descriptors([load_image(a), load_image(b)], image_ids=ids)
    for image_id, desc in zip(ids, fresh):
        cached = hf.cached_descriptors(train_cache, image_id)
        assert desc.shape == cached.shape == (32, 16, 16)
        scale = cached.abs().max().item()
        assert scale > 0
        # both go through fp16 feature storage; only batch-composition rounding may differ
        torch.testing.assert_close(desc, cached, rtol=0, atol=2e-3 * scale)
    # the on-the-fly path captured only the checkpoint's steps, in its order
    assert hf.extractor.timesteps == [-1, 300, 800]
    # the latent seed matters: the default pixel-hash id gives other features than the cache id
    default = hf.descriptors(a)
    assert (default - fresh[0]).abs().max() > 2e-2 * scale
    assert pixel_id(load_image(a)) == pixel_id(load_image(a).convert("RGBA")) != pixel_id(load_image(b))


def test_another_model_is_refused_naming_both_hashes(run, test_pair, tmp_path):
    from dhf_cache.sources.sd.backbone import load_backbone
    from dhf_cache.sources.sd.tiny_model import write_tiny_model

    other = write_tiny_model(tmp_path / "other-tiny", seed=1)
    _, a, b = test_pair
    result = runner.invoke(app, match_args(run, a, b, tmp_path / "m.png", "--model", str(other)))
    assert result.exit_code == 1, result.output
    want = read_json(run / "config.json")["features"]["feature_space_spec"]["model"]["unet_sha256"]
    have = load_backbone(str(other)).identity.unet_sha256
    assert want != have
    assert f"unet_sha256: checkpoint {want}, loaded model {have}" in result.output
    assert "not the model the checkpoint's features came from" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "m.png").exists()


def test_bad_points_and_images_give_clear_errors(run, test_pair, tmp_path):
    _, a, b = test_pair
    out = tmp_path / "m.png"
    proc = cli(*match_args(run, a, b, out, "--points", "10,20;abc"))  # a real process: no traceback
    assert proc.returncode == 2, proc.stderr
    assert "--points '10,20;abc': 'abc' is not a point" in proc.stderr and "x,y;x,y" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    w, h = load_image(a).size
    result = runner.invoke(app, match_args(run, a, b, out, "--points", f"5,5;{w},3"))
    assert result.exit_code == 2
    assert f"points ({w}, 3) lie outside image A" in result.output and f"0 <= x < {w}" in result.output
    result = runner.invoke(app, match_args(run, a, b, out, "--points", "5,5", "--grid", "3"))
    assert result.exit_code == 2 and "give one of them" in result.output
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    result = runner.invoke(app, match_args(run, broken, b, out))
    assert result.exit_code == 1 and f"{broken}: not a readable image file" in result.output
    result = runner.invoke(app, match_args(run, a, tmp_path / "missing.png", out))
    assert result.exit_code == 1 and "missing.png: file not found" in result.output
    result = runner.invoke(app, match_args(run, a, b, out, "--refine", "best"))
    assert result.exit_code == 2 and "--refine 'best': unknown" in result.output
    assert not out.exists()


def test_point_helpers():
    assert parse_points("1,2;3.5, 4;") == ((1.0, 2.0), (3.5, 4.0))
    for bad in ("", "1,2,3", "1;2", "x,1", "nan,1"):
        with pytest.raises(UsageError, match="--points"):
            parse_points(bad)
    np.testing.assert_allclose(grid_points((100, 50), 2), [[25, 12.5], [75, 12.5], [25, 37.5], [75, 37.5]])
    with pytest.raises(UsageError, match="outside image A"):
        check_points([[0, 0], [-0.5, 3]], (10, 10))
    np.testing.assert_allclose(check_points([9.9, 0], (10, 10)), [[9.9, 0]])


def test_cached_descriptors_refuse_unknown_ids_and_other_caches(hf, train_cache, tmp_path, train_data, tiny_model_dir):
    with pytest.raises(CacheError, match=r"image id 'cat/nope.jpg': not in"):
        hf.cached_descriptors(train_cache, "cat/nope.jpg")
    other = tmp_path / "other.zarr"
    build = ["build", "--dataset", f"spair:{train_data}", "--split", "test", "--limit", "1", "--cache", str(other),
             "--model", str(tiny_model_dir), "--load-size", "64", "--image-size", "64", "--steps", "10",
             "--save-steps", "9,4,0", "--device", "cpu", "--no-progress"]
    assert runner.invoke(app, build).exit_code == 0
    with pytest.raises(CheckpointError, match=r"(?s)cannot read the features.*feature_space fingerprint differs"):
        hf.cached_descriptors(str(other), open_dataset(f"spair:{train_data}").images("test")[0].id)


def test_unbound_imported_checkpoint_derives_the_sd_schedule(run, test_pair, tmp_path, tiny_model_dir):
    assert derive_save_steps([-1, 60, 960]) == (49, 45, 0)
    assert derive_save_steps([800, -1]) == (49, 8)
    with pytest.raises(CheckpointError, match=r"timesteps \[310\]: not UNet calls of the 50-step"):
        derive_save_steps([-1, 310])
    unbound = tmp_path / "unbound"
    shutil.copytree(run, unbound)
    config = read_json(unbound / "config.json")
    for key in ("feature_space_spec", "preprocessing", "model_source", "cache_fingerprint", "cache_url"):
        config["features"].pop(key)
    config["features"]["feature_space"] = None
    config["features"]["timesteps"] = [-1, 0, 20]  # the first three calls of 50: a short inversion
    write_json(unbound / "config.json", config)
    _, a, b = test_pair
    with pytest.raises(CheckpointError, match="records no model"):
        Hyperfeatures.from_checkpoint(unbound, device="cpu").descriptors(a)
    notes = []
    hf = Hyperfeatures.from_checkpoint(unbound, device="cpu", model=str(tiny_model_dir),
                                       preprocessing=Preprocessing(load_size=64, image_size=64), log=notes.append)
    pts_a, pts_b = hf.match(a, b, points=[[10, 10]], load_size=64)
    assert pts_b.shape == (1, 2) and np.isfinite(pts_b).all()
    assert len(notes) == 1 and "identity" in notes[0] and "cannot be checked" in notes[0]
    assert hf.extractor.feature_space.save_steps == (49, 48, 47)  # t = -1, 0, 20 of 50 steps
    assert hf.extractor.extractor.space.save_steps == (49, 48, 47)
