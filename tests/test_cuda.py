"""The CUDA paths, end to end (skipped without CUDA; `bash bench/gpu_device.sh run` runs them on a
lent GPU before its benchmarks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from conftest import SMALL_NET, cli, small_build_args, source_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_a_cuda_build_stores_the_cpu_builds_features(tmp_path, mini_spair, tiny_model_dir):
    """Same spec (float32 compute, TF32 off) on both devices: the same latents (CPU generators per
    image id) and the same features up to the order of GPU sums and fp16 storage."""
    caches = {}
    for device in ("cpu", "cuda"):
        caches[device] = tmp_path / f"{device}.zarr"
        args = small_build_args(f"spair:{mini_spair}", caches[device], tiny_model_dir, "--split", "test",
                                "--dtype", "float32")
        args[args.index("--device") + 1] = device
        result = cli(*args, env={"NVIDIA_TF32_OVERRIDE": "0"})  # full fp32 on the GPU too
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_features(caches["cpu"], caches["cuda"], latents_tolerance=1e-3)


def assert_same_features(reference, other, latents_tolerance: float) -> None:
    """Two caches of the same images: latents within the tolerance; every map finite and the same
    up to 2% of its layer's range, correlation > 0.999 (the order of GPU sums, fp16 storage)."""
    a_group, b_group = (zarr.open_group(str(source_dir(c)), mode="r") for c in (reference, other))
    np.testing.assert_allclose(b_group["latents"][:], a_group["latents"][:], rtol=latents_tolerance,
                               atol=latents_tolerance)
    for name, arr in a_group["features"].arrays():
        a, b = arr[:].astype(np.float32), b_group["features"][name][:].astype(np.float32)
        assert np.isfinite(b).all()
        assert np.abs(a - b).max() <= 0.02 * np.abs(a).max(), name
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999, name


def test_the_speed_levers_store_the_plain_cuda_builds_features(tmp_path, mini_spair, tiny_model_dir):
    """fp16 on the GPU, with and without channels-last, the flash kernel chosen by torch and the
    UNet compiled with CUDA graphs (batch 3 over 4 images: the short batch is padded): the same
    latents and features up to fp16 compute's reordering."""
    caches = {}
    for name, levers in (("plain", ()), ("levers", ("--channels-last", "--compile", "reduce-overhead"))):
        caches[name] = tmp_path / f"{name}.zarr"
        args = small_build_args(f"spair:{mini_spair}", caches[name], tiny_model_dir, "--split", "test",
                                "--dtype", "float16", "--batch-size", "3", *levers)
        args[args.index("--device") + 1] = "cuda"
        result = cli(*args, timeout=900)
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_features(caches["plain"], caches["levers"], latents_tolerance=1e-2)


def test_bf16_training_on_cuda_tracks_fp32(tmp_path, train_cache, train_data):
    """--precision bf16 on the GPU (autocast, bf16 tensor cores): the same start and pairs give
    losses within 2% of fp32's over a few steps, and the run records its precision."""
    losses = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        result = cli("train", "--cache", train_cache, "--dataset", f"spair:{train_data}", "--out", str(run),
                     "--steps", "5", "--val-split", "", "--device", "cuda", "--no-progress", "--precision", precision,
                     *SMALL_NET, env={"NVIDIA_TF32_OVERRIDE": "0"})
        assert result.returncode == 0, result.stderr[-2000:]
        losses[precision] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                             if '"loss"' in line]
        assert json.loads((run / "config.json").read_text())["training"]["options"]["precision"] == precision
    assert losses["bf16"] != losses["fp32"]
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.02)


def test_every_stage_runs_on_cuda(tmp_path):
    work = tmp_path / "demo"
    result = cli("demo", "--workdir", str(work), "--device", "cuda", "--no-progress", "--image-size", "64",
                 "--inversion-steps", "5", "--train-steps", "20", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained aggregator" in result.stdout
    info = json.loads(cli("info", str(work / "features.zarr"), "--json").stdout)
    assert info["n_done"] == info["n_images"] == 50
    assert info["spec"]["compute"]["dtype"] == "float16"  # auto on CUDA
    verify = cli("verify", str(work / "features.zarr"), "--json")
    assert verify.returncode == 0, verify.stdout[-2000:]
    metrics = json.loads((work / "eval" / "trained" / "metrics.json").read_text())
    assert metrics["n_pairs"] == 30


def test_features_reach_the_host_through_pinned_memory_unchanged():
    from dhf_cache.sources.sd.extract import to_host

    gen = torch.Generator("cuda").manual_seed(0)
    on_gpu = {"a": torch.randn(2, 11, 8, 4, 4, device="cuda", generator=gen).half(),
              "b": torch.randn(2, 11, 3, 16, 16, device="cuda", generator=gen).half()}
    for _ in range(2):  # the second batch reuses the caching host allocator's blocks
        host = to_host(on_gpu)
        for name, tensor in on_gpu.items():
            assert host[name].device.type == "cpu" and host[name].is_pinned()
            assert torch.equal(host[name], tensor.cpu())


def test_step_inputs_stage_through_pinned_buffers():
    from dhf_cache.pipelines.train import StepInputs

    gen = torch.Generator().manual_seed(0)
    feats = [({"a": torch.randn(2, 3, 4, 4, generator=gen).half()}, {"a": torch.randn(2, 3, 4, 4, generator=gen).half()})]
    staging = StepInputs("cuda")
    for _ in range(2):
        moved = staging(["a"], feats)["a"]
        assert moved.device.type == "cuda"
        assert torch.equal(moved.cpu(), torch.stack([feats[0][0]["a"], feats[0][1]["a"]]))
    assert staging._buffers["a"].is_pinned()
