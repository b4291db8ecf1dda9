"""METHOD.md's numbers are the defaults a user gets, from the Python API and from the CLI.

Behaviour tests elsewhere check that each setting does what it says (the loss at temperature
0.07, the schedule's timesteps, ...). These check that the defaults *are* the paper's, so that a
run without options reproduces the reference, and that the CLI's options cannot drift from the
config models (dev/method_mutations.py found both gaps: changing a training default, or the
CLI's copy of it, failed no test).
"""

from __future__ import annotations

import pytest
import typer

from dhf_cache.cli import main as _register  # noqa: F401  (registers the commands)
from dhf_cache.cli.app import app
from dhf_cache.config import (DEFAULT_LAYERS, DEFAULT_STEPS, FAMILY_DEFAULT_LAYERS, EVAL_LOAD_SIZE, PCK_ALPHAS, SD15_MODEL_ID, SD15_SAVE_STEPS,
                              BuildOptions, CodecSpec, GenerationSpec, Preprocessing, SchedulerSpec, TrainOptions, default_save_steps)
from dhf_cache.correspondence.pck import PCKAccumulator
from dhf_cache.pipelines.build import BuildRequest
from dhf_cache.pipelines.evaluate import EvalRequest
from dhf_cache.pipelines.match import MatchRequest

COMMANDS = typer.main.get_command(app).commands


def cli_defaults(command: str) -> dict:
    return {p.name: p.default for p in COMMANDS[command].params}


def test_training_defaults_are_the_reference_run():
    o = TrainOptions()
    # 5,000 steps of one pair, AdamW lr 1e-3, no weight decay, a fixed permutation with seed 0
    assert (o.steps, o.pairs_per_step, o.lr, o.weight_decay, o.seed) == (5000, 1, 1e-3, 0.0, 0)
    # a 384-channel descriptor on a 64 x 64 grid, GroupNorm(32) (bottleneck 96 = 384 / 4)
    assert (o.projection_dim, o.output_size, o.norm_groups) == (384, 64, 32)
    # validation every 1,000 steps on 20 pairs per category (360 on SPair) at load size 224
    assert (o.val_every, o.val_pairs_per_category, o.val_load_size) == (1000, 20, 224)
    assert (o.split, o.val_split, o.layers, o.timesteps) == ("trn", "val", None, None)  # every cached map
    assert o.precision == "fp32"  # the reference trains in fp32; bf16 autocast is opt-in


def test_build_speed_levers_are_off_by_default():
    """Until a GPU run says which pay, a build runs the network as the reference does."""
    o = BuildOptions()
    assert (o.channels_last, o.attention, o.compile) == (False, "auto", "off")


def test_build_defaults_are_the_reference_inversion():
    assert SD15_MODEL_ID == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the old runwayml id is gone
    s = SchedulerSpec()
    assert (s.beta_start, s.beta_end, s.beta_schedule, s.num_train_timesteps, s.steps_offset) == (
        0.00085, 0.012, "scaled_linear", 1000, 0)
    assert DEFAULT_STEPS == 50 and default_save_steps(50) == SD15_SAVE_STEPS == (49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0)
    assert DEFAULT_LAYERS == "up" and FAMILY_DEFAULT_LAYERS == {"sd": "up", "sdxl": "up", "dinov2": "last"}
    p = Preprocessing()
    assert (p.load_size, p.image_size, p.resampling, p.latent) == (512, 512, "bilinear", "sample")
    assert GenerationSpec().guidance == 7.5
    request = BuildRequest(dataset=None, cache_url="c.zarr", model="m")
    assert (request.steps, request.layers, request.preprocessing) == (50, None, p)  # None: the family's default


def test_eval_defaults_are_the_paper_protocol():
    assert EVAL_LOAD_SIZE == 224 and 0.1 in PCK_ALPHAS
    assert PCKAccumulator().alphas == PCK_ALPHAS
    request = EvalRequest(cache_url="c.zarr", dataset="d", out="o")
    assert (request.load_size, request.alphas, request.split, request.refine) == (224, PCK_ALPHAS, "test", "none")
    assert MatchRequest.__dataclass_fields__["load_size"].default == 224


def test_train_cli_defaults_are_the_config_defaults():
    cli, o = cli_defaults("train"), TrainOptions()
    for name in ("split", "steps", "lr", "pairs_per_step", "projection_dim", "output_size", "norm_groups",
                 "val_every", "val_pairs_per_category", "val_load_size", "seed", "precision"):
        assert cli[name] == getattr(o, name), name
    assert cli["val_split"] == o.val_split and cli["layers"] is None and cli["timesteps"] is None


def test_build_cli_defaults_are_the_config_defaults():
    cli = cli_defaults("build")
    p, g, c, b = Preprocessing(), GenerationSpec(), CodecSpec(), BuildOptions()
    assert cli["model"] == SD15_MODEL_ID
    assert (cli["load_size"], cli["image_size"], cli["seed"]) == (p.load_size, p.image_size, p.seed)
    assert (cli["steps"], cli["layers"], cli["save_steps"]) == (DEFAULT_STEPS, None, None)  # None: FAMILY_DEFAULT_LAYERS
    assert (cli["guidance"], cli["negative_prompt"]) == (g.guidance, g.negative_prompt)
    assert (cli["codec"], cli["zstd_level"], cli["keepbits"]) == (c.name, c.level, c.keepbits)
    assert (cli["batch_size"], cli["max_pixels"]) == (b.batch_size, b.max_pixels)
    assert (cli["channels_last"], cli["attention"], cli["compile"]) == (b.channels_last, b.attention, b.compile)


@pytest.mark.parametrize("command", ["eval", "match"])
def test_eval_cli_defaults_are_the_config_defaults(command):
    cli = cli_defaults(command)
    if command == "eval":  # the matching options default to the protocol's, the paper's by default
        from dhf_cache.correspondence.protocols import PROTOCOLS

        assert cli["protocol"] == "dhf" and (cli["load_size"], cli["match_at"], cli["refine"]) == (None, None, None)
        dhf = PROTOCOLS["dhf"]
        assert (dhf.load_size, dhf.match_at, dhf.refine, dhf.base, dhf.inequality, dhf.averagings, dhf.alpha) == (
            EVAL_LOAD_SIZE, "load", "none", "bbox", "<=", ("per_point",), 0.1)
    else:
        assert cli["load_size"] == EVAL_LOAD_SIZE
    if command == "eval":
        assert tuple(float(a) for a in cli["alpha"].split(",")) == PCK_ALPHAS
        assert cli["split"] == "test"
