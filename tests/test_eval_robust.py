"""eval, descriptor sets and export-images under interruption and bad input (issue 14).

Kills are real SIGKILLs of a `dhf-cache eval` process; half-made states are the exact files such
a kill leaves. Caches are private copies of conftest's `train_cache`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.codecs as zc

from conftest import SMALL_NET, eval_args, invoke, source_dir, start_cli
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.cache.descriptor_store import list_descriptor_sets
from dhf_cache.errors import UsageError
from dhf_cache.config import MAX_LOAD_SIZE
from dhf_cache.pipelines.evaluate import EvalRequest, run_eval
from dhf_cache.reports.report import best_cell, render_report



def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_cache, train_data) -> Path:
    """A small checkpoint (2 steps: its descriptors only need to be deterministic)."""
    out = tmp_path_factory.mktemp("robust-run") / "run"
    result = invoke("train", "--cache", train_cache, "--dataset", f"spair:{train_data}", "--out", out, "--steps", "2",
                    "--val-split", "", "--device", "cpu", "--no-progress", *SMALL_NET)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def cache(tmp_path, train_cache) -> Path:
    return Path(shutil.copytree(train_cache, tmp_path / "cache.zarr"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_cache, train_data, run) -> dict:
    """metrics.json of an uninterrupted checkpoint eval on a fresh copy of the cache."""
    base = tmp_path_factory.mktemp("robust-ref")
    copy = shutil.copytree(train_cache, base / "cache.zarr")
    result = invoke(*eval_args(copy, train_data, base / "out", "--checkpoint", run))
    assert result.exit_code == 0, result.output
    return json.loads((base / "out" / "metrics.json").read_text())


# ------------------------------------------------------------------ 1. half-created descriptor sets


def test_a_descriptor_set_cut_short_between_its_arrays_is_recreated(tmp_path, cache, run, train_data, reference):
    key = reference["fingerprints"]["checkpoint"][:32]
    # Exactly what an eval killed between creating `maps` and `done` leaves: the set's group and
    # its `maps` array (created as eval creates it), no `done`, no attributes.
    group = zarr.open_group(source_dir(cache), mode="r+").require_group("descriptors").require_group(key)
    group.create_array("maps", shape=(16, 32, 16, 16), chunks=(1, 32, 16, 16), dtype="float16",
                       compressors=[zc.ZstdCodec(level=3), zc.Crc32cCodec()], fill_value=0,
                       config={"write_empty_chunks": True})
    [half] = list_descriptor_sets(FeatureCache.open(str(cache)))
    assert not half.complete and half.images_done == 0

    result = invoke(*eval_args(cache, train_data, tmp_path / "out", "--checkpoint", run, "--json"))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["descriptors"] == {"computed": 4, "reused": 0, "stored_in_cache": True}
    assert metrics["pck"] == reference["pck"]
    [whole] = list_descriptor_sets(FeatureCache.open(str(cache)))
    assert whole.complete and whole.images_done == 4 and whole.checkpoint_fingerprint == reference["fingerprints"]["checkpoint"]


def test_eval_killed_while_creating_its_descriptor_set_reruns_to_the_same_result(
        tmp_path, cache, run, train_data, reference):
    maps_meta = source_dir(cache) / "descriptors" / reference["fingerprints"]["checkpoint"][:32] / "maps" / "zarr.json"
    proc = start_cli(*eval_args(cache, train_data, tmp_path / "killed", "--checkpoint", run))
    try:
        deadline = time.monotonic() + 300
        while not maps_meta.exists():  # kill the moment the first array of the set exists
            assert proc.poll() is None, "eval ended before creating its descriptor set"
            assert time.monotonic() < deadline, "eval never created its descriptor set"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    result = invoke(*eval_args(cache, train_data, tmp_path / "out", "--checkpoint", run, "--json"))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["pck"] == reference["pck"]
    assert metrics["descriptors"]["computed"] + metrics["descriptors"]["reused"] == 4


# ------------------------------------------------------------------ 2. listing and pruning


def test_descriptor_sets_are_listed_and_pruned(tmp_path, cache, run, train_data, reference):
    assert list_descriptor_sets(FeatureCache.open(str(cache))) == []
    assert invoke(*eval_args(cache, train_data, tmp_path / "a", "--checkpoint", run)).exit_code == 0
    fingerprint = reference["fingerprints"]["checkpoint"]
    [item] = list_descriptor_sets(FeatureCache.open(str(cache)))
    folder = source_dir(cache) / "descriptors" / fingerprint[:32]
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert (item.key, item.checkpoint_fingerprint) == (fingerprint[:32], fingerprint)
    assert (item.images_done, item.n_images, item.complete, item.bytes) == (4, 16, True, on_disk)

    dry = invoke("prune", cache, "--descriptors", fingerprint[:8], "--dry-run")
    assert dry.exit_code == 0 and f"would remove descriptors/{item.key}" in dry.output and folder.is_dir()
    for args, message in [((), "exactly one of"), (("--descriptors", "0" * 32, "--all-descriptors"), "exactly one of"),
                          (("--descriptors", "f00d"), f"no descriptor set 'f00d' (sets: {item.key})")]:
        refused = invoke("prune", cache, *args)
        assert refused.exit_code != 0 and len(error_lines(refused.output)) == 1 and message in refused.output
    assert folder.is_dir()

    removed = invoke("prune", cache, "--descriptors", fingerprint)  # the full fingerprint works too
    assert removed.exit_code == 0, removed.output
    assert f"removed descriptors/{item.key}" in removed.output and not folder.exists()
    assert FeatureCache.open(str(cache)).done_mask().sum() == 16  # the features are untouched
    again = invoke(*eval_args(cache, train_data, tmp_path / "b", "--checkpoint", run, "--json"))
    assert json.loads(again.stdout)["descriptors"]["computed"] == 4

    assert "removed 1 descriptor sets" in invoke("prune", cache, "--all-descriptors").output
    assert "nothing to remove" in invoke("prune", cache, "--all-descriptors").output
    missing = tmp_path / "nope.zarr"
    refused = invoke("prune", missing, "--all-descriptors")
    assert refused.exit_code == 1 and len(error_lines(refused.output)) == 1 and not missing.exists()


# ------------------------------------------------------------------ 3. a missing cache


@pytest.mark.parametrize("mode", ["checkpoint", "raw"])
def test_eval_on_a_missing_cache_creates_nothing(tmp_path, run, train_data, mode):
    missing, out = tmp_path / "nope.zarr", tmp_path / "out"
    extra = ("--checkpoint", run) if mode == "checkpoint" else ("--raw", "best")
    result = invoke(*eval_args(missing, train_data, out, *extra))
    assert result.exit_code == 1
    [line] = error_lines(result.output)
    assert str(missing) in line
    assert not missing.exists() and not out.exists()


# ------------------------------------------------------------------ 4. the load size


def test_a_huge_load_size_is_one_line_before_any_work(tmp_path, cache, train_data):
    out = tmp_path / "out"
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    args = eval_args(cache, train_data, out, "--raw", "best")
    args[args.index("--load-size") + 1] = "100000"
    result = invoke(*args)
    assert result.exit_code == 2  # a usage error
    [line] = error_lines(result.output)
    assert line.startswith("error: --load-size 100000: expected 8 to 2048") and "40.0 GB" in line
    assert not out.exists() and sorted(p.relative_to(cache) for p in cache.rglob("*")) == before
    with pytest.raises(UsageError, match="--load-size 4"):  # the Python API checks it too
        run_eval(EvalRequest(cache_url=str(cache), dataset=f"spair:{train_data}", out=out, raw="best", load_size=4))
    assert MAX_LOAD_SIZE == 2048  # the help text says so


# ------------------------------------------------------------------ 5. one best map on a tie


def test_best_cell_breaks_ties_by_the_first_cell_in_table_order():
    assert best_cell([[0.2, None, 0.5], [0.5, float("nan"), 0.1]]) == (0, 2)
    assert best_cell([[None, 0.3], [0.3, 0.3]]) == (0, 1)
    assert best_cell([[None], [float("nan")]]) is None
    report = render_report({"pck": {"bbox@0.1": {"per_point": 0.5}}},
                           {"layers": ["a", "b"], "timesteps": [-1, 300], "pck": [[0.1, 0.4], [0.4, 0.2]]})
    assert "Best (★): `b` at t = -1" in report  # a table without "best" is marked by the same rule


def test_raw_best_names_one_map_everywhere_when_two_tie(tmp_path, cache, train_data):
    group = zarr.open_group(source_dir(cache), mode="r+")
    good = np.asarray(group["features/up_blocks.3.resnets.1"][:, 0])  # its t = -1 maps, (N, 32, 8, 8)
    for name in group["features"].array_keys():  # every other map zero: no keypoint matches
        # write_empty_chunks as dhf-cache writes (it is a runtime setting, not in the metadata):
        # otherwise zarr deletes the all-zero chunks, and a missing chunk is refused as damage
        with zarr.config.set({"array.write_empty_chunks": True}):
            array = zarr.open_array(source_dir(cache) / "features" / name, mode="r+")
            array[:] = np.zeros(array.shape, dtype=array.dtype)
    # the same maps at (t = 300, up_blocks.3.resnets.0), met first by a layer-by-layer sweep, and at
    # (t = -1, up_blocks.3.resnets.1), the first of the two in the table's order
    group["features/up_blocks.3.resnets.0"][:, 1] = good
    group["features/up_blocks.3.resnets.1"][:, 0] = good

    result = invoke(*eval_args(cache, train_data, tmp_path / "best", "--raw", "best"))
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "best" / "raw_sweep.json").read_text())
    pck = np.array(table["pck"], dtype=float)
    layers = table["layers"]
    a, b = (1, layers.index("up_blocks.3.resnets.0")), (0, layers.index("up_blocks.3.resnets.1"))
    assert pck[a] == pck[b] and (np.delete(pck.ravel(), [np.ravel_multi_index(c, pck.shape) for c in (a, b)])
                                 < pck[a]).all(), "precondition: the two maps tie, above every other"
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert metrics["options"]["descriptor"] == "raw best: up_blocks.3.resnets.1@-1 (chosen on the val split)"
    assert (table["best"]["layer"], table["best"]["timestep"]) == ("up_blocks.3.resnets.1", -1)
    assert "Best (★): `up_blocks.3.resnets.1` at t = -1" in (tmp_path / "best" / "report.md").read_text()
    single = invoke(*eval_args(cache, train_data, tmp_path / "one", "--raw", "up_blocks.3.resnets.1@-1"))
    assert single.exit_code == 0, single.output
    assert ((tmp_path / "best" / "predictions.jsonl").read_text()
            == (tmp_path / "one" / "predictions.jsonl").read_text())


# ------------------------------------------------------------------ 6. unusable images of pairs


def test_pairs_with_unusable_or_unbuilt_images_are_refused_or_skipped_and_counted(tmp_path, train_data,
                                                                                  tiny_model_dir):
    root = tmp_path / "mine"
    shutil.copytree(train_data / "JPEGImages" / "cat", root / "imgs")
    a, b, c, d = (f"imgs/chelsea_00{i}.jpg" for i in (0, 1, 2, 3))

    def pair(name, src, trg, src_kps=((10, 10), (30, 20)), trg_kps=((12, 11), (29, 22))):
        return {"name": name, "src": src, "trg": trg, "src_kps": src_kps, "trg_kps": trg_kps, "category": "cat"}

    (root / "build.json").write_text(json.dumps({"pairs": [pair("ab", a, b), pair("ca", c, a)]}))
    build = invoke("build", "--dataset", f"pairs:{root / 'build.json'}", "--cache", tmp_path / "c.zarr",
                   "--model", tiny_model_dir, "--load-size", "64", "--image-size", "64", "--steps", "2",
                   "--save-steps", "1,0", "--device", "cpu", "--no-progress")
    assert build.exit_code == 0, build.output
    (root / c).unlink()  # built, but its file is gone: the data set marks its pairs unusable
    (root / "eval.json").write_text(json.dumps({"pairs": [
        pair("ab", a, b),
        pair("nan", a, b, src_kps=[[10, 10], [None, 3], [30, 20]], trg_kps=[[12, 11], [5, 5], [29, 22]]),
        pair("gone", c, a),
        pair("unsafe", "../outside.jpg", b),
        pair("unbuilt", d, a),
    ]}))

    def evaluate(*extra):
        return invoke("eval", "--cache", tmp_path / "c.zarr", "--dataset", f"pairs:{root / 'eval.json'}",
                      "--out", tmp_path / "e", "--raw", "up_blocks.3.resnets.2@-1", "--load-size", "64",
                      "--device", "cpu", "--no-progress", *extra)

    refused = evaluate()
    assert refused.exit_code == 1
    [line] = error_lines(refused.output)
    assert "2 test pairs" in line and "gone (" in line and "unsafe (" in line and "--skip-missing" in line
    assert not (tmp_path / "e").exists()
    result = evaluate("--skip-missing")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_pairs"] == 2 and metrics["n_points"] == 4
    skipped = metrics["skipped"]
    assert (skipped["unusable_image_pairs"], skipped["missing_image_pairs"], skipped["dropped_nonfinite_points"]) == (2, 1, 1)
    assert "unusable_image_pairs" in (tmp_path / "e" / "report.md").read_text()


# ------------------------------------------------------------------ 7. export-images and unsafe ids


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_model_dir) -> Path:
    prompts = tmp_path_factory.mktemp("robust-prompts") / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    cache = tmp_path_factory.mktemp("robust-gen") / "gen.zarr"
    result = invoke("build", "--generate", prompts, "--cache", cache, "--model", tiny_model_dir, "--image-size", "64",
                    "--steps", "2", "--save-steps", "1,0", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    return cache


@pytest.mark.parametrize("bad_id", ["no-extension", "../../escaped.png", "/abs/olute.png", "a//b.png", "a\\b.png",
                                    "photo.jpg", ".png", "x" * 300 + ".png"])
def test_export_refuses_ids_that_are_not_safe_png_names(tmp_path, generated, bad_id):
    cache = Path(shutil.copytree(generated, tmp_path / "gen.zarr"))
    ids = zarr.open_group(source_dir(cache), mode="r+")["image_ids"]
    ids[1] = bad_id
    out = tmp_path / "deep" / "out"
    result = invoke("export-images", cache, out, "--no-progress")
    assert result.exit_code == 1
    [line] = error_lines(result.output)
    assert repr(bad_id) in line and "nothing was written" in line
    assert not (tmp_path / "deep").exists() and not (tmp_path / "escaped.png").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"gen.zarr"}


def test_export_writes_a_safe_nested_id_where_it_says(tmp_path, generated):
    cache = Path(shutil.copytree(generated, tmp_path / "gen.zarr"))
    zarr.open_group(source_dir(cache), mode="r+")["image_ids"][0] = "sub-dir/00000-00.png"
    result = invoke("export-images", cache, tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")) == [
        "00001-00.png", "sub-dir/00000-00.png"]
