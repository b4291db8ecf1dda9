"""The build's speed levers (sources/acceleration.py) change how the network runs, never what is
stored: each lever's build stores the plain build's values within fp16 rounding. On the CPU here
(channels-last, the math attention kernel, torch.compile traced with the eager backend, since
inductor's compile of even the tiny UNet takes minutes on two cores); tests/test_cuda.py runs
the same with inductor and CUDA graphs on a GPU."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import zarr

from conftest import invoke, small_build_args, source_dir


BATCH = 3  # over the 4 test images of mini_spair: the last batch is short (padded when compiled)


def build(url: str, mini_spair, tiny_model_dir, levers: dict | None = None):
    """The test split built in this process into `url`, with `levers` (extractor.accelerate's
    arguments) or none; the source's Zarr group."""
    from dhf_cache.config import BuildOptions, Preprocessing
    from dhf_cache.datasets import open_dataset
    from dhf_cache.pipelines.build import BuildRequest, build_images, open_build, request_records

    request = BuildRequest(dataset=open_dataset(f"spair:{mini_spair}"), cache_url=url, model=str(tiny_model_dir),
                           split="test", steps=10, save_steps=(9, 5, 0), dtype="float32",
                           preprocessing=Preprocessing(load_size=64, image_size=64))
    records = request_records(request)
    assert len(records) % BATCH, "the last batch must be short"
    extractor, cache = open_build(request, [r.id for r in records], "cpu", log=lambda _: None)
    if levers:
        extractor.accelerate(**levers)
    compiled = bool(levers) and levers.get("compile", "off") != "off"
    options = BuildOptions(batch_size=BATCH, progress=False, compile="default" if compiled else "off")
    result = build_images(extractor, cache, records, options, log=lambda _: None)
    assert result.ok and result.n_built == len(records)
    return zarr.open_group(str(source_dir(url)), mode="r")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, mini_spair, tiny_model_dir):
    return build(str(tmp_path_factory.mktemp("plain") / "plain.zarr"), mini_spair, tiny_model_dir)


def assert_same_within_fp16(plain, levers) -> None:
    for name, arr in plain["features"].arrays():
        a, b = arr[:].astype(np.float32), levers["features"][name][:].astype(np.float32)
        # fp32 compute stored as fp16: a reordered sum moves a value by at most an fp16 step
        np.testing.assert_allclose(b, a, rtol=2 ** -9, atol=2 ** -9 * float(np.abs(a).max()), err_msg=name)
    # the VAE sees a padded batch too: its fp32 sums may be ordered otherwise
    np.testing.assert_allclose(levers["latents"][:], plain["latents"][:], rtol=1e-5, atol=1e-6)


def test_channels_last_and_the_math_kernel_store_the_plain_values(tmp_path, plain, mini_spair, tiny_model_dir):
    levers = build(str(tmp_path / "levers.zarr"), mini_spair, tiny_model_dir, {"channels_last": True, "attention": "math"})
    assert_same_within_fp16(plain, levers)


def test_a_compiled_unet_captures_every_saved_step_and_pads_the_short_batch(tmp_path, plain, mini_spair, tiny_model_dir):
    """torch.compile traces the capture hooks (dynamo, eager backend); the UNet is compiled for one
    batch shape and capture never toggles, so the short last batch is padded, not recompiled."""
    torch._dynamo.reset()
    levers = build(str(tmp_path / "compiled.zarr"), mini_spair, tiny_model_dir,
                   {"compile": "default", "backend": "eager", "attention": "math"})
    assert_same_within_fp16(plain, levers)
    counters = torch._dynamo.utils.counters["stats"]
    assert counters["unique_graphs"] == 1, dict(counters)  # one graph: no recompile for capture or the short batch


def test_pad_batch_repeats_the_last_image():
    from dhf_cache.sources.acceleration import pad_batch

    pixels = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    padded, ids = pad_batch(pixels, ["a", "b"], 4)
    assert ids == ["a", "b", "b", "b"] and padded.shape == (4, 3, 2, 2)
    assert torch.equal(padded[3], pixels[1]) and torch.equal(padded[:2], pixels)
    assert pad_batch(pixels, ["a", "b"], 2)[0] is pixels


@pytest.mark.parametrize("flag, line", [
    (("--attention", "efficient"), "--attention efficient: a CUDA kernel"),
    (("--compile", "reduce-overhead"), "CUDA graphs need a CUDA device"),
    (("--compile", "fast"), "--compile"),
    (("--attention", "xformers"), "--attention"),
])
def test_a_lever_the_device_lacks_is_one_line_before_the_model_loads(tmp_path, mini_spair, flag, line):
    result = invoke(*small_build_args(f"spair:{mini_spair}", tmp_path / "c.zarr", tmp_path / "no-model", *flag))
    assert result.exit_code == 2, result.output
    assert line in result.output and "Traceback" not in result.output
    assert "no such directory" not in result.output  # refused before the model is looked for
    assert not (tmp_path / "c.zarr").exists()


def test_the_cli_levers_reach_the_build(tmp_path, mini_spair, tiny_model_dir):
    cache = tmp_path / "c.zarr"
    result = invoke(*small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--limit", "2",
                                      "--channels-last", "--attention", "math", "--json"))
    assert result.exit_code == 0, result.output
    assert "speed levers: channels_last=True, attention=math, compile=off" in result.output
    assert '"n_built": 2' in result.output
