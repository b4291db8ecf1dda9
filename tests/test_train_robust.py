"""Training runs and checkpoints that survive kills, Ctrl-C and damage (issue 14).

Every interruption resumes by rerunning the same command, every kill point of a checkpoint save
leaves a complete checkpoint that resume, eval, match and the Python API find, and damaged or
malformed run folders are refused with one line naming the file.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import SMALL_NET, cli, source_dir, start_cli
from dhf_cache.aggregator.network import AggregationNetwork
from dhf_cache.api import Hyperfeatures
from dhf_cache.aggregator.checkpoint import (find_checkpoint, load_checkpoint, make_config, promote_checkpoint, read_json,
                                  save_checkpoint, write_json)
from dhf_cache.cli import main as _register  # noqa: F401
from dhf_cache.cli.app import app
from dhf_cache.errors import CheckpointError, ModelNotFoundError
from dhf_cache.cache.layers import LayerInfo
from dhf_cache.sources.onthefly import recorded_model

runner = CliRunner()
RUN_OPTIONS = ("--seed", "3", "--pairs-per-step", "2", "--lr", "3e-3", "--val-every", "2")


def train_args(cache: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--cache", cache, "--dataset", f"spair:{data}", "--out", str(out), "--device", "cpu",
            "--no-progress", "--val-load-size", "64", *SMALL_NET, *RUN_OPTIONS, *extra]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def refused(result, *fragments: str, code: int = 1) -> str:
    """The one `error:` line of a refused command (no traceback), checked to hold `fragments`."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    lines = result.output[result.output.index("error:"):].strip().splitlines()
    assert len(lines) == 1, result.output  # nothing after the error line either
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / "state.json").read_text())["step"]


def loss_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, train_cache, train_data) -> Path:
    """A run at its final step 2 (validated and checkpointed there); read-only, copy to change."""
    run = tmp_path_factory.mktemp("runs") / "finished"
    result = invoke(*train_args(train_cache, train_data, run, "--steps", "2"))
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


# --- 1. killed before the first checkpoint -------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_run_killed_before_its_first_checkpoint_restarts_at_step_0(run_copy, finished, train_cache, train_data, resume):
    # what a kill before the first save leaves: config.json and some metric lines, no checkpoint
    shutil.rmtree(run_copy / "last")
    shutil.rmtree(run_copy / "best")
    with open(run_copy / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    result = invoke(*train_args(train_cache, train_data, run_copy, "--steps", "2", *(["--resume"] if resume else [])))
    assert result.exit_code == 0, result.output
    assert "stopped before its first checkpoint" in result.output and "starting again at step 0" in result.output
    assert step_of(run_copy / "last") == 2 and loss_steps(run_copy) == [1, 2]
    same_weights(run_copy / "last", finished / "last")  # what an uninterrupted run trains


# --- 2. killed mid-save: every kill point of save_checkpoint -------------------------------------


def _tiny_run(tmp_path: Path) -> tuple[AggregationNetwork, torch.optim.Optimizer]:
    torch.manual_seed(0)
    network = AggregationNetwork([LayerInfo("a", 8, 4, 4)], 2, projection_dim=16, output_size=4, num_groups=4)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    network(({"a": torch.randn(1, 2, 8, 4, 4)})).sum().backward()
    optimizer.step()
    return network, optimizer


def _checkpoint_at(tmp_path: Path, network, optimizer, step: int) -> Path:
    """A complete last/ checkpoint at `step`, written by save_checkpoint in a scratch run."""
    with torch.no_grad():
        network.mixing_weights.fill_(float(step))  # tell the steps apart by their weights too
    return save_checkpoint(tmp_path / f"scratch{step}", "last", network, {"step": step}, optimizer)


def _kill_states(tmp_path: Path):
    """(name, files, expected step): the folder a kill leaves at each point of save_checkpoint
    (writing checkpoint 2 over checkpoint 1), in the order of its lines."""
    network, optimizer = _tiny_run(tmp_path)
    one, two = _checkpoint_at(tmp_path, network, optimizer, 1), _checkpoint_at(tmp_path, network, optimizer, 2)
    partial = tmp_path / "partial"
    shutil.copytree(two, partial)
    (partial / "state.json").unlink()  # state.json is written last
    data = (partial / "optimizer.safetensors").read_bytes()
    (partial / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    half_removed = tmp_path / "half-removed"
    shutil.copytree(one, half_removed)
    (half_removed / "model.safetensors").unlink()
    return config_for(network), [
        ("writing the temporary", {"last": one, ".last.tmp": partial}, 1),
        ("temporary written, before the renames", {"last": one, ".last.tmp": two}, 2),
        ("removing a stale .old before the renames", {"last": one, ".last.tmp": two, ".last.old": half_removed}, 2),
        ("between the two renames", {".last.old": one, ".last.tmp": two}, 2),
        ("after the renames, before removing .old", {"last": two, ".last.old": one}, 2),
        ("while removing .old", {"last": two, ".last.old": half_removed}, 2),
    ]


def config_for(network: AggregationNetwork) -> dict:
    features = {"layers": network.config["layers"], "timesteps": [-1, 60], "feature_space": None}
    return make_config(network, features, None, source="test")


def test_every_kill_point_of_a_save_leaves_a_complete_checkpoint_that_is_found(tmp_path):
    config, states = _kill_states(tmp_path)
    for name, files, expected in states:
        run = tmp_path / name.replace(" ", "-").replace(",", "")
        run.mkdir()
        write_json(run / "config.json", config)
        for slot, source in files.items():
            shutil.copytree(source, run / slot)
        found = find_checkpoint(run, "last")
        assert found is not None and step_of(found) == expected, name
        # eval, match and the Python API load it (RUN and RUN/last alike)
        for path in (run, run / "last"):
            ckpt = load_checkpoint(path)
            assert ckpt.state["step"] == expected and ckpt.network.mixing_weights[0].item() == expected, name
        # resume makes it RUN/last again; the next save then goes on from there
        assert promote_checkpoint(run, "last") == run / "last" and step_of(run / "last") == expected, name
        assert not (run / ".last.old").exists(), name
        network = load_checkpoint(run).network
        save_checkpoint(run, "last", network, {"step": expected + 1})
        assert step_of(find_checkpoint(run, "last")) == expected + 1, name
        assert sorted(p.name for p in run.iterdir()) == ["config.json", "last"], name


class _Unsaveable(torch.nn.Module):
    """A network whose weights cannot be read: its save fails while writing the temporary."""

    def state_dict(self, *args, **kwargs):
        raise RuntimeError("weights unavailable")


def test_a_save_after_a_kill_between_the_renames_never_deletes_the_newest_checkpoint(tmp_path):
    network, optimizer = _tiny_run(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(_checkpoint_at(tmp_path, network, optimizer, 1), run / ".last.old")
    shutil.copytree(_checkpoint_at(tmp_path, network, optimizer, 2), run / ".last.tmp")
    # the next save fails after it has cleared the way for its own temporary
    with pytest.raises(RuntimeError, match="weights unavailable"):
        save_checkpoint(run, "last", _Unsaveable(), {"step": 3})
    assert step_of(find_checkpoint(run, "last")) == 2
    save_checkpoint(run, "last", network, {"step": 3}, optimizer)
    assert step_of(run / "last") == 3 and not (run / ".last.tmp").exists() and not (run / ".last.old").exists()


def test_resume_after_a_kill_between_the_renames_continues_from_the_newest_checkpoint(run_copy, train_cache, train_data):
    (run_copy / "last").rename(run_copy / ".last.tmp")  # step 2: written, not yet renamed
    shutil.copytree(run_copy / ".last.tmp", run_copy / ".last.old")
    state = read_json(run_copy / ".last.old" / "state.json")
    write_json(run_copy / ".last.old" / "state.json", {**state, "step": 1})  # the checkpoint before it
    assert load_checkpoint(run_copy / "last").state["step"] == 2  # eval and match find it
    result = invoke(*train_args(train_cache, train_data, run_copy, "--steps", "3", "--resume"))
    assert result.exit_code == 0, result.output
    assert f"resuming {run_copy} from step 2" in result.output
    assert step_of(run_copy / "last") == 3 and loss_steps(run_copy) == [1, 2, 3]
    assert not (run_copy / ".last.tmp").exists() and not (run_copy / ".last.old").exists()


def _state_step(run: Path) -> int | None:
    for slot in ("last", ".last.tmp"):
        try:
            return step_of(run / slot)
        except (OSError, ValueError, KeyError):
            continue
    return None


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> None:
    """Read the process's stderr until a line holds `text` (or it ends, or `timeout` passes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.1)
        if ready:
            line = proc.stderr.readline()
            if text in line or not line:
                return
    raise AssertionError(f"no line with {text!r} within {timeout} s")


def _sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, train_cache, train_data):
    """Killed once before its first checkpoint and once after a later one; the same command with
    --resume then ends where an uninterrupted run ends."""
    out = tmp_path / "killed"
    args = train_args(train_cache, train_data, out, "--steps", "8")
    first = start_cli(*args, capture=True)
    try:
        _wait_for_line(first, "loader:", timeout=300)  # printed as the training loop starts
        _sigkill(first)
    finally:
        first.kill()
    assert (out / "config.json").is_file() and _state_step(out) is None
    second = start_cli(*args, "--resume")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and second.poll() is None and (_state_step(out) or 0) < 4:
            time.sleep(0.01)
        _sigkill(second)
    finally:
        second.kill()
    assert 4 <= (_state_step(out) or 0) < 8
    again = cli(*args, "--resume", timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    straight = tmp_path / "straight"
    assert invoke(*train_args(train_cache, train_data, straight, "--steps", "8")).exit_code == 0
    same_weights(out / "last", straight / "last")
    assert loss_steps(out) == list(range(1, 9))


# --- 3. Ctrl-C ----------------------------------------------------------------------------------


def _finished_loss_lines(run: Path) -> int:
    """Loss lines of a running training written whole (metrics.jsonl is flushed every step)."""
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return sum('"loss"' in line for line in text.split("\n")[:-1])


@pytest.mark.slow
def test_ctrl_c_saves_the_last_finished_step_and_resume_continues_from_it(tmp_path, train_cache, train_data):
    out = tmp_path / "run"
    args = train_args(train_cache, train_data, out, "--steps", "500", "--val-every", "1000")
    proc = start_cli(*args, capture=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _finished_loss_lines(out) < 3:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    step = step_of(out / "last")
    assert 3 <= step < 500 and loss_steps(out) == list(range(1, step + 1))
    result = invoke(*train_args(train_cache, train_data, out, "--steps", str(step + 2), "--resume"))
    assert result.exit_code == 0, result.output
    assert f"resuming {out} from step {step}" in result.output
    assert step_of(out / "last") == step + 2 and loss_steps(out) == list(range(1, step + 3))


# --- 4. --resume takes the run's options ----------------------------------------------------------


def test_resume_takes_the_runs_options_and_refuses_typed_ones_that_differ(run_copy, train_cache, train_data):
    bare = ["train", "--cache", train_cache, "--dataset", f"spair:{train_data}", "--out", str(run_copy),
            "--device", "cpu", "--no-progress", "--resume"]
    result = invoke(*bare, "--seed", "4", "--pairs-per-step", "1")
    refused(result, "--seed: run has 3, now 4", "--pairs-per-step: run has 2, now 1")
    result = invoke(*bare, "--steps", "3")  # none of the network or feature options retyped
    assert result.exit_code == 0, result.output
    assert "from the run's config.json" in result.output and "--projection-dim 32" in result.output
    config = read_json(run_copy / "config.json")
    options = config["training"]["options"]
    assert (options["seed"], options["pairs_per_step"], options["lr"], options["val_load_size"]) == (3, 2, 3e-3, 64)
    assert config["network"]["projection_dim"] == 32 and step_of(run_copy / "last") == 3
    # lr and --steps may change on resume; a typed network option that differs is refused as before
    result = invoke(*bare, "--steps", "4", "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    assert read_json(run_copy / "config.json")["training"]["options"]["lr"] == 1e-3
    assert read_json(run_copy / "last" / "state.json")["optimizer_param_groups"][0]["lr"] == 1e-3
    result = invoke(*bare, "--steps", "5", "--projection-dim", "64")
    assert result.exit_code == 1 and "network projection_dim: run has 32, now 64" in result.output


# --- 5. damaged --resume state ------------------------------------------------------------------


def test_a_torn_metrics_line_is_dropped_on_resume(run_copy, train_cache, train_data):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill mid-write
    result = invoke(*train_args(train_cache, train_data, run_copy, "--steps", "3", "--resume"))
    assert result.exit_code == 0, result.output
    assert "torn last line" in result.output
    assert loss_steps(run_copy) == [1, 2, 3]
    assert all(json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines())


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])


def _flip_last_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _edit_json(path: Path, edit) -> None:
    value = read_json(path)
    edit(value)
    write_json(path, value)


DAMAGED_RESUME = {
    "truncated optimizer": (lambda run: _truncate(run / "last" / "optimizer.safetensors"),
                            "last/optimizer.safetensors: truncated or damaged"),
    "truncated model": (lambda run: _truncate(run / "last" / "model.safetensors"), "last/model.safetensors: truncated"),
    "flipped bit in model": (lambda run: _flip_last_bit(run / "last" / "model.safetensors"),
                             "last/model.safetensors: its sha256 differs"),
    "state.json wrong step type": (lambda run: _edit_json(run / "last" / "state.json", lambda s: s.update(step="two")),
                                   "last/state.json: malformed (step 'two' is not a step number"),
    "state.json without optimizer groups": (
        lambda run: _edit_json(run / "last" / "state.json", lambda s: s.pop("optimizer_param_groups")),
        "last/state.json: malformed (optimizer_param_groups is missing"),
    "state.json not an object": (lambda run: write_json(run / "last" / "state.json", [2]),
                                 "last/state.json: not a JSON object"),
    "config.json wrong type": (lambda run: _edit_json(run / "config.json", lambda c: c["network"].update(projection_dim="32")),
                               "config.json: malformed (network.projection_dim: Input should be a valid integer"),
    "config.json missing key": (lambda run: _edit_json(run / "config.json", lambda c: c.pop("features")),
                                "config.json: malformed (features: Field required"),
    "config.json bad options": (lambda run: _edit_json(run / "config.json", lambda c: c["training"]["options"].update(seed="x")),
                                "config.json: malformed training.options (seed"),
}


@pytest.mark.parametrize("damage", DAMAGED_RESUME)
def test_damaged_resume_state_is_refused_in_one_line(run_copy, train_cache, train_data, damage):
    edit, message = DAMAGED_RESUME[damage]
    edit(run_copy)
    result = invoke(*train_args(train_cache, train_data, run_copy, "--steps", "3", "--resume"))
    refused(result, message)
    assert loss_steps(run_copy) == [1, 2]  # nothing written


def test_resuming_a_finished_run_says_there_is_nothing_to_do(run_copy, train_cache, train_data):
    before = (run_copy / "config.json").read_text()
    result = invoke(*train_args(train_cache, train_data, run_copy, "--steps", "2", "--resume"))
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "already at step 2 of 2: nothing to train" in result.output
    assert (run_copy / "config.json").read_text() == before


# --- 6. malformed run folders for eval, match and the Python API ---------------------------------


def _wrong_shape(run: Path) -> None:
    path = run / "best" / "model.safetensors"
    tensors = load_file(path)
    tensors["mixing_weights"] = torch.ones(5)
    save_file(tensors, path)
    _edit_json(run / "best" / "state.json", lambda s: s.pop("files"))  # an older checkpoint: no digests


MALFORMED_RUNS = {
    "config missing a key": (lambda run: _edit_json(run / "config.json", lambda c: c["network"].pop("num_groups")),
                             "config.json: malformed (network.num_groups: Field required"),
    "config with a wrong type": (lambda run: _edit_json(run / "config.json", lambda c: c["features"].update(timesteps="all")),
                                 "config.json: malformed (features.timesteps: Input should be a valid list"),
    "config not an object": (lambda run: write_json(run / "config.json", [1, 2]), "config.json: holds a JSON list"),
    "config inconsistent": (lambda run: _edit_json(run / "config.json", lambda c: c["network"].update(n_timesteps=2)),
                            "config.json: inconsistent (3 features.timesteps for network.n_timesteps 2)"),
    "weights missing": (lambda run: (run / "best" / "model.safetensors").unlink(), "best/model.safetensors: missing"),
    "weights of the wrong shape": (_wrong_shape, "best/model.safetensors: does not fit the network in config.json "
                                                 "(wrong shape: mixing_weights (5,) (network: (36,)))"),
}


@pytest.mark.parametrize("damage", MALFORMED_RUNS)
def test_malformed_run_folders_are_refused_in_one_line_naming_the_file(run_copy, train_data, tmp_path, damage):
    edit, message = MALFORMED_RUNS[damage]
    edit(run_copy)
    with pytest.raises(CheckpointError, match=r"^[^\n]*$") as caught:
        load_checkpoint(run_copy)
    assert message in str(caught.value)
    with pytest.raises(CheckpointError) as caught:
        Hyperfeatures.from_checkpoint(run_copy, device="cpu")
    assert message in str(caught.value)
    image = next((train_data / "JPEGImages").rglob("*.jpg"))
    result = invoke("match", str(image), str(image), "--checkpoint", str(run_copy), "--out", str(tmp_path / "m.png"),
                    "--device", "cpu")
    refused(result, message)
    assert not (tmp_path / "m.png").exists()


def test_eval_refuses_a_malformed_run_folder_in_one_line(run_copy, train_cache, train_data, tmp_path):
    _wrong_shape(run_copy)
    result = invoke("eval", "--cache", train_cache, "--dataset", f"spair:{train_data}", "--checkpoint", str(run_copy),
                    "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-progress", "--load-size", "64")
    refused(result, "best/model.safetensors: does not fit the network in config.json")


# --- 8. the backbone's path ---------------------------------------------------------------------


def test_new_checkpoints_record_a_local_backbone_folder_as_an_absolute_path(copy_dir, tmp_path, train_cache, train_data,
                                                                            tiny_model_dir, monkeypatch):
    cache = copy_dir(Path(train_cache), "relative.zarr")
    source_meta = source_dir(cache) / "zarr.json"  # the source's attributes hold its provenance
    meta = json.loads(source_meta.read_text())
    meta["attributes"]["dhf_cache"]["provenance"]["model_source"] = "models/tiny"  # as a build given a relative path
    source_meta.write_text(json.dumps(meta))
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny").symlink_to(tiny_model_dir)
    monkeypatch.chdir(work)
    result = invoke(*train_args(str(cache), train_data, tmp_path / "run", "--steps", "1", "--val-split", ""))
    assert result.exit_code == 0, result.output
    recorded = read_json(tmp_path / "run" / "config.json")["features"]["model_source"]
    assert Path(recorded).is_absolute() and Path(recorded).resolve() == tiny_model_dir.resolve()


def test_a_relative_backbone_path_of_an_older_checkpoint_resolves_against_the_run_folder(
        finished, tmp_path, tiny_model_dir, monkeypatch):
    run = Path(shutil.copytree(finished, tmp_path / "runs" / "old"))
    _edit_json(run / "config.json", lambda c: c["features"].update(model_source=os.path.relpath(tiny_model_dir, run)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hf = Hyperfeatures.from_checkpoint(run, device="cpu")
    assert recorded_model(hf.checkpoint) == (str(tiny_model_dir.resolve()), [])
    assert hf.extractor.backbone is not None  # loaded from the run-relative folder, identity checked


def test_a_backbone_that_cannot_be_found_is_one_line_naming_what_was_tried(run_copy, train_data, tmp_path):
    _edit_json(run_copy / "config.json", lambda c: c["features"].update(model_source="gone/tiny-model"))
    image = next((train_data / "JPEGImages").rglob("*.jpg"))
    result = invoke("match", str(image), str(image), "--checkpoint", str(run_copy), "--out", str(tmp_path / "m.png"),
                    "--device", "cpu")
    line = refused(result, "the checkpoint's model 'gone/tiny-model' was not found", str(run_copy / "gone" / "tiny-model"),
                   "the Hugging Face cache", "pass --model")
    assert str(Path.cwd() / "gone" / "tiny-model") in line
    with pytest.raises(ModelNotFoundError, match="tried"):
        Hyperfeatures.from_checkpoint(run_copy, device="cpu").extractor


# --- 9. non-finite loss, unusable pairs, non-finite keypoints -----------------------------------


def test_non_finite_cached_features_are_named_as_a_damaged_cache(copy_dir, tmp_path, train_cache, train_data):
    import zarr

    cache = copy_dir(Path(train_cache), "nan.zarr")
    layer = "up_blocks.1.resnets.0"
    array = zarr.open_array(str(source_dir(cache) / "features" / layer), mode="r+")
    array[:] = np.full(array.shape, np.nan, dtype=np.float16)
    result = invoke(*train_args(str(cache), train_data, tmp_path / "run", "--steps", "2", "--val-split", ""))
    line = refused(result, f"(layer {layer})", "are not finite", "is damaged", f"dhf-cache verify {cache} --repair",
                   "dhf-cache build")
    assert "lower --lr" not in line and ".jpg (layer" in line


def test_pairs_with_unusable_images_are_refused_or_skipped_and_dropped_keypoints_counted(
        copy_dir, tmp_path, train_cache, train_data):
    data = copy_dir(train_data, "data")
    first, second = sorted((data / "PairAnnotation" / "trn").glob("*.json"))[:2]
    unsafe = json.loads(first.read_text())
    unsafe["trg_imname"] = "../../../outside.jpg"
    first.write_text(json.dumps(unsafe))
    nan_kps = json.loads(second.read_text())
    nan_kps["src_kps"][0] = [None, 5.0]
    second.write_text(json.dumps(nan_kps))
    args = train_args(train_cache, data, tmp_path / "run", "--steps", "1", "--val-split", "")
    refused(invoke(*args), "1 training pairs use images that cannot be read", first.stem, "--skip-missing")
    result = invoke(*args, "--skip-missing", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["skipped"]["unreadable_images"] == 1 and summary["skipped"]["nonfinite_keypoints"] == 1
    assert summary["pairs"] == 23
