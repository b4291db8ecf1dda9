"""Models whose UNet predicts v (SD 2.x at 768 px) are inverted with the noise their v implies;
until this existed they were inverted as if v were the noise, silently giving other features."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from conftest import invoke, small_build_args
from dhf_cache.sources.sd.backbone import load_backbone
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.config import FeatureSpace, Preprocessing, SchedulerSpec
from dhf_cache.errors import UsageError
from dhf_cache.sources.sd.extract import FeatureExtractor
from dhf_cache.cache.fingerprint import spec_fingerprints
from dhf_cache.sources.sd.inversion import make_schedule, noise_estimate
from dhf_cache.sources.sd.tiny_model import write_tiny_model

LAYERS = ("up_blocks.1.resnets.0", "up_blocks.3.resnets.2")


@pytest.mark.parametrize("a_t", [0.2, 0.7, 0.999, 1.0])
def test_noise_from_v_is_exact(a_t):
    gen = torch.Generator().manual_seed(0)
    eps, x0 = torch.randn(4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(4, 8, 8, generator=gen, dtype=torch.float64)
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    v = math.sqrt(a_t) * eps - math.sqrt(1 - a_t) * x0
    assert torch.allclose(noise_estimate(v, x_t, a_t, "v_prediction"), eps, atol=1e-12)
    assert noise_estimate(eps, x_t, a_t, "epsilon") is eps
    with pytest.raises(ValueError, match="sample"):
        noise_estimate(v, x_t, a_t, "sample")


def _v_predicting(backbone, alphas):
    """The same UNet, answering v where it answered the noise: a v-prediction model whose
    noise estimate is known exactly (the hooked layers see the same tensors)."""
    twin = copy.deepcopy(backbone)

    class VPrediction(type(twin.unet)):
        def forward(self, sample, timestep, *args, **kwargs):
            eps = super().forward(sample, timestep, *args, **kwargs).sample.double()
            t = int(torch.as_tensor(timestep).reshape(-1)[0])
            a = 1.0 if t < 0 else alphas[t]
            x = sample.double()
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            return UNet2DConditionOutput(sample=(math.sqrt(a) * eps - math.sqrt(1 - a) * x0).to(sample.dtype))

    twin.unet.__class__ = VPrediction
    twin.prediction_type = "v_prediction"
    return twin


def test_a_v_predicting_unet_gives_the_features_of_its_noise_predicting_twin(tiny_backbone):
    space = FeatureSpace(model=tiny_backbone.identity, steps=10, save_steps=(9, 5, 0), layers=LAYERS)
    v_space = space.model_copy(update={"scheduler": SchedulerSpec(prediction_type="v_prediction")})
    alphas = make_schedule(space.scheduler, space.steps).alphas_cumprod
    twin = _v_predicting(tiny_backbone, alphas)
    pre = Preprocessing(load_size=64, image_size=64)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = ["a.jpg", "b.jpg"]
    want = FeatureExtractor(tiny_backbone, space, pre, "cpu", torch.float32).extract(pixels, ids)
    got = FeatureExtractor(twin, v_space, pre, "cpu", torch.float32).extract(pixels, ids)
    for w, g in zip(want, got):
        for layer in LAYERS:
            np.testing.assert_allclose(g.features[layer].astype(np.float32), w.features[layer].astype(np.float32),
                                       rtol=2e-3, atol=2e-3)
    # what the code did before: v taken for the noise gives other features from the second call on
    twin.prediction_type = "epsilon"
    wrong = FeatureExtractor(twin, space, pre, "cpu", torch.float32).extract(pixels, ids)
    later = wrong[0].features[LAYERS[1]][1:].astype(np.float32) - want[0].features[LAYERS[1]][1:].astype(np.float32)
    assert np.abs(later).max() > 0.05


def test_a_features_spec_and_a_model_of_the_other_kind_are_refused(tiny_backbone):
    space = FeatureSpace(model=tiny_backbone.identity, steps=10, save_steps=(9, 5, 0), layers=LAYERS,
                         scheduler=SchedulerSpec(prediction_type="v_prediction"))
    with pytest.raises(UsageError, match="predicts 'epsilon'.*'v_prediction'"):
        FeatureExtractor(tiny_backbone, space, Preprocessing(load_size=64, image_size=64), "cpu", torch.float32)


def test_epsilon_specs_keep_their_fingerprints():
    """An epsilon spec hashes as the JSON written before the field existed (no such key), so
    every existing cache and checkpoint keeps its fingerprint; a v spec does not."""
    from dhf_cache.config import BuildSpec, ModelIdentity
    from dhf_cache.cache.fingerprint import sha256_of

    identity = ModelIdentity(unet_class="U", unet_sha256="u", vae_sha256="v", text_encoder_sha256="t")
    spec = BuildSpec(feature_space=FeatureSpace(model=identity, layers=LAYERS))
    before = copy.deepcopy(spec.model_dump(mode="json")["feature_space"])
    del before["scheduler"]["prediction_type"]
    assert sha256_of(before) == spec_fingerprints(spec)["feature_space"]
    v_spec = BuildSpec(feature_space=spec.feature_space.model_copy(
        update={"scheduler": SchedulerSpec(prediction_type="v_prediction")}))
    assert spec_fingerprints(v_spec)["feature_space"] != spec_fingerprints(spec)["feature_space"]


def test_a_v_prediction_model_is_built_as_such_and_an_unknown_kind_refused(tmp_path, mini_spair):
    v_model = write_tiny_model(tmp_path / "tiny-v", seed=0, prediction_type="v_prediction")
    assert load_backbone(str(v_model)).prediction_type == "v_prediction"
    cache = tmp_path / "v.zarr"
    built = invoke(*small_build_args(f"spair:{mini_spair}", cache, v_model, "--split", "trn"))
    assert built.exit_code == 0, built.output[-2000:]
    spec = FeatureCache.open(str(cache)).spec
    assert spec.feature_space.scheduler.prediction_type == "v_prediction"
    assert "UNet predicts v_prediction" in invoke("info", str(cache)).output

    odd = tmp_path / "tiny-sample"
    shutil.copytree(v_model, odd)
    config = odd / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    refused = invoke(*small_build_args(f"spair:{mini_spair}", tmp_path / "odd.zarr", odd, "--split", "trn"))
    assert refused.exit_code == 2 and "predicts 'sample'" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "odd.zarr").exists()


def test_generation_with_a_v_predicting_unet_equals_its_noise_predicting_twin(tiny_backbone):
    from dhf_cache.config import GenerationSpec

    space = FeatureSpace(model=tiny_backbone.identity, steps=10, save_steps=(9, 5, 0), layers=LAYERS,
                         source="generation", generation=GenerationSpec())
    v_space = space.model_copy(update={"scheduler": SchedulerSpec(prediction_type="v_prediction")})
    pre = Preprocessing(load_size=64, image_size=64)
    eps_ex = FeatureExtractor(tiny_backbone, space, pre, "cpu", torch.float32)
    alphas = [float(a) for a in eps_ex.generator.scheduler.alphas_cumprod]
    v_ex = FeatureExtractor(_v_predicting(tiny_backbone, alphas), v_space, pre, "cpu", torch.float32)
    want = eps_ex.generator.generate(["a cat"], ["a cat\x000"])[0]
    got = v_ex.generator.generate(["a cat"], ["a cat\x000"])[0]
    for layer in LAYERS:
        np.testing.assert_allclose(got.features[layer].astype(np.float32), want.features[layer].astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
    assert np.abs(got.image.astype(int) - want.image.astype(int)).max() <= 2
