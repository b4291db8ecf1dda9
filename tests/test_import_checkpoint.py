"""`dhf-cache import-checkpoint`: the authors' released file becomes a run folder eval can use."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from dhf_cache.cache import FeatureCache
from dhf_cache.checkpoint import check_features_match, load_checkpoint
from dhf_cache.cli import main as _register  # noqa: F401
from dhf_cache.cli.app import app
from dhf_cache.interop import load_reference_aggregator, reference_positions
from test_interop import reference_state, save_like_reference

runner = CliRunner()


def _reference_file(tmp_path, cache: FeatureCache, n_timesteps: int, save_timestep=(9, 5, 0)):
    order = sorted(range(len(cache.layers)), key=lambda l: reference_positions(cache.layers)[l])
    channels = [cache.layers[l].channels for l in order]  # the reference's layer order
    path = tmp_path / "aggregation_network.pt"
    config = {"projection_dim": 128, "save_timestep": list(save_timestep), "num_timesteps": 10,
              "flip_timesteps": False, "prompt": ""}
    save_like_reference(path, reference_state(channels, projection_dim=128, n_timesteps=n_timesteps), config)
    return path


def test_imported_run_loads_and_computes_what_the_reference_network_does(tmp_path, train_cache):
    cache = FeatureCache.open(train_cache)
    path = _reference_file(tmp_path, cache, n_timesteps=3)
    result = runner.invoke(app, ["import-checkpoint", str(path), "--out", str(tmp_path / "bound"), "--cache", train_cache])
    assert result.exit_code == 0, result.output
    assert "bound to" in result.output
    ckpt = load_checkpoint(tmp_path / "bound")
    assert ckpt.features["feature_space"] == cache.fingerprint["feature_space"]
    assert check_features_match(ckpt.features, cache) == []
    reference, _ = load_reference_aggregator(path, cache.layers, 3)
    feats = {l.name: torch.randn(1, 3, l.channels, l.height, l.width) for l in cache.layers}
    with torch.no_grad():
        torch.testing.assert_close(ckpt.network(feats), reference.eval()(feats))

    unbound = tmp_path / "unbound"
    result = runner.invoke(app, ["import-checkpoint", str(path), "--out", str(unbound)])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(unbound)
    assert ckpt.features["feature_space"] is None
    assert ckpt.timesteps == [-1, 300, 800]  # save_timestep [9, 5, 0] of a 10-step inversion
    assert check_features_match(ckpt.features, cache) == []  # names, channels and steps fit
    config = json.loads((unbound / "config.json").read_text())
    assert config["source"] == "imported:aggregation_network.pt"


def test_import_refuses_a_checkpoint_that_does_not_fit_the_cache(tmp_path, train_cache):
    cache = FeatureCache.open(train_cache)
    path = _reference_file(tmp_path, cache, n_timesteps=11, save_timestep=tuple(range(10, -1, -1)))
    result = runner.invoke(app, ["import-checkpoint", str(path), "--out", str(tmp_path / "x"), "--cache", train_cache])
    assert result.exit_code == 1
    assert "12 layers x 11 timesteps" in result.output and "12 x 3" in result.output
    assert not (tmp_path / "x" / "config.json").exists()
