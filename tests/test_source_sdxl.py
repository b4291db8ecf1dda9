"""SDXL as a feature source: the tiny SDXL loads in the real pipeline, and the conditioning, UNet
call and latents are what diffusers' StableDiffusionXLPipeline computes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from pydantic import ValidationError

from dhf_cache.errors import ModelNotFoundError, UsageError
from dhf_cache.sources.sdxl import (
    SDXL_UNET_CONFIG,
    TINY_SDXL_UNET_CONFIG,
    SdxlIdentity,
    encode_image_latents,
    load_sdxl,
    sdxl_conditioning,
    sdxl_unet_call,
    up_block_layers,
    write_tiny_sdxl,
)

PROMPT = "a photo of a cat on a mat"


def _digest(directory) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def backbone(sdxl_dir):
    return load_sdxl(str(sdxl_dir)).to("cpu")


def _run_pipeline(pipe, height=64, width=64, images=1):
    """One Euler step of the real pipeline without guidance; the UNet's inputs and output."""
    seen = {}

    def hook(_module, args, kwargs, output):
        seen.update(sample=args[0].clone(), t=args[1], kwargs=kwargs, out=output[0].clone())

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0, height=height, width=width,
             num_images_per_prompt=images, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return seen


def test_tiny_sdxl_loads_in_the_real_pipeline_with_sdxl_layout(pipe, backbone):
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = pipe.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.config.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.config.projection_class_embeddings_input_dim == 6 * unet.config.addition_time_embed_dim + te2.projection_dim
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    # the same weights through load_sdxl and the pipeline
    assert backbone.prediction_type == "epsilon" and backbone.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), backbone.unet.state_dict().values()))
    # SDXL base's real config obeys the same arithmetic (768 + 1280, 6 * 256 + 1280)
    assert SDXL_UNET_CONFIG["cross_attention_dim"] == 768 + 1280
    assert SDXL_UNET_CONFIG["projection_class_embeddings_input_dim"] == 6 * SDXL_UNET_CONFIG["addition_time_embed_dim"] + 1280


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, sdxl_dir):
    again = _digest(write_tiny_sdxl(tmp_path / "again", seed=0))
    assert again == _digest(sdxl_dir) and len(again) == 4  # unet, vae, both text encoders
    other = _digest(write_tiny_sdxl(tmp_path / "other", seed=1))
    assert all(other[k] != v for k, v in again.items())


@pytest.mark.parametrize(("height", "width", "images"), [(64, 64, 1), (64, 96, 2)])
def test_conditioning_is_what_the_pipeline_passes_its_unet(pipe, backbone, height, width, images):
    seen = _run_pipeline(pipe, height, width, images)
    cond = sdxl_conditioning(backbone, PROMPT, height, width, images, "cpu", torch.float32)
    kwargs = seen["kwargs"]
    assert cond.encoder_hidden_states.shape == (images, 77, TINY_SDXL_UNET_CONFIG["cross_attention_dim"])
    torch.testing.assert_close(cond.encoder_hidden_states, kwargs["encoder_hidden_states"], rtol=0, atol=1e-6)
    added = kwargs["added_cond_kwargs"]
    assert set(added) == set(cond.added_cond_kwargs) == {"text_embeds", "time_ids"}
    torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"], added["text_embeds"], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.added_cond_kwargs["time_ids"], added["time_ids"], rtol=0, atol=0)
    assert cond.added_cond_kwargs["time_ids"][0].tolist() == [height, width, 0, 0, height, width]


def test_unet_call_needs_added_cond_kwargs_and_gives_the_pipelines_output(pipe, backbone):
    seen = _run_pipeline(pipe)
    cond = sdxl_conditioning(backbone, PROMPT, 64, 64, 1, "cpu", torch.float32)
    with torch.no_grad():
        out = sdxl_unet_call(backbone, seen["sample"], seen["t"], cond)
        torch.testing.assert_close(out, seen["out"], rtol=1e-5, atol=1e-5)
        # a plain SD-style call (no added_cond_kwargs) is refused by SDXL's UNet
        with pytest.raises(TypeError):  # diffusers 0.42: `"text_embeds" in None`
            backbone.unet(seen["sample"], seen["t"], encoder_hidden_states=cond.encoder_hidden_states)
        with pytest.raises(ValueError, match="text_embeds"):
            backbone.unet(seen["sample"], seen["t"], encoder_hidden_states=cond.encoder_hidden_states,
                          added_cond_kwargs={})
        # and the added conditioning changes the prediction: both the pooled text and the time ids
        for key, value in (("time_ids", torch.tensor([[128.0, 128, 0, 0, 128, 128]])),
                           ("text_embeds", torch.zeros_like(cond.added_cond_kwargs["text_embeds"]))):
            other = type(cond)(cond.encoder_hidden_states, {**cond.added_cond_kwargs, key: value})
            assert not torch.allclose(sdxl_unet_call(backbone, seen["sample"], seen["t"], other), out, atol=1e-4), key
        # a one-row conditioning serves a batch, row by row the same
        batch = sdxl_unet_call(backbone, seen["sample"].repeat(2, 1, 1, 1), seen["t"], cond)
        torch.testing.assert_close(batch[1:], out, rtol=1e-5, atol=1e-5)


def test_up_block_layers_are_captures_up_set_and_are_captured(backbone):
    from dhf_cache.sources.sd.capture import FeatureCapture, resolve_layers

    layers = up_block_layers(backbone.unet)
    assert layers == [f"up_blocks.{b}.resnets.{r}" for b in range(3) for r in range(3)]
    assert list(resolve_layers(backbone.unet, "up")) == layers  # capture.py works unchanged on SDXL
    cond = sdxl_conditioning(backbone, PROMPT, 64, 64, 1, "cpu", torch.float32)
    with FeatureCapture(backbone.unet, layers) as capture, torch.no_grad():
        capture.enabled = True
        sdxl_unet_call(backbone, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500, cond)
        maps = capture.take()
    assert [maps[n].shape[-1] for n in layers] == [2] * 3 + [4] * 3 + [8] * 3
    assert [maps[n].shape[1] for n in layers] == [64] * 6 + [32] * 3


def test_non_sdxl_folders_are_refused_in_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(UsageError) as refused:
        load_sdxl(str(tiny_model_dir))  # the SD 1.5-shaped tiny model
    message = str(refused.value)
    assert "\n" not in message and "not an SDXL" in message and "addition_embed_type" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError) as missing:
        load_sdxl(str(tmp_path / "empty"))
    assert "\n" not in str(missing.value) and "unet/config.json" in str(missing.value)


def test_latents_as_diffusers_and_the_vae_upcast_in_fp16(sdxl_dir, backbone):
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
        retrieve_latents,
    )

    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = encode_image_latents(backbone, pixels, torch.Generator().manual_seed(7))
    with torch.no_grad():  # diffusers' img2img: retrieve_latents(vae.encode(image), generator) * scaling
        expected = retrieve_latents(backbone.vae.encode(pixels), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(latents, expected * 0.13025)
    # one generator per image: a row does not depend on its batch
    rows = encode_image_latents(backbone, pixels, [torch.Generator().manual_seed(s) for s in (3, 4)])
    alone = encode_image_latents(backbone, pixels[1:], [torch.Generator().manual_seed(4)])
    torch.testing.assert_close(rows[1:], alone, rtol=1e-5, atol=1e-5)

    half = load_sdxl(str(sdxl_dir), dtype=torch.float16).to("cpu")
    assert half.identity() == backbone.identity() and isinstance(half.identity(), SdxlIdentity)
    with pytest.raises(ValidationError):  # frozen
        half.identity().unet_sha256 = "x"
    dtypes = []
    handle = half.vae.encoder.register_forward_pre_hook(
        lambda module, args: dtypes.append((args[0].dtype, next(module.parameters()).dtype)))
    try:
        latents16 = encode_image_latents(half, pixels, torch.Generator().manual_seed(7))
    finally:
        handle.remove()
    assert dtypes == [(torch.float32, torch.float32)]  # force_upcast: the VAE ran in float32
    assert half.vae.dtype == torch.float16  # and is back in fp16 after
    assert latents16.dtype == torch.float32 and torch.isfinite(latents16).all()
    torch.testing.assert_close(latents16, latents, rtol=1e-2, atol=1e-2)  # fp16-rounded weights only
