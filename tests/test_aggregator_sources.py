"""The aggregator over the maps of several feature sources (e.g. an SD UNet and DINOv2).

Contract under test: one bottleneck per (source, layer), numbered source by source; mixing
weight of (source s, timestep t, layer l) at offset_s + t * L_s + l; ONE softmax over all of
them; a single source is exactly the legacy network.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dhf_cache.aggregator.network import (
    LEGACY_SOURCE_NAME,
    AggregationNetwork,
    BottleneckBlock,
    SourceMaps,
    map_key,
    parameter_count,
    parameter_count_sources,
)
from dhf_cache.errors import UsageError
from dhf_cache.cache.layers import LayerInfo

P, S, G = 32, 8, 8  # projection dim, output grid, GroupNorm groups: tiny but complete
SD = SourceMaps("sd", (LayerInfo("up.0", 24, 4, 4), LayerInfo("up.1", 40, 8, 8), LayerInfo("up.2", 16, 16, 16)), 4)
# C == P for one layer (identity shortcut); a native 6x6 grid unlike any SD layer
DINO = SourceMaps("dinov2", (LayerInfo("block.5", 48, 6, 6), LayerInfo("block.11", 32, 6, 6)), 1)
SOURCES = (SD, DINO)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize(net: AggregationNetwork, seed: int) -> torch.Generator:
    """Random GN affine parameters and mixing weights: defaults (1, 0, all ones) hide mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
        net.mixing_weights.copy_(torch.randn(net.mixing_weights.shape, generator=gen))
    return gen


def inputs(sources, gen: torch.Generator, batch: int = 2, multi: bool = True) -> dict[str, torch.Tensor]:
    return {
        (map_key(s.name, layer.name) if multi else layer.name):
            torch.randn(batch, s.n_timesteps, layer.channels, layer.height, layer.width, generator=gen)
        for s in sources for layer in s.layers
    }


def functional_bottleneck(block: BottleneckBlock, x: torch.Tensor) -> torch.Tensor:
    """The Detectron2 bottleneck written out from the block's tensors (shortcut or identity)."""
    out = F.relu(F.group_norm(F.conv2d(x, block.conv1.weight), G, block.norm1.weight, block.norm1.bias))
    out = F.relu(F.group_norm(F.conv2d(out, block.conv2.weight, padding=1), G, block.norm2.weight, block.norm2.bias))
    out = F.group_norm(F.conv2d(out, block.conv3.weight), G, block.norm3.weight, block.norm3.bias)
    if block.shortcut is not None:
        short = F.group_norm(F.conv2d(x, block.shortcut.weight), G, block.shortcut_norm.weight, block.shortcut_norm.bias)
    else:
        short = x
    return F.relu(out + short)


def reference_forward(net, feats, softmax_scope="global", order="timestep-major"):
    """Plain loop over every (source, timestep, layer) map: resize to S, its bottleneck, its weight.

    The variants (per-source softmax, layer-major index) exist to show this test tells them apart.
    """
    raw = net.mixing_weights.detach()
    if softmax_scope == "global":
        w = torch.softmax(raw, 0)
    else:
        parts, start = [], 0
        for s in SOURCES:
            n = s.n_timesteps * len(s.layers)
            parts.append(torch.softmax(raw[start:start + n], 0))
            start += n
        w = torch.cat(parts)
    expected = 0
    weight_offset = block_offset = 0
    for s in SOURCES:
        L, T = len(s.layers), s.n_timesteps
        for t in range(T):
            for l, layer in enumerate(s.layers):
                x = F.interpolate(feats[map_key(s.name, layer.name)][:, t].float(), size=(S, S),
                                  mode="bilinear", align_corners=False)
                i = weight_offset + (t * L + l if order == "timestep-major" else l * T + t)
                expected = expected + w[i] * functional_bottleneck(net.bottlenecks[block_offset + l], x)
        weight_offset += T * L
        block_offset += L
    return expected


def test_map_key():
    assert map_key("sd", "up_blocks.0.resnets.1") == "sd:up_blocks.0.resnets.1"


def test_one_source_is_the_legacy_network():
    torch.manual_seed(0)
    legacy = AggregationNetwork(SD.layers, SD.n_timesteps, P, S, G)
    torch.manual_seed(0)
    one = AggregationNetwork.over_sources([SD], projection_dim=P, output_size=S, num_groups=G)
    assert type(one) is AggregationNetwork and not one.multi_source and not legacy.multi_source
    assert list(one.state_dict()) == list(legacy.state_dict())
    for (k, a), b in zip(legacy.state_dict().items(), one.state_dict().values()):
        assert torch.equal(a, b), k
    assert one.config == legacy.config
    assert set(one.config) == {"layers", "n_timesteps", "projection_dim", "output_size", "num_groups"}
    assert one.sources == legacy.sources == (SourceMaps(LEGACY_SOURCE_NAME, SD.layers, 4),)
    assert one.map_keys == legacy.map_keys == ["up.0", "up.1", "up.2"]  # bare layer names
    gen = randomize(legacy, 3)
    one.load_state_dict(legacy.state_dict(), strict=True)
    feats = inputs([SD], gen, multi=False)
    assert torch.equal(one(feats), legacy(feats))
    tables = one.mixing_weights_tables()
    assert list(tables) == [""] and torch.equal(tables[""], one.mixing_weights_table())
    assert parameter_count_sources([SD], P) == parameter_count(SD.layers, P, 4) == n_params(one)


def test_two_sources_layout():
    net = AggregationNetwork.over_sources(SOURCES, projection_dim=P, output_size=S, num_groups=G)
    assert net.multi_source and net.sources == SOURCES and net.n_timesteps is None
    keys = list(net.state_dict())
    assert {k.split(".")[1] for k in keys if k.startswith("bottlenecks.")} == {"0", "1", "2", "3", "4"}
    assert [k for k in keys if not k.startswith("bottlenecks.")] == ["mixing_weights"]
    assert net.mixing_weights.shape == (3 * 4 + 2 * 1,)
    assert [b.in_channels for b in net.bottlenecks] == [24, 40, 16, 48, 32]
    assert net.bottlenecks[4].shortcut is None  # C == P: identity shortcut, as for one source
    assert net.map_keys == ["sd:up.0", "sd:up.1", "sd:up.2", "dinov2:block.5", "dinov2:block.11"]
    assert net.layers == SD.layers + DINO.layers
    assert n_params(net) == parameter_count_sources(SOURCES, P)
    assert parameter_count_sources(SOURCES, P) == parameter_count(SD.layers, P, 4) + parameter_count(DINO.layers, P, 1)


def test_first_source_blocks_load_from_a_single_source_network():
    single = AggregationNetwork(SD.layers, SD.n_timesteps, P, S, G)
    gen = randomize(single, 4)
    net = AggregationNetwork.over_sources(SOURCES, projection_dim=P, output_size=S, num_groups=G)
    blocks = {k: v for k, v in single.state_dict().items() if k.startswith("bottlenecks.")}
    result = net.load_state_dict(blocks, strict=False)
    assert result.unexpected_keys == []
    assert {k.split(".")[1] for k in result.missing_keys if k.startswith("bottlenecks.")} == {"3", "4"}
    for i, layer in enumerate(SD.layers):
        x = torch.randn(3, layer.channels, layer.height, layer.width, generator=gen)
        torch.testing.assert_close(net.bottlenecks[i](x, (S, S)), single.bottlenecks[i](x, (S, S)), rtol=0, atol=0)
    # with the other source's logits at -inf, the sd slice of the one softmax is the single network's
    with torch.no_grad():
        net.mixing_weights[:12] = single.mixing_weights
        net.mixing_weights[12:] = float("-inf")
    feats = inputs(SOURCES, gen)
    bare = {layer.name: feats[map_key("sd", layer.name)] for layer in SD.layers}
    torch.testing.assert_close(net(feats), single(bare), rtol=1e-6, atol=1e-6)


def test_forward_equals_independent_reference():
    net = AggregationNetwork.over_sources(SOURCES, projection_dim=P, output_size=S, num_groups=G)
    gen = randomize(net, 5)
    feats = {k: v.half() for k, v in inputs(SOURCES, gen).items()}  # fp16 as read from a cache
    out = net(feats)
    assert out.shape == (2, P, S, S) and out.dtype == torch.float32
    with torch.no_grad():
        expected = reference_forward(net, feats)
        per_source = reference_forward(net, feats, softmax_scope="per-source")
        layer_major = reference_forward(net, feats, order="layer-major")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the reference is sensitive to the contract it checks
    assert not torch.allclose(out, per_source, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(out, layer_major, rtol=1e-3, atol=1e-3)


def test_gradients_reach_every_bottleneck_and_mixing_weight():
    net = AggregationNetwork.over_sources(SOURCES, projection_dim=P, output_size=S, num_groups=G)
    gen = randomize(net, 6)
    probe = torch.randn(2, P, S, S, generator=gen)
    (net(inputs(SOURCES, gen)) * probe).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (net.mixing_weights.grad != 0).all()  # each of the 14 weights, both sources


def test_config_round_trip_both_forms():
    for net in (AggregationNetwork(SD.layers, SD.n_timesteps, P, S, G),
                AggregationNetwork.over_sources(SOURCES, projection_dim=P, output_size=S, num_groups=G)):
        gen = randomize(net, 7)
        config = json.loads(json.dumps(net.config))
        clone = AggregationNetwork.from_config(config)
        clone.load_state_dict(net.state_dict(), strict=True)
        assert clone.config == net.config and clone.sources == net.sources and clone.multi_source == net.multi_source
        feats = inputs(SOURCES if net.multi_source else [SD], gen, multi=net.multi_source)
        assert torch.equal(clone(feats), net(feats))
    assert net.config == {
        "sources": [SD.as_dict(), DINO.as_dict()], "projection_dim": P, "output_size": S, "num_groups": G,
    }
    # a "sources" config of one entry is the legacy network, as over_sources([one]) is
    one = AggregationNetwork.from_config({**net.config, "sources": [SD.as_dict()]})
    assert not one.multi_source and set(one.config) == {"layers", "n_timesteps", "projection_dim", "output_size",
                                                        "num_groups"}


def _multi_config() -> dict:
    return AggregationNetwork.over_sources(SOURCES, projection_dim=P, output_size=S, num_groups=G).config


def _with_source(i: int, **changes) -> dict:
    config = _multi_config()
    config["sources"][i] = {**config["sources"][i], **changes}
    return config


MALFORMED = [
    ({k: v for k, v in _multi_config().items() if k != "num_groups"}, r"missing \['num_groups'\]"),
    ({**_multi_config(), "layers": []}, r"unexpected \['layers'\]"),
    ({**_multi_config(), "sources": {"sd": SD.as_dict()}}, "not a non-empty list"),
    ({**_multi_config(), "sources": []}, "not a non-empty list"),
    ({**_multi_config(), "sources": [SD.as_dict(), "dinov2"]}, r"sources\[1\] has keys"),
    (_with_source(1, extra=1), r"sources\[1\] has keys"),
    (_with_source(1, layers=[{"name": "x", "channels": 8}]), r"bad sources\[1\] \('dinov2'\) layer table"),
    (_with_source(1, layers="block.5"), "not a list of layer dicts"),
    (_with_source(1, layers=[]), "layer table is empty"),
    (_with_source(1, n_timesteps=0), "source 'dinov2': n_timesteps=0"),
    (_with_source(1, name="DINOv2"), "source name 'DINOv2' is not allowed"),
    (_with_source(1, name="sd"), "unique"),
    ("not a config", "not a mapping"),
]


@pytest.mark.parametrize(("config", "match"), MALFORMED)
def test_malformed_multi_source_configs(config, match):
    with pytest.raises(UsageError, match=match) as info:
        AggregationNetwork.from_config(config)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("sources", "match"), [
    ([SD, SourceMaps("sd", DINO.layers, 1)], "unique"),
    ([SD, SourceMaps("sd:x", DINO.layers, 1)], "not allowed"),
    ([SD, SourceMaps("-x", DINO.layers, 1)], "not allowed"),
    ([SourceMaps("Sd", SD.layers, 4)], "not allowed"),  # checked for one source too
    ([], "at least one feature source"),
    ([SD, DINO.as_dict()], "not a SourceMaps"),
    ([SD, SourceMaps("dinov2", (), 1)], "source 'dinov2': .*layer table is empty"),
    ([SD, SourceMaps("dinov2", DINO.layers * 2, 1)], "names a layer twice"),
    ([SD, SourceMaps("dinov2", DINO.layers, 0)], "source 'dinov2': n_timesteps=0"),
])
def test_bad_sources(sources, match):
    with pytest.raises(UsageError, match=match) as info:
        AggregationNetwork.over_sources(sources, projection_dim=P, output_size=S, num_groups=G)
    assert "\n" not in str(info.value)


def test_input_errors_name_the_problem():
    net = AggregationNetwork.over_sources(SOURCES, projection_dim=P, output_size=S, num_groups=G)
    good = inputs(SOURCES, torch.Generator().manual_seed(8), batch=1)
    cases = [
        ({k: v for k, v in good.items() if k != "dinov2:block.11"}, r"missing maps \['dinov2:block.11'\]"),
        ({**good, "extra:x": good["sd:up.0"]}, r"unexpected maps \['extra:x'\]"),
        # bare layer names are the one-source form
        ({("up.0" if k == "sd:up.0" else k): v for k, v in good.items()}, r"unexpected maps \['up.0'\]"),
        ({**good, "dinov2:block.5": torch.zeros(1, 4, 48, 6, 6)}, r"'dinov2:block.5'.*T=1.*source 'dinov2'"),
        ({**good, "sd:up.1": torch.zeros(1, 1, 40, 8, 8)}, r"'sd:up.1'.*T=4"),
        ({**good, "sd:up.1": torch.zeros(1, 4, 41, 8, 8)}, "C=40"),
        ({**good, "dinov2:block.5": torch.zeros(2, 1, 48, 6, 6)}, "batch 2"),
    ]
    for feats, match in cases:
        with pytest.raises(UsageError, match=match) as info:
            net(feats)
        assert "\n" not in str(info.value)


def test_tables_are_slices_of_one_softmax():
    net = AggregationNetwork.over_sources(SOURCES, projection_dim=P, output_size=S, num_groups=G)
    tables = net.mixing_weights_tables()
    torch.testing.assert_close(tables["sd"], torch.full((4, 3), 1 / 14))  # uniform over all 14 at init
    randomize(net, 9)
    tables = net.mixing_weights_tables()
    assert list(tables) == ["sd", "dinov2"]
    assert tables["sd"].shape == (4, 3) and tables["dinov2"].shape == (1, 2)
    total = sum(t.sum() for t in tables.values())
    torch.testing.assert_close(total, torch.tensor(1.0))
    assert not torch.isclose(tables["sd"].sum(), torch.tensor(1.0))  # not normalised per source
    w = torch.softmax(net.mixing_weights.detach(), 0)
    torch.testing.assert_close(tables["sd"][2, 1], w[2 * 3 + 1])
    torch.testing.assert_close(tables["dinov2"][0, 1], w[12 + 1])
    with pytest.raises(UsageError, match="mixing_weights_tables"):
        net.mixing_weights_table()
