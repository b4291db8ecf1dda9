"""Stored features equal an independent recomputation with plain hooks (METHOD.md, exactly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.sources.sd.capture import resolve_layers
from dhf_cache.config import BuildOptions, Preprocessing
from dhf_cache.datasets import open_dataset
from dhf_cache.errors import UsageError
from dhf_cache.sources.sd.extract import image_seed
from dhf_cache.pipelines.build import BuildRequest, run_build

PAPER_TIMESTEPS = [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]
UP_LAYERS = [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, mini_spair):
    """The mini data set's test split built with the default 50 steps / 11 saved steps."""
    url = str(tmp_path_factory.mktemp("caches") / "full.zarr")
    request = BuildRequest(
        dataset=open_dataset(f"spair:{mini_spair}"), cache_url=url, model=str(tiny_model_dir), split="test",
        preprocessing=Preprocessing(load_size=48, image_size=64),
    )
    result = run_build(request, BuildOptions(batch_size=1, device="cpu", progress=False), log=lambda _: None)
    assert result.ok and result.n_built == 4
    return FeatureCache.open(url)


def _independent_features(model_dir, latent: np.ndarray):
    """The reference procedure written from METHOD.md alone, with plain forward hooks."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1.0 - betas, 0)

    def a(t):
        return 1.0 if t == -1 else float(alphas[t])

    conv2_out, block_out, current = {}, {}, {}
    for i in range(4):
        for j in range(3):
            name = f"up_blocks.{i}.resnets.{j}"
            resnet = unet.up_blocks[i].resnets[j]
            resnet.conv2.register_forward_hook(lambda m, inp, out, n=name: current.__setitem__(("c", n), out))
            resnet.register_forward_hook(lambda m, inp, out, n=name: current.__setitem__(("b", n), out))
    with torch.no_grad():
        ids = tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids
        emb = text(ids)[0]
        x = torch.from_numpy(latent)[None]
        calls = [-1] + list(range(0, 980, 20))
        for i, t in enumerate(calls):
            eps = unet(x, torch.tensor(t), encoder_hidden_states=emb).sample
            index = 49 - i
            conv2_out[index] = {n: current[("c", n)][0].clone() for n in UP_LAYERS}
            block_out[index] = {n: current[("b", n)][0].clone() for n in UP_LAYERS}
            t_next = t + 20 if t >= 0 else 0
            x0 = (x - (1 - a(t)) ** 0.5 * eps) / a(t) ** 0.5
            x = a(t_next) ** 0.5 * x0 + (1 - a(t_next)) ** 0.5 * eps
    saved = [49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0]
    stack = lambda d: {n: torch.stack([d[s][n] for s in saved]).numpy() for n in UP_LAYERS}  # noqa: E731
    return stack(conv2_out), stack(block_out)


def test_cache_records_the_papers_layers_and_timesteps(built):
    assert built.timesteps == PAPER_TIMESTEPS
    assert [l.name for l in built.layers] == UP_LAYERS
    assert built.meta["save_steps"] == [49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0]


def test_stored_features_equal_an_independent_recomputation(built, tiny_model_dir):
    index = 1
    latent = built.read_latent(index)
    conv2, block = _independent_features(str(tiny_model_dir), latent)
    stored = built.read_features(index)
    for name in UP_LAYERS:
        got = stored[name].astype(np.float32)
        assert got.shape == conv2[name].shape
        want = conv2[name].astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4, err_msg=name)
        # what is stored is the residual branch (conv2), not the resnet block's output
        assert np.abs(got - block[name]).mean() > 10 * np.abs(got - want).mean() + 1e-3, name
    # clean first: the first stored step is the call at t = -1, not the last one
    first = stored["up_blocks.3.resnets.2"][0].astype(np.float32)
    assert np.abs(first - conv2["up_blocks.3.resnets.2"][-1]).mean() > 1e-2


def test_latent_is_a_seeded_sample_of_the_vae_posterior(built, tiny_model_dir, mini_spair):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tiny_model_dir), subfolder="vae").eval()
    image_id = built.image_ids[2]
    pil = Image.open(mini_spair / "JPEGImages" / image_id).convert("RGB").resize((48, 48), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        sample = dist.sample(generator=torch.Generator().manual_seed(image_seed(0, image_id))) * 0.18215
        mean = dist.mean * 0.18215
    stored = built.read_latent(2)
    np.testing.assert_allclose(stored, sample[0].numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(stored - mean[0].numpy()).max() > 1e-3  # sampled, not the mean
    assert built.sizes()[2].tolist() == list(Image.open(mini_spair / "JPEGImages" / image_id).size)


def test_image_seed_depends_on_seed_and_id_only():
    assert image_seed(0, "cat/a.jpg") == image_seed(0, "cat/a.jpg")
    assert len({image_seed(0, "cat/a.jpg"), image_seed(1, "cat/a.jpg"), image_seed(0, "cat/b.jpg")}) == 3


def test_layer_sets_and_explicit_names(tiny_backbone):
    unet = tiny_backbone.unet
    up = resolve_layers(unet, "up")
    down = resolve_layers(unet, "down")
    mid = resolve_layers(unet, "mid")
    assert list(up) == UP_LAYERS
    assert list(down) == [f"down_blocks.{i}.resnets.{j}" for i in range(4) for j in range(2)]
    assert list(mid) == ["mid_block.resnets.0", "mid_block.resnets.1"]
    assert resolve_layers(unet, "all") == down + mid + up
    assert resolve_layers(unet, "up_blocks.1.resnets.2,mid_block.resnets.0") == (
        "up_blocks.1.resnets.2", "mid_block.resnets.0")
    with pytest.raises(UsageError, match="up_blocks.9.resnets.0.*up_blocks.0.resnets.0"):
        resolve_layers(unet, "up_blocks.9.resnets.0")
