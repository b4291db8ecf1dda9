"""`dhf-cache import-checkpoint`: the authors' released file becomes a run folder eval can use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.aggregator.checkpoint import check_features_match, load_checkpoint
from dhf_cache.cli import main as _register  # noqa: F401
from dhf_cache.cli.app import app
from dhf_cache.aggregator.interop import load_reference_aggregator, reference_positions
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


def _malformed(tmp_path, config=..., state_edit=None, projection_dim=128):
    """A reference .pt of the 12 up-block layers (as an unbound import expects), made malformed."""
    state = reference_state([8] * 12, projection_dim=projection_dim, n_timesteps=3)
    if state_edit:
        state_edit(state)
    path = tmp_path / "aggregation_network.pt"
    if config is ...:
        config = {"save_timestep": [9, 5, 0], "num_timesteps": 10}
    torch.save({"step": 5, "config": config, "aggregation_network": state}, path)
    return path


MALFORMED_REFERENCES = {
    "save_timestep of the wrong type": (dict(config={"save_timestep": "9,5,0", "num_timesteps": 10}),
                                        "reference config save_timestep '9,5,0': expected a list"),
    "num_timesteps of the wrong type": (dict(config={"save_timestep": [9, 5, 0], "num_timesteps": "ten"}),
                                        "reference config num_timesteps 'ten': expected a positive integer"),
    "save_timestep outside the schedule": (dict(config={"save_timestep": [90, 5, 0], "num_timesteps": 10}),
                                           "expected a list of distinct step indices in 0..9"),
    "config holding a tensor": (dict(config={"save_timestep": [9, 5, 0], "num_timesteps": 10, "w": torch.ones(3)}),
                                "reference config.w is a Tensor, not plain data"),
    "config not a dict": (dict(config=[9, 5, 0]), "`aggregation_network` or `config` is not a dict"),
    "projection dim not a multiple of 4": (dict(projection_dim=6), "projection dim 6 (conv3 output channels"),
    "mixing weights of the wrong shape": (dict(state_edit=lambda s: s.update(mixing_weights=torch.ones(3, 12))),
                                          "reference mixing_weights has shape (3, 12)"),
}


@pytest.mark.parametrize("case", MALFORMED_REFERENCES)
def test_malformed_reference_files_are_refused_in_one_line(tmp_path, case):
    kwargs, message = MALFORMED_REFERENCES[case]
    path = _malformed(tmp_path, **kwargs)
    out = tmp_path / "run"
    result = runner.invoke(app, ["import-checkpoint", str(path), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("kill_point", ["weights written, config not yet", "config written, weights not yet"])
def test_an_interrupted_import_is_completed_by_the_same_command(tmp_path, kill_point):
    path = _malformed(tmp_path)  # a well-formed one: the default config fits
    out = tmp_path / "run"
    assert runner.invoke(app, ["import-checkpoint", str(path), "--out", str(out)]).exit_code == 0
    if kill_point == "weights written, config not yet":  # this version's order: config.json last
        (out / "config.json").unlink()
    else:  # what the order of earlier versions left
        shutil.rmtree(out / "last")
    result = runner.invoke(app, ["import-checkpoint", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out).timesteps == [-1, 300, 800]
    result = runner.invoke(app, ["import-checkpoint", str(path), "--out", str(out)])
    assert result.exit_code == 1 and "already holds a run" in result.output
