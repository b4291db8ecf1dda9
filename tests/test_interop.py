"""Importing the authors' released aggregation networks.

The test writes a checkpoint exactly as the reference's `save_model` does (key names and file
layout of their archs/aggregation_network.py + Detectron2 BottleneckBlock), converts it, and
checks our network against a functional replay of the reference's forward pass.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from dhf_cache.aggregator.network import AggregationNetwork
from dhf_cache.cache.layers import LayerInfo
from dhf_cache.aggregator.interop import (
    ReferenceCheckpointError,
    convert_reference_state_dict,
    load_reference_aggregator,
    load_reference_checkpoint,
    reference_layout,
    reference_time_axis,
)

P, S, T = 128, 8, 2  # the reference's GroupNorm has 32 groups: P/4 must be a multiple of 32
LAYERS = [  # one layer with C == P: the reference then has no shortcut conv
    LayerInfo("up_blocks.0.resnets.0", 48, 4, 4),
    LayerInfo("up_blocks.0.resnets.1", 128, 4, 4),
    LayerInfo("up_blocks.1.resnets.0", 24, 8, 8),
]


def reference_state(channels, projection_dim=P, n_timesteps=T, seed=0) -> OrderedDict:
    """Random tensors under the reference's names, in its state_dict order."""
    gen = torch.Generator().manual_seed(seed)
    p4 = projection_dim // 4

    def conv(o, i, k=1):
        return 0.2 * torch.randn(o, i, k, k, generator=gen)

    def norm(prefix, c):
        state[f"{prefix}.norm.weight"] = 1 + 0.3 * torch.randn(c, generator=gen)
        state[f"{prefix}.norm.bias"] = 0.3 * torch.randn(c, generator=gen)

    state = OrderedDict(mixing_weights=torch.randn(len(channels) * n_timesteps, generator=gen))
    for l, c in enumerate(channels):
        pre = f"bottleneck_layers.{l}.0"
        if c != projection_dim:  # registered first in the Detectron2 block
            state[f"{pre}.shortcut.weight"] = conv(projection_dim, c)
            norm(f"{pre}.shortcut", projection_dim)
        state[f"{pre}.conv1.weight"] = conv(p4, c)
        norm(f"{pre}.conv1", p4)
        state[f"{pre}.conv2.weight"] = conv(p4, p4, 3)
        norm(f"{pre}.conv2", p4)
        state[f"{pre}.conv3.weight"] = conv(projection_dim, p4)
        norm(f"{pre}.conv3", projection_dim)
    return state


def save_like_reference(path, state, config=None):
    """torch.save of the dict their train_hyperfeatures.save_model writes."""
    dummy = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([dummy], lr=1e-3, weight_decay=0)
    dummy.sum().backward()
    opt.step()
    config = config or {
        "projection_dim": P, "save_timestep": [49, 0], "num_timesteps": 50, "flip_timesteps": False,
        "model_id": "runwayml/stable-diffusion-v1-5", "diffusion_mode": "inversion", "output_resolution": S,
        "lr": "1e-3", "weight_decay": 0, "batch_size": 2, "prompt": "", "wandb_run": None,
    }
    torch.save(
        {"step": 1000, "config": config, "aggregation_network": state, "optimizer_state_dict": opt.state_dict()}, path
    )


def reference_forward(state, channels, feats_by_t):
    """Replay of their forward: input (B, T*sum C, S, S) timestep-major, chunk i uses layer i % L."""
    L = len(channels)
    batch = torch.cat([torch.cat(per_layer, dim=1) for per_layer in feats_by_t], dim=1)
    weights = torch.softmax(state["mixing_weights"], dim=0)
    out, start = None, 0
    for i in range(len(weights)):
        l, c = i % L, channels[i % L]
        x = batch[:, start:start + c]
        start += c
        pre = f"bottleneck_layers.{l}.0"

        def conv_norm(name, inp, padding=0):
            y = F.conv2d(inp, state[f"{pre}.{name}.weight"], padding=padding)
            return F.group_norm(y, 32, state[f"{pre}.{name}.norm.weight"], state[f"{pre}.{name}.norm.bias"])

        y = F.relu(conv_norm("conv1", x))
        y = F.relu(conv_norm("conv2", y, padding=1))
        y = conv_norm("conv3", y)
        y = F.relu(y + (conv_norm("shortcut", x) if f"{pre}.shortcut.weight" in state else x))
        out = weights[i] * y if out is None else out + weights[i] * y
    return out


def cache_features(layers, seed=1):
    """Native-resolution fp16 features as the cache stores them: {name: (B, T, C, H, W)}."""
    gen = torch.Generator().manual_seed(seed)
    return {l.name: torch.randn(2, T, l.channels, l.height, l.width, generator=gen).half() for l in layers}


def upsampled_by_timestep(feats, layers_in_reference_order):
    """What the reference's extractor feeds: per timestep, every layer bilinearly resized to S."""
    return [
        [
            F.interpolate(feats[l.name][:, t].float(), size=S, mode="bilinear", align_corners=False)
            for l in layers_in_reference_order
        ]
        for t in range(T)
    ]


def test_released_layout_converts_and_matches_reference_forward(tmp_path):
    channels = [l.channels for l in LAYERS]
    state = reference_state(channels)
    path = tmp_path / "aggregation_network.pt"
    save_like_reference(path, state)

    loaded, config = load_reference_checkpoint(path)
    assert config["save_timestep"] == [49, 0] and set(loaded) == set(state)
    assert reference_layout(loaded) == {"channels": channels, "projection_dim": P, "n_timesteps": T}
    converted = convert_reference_state_dict(loaded, LAYERS, T)
    net = AggregationNetwork(LAYERS, T, projection_dim=P, output_size=S)
    net.load_state_dict(converted, strict=True)  # every key of ours filled, none left over

    feats = cache_features(LAYERS)
    expected = reference_forward(state, channels, upsampled_by_timestep(feats, LAYERS))
    with torch.no_grad():
        torch.testing.assert_close(net(feats), expected, rtol=1e-5, atol=1e-5)
        ready, _ = load_reference_aggregator(path, LAYERS, output_size=S)
        torch.testing.assert_close(ready(feats), expected, rtol=1e-5, atol=1e-5)


def test_layer_table_in_another_order_is_permuted(tmp_path):
    channels = [l.channels for l in LAYERS]
    state = reference_state(channels, seed=3)
    shuffled = [LAYERS[2], LAYERS[0], LAYERS[1]]
    net = AggregationNetwork(shuffled, T, projection_dim=P, output_size=S)
    net.load_state_dict(convert_reference_state_dict(state, shuffled, T), strict=True)
    feats = cache_features(LAYERS, seed=4)
    expected = reference_forward(state, channels, upsampled_by_timestep(feats, LAYERS))
    with torch.no_grad():
        torch.testing.assert_close(net(feats), expected, rtol=1e-5, atol=1e-5)


def test_plain_state_dict_file_is_accepted(tmp_path):
    state = reference_state([l.channels for l in LAYERS])
    torch.save(state, tmp_path / "plain.pt")
    loaded, config = load_reference_checkpoint(tmp_path / "plain.pt")
    assert config == {} and set(loaded) == set(state)


class Payload:
    """Unpickling this would create a file: proof that nothing gets unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    state = reference_state([l.channels for l in LAYERS])
    path = tmp_path / "evil.pt"
    torch.save({"aggregation_network": state, "config": {"x": Payload(marker)}}, path)
    with pytest.raises(ReferenceCheckpointError, match="non-tensor Python objects.*refused"):
        load_reference_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(ReferenceCheckpointError, match="no such file"):
        load_reference_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ReferenceCheckpointError, match="cannot be read"):
        load_reference_checkpoint(tmp_path / "junk.pt")


def test_mismatches_are_reported():
    channels = [l.channels for l in LAYERS]
    state = reference_state(channels)
    other = [LAYERS[0], LayerInfo("up_blocks.0.resnets.1", 64, 4, 4), LAYERS[2]]
    with pytest.raises(ReferenceCheckpointError, match="up_blocks.0.resnets.1: cache 64, checkpoint 128"):
        convert_reference_state_dict(state, other, T)
    with pytest.raises(ReferenceCheckpointError, match="mixes 2 timesteps.*cache has 11"):
        convert_reference_state_dict(state, LAYERS, 11)
    with pytest.raises(ReferenceCheckpointError, match="3 bottleneck layers"):
        convert_reference_state_dict(state, LAYERS[:2], T)
    extra = OrderedDict(state, **{"bottleneck_layers.0.1.conv1.weight": torch.zeros(1)})
    with pytest.raises(ReferenceCheckpointError, match="unexpected keys \\[bottleneck_layers.0.1.conv1.weight\\]"):
        convert_reference_state_dict(extra, LAYERS, T)
    missing = OrderedDict((k, v) for k, v in state.items() if k != "bottleneck_layers.2.0.conv2.norm.bias")
    with pytest.raises(ReferenceCheckpointError, match="missing keys \\[bottleneck_layers.2.0.conv2.norm.bias\\]"):
        convert_reference_state_dict(missing, LAYERS, T)
    bad_shape = OrderedDict(state)
    bad_shape["bottleneck_layers.0.0.conv2.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(ReferenceCheckpointError, match="conv2.weight: \\(32, 32, 1, 1\\), expected \\(32, 32, 3, 3\\)"):
        convert_reference_state_dict(bad_shape, LAYERS, T)


def test_reference_time_axis():
    steps = [49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0]
    assert reference_time_axis({"save_timestep": steps, "num_timesteps": 50}) == (50, tuple(steps))
    # their loader reversed the stored list after the extractor kept the original order
    flipped = {"save_timestep": steps[::-1], "num_timesteps": 50, "flip_timesteps": True}
    assert reference_time_axis(flipped) == (50, tuple(steps))
    assert reference_time_axis({"save_timestep": [0], "num_timesteps": 1}) == (1, (0,))
    assert reference_time_axis({}) is None
