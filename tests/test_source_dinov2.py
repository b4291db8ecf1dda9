"""The DINOv2 feature source: maps against hooks, loading and refusals, identity, preprocessing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from dhf_cache.errors import ModelNotFoundError, UsageError
from dhf_cache.sources.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Dinov2FeatureSpace,
    available_layers,
    extract_dinov2,
    layer_table,
    load_dinov2,
    preprocess_dinov2,
    resolve_dinov2_layers,
    write_tiny_dinov2,
)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    return {False: write_tiny_dinov2(root / "plain", seed=0),
            True: write_tiny_dinov2(root / "registers", seed=0, registers=True)}


def _hooked_maps(model, pixel_values, num_registers, patch_size):
    """Independent recomputation: hooks on each block and the final layernorm, then the patch
    tokens picked and laid out by hand."""
    captured = {}
    modules = {f"encoder.layer.{i}": block for i, block in enumerate(model.encoder.layer)}
    modules["layernorm"] = model.layernorm
    handles = [module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
               for name, module in modules.items()]
    try:
        with torch.no_grad():
            model(pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    side = pixel_values.shape[-1] // patch_size
    maps = {}
    for name, tokens in captured.items():
        batch, _, channels = tokens.shape
        grid = torch.empty(batch, channels, side, side)
        for r in range(side):
            for c in range(side):
                grid[:, :, r, c] = tokens[:, 1 + num_registers + r * side + c, :]
        maps[name] = grid[:, None]
    return maps


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("size", [56, 42])  # 42: position embeddings interpolated
def test_maps_equal_hooked_patch_tokens(tiny_dirs, registers, size):
    backbone = load_dinov2(str(tiny_dirs[registers]))
    assert backbone.num_register_tokens == (4 if registers else 0)
    assert backbone.model_class == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    layers = available_layers(backbone)
    assert layers == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "encoder.layer.3", "layernorm"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    maps = extract_dinov2(backbone, x, layers)
    expected = _hooked_maps(backbone.model, x, backbone.num_register_tokens, backbone.patch_size)
    side = size // 14
    assert [(t.name, t.channels, t.height, t.width) for t in layer_table(backbone, size)] == [
        (name, 32, side, side) for name in layers]
    for name in layers:
        assert maps[name].shape == (2, 1, 32, side, side) and maps[name].dtype == torch.float32
        torch.testing.assert_close(maps[name], expected[name], rtol=0, atol=0)
    # the layers really differ (a wrong index would not go unnoticed), and so does each image
    assert not torch.equal(maps["encoder.layer.3"], maps["layernorm"])
    assert not torch.equal(maps["encoder.layer.2"], maps["encoder.layer.3"])
    assert not torch.equal(maps["layernorm"][0], maps["layernorm"][1])
    # a subset gives the same maps as the whole
    assert torch.equal(extract_dinov2(backbone, x, ["encoder.layer.1"])["encoder.layer.1"], maps["encoder.layer.1"])


def test_same_seed_same_bytes_and_fp16_identity(tiny_dirs, tmp_path):
    again = write_tiny_dinov2(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (again / name).read_bytes() == (tiny_dirs[False] / name).read_bytes(), name
    other = write_tiny_dinov2(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    preprocessor = json.loads((again / "preprocessor_config.json").read_text())
    assert preprocessor["image_mean"] == list(IMAGENET_MEAN) and preprocessor["image_std"] == list(IMAGENET_STD)

    fp32 = load_dinov2(str(again))
    assert next(fp32.model.parameters()).dtype == torch.float32 and not fp32.model.training
    assert not any(p.requires_grad for p in fp32.model.parameters())
    half_dir = tmp_path / "half"
    fp32.model.to(torch.float16).save_pretrained(half_dir)
    fp32.model.to(torch.float32)
    identity = fp32.identity()
    assert load_dinov2(str(half_dir)).identity() == identity
    assert load_dinov2(str(again), dtype=torch.float16).identity() == identity
    assert load_dinov2(str(other)).identity().weights_sha256 != identity.weights_sha256
    assert load_dinov2(str(tiny_dirs[True])).identity().num_register_tokens == 4
    assert (identity.model_class, identity.patch_size, identity.num_register_tokens) == ("Dinov2Model", 14, 0)


def test_hub_id_from_the_local_cache_and_a_miss(tiny_dirs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--tiny-dinov2" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dirs[True], snapshot)
    (tmp_path / "hub" / "models--org--tiny-dinov2" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-dinov2" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load_dinov2("org/tiny-dinov2")
    assert backbone.num_register_tokens == 4 and backbone.source == "org/tiny-dinov2"
    assert backbone.identity() == load_dinov2(str(tiny_dirs[True])).identity()

    with pytest.raises(ModelNotFoundError) as info:
        load_dinov2("org/no-such-dinov2")
    message = str(info.value)
    assert "\n" not in message and "org/no-such-dinov2" in message and "HF_HUB_OFFLINE" in message
    assert 'hf download org/no-such-dinov2 --include "config.json"' in message


def test_other_models_and_missing_folders_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=28, patch_size=14)).save_pretrained(vit)
    with pytest.raises(UsageError) as info:
        load_dinov2(str(vit))
    message = str(info.value)
    assert "\n" not in message and str(vit) in message and "ViTModel" in message and "Dinov2Model" in message

    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UsageError, match="StableDiffusionPipeline, not a DINOv2 model") as info:
        load_dinov2(str(sd))
    assert "\n" not in str(info.value)

    missing = tmp_path / "nowhere"
    with pytest.raises(ModelNotFoundError) as info:
        load_dinov2(str(missing))
    assert "\n" not in str(info.value) and str(missing) in str(info.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_dinov2(str(tmp_path / "empty"))


def test_broken_weights_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    lacking = write_tiny_dinov2(tmp_path / "lacking")  # a tensor missing would stay random
    state = load_file(lacking / "model.safetensors")
    del state["encoder.layer.2.mlp.fc1.weight"]
    save_file(state, lacking / "model.safetensors", metadata={"format": "pt"})
    reshaped = write_tiny_dinov2(tmp_path / "reshaped")
    config = json.loads((reshaped / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    corrupt = write_tiny_dinov2(tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    for folder, reason in ((lacking, "lack 1 tensor.*encoder.layer.2.mlp.fc1.weight"),
                           (reshaped, "shapes do not fit its config.json"), (corrupt, "corrupt safetensors")):
        with pytest.raises(ModelNotFoundError, match=reason) as info:
            load_dinov2(str(folder))
        assert "\n" not in str(info.value) and str(folder) in str(info.value)


def test_feature_space_and_layer_checks(tiny_dirs):
    backbone = load_dinov2(str(tiny_dirs[False]))
    identity = backbone.identity()
    space = Dinov2FeatureSpace(kind="dinov2", model=identity, layers=("encoder.layer.3", "layernorm"), image_size=56)
    assert (space.normalization, space.tokens, space.storage_dtype) == ("imagenet", "patch", "float16")
    with pytest.raises(ValidationError, match="not a positive multiple of the patch size 14"):
        Dinov2FeatureSpace(kind="dinov2", model=identity, layers=("layernorm",), image_size=50)
    with pytest.raises(ValidationError):  # kind is required
        Dinov2FeatureSpace(model=identity, layers=("layernorm",), image_size=56)
    with pytest.raises(ValidationError, match="at least one layer"):
        Dinov2FeatureSpace(kind="dinov2", model=identity, layers=(), image_size=56)
    with pytest.raises(ValidationError, match="not DINOv2 layer names"):
        Dinov2FeatureSpace(kind="dinov2", model=identity, layers=("blocks.3",), image_size=56)
    # DINOv2's sizes are multiples of its patch, not of SD's VAE factor 8 (its own default is 518)
    from dhf_cache.config import BuildSpec, Preprocessing

    odd = Dinov2FeatureSpace(kind="dinov2", model=identity, layers=("layernorm",), image_size=70)
    assert BuildSpec(feature_space=odd, preprocessing=Preprocessing(load_size=70, image_size=70))

    with pytest.raises(UsageError) as info:
        extract_dinov2(backbone, torch.zeros(1, 3, 56, 56), ["encoder.layer.4"])
    message = str(info.value)
    assert "\n" not in message and "encoder.layer.4" in message
    assert "available: encoder.layer.0, encoder.layer.1, encoder.layer.2, encoder.layer.3, layernorm" in message
    with pytest.raises(UsageError, match="unknown layer"):
        layer_table(backbone, 56, ["blocks.0"])
    assert resolve_dinov2_layers(backbone, "last") == ("layernorm",)
    assert resolve_dinov2_layers(backbone, "all")[-1] == "layernorm"
    with pytest.raises(UsageError, match="up"):  # SD's layer sets mean nothing here
        resolve_dinov2_layers(backbone, "up")
    with pytest.raises(UsageError, match="patch size 14"):
        extract_dinov2(backbone, torch.zeros(1, 3, 50, 50), ["layernorm"])


def test_preprocessing_uses_imagenet_mean_and_std():
    gray = Image.new("RGB", (37, 23), (128, 128, 128))
    x = preprocess_dinov2(gray, 28)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    expected = [(128 / 255 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    for channel in range(3):
        torch.testing.assert_close(x[channel], torch.full((28, 28), expected[channel]), rtol=0, atol=1e-6)
    # grayscale input is taken as RGB
    torch.testing.assert_close(preprocess_dinov2(Image.new("L", (10, 10), 128), 28), x)
