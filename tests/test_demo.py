"""`dhf-cache demo` end to end: build, train, eval, and the trained-vs-raw table, offline."""

from __future__ import annotations

import json

from conftest import cli


def test_demo_runs_every_stage_and_prints_the_comparison(tmp_path):
    work = tmp_path / "demo"
    args = ["demo", "--workdir", str(work), "--device", "cpu", "--no-progress",
            "--image-size", "64", "--inversion-steps", "5", "--train-steps", "20"]
    result = cli(*args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "PCK@0.1 on the sample data's test pairs (30 pairs" in out
    assert "trained aggregator" in out and "one raw map, best on val (up_blocks." in out
    assert "95% bootstrap interval over the 30 pairs" in out and "Why the trained network need not win" in out
    for stage in ("stage one", "stage two", "stage three"):
        assert stage in result.stderr
    info = json.loads(cli("info", str(work / "features.zarr"), "--json").stdout)
    assert info["n_done"] == info["n_images"] == 50
    trained = json.loads((work / "eval" / "trained" / "metrics.json").read_text())
    raw = json.loads((work / "eval" / "raw-best" / "metrics.json").read_text())
    assert trained["n_pairs"] == raw["n_pairs"] == 30
    assert raw["options"]["select_split"] == "val"  # the raw map is never chosen on the pairs it is scored on
    assert (work / "run" / "best" / "model.safetensors").is_file()
    # a second run reuses the cache, the finished run and the stored descriptors
    again = cli(*args, timeout=900)
    assert again.returncode == 0
    assert "50 already done" in again.stderr and "nothing to train" in again.stderr
    assert "descriptors: 15 images, 15 stored, 0 to compute" in again.stderr
