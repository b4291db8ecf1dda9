"""The offline tiny pipeline: SD 1.5's block layout, loadable by diffusers, seeded."""

from __future__ import annotations

import hashlib

from dhf_cache.tiny_model import SD15_UNET_CONFIG, TINY_UNET_CONFIG, write_tiny_model


def _digest(directory) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*.safetensors"))}


def test_stable_diffusion_pipeline_loads_it(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    unet = pipe.unet
    assert [type(b).__name__ for b in unet.down_blocks] == list(SD15_UNET_CONFIG["down_block_types"])
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                           "CrossAttnUpBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert all(len(block.resnets) == 3 for block in unet.up_blocks)
    assert pipe.vae.config.scaling_factor == 0.18215
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8  # SD's VAE factor
    ids = pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer("a cat").input_ids != pipe.tokenizer("a dog").input_ids
    assert TINY_UNET_CONFIG["layers_per_block"] == SD15_UNET_CONFIG["layers_per_block"] == 2


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = write_tiny_model(tmp_path / "again", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    assert _digest(again) == _digest(tiny_model_dir)
    different = _digest(other)
    assert set(different) == set(_digest(tiny_model_dir))
    assert all(different[k] != v for k, v in _digest(tiny_model_dir).items())
