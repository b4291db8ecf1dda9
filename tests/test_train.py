"""`dhf-cache train`: learns from the cache, resumes exactly, refuses bad input clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import ROOT, SMALL_NET
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.aggregator.checkpoint import load_checkpoint
from dhf_cache.cli import main as _register  # noqa: F401
from dhf_cache.cli.app import app
from dhf_cache.config import TrainOptions
from dhf_cache.datasets import PairRecord, open_dataset
from dhf_cache.correspondence.descriptors import network_descriptors
from dhf_cache.cache.feature_loader import FeatureReader, default_loader_workers, select_features
from dhf_cache.pipelines.train import PairSchedule, pick_val_pairs
from dhf_cache.correspondence.scoring import score_pairs

runner = CliRunner()


def train_args(cache: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--cache", cache, "--dataset", f"spair:{data}", "--out", str(out), "--device", "cpu",
            "--no-progress", "--val-load-size", "64", *SMALL_NET, *extra]


def invoke(*args):
    return runner.invoke(app, list(args))


def _losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_cache, train_data) -> Path:
    run = tmp_path_factory.mktemp("runs") / "trained"
    result = invoke(*train_args(train_cache, train_data, run, "--steps", "120", "--val-every", "60", "--lr", "3e-3"))
    assert result.exit_code == 0, result.output
    return run


def _test_pck(network, cache_url: str, data: Path) -> float:
    cache = FeatureCache.open(cache_url)
    reader = FeatureReader(cache, select_features(cache))
    pairs = open_dataset(f"spair:{data}").pairs("test")
    acc, _ = score_pairs(pairs, network_descriptors(network, reader, cache.index_of(), "cpu"), 64, alphas=(0.1,))
    return acc.summary()["bbox@0.1"]["per_point"]


def test_loss_decreases(trained):
    losses = _losses(trained)
    assert len(losses) == 120
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])


def test_trained_network_matches_held_out_pairs_better_than_untrained(trained, train_cache, train_data):
    ckpt = load_checkpoint(trained)
    assert ckpt.path.name == "best"
    torch.manual_seed(0)  # the initial weights of the run (seed 0)
    untrained = type(ckpt.network).from_config(ckpt.config["network"]).eval()
    before, after = _test_pck(untrained, train_cache, train_data), _test_pck(ckpt.network, train_cache, train_data)
    print(f"test PCK@0.1 untrained {before:.3f} -> trained {after:.3f}")
    assert after > before + 0.05, (before, after)


def test_run_folder_holds_what_the_issue_names(trained, train_cache):
    config = json.loads((trained / "config.json").read_text())
    cache = FeatureCache.open(train_cache)
    assert config["features"]["feature_space"] == cache.fingerprint["feature_space"]
    assert config["features"]["timesteps"] == cache.timesteps == [-1, 300, 800]
    assert [l["name"] for l in config["features"]["layers"]] == [l.name for l in cache.layers]
    assert config["network"]["projection_dim"] == 32 and config["training"]["options"]["lr"] == 3e-3
    for which in ("last", "best"):
        assert (trained / which / "model.safetensors").is_file()
    assert (trained / "last" / "optimizer.safetensors").is_file()
    state = json.loads((trained / "last" / "state.json").read_text())
    assert state["step"] == 120 and state["best_step"] in (60, 120)
    # AdamW (decoupled weight decay; torch < 2.6 names no such key) with torch's betas and eps, as Ref
    group = state["optimizer_param_groups"][0]
    assert group.get("decoupled_weight_decay", True) is True and group["weight_decay"] == 0
    assert tuple(group["betas"]) == (0.9, 0.999) and group["eps"] == 1e-8 and group["lr"] == 3e-3
    vals = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    assert [v["step"] for v in vals] == [60, 120]
    assert 0 <= vals[-1]["val"]["bbox@0.1"]["per_point"] <= 1


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, train_cache, train_data):
    common = ("--val-every", "4", "--lr", "3e-3", "--pairs-per-step", "2")
    straight = tmp_path / "straight"
    assert invoke(*train_args(train_cache, train_data, straight, "--steps", "12", *common)).exit_code == 0
    split = tmp_path / "split"
    assert invoke(*train_args(train_cache, train_data, split, "--steps", "5", *common)).exit_code == 0
    # the last checkpoint is at step 4 (val-every 4) plus the final step 5; lose step 5's metrics too
    again = invoke(*train_args(train_cache, train_data, split, "--steps", "12", "--resume", *common))
    assert again.exit_code == 0, again.output
    assert "resuming" in again.output
    a, b = load_file(straight / "last" / "model.safetensors"), load_file(split / "last" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert _losses(straight) == pytest.approx(_losses(split), rel=1e-5)


def test_loader_width_does_not_change_what_is_learned(tmp_path, train_cache, train_data):
    runs = {}
    for workers in ("1", "4"):
        runs[workers] = tmp_path / f"w{workers}"
        result = invoke(*train_args(train_cache, train_data, runs[workers], "--steps", "6", "--val-every", "6",
                                    "--pairs-per-step", "2", "--loader-workers", workers))
        assert result.exit_code == 0, result.output
        assert f"loader: {workers} reader threads, {int(workers) + 2} steps read ahead" in result.output
    a, b = load_file(runs["1"] / "last" / "model.safetensors"), load_file(runs["4"] / "last" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _losses(runs["1"]) == _losses(runs["4"])


def test_existing_run_needs_resume(tmp_path, train_cache, train_data):
    out = tmp_path / "run"
    assert invoke(*train_args(train_cache, train_data, out, "--steps", "1")).exit_code == 0
    result = invoke(*train_args(train_cache, train_data, out, "--steps", "2"))
    assert result.exit_code == 1 and "pass --resume" in result.output



def test_bad_options_say_which_option_without_pydantics_dump(tmp_path, train_cache, train_data):
    result = invoke(*train_args(train_cache, train_data, tmp_path / "r", "--lr", "-1"))
    assert result.exit_code == 2 and "error: --lr -1.0: Input should be greater than 0" in result.output
    assert "pydantic" not in result.output and "validation error" not in result.output
    # a validation split asked for by name must exist (the default 'val' may be absent: a warning)
    result = invoke(*train_args(train_cache, train_data, tmp_path / "r", "--val-split", "vall"))
    assert result.exit_code == 2 and "--val-split 'vall'" in result.output and "trn, val, test" in result.output
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_resume_with_another_network_or_feature_space_is_refused(tmp_path, train_cache, train_data, tiny_model_dir, mini_spair):
    out = tmp_path / "run"
    assert invoke(*train_args(train_cache, train_data, out, "--steps", "1")).exit_code == 0
    wider = train_args(train_cache, train_data, out, "--steps", "2", "--resume")
    wider[wider.index("--projection-dim") + 1] = "64"
    result = invoke(*wider)
    assert result.exit_code == 1
    assert "network projection_dim: run has 32, now 64" in result.output
    # a cache of another feature space (other saved steps) with the same layers
    other = tmp_path / "other.zarr"
    build = ["build", "--dataset", f"spair:{train_data}", "--cache", str(other), "--model", str(tiny_model_dir),
             "--load-size", "64", "--image-size", "64", "--steps", "10", "--save-steps", "9,4,0",
             "--device", "cpu", "--no-progress"]
    assert invoke(*build).exit_code == 0
    result = invoke(*train_args(str(other), train_data, out, "--steps", "2", "--resume"))
    assert result.exit_code == 1
    assert "feature space" in result.output and "save_steps: run has [9, 5, 0], now [9, 4, 0]" in result.output


def test_layers_and_timesteps_the_cache_lacks_are_refused(tmp_path, train_cache, train_data):
    result = invoke(*train_args(train_cache, train_data, tmp_path / "a", "--layers", "up_blocks.7.resnets.0"))
    assert result.exit_code == 2 and "not in the cache; it holds up_blocks.0.resnets.0" in result.output
    result = invoke(*train_args(train_cache, train_data, tmp_path / "b", "--timesteps", "-1,60"))
    assert result.exit_code == 2 and "--timesteps 60" in result.output and "-1, 300, 800" in result.output


def test_subset_of_layers_and_timesteps_trains_without_reextraction(tmp_path, train_cache, train_data):
    out = tmp_path / "subset"
    result = invoke(*train_args(train_cache, train_data, out, "--steps", "3",
                                "--layers", "up_blocks.3.resnets.2,up_blocks.2.resnets.0", "--timesteps", "800,-1"))
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    assert ckpt.layer_names == ["up_blocks.3.resnets.2", "up_blocks.2.resnets.0"]
    assert ckpt.timesteps == [800, -1]
    assert ckpt.network.mixing_weights.numel() == 4


def test_pairs_with_missing_images_are_listed_or_skipped(tmp_path, train_data, tiny_model_dir):
    cache = tmp_path / "partial.zarr"
    build = ["build", "--dataset", f"spair:{train_data}", "--split", "trn", "--limit", "6", "--cache", str(cache),
             "--model", str(tiny_model_dir), "--load-size", "64", "--image-size", "64", "--steps", "2",
             "--save-steps", "1,0", "--device", "cpu", "--no-progress"]
    assert invoke(*build).exit_code == 0
    result = invoke(*train_args(str(cache), train_data, tmp_path / "r", "--steps", "2", "--val-split", ""))
    assert result.exit_code == 1
    assert "use images the cache has not built: person/astronaut_" in result.output
    assert "--skip-missing" in result.output
    result = invoke(*train_args(str(cache), train_data, tmp_path / "r2", "--steps", "2", "--val-split", "",
                                "--skip-missing", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["pairs"] == 12 + 2 and summary["skipped"]["missing_images"] == 10  # 6 of 8 images built


def test_pairs_without_visible_keypoints_are_skipped_and_counted(tmp_path, train_cache, train_data, copy_dir):
    data = copy_dir(train_data, "data")
    pair_file = sorted((data / "PairAnnotation" / "trn").glob("*.json"))[0]
    pair = json.loads(pair_file.read_text())
    pair["src_kps"], pair["trg_kps"], pair["kps_ids"] = [], [], []
    pair_file.write_text(json.dumps(pair))
    result = invoke(*train_args(train_cache, data, tmp_path / "r", "--steps", "2", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped"]["no_keypoints"] == 1 and summary["pairs"] == 23
    assert summary["loader_workers"] == default_loader_workers()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, train_cache, train_data):
    out = tmp_path / "run"
    assert invoke(*train_args(train_cache, train_data, out, "--steps", "2", "--val-every", "2")).exit_code == 0
    good = load_file(out / "last" / "model.safetensors")
    result = invoke(*train_args(train_cache, train_data, out, "--steps", "40", "--val-every", "100",
                                "--lr", "1e30", "--resume"))
    assert result.exit_code == 1
    assert "the loss became nan" in result.output.lower() and "lower --lr" in result.output
    state = json.loads((out / "last" / "state.json").read_text())
    kept = load_file(out / "last" / "model.safetensors")
    assert 2 <= state["step"] < 40
    assert all(torch.isfinite(t).all() for t in kept.values())
    if state["step"] == 2:
        assert all(torch.equal(good[k], kept[k]) for k in good)


def test_pair_order_is_a_function_of_seed_and_step():
    a, b = PairSchedule(10, 2, seed=0), PairSchedule(10, 2, seed=0)
    order = [a(s) for s in range(1, 11)]
    assert [b(s) for s in (7, 3, 10, 1)] == [order[6], order[2], order[9], order[0]]
    first_epoch = sum(order[:5], [])
    assert sorted(first_epoch) == list(range(10))  # every pair once per epoch
    assert sum(order[5:], []) != first_epoch  # a new permutation each epoch
    assert [PairSchedule(10, 2, seed=1)(s) for s in range(1, 6)] != order[:5]



def test_validation_takes_up_to_20_pairs_of_each_category():
    def pair(cat: str, i: int) -> PairRecord:
        kps = np.zeros((1, 2))
        return PairRecord(f"{cat}-{i}", cat, "a", "b", kps, kps, (0, 0, 1, 1), (0, 0, 1, 1), (8, 8), (8, 8))

    pairs = [pair(c, i) for c, n in (("cat", 30), ("dog", 5), ("bus", 21)) for i in range(n)]
    picked = pick_val_pairs(pairs, TrainOptions().val_pairs_per_category, seed=0)
    counts = {c: sum(p.category == c for p in picked) for c in ("bus", "cat", "dog")}
    assert counts == {"bus": 20, "cat": 20, "dog": 5}  # 18 SPair categories x 20 = the paper's 360
    names = [p.name for p in picked]
    assert len(set(names)) == 45 and all(any(p is q for q in pairs) for p in picked)
    again, other = pick_val_pairs(pairs, 20, seed=0), pick_val_pairs(pairs, 20, seed=1)
    assert [p.name for p in again] == names != [p.name for p in other]  # fixed by the seed


def test_training_never_imports_diffusers(tmp_path, train_cache, train_data):
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from dhf_cache.pipelines.train import TrainRequest, run_train\n"
        "from dhf_cache.config import TrainOptions\n"
        f"run_train(TrainRequest({train_cache!r}, 'spair:{train_data}', Path({str(tmp_path / 'r')!r}), "
        "TrainOptions(steps=2, projection_dim=32, norm_groups=8, output_size=16, val_load_size=64), "
        "device='cpu', progress=False), log=lambda m: None)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_train_options_are_validated():
    with pytest.raises(ValueError):
        TrainOptions(steps=0)


def test_step_inputs_reuse_their_buffers_and_train_the_same_weights():
    """Staging buffers kept across steps: same values as a fresh stack, same weights after 3 steps,
    and no new allocation per step (a new shape gets a new buffer)."""
    from dhf_cache.aggregator.network import AggregationNetwork
    from dhf_cache.cache.layers import LayerInfo
    from dhf_cache.pipelines.train import StepInputs, _Example, _train_step

    layers = [LayerInfo("a", 6, 4, 4), LayerInfo("b", 3, 8, 8)]
    gen = torch.Generator().manual_seed(0)

    def image():
        return {l.name: torch.randn(2, l.channels, l.height, l.width, generator=gen).half() for l in layers}

    steps = [[(image(), image())] for _ in range(3)]
    batch = [_Example(None, torch.tensor([[1, 2], [5, 7]]), torch.tensor([[3, 3], [6, 0]]))]
    weights, losses = {}, {}
    for reuse in (False, True):
        torch.manual_seed(0)
        net = AggregationNetwork(layers, 2, 16, 8, 4)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        staging = StepInputs("cpu") if reuse else None
        losses[reuse] = [_train_step(net, opt, batch, feats, "cpu", staging) for feats in steps]
        weights[reuse] = [p.detach().clone() for p in net.parameters()]
    assert losses[True] == losses[False]
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))

    staging = StepInputs("cpu")
    first = staging(["a", "b"], steps[0])
    pointers = {name: t.data_ptr() for name, t in first.items()}
    second = staging(["a", "b"], steps[1])
    assert {name: t.data_ptr() for name, t in second.items()} == pointers  # reused, not reallocated
    assert torch.equal(second["b"], torch.stack([steps[1][0][0]["b"], steps[1][0][1]["b"]]))
    two_pairs = staging(["a"], steps[0] + steps[1])
    assert two_pairs["a"].shape[0] == 4 and two_pairs["a"].data_ptr() != pointers["a"]


def test_threads_option_sets_torchs_threads_and_json_has_the_loop_time(tmp_path, train_cache, train_data):
    before = torch.get_num_threads()
    try:
        result = invoke(*train_args(train_cache, train_data, tmp_path / "run", "--steps", "2", "--val-split", "",
                                    "--threads", "1", "--json"))
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert 0 < summary["loop_seconds"] <= summary["seconds"]
    assert summary["steps_per_second"] == pytest.approx(2 / summary["loop_seconds"], rel=0.01)


def test_a_bf16_step_tracks_the_fp32_step_and_keeps_fp32_weights():
    """--precision bf16: the forward pass under autocast, the loss and the weights fp32. From the
    same start on the same inputs, five steps' losses stay within bf16's ~3 significant digits of
    fp32's, and the weights move the same way."""
    from dhf_cache.aggregator.network import AggregationNetwork
    from dhf_cache.cache.layers import LayerInfo
    from dhf_cache.pipelines.train import _Example, _train_step

    layers = [LayerInfo("a", 24, 8, 8), LayerInfo("b", 12, 16, 16)]
    gen = torch.Generator().manual_seed(0)

    def image():
        return {l.name: torch.randn(2, l.channels, l.height, l.width, generator=gen).half() for l in layers}

    steps = [[(image(), image())] for _ in range(5)]
    batch = [_Example(None, torch.tensor([[1, 2], [5, 7], [12, 3]]), torch.tensor([[3, 3], [6, 0], [9, 14]]))]
    losses, moved = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = AggregationNetwork(layers, 2, 32, 16, 4)
        start = [p.detach().clone() for p in net.parameters()]
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        losses[precision] = [_train_step(net, opt, batch, feats, "cpu", None, precision) for feats in steps]
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert all(s.dtype == torch.float32 for state in opt.state.values() for s in state.values() if s.dim())
        moved[precision] = torch.cat([(p.detach() - s).flatten() for p, s in zip(net.parameters(), start)])
    assert losses["bf16"] != losses["fp32"]  # autocast did run in bf16
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.02)
    cosine = torch.nn.functional.cosine_similarity(moved["bf16"], moved["fp32"], dim=0)
    assert cosine > 0.95, float(cosine)


def test_precision_is_recorded_and_a_dtype_without_loss_scaling_is_refused(tmp_path, train_cache, train_data):
    run = tmp_path / "bf16"
    result = invoke(*train_args(train_cache, train_data, run, "--steps", "2", "--val-split", "", "--precision", "bf16"))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["training"]["options"]["precision"] == "bf16"
    assert all(np.isfinite(_losses(run)))
    result = invoke(*train_args(train_cache, train_data, tmp_path / "fp16", "--precision", "fp16"))
    assert result.exit_code == 2 and "--precision" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "fp16").exists()
