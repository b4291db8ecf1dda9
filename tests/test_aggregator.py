"""The aggregation network: sizes, init, the shared bottleneck, the joint softmax and its order."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dhf_cache.aggregator.network import (
    AggregationNetwork,
    BottleneckBlock,
    bottleneck_parameter_count,
    parameter_count,
)
from dhf_cache.errors import UsageError
from dhf_cache.cache.layers import LayerInfo

SD15_LAYERS = [
    LayerInfo(f"up_blocks.{i}.resnets.{j}", c, s, s)
    for i, (c, s) in enumerate([(1280, 8), (1280, 16), (640, 32), (320, 64)])
    for j in range(3)
]
SMALL_LAYERS = [LayerInfo("a", 24, 4, 4), LayerInfo("b", 40, 8, 8)]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize_norms(module: nn.Module, gen: torch.Generator) -> None:
    """GN weights 1 / bias 0 would hide a norm applied with the wrong affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


def functional_bottleneck(block: BottleneckBlock, x: torch.Tensor, groups: int, final_relu: bool = True):
    """Independent re-implementation of the Detectron2 bottleneck from the block's tensors."""
    out = F.conv2d(x, block.conv1.weight)
    out = F.relu(F.group_norm(out, groups, block.norm1.weight, block.norm1.bias))
    out = F.conv2d(out, block.conv2.weight, padding=1)
    out = F.relu(F.group_norm(out, groups, block.norm2.weight, block.norm2.bias))
    out = F.conv2d(out, block.conv3.weight)
    out = F.group_norm(out, groups, block.norm3.weight, block.norm3.bias)
    short = F.conv2d(x, block.shortcut.weight)
    short = F.group_norm(short, groups, block.shortcut_norm.weight, block.shortcut_norm.bias)
    out = out + short
    return F.relu(out) if final_relu else out


def test_parameter_count_sd15():
    net = AggregationNetwork(SD15_LAYERS, n_timesteps=11)
    assert n_params(net) == 6_529_536 + 132
    assert net.mixing_weights.shape == (132,)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4 * 12 and {m.num_groups for m in norms} == {32}  # GroupNorm(32) in every block
    assert (net.projection_dim, net.output_size) == (384, 64)  # 384 x 64 x 64 descriptors by default
    assert parameter_count(SD15_LAYERS) == 6_529_536
    assert parameter_count(SD15_LAYERS, n_timesteps=11) == 6_529_536 + 132


@pytest.mark.parametrize("channels", [320, 640, 1280, 17])
def test_parameter_count_per_layer(channels):
    block = BottleneckBlock(channels, 96, 384)
    assert n_params(block) == 480 * channels + 121_728
    assert bottleneck_parameter_count(channels, 384) == 480 * channels + 121_728


def test_convs_have_no_bias_and_stride_one():
    block = BottleneckBlock(64, 96, 384)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    for conv in convs:
        assert conv.bias is None
        assert conv.stride == (1, 1)
    assert block.conv2.kernel_size == (3, 3) and block.conv2.padding == (1, 1)
    assert all(m.num_groups == 32 for m in block.modules() if isinstance(m, nn.GroupNorm))


def test_msra_init_statistics():
    torch.manual_seed(0)
    block = BottleneckBlock(1280, 96, 384)
    # c2_msra_fill: kaiming normal, fan_out, relu gain -> std = sqrt(2 / (out_channels * k * k))
    for conv, fan_out in [(block.conv1, 96), (block.conv2, 96 * 9), (block.conv3, 384), (block.shortcut, 384)]:
        w = conv.weight.detach()
        assert abs(w.std().item() / math.sqrt(2 / fan_out) - 1) < 0.05
        assert abs(w.mean().item()) < 0.05 * math.sqrt(2 / fan_out)
    # every GN starts at 1 / 0, the last one too (the reference's zero-init is commented out)
    for norm in (block.norm1, block.norm2, block.norm3, block.shortcut_norm):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_bottleneck_matches_functional_and_ends_in_relu():
    gen = torch.Generator().manual_seed(1)
    block = BottleneckBlock(40, 16, 64, num_groups=8)
    randomize_norms(block, gen)
    x = torch.randn(3, 40, 6, 5, generator=gen)
    out = block(x)
    torch.testing.assert_close(out, functional_bottleneck(block, x, 8), rtol=1e-5, atol=1e-5)
    pre_relu = functional_bottleneck(block, x, 8, final_relu=False)
    assert (pre_relu < 0).any()  # so the check below is about the final ReLU
    assert (out >= 0).all() and (out == 0).any()


def test_identity_shortcut_when_channels_equal_projection():
    block = BottleneckBlock(64, 16, 64, num_groups=8)
    assert block.shortcut is None and block.shortcut_norm is None
    assert n_params(block) == bottleneck_parameter_count(64, 64)


def test_mixing_weights_start_uniform():
    net = AggregationNetwork(SMALL_LAYERS, n_timesteps=3, projection_dim=64, output_size=8, num_groups=8)
    assert torch.all(net.mixing_weights.detach() == 1)
    table = net.mixing_weights_table()
    assert table.shape == (3, 2)
    torch.testing.assert_close(table, torch.full((3, 2), 1 / 6))


class ChannelProbe(nn.Module):
    """Stands in for a bottleneck: copies input channel 0 to every output channel."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x, size=None):
        if size is not None:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x[:, :1].expand(-1, self.out_channels, -1, -1)


def test_softmax_is_joint_over_all_weights_in_timestep_major_order():
    L, T, P = 2, 3, 64
    net = AggregationNetwork(SMALL_LAYERS, n_timesteps=T, projection_dim=P, output_size=8, num_groups=8)
    net.bottlenecks = nn.ModuleList(ChannelProbe(P) for _ in range(L))
    raw = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.2, 1.1])
    with torch.no_grad():
        net.mixing_weights.copy_(raw)
    joint = torch.softmax(raw, dim=0)
    for t in range(T):
        for l in range(L):
            feats = {
                layer.name: torch.zeros(1, T, layer.channels, layer.height, layer.width) for layer in SMALL_LAYERS
            }
            feats[SMALL_LAYERS[l].name][:, t] = 1.0  # only (t, l) is non-zero
            out = net(feats)
            torch.testing.assert_close(out, torch.full_like(out, joint[t * L + l].item()))
    torch.testing.assert_close(net.mixing_weights_table(), joint.view(T, L))
    assert math.isclose(net.mixing_weights_table().sum().item(), 1.0, rel_tol=1e-6)
    assert not torch.allclose(net.mixing_weights_table().sum(dim=1), torch.ones(T))  # not per timestep
    assert not torch.allclose(net.mixing_weights_table().sum(dim=0), torch.ones(L))  # not per layer


def test_forward_equals_weighted_sum_of_shared_bottlenecks():
    gen = torch.Generator().manual_seed(2)
    L, T, P, S = 2, 3, 64, 8
    net = AggregationNetwork(SMALL_LAYERS, n_timesteps=T, projection_dim=P, output_size=S, num_groups=8)
    randomize_norms(net, gen)
    with torch.no_grad():
        net.mixing_weights.copy_(torch.randn(L * T, generator=gen))
    # fp16 as read from the cache: the network casts to its own dtype
    feats = {
        layer.name: torch.randn(2, T, layer.channels, layer.height, layer.width, generator=gen).half()
        for layer in SMALL_LAYERS
    }
    out = net(feats)
    assert out.shape == (2, P, S, S) and out.dtype == torch.float32
    w = torch.softmax(net.mixing_weights.detach(), 0)
    expected = torch.zeros(2, P, S, S)
    for t in range(T):
        for l, layer in enumerate(SMALL_LAYERS):
            x = F.interpolate(feats[layer.name][:, t].float(), size=(S, S), mode="bilinear", align_corners=False)
            expected += w[t * L + l] * functional_bottleneck(net.bottlenecks[l], x, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bottlenecks_are_shared_across_timesteps():
    one = AggregationNetwork(SMALL_LAYERS, n_timesteps=1, projection_dim=64, output_size=8, num_groups=8)
    many = AggregationNetwork(SMALL_LAYERS, n_timesteps=11, projection_dim=64, output_size=8, num_groups=8)
    assert len(many.bottlenecks) == len(SMALL_LAYERS)
    assert n_params(many) - n_params(one) == len(SMALL_LAYERS) * 10  # only mixing weights grow with T
    # every timestep's input reaches the same block's gradients
    many.zero_grad()
    feats = {l.name: torch.zeros(1, 11, l.channels, l.height, l.width) for l in SMALL_LAYERS}
    feats["a"][:, 7] = torch.randn(1, 24, 4, 4)
    many(feats).sum().backward()
    assert many.bottlenecks[0].conv1.weight.grad.abs().sum() > 0


def test_config_roundtrip():
    net = AggregationNetwork(SMALL_LAYERS, n_timesteps=3, projection_dim=64, output_size=8, num_groups=8)
    config = json.loads(json.dumps(net.config))
    clone = AggregationNetwork.from_config(config)
    clone.load_state_dict(net.state_dict(), strict=True)
    assert clone.config == net.config and clone.layers == net.layers
    with pytest.raises(UsageError, match="output_size"):
        AggregationNetwork.from_config({k: v for k, v in config.items() if k != "output_size"})


def test_input_errors_name_the_problem():
    net = AggregationNetwork(SMALL_LAYERS, n_timesteps=3, projection_dim=64, output_size=8, num_groups=8)
    good = {l.name: torch.zeros(1, 3, l.channels, l.height, l.width) for l in SMALL_LAYERS}
    with pytest.raises(UsageError, match="missing layers \\['b'\\]"):
        net({"a": good["a"]})
    with pytest.raises(UsageError, match="T=3"):
        net({**good, "b": torch.zeros(1, 2, 40, 8, 8)})
    with pytest.raises(UsageError, match="num_groups"):
        AggregationNetwork(SMALL_LAYERS, n_timesteps=1, projection_dim=64, num_groups=32)


def test_one_by_one_convs_at_native_resolution_equal_resizing_first():
    """conv1 and the shortcut commute with bilinear resizing: the fast path is the same function."""
    torch.manual_seed(0)
    block = BottleneckBlock(40, 32, 128).eval()
    x = torch.randn(3, 40, 8, 8)
    with torch.no_grad():
        fast = block(x, (64, 64))
        slow = block(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
        down = block(torch.randn(2, 40, 80, 80), (64, 64))  # larger maps are resized first
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    assert down.shape == (2, 128, 64, 64)
