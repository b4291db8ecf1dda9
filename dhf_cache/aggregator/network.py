"""The aggregation network of Diffusion Hyperfeatures (METHOD.md, "Aggregation network").

One Detectron2-style bottleneck per layer, shared by all timesteps, projects every
(layer, timestep) map to `projection_dim` channels at `output_size`; a softmax over all
L*T mixing weights jointly blends them into one descriptor map.

Ordering contract (it decides whether released weights import correctly): mixing weight
i = t * L + l belongs to timestep t (position on the cache's time axis, clean first) and layer l
(position in the layer table). That is the reference's order: it concatenates all layers of one
timestep, then the next timestep, and uses bottleneck `i % L` for chunk i.

Several feature sources (`AggregationNetwork.over_sources`, e.g. an SD UNet with T = 11 and
DINOv2 with T = 1): one bottleneck per (source, layer), numbered source by source, layer by
layer; the mixing weights are the sources' blocks concatenated in source order, each block in
that source's own timestep-major order, so source s, timestep t, layer l has index
offset_s + t * L_s + l with offset_s = sum of T_r * L_r over the sources r before s. ONE softmax
runs over all of them (sources compete for weight, as layers and timesteps do). Inputs are
keyed `map_key(source, layer)` = "source:layer". A single source is exactly the legacy network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dhf_cache.config import DESCRIPTOR_GRID, NORM_GROUPS, PROJECTION_DIM
from dhf_cache.errors import UsageError
from dhf_cache.cache.layers import LayerInfo


def _msra_fill(conv: nn.Conv2d) -> None:
    """Detectron2/fvcore `c2_msra_fill`: He normal with fan_out, as the reference initialises."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _check_dims(in_channels: int, bottleneck_channels: int, out_channels: int, num_groups: int) -> None:
    for name, value in (("in_channels", in_channels), ("bottleneck_channels", bottleneck_channels),
                        ("out_channels", out_channels), ("num_groups", num_groups)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"bottleneck {name}={value!r}: must be a positive integer")
    for name, value in (("bottleneck_channels", bottleneck_channels), ("out_channels", out_channels)):
        if value % num_groups:
            raise UsageError(
                f"bottleneck {name}={value} is not divisible by num_groups={num_groups} (GroupNorm); "
                f"choose a projection_dim with projection_dim/4 a multiple of {num_groups}"
            )


class BottleneckBlock(nn.Module):
    """1x1 C->P/4, GN, ReLU; 3x3 P/4->P/4, GN, ReLU; 1x1 P/4->P, GN; + shortcut; ReLU.

    As Detectron2's block in the reference: stride 1, no conv bias, MSRA fill, every GroupNorm
    weight 1 and bias 0 (the reference leaves the zero-init of the last norm commented out).
    The projection shortcut (1x1 conv + GN) exists only when in_channels != out_channels, also
    as in the reference; otherwise the input is added as is.
    """

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, num_groups: int = NORM_GROUPS):
        super().__init__()
        _check_dims(in_channels, bottleneck_channels, out_channels, num_groups)
        self.in_channels = in_channels
        self.bottleneck_channels = bottleneck_channels
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)
        self.norm1 = nn.GroupNorm(num_groups, bottleneck_channels)
        self.conv2 = nn.Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, bottleneck_channels)
        self.conv3 = nn.Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False)
        self.norm3 = nn.GroupNorm(num_groups, out_channels)
        if in_channels != out_channels:
            self.shortcut: nn.Conv2d | None = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
            self.shortcut_norm: nn.GroupNorm | None = nn.GroupNorm(num_groups, out_channels)
        else:
            self.shortcut = None
            self.shortcut_norm = None
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if conv is not None:
                _msra_fill(conv)
        # nn.GroupNorm already starts at weight 1, bias 0, as the reference's norms do.

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The block on `x` bilinearly resized to `size` (None: as is).

        The 1x1 convs (conv1, projection shortcut) commute with bilinear resizing (one is linear
        over channels, the other over space), so when the map is smaller than `size` they run
        at native resolution and their outputs are resized: the same result as resizing first,
        at a fraction of the cost for 1280-channel 8x8 maps.
        """
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            def resize(t: torch.Tensor) -> torch.Tensor:
                return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

            if x.shape[-2] * x.shape[-1] < size[0] * size[1]:
                a = resize(self.conv1(x))
                s = resize(self.shortcut(x)) if self.shortcut is not None else resize(x)
            else:
                x = resize(x)
                a, s = self.conv1(x), (self.shortcut(x) if self.shortcut is not None else x)
        else:
            a, s = self.conv1(x), (self.shortcut(x) if self.shortcut is not None else x)
        out = F.relu(self.norm1(a))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        identity = self.shortcut_norm(s) if self.shortcut is not None else s
        return F.relu(out + identity)


def bottleneck_parameter_count(in_channels: int, projection_dim: int = PROJECTION_DIM) -> int:
    """Parameters of one block: 480*C + 121,728 at P=384 (C != P)."""
    p4 = projection_dim // 4
    count = in_channels * p4 + 2 * p4  # conv1 + GN
    count += p4 * p4 * 9 + 2 * p4  # conv2 + GN
    count += p4 * projection_dim + 2 * projection_dim  # conv3 + GN
    if in_channels != projection_dim:
        count += in_channels * projection_dim + 2 * projection_dim  # shortcut + GN
    return count



def parameter_count(layers: Sequence[LayerInfo], projection_dim: int = PROJECTION_DIM, n_timesteps: int | None = None) -> int:
    """Bottleneck parameters of a network over `layers`, plus L*T mixing weights if T is given."""
    total = sum(bottleneck_parameter_count(layer.channels, projection_dim) for layer in layers)
    if n_timesteps is not None:
        total += len(layers) * n_timesteps
    return total


SOURCE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
"""A source name: lower-case letters, digits, '_' and '-', not starting with '_' or '-' (no ':')."""

LEGACY_SOURCE_NAME = ""
"""The name under which a single-source (legacy) network lists its one source."""


@dataclass(frozen=True)
class SourceMaps:
    """The maps one feature source contributes: its layer table and its number of timesteps.

    `layers` is stored as a tuple (a list is accepted and converted). The name is checked by
    `AggregationNetwork.over_sources` (it must match `SOURCE_NAME_PATTERN`).
    """

    name: str
    layers: tuple[LayerInfo, ...]
    n_timesteps: int

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))

    def as_dict(self) -> dict:
        return {"name": self.name, "layers": [layer.as_dict() for layer in self.layers], "n_timesteps": self.n_timesteps}


def map_key(source: str, layer: str) -> str:
    """The input key of one source's layer in a multi-source network: "source:layer"."""
    return f"{source}:{layer}"


def _check_layers(layers: tuple, n_timesteps, where: str = "") -> None:
    """The layer table and T of one source; `where` prefixes messages ("" for the legacy form)."""
    if not layers:
        raise UsageError(f"{where}aggregation network needs at least one layer; the layer table is empty")
    bad = [layer for layer in layers if not isinstance(layer, LayerInfo)]
    if bad:
        raise UsageError(f"{where}layer table entry {bad[0]!r} is not a LayerInfo(name, channels, height, width)")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise UsageError(f"{where}layer table names a layer twice: {names}")
    if not isinstance(n_timesteps, int) or n_timesteps < 1:
        raise UsageError(f"{where}n_timesteps={n_timesteps!r}: must be a positive integer")


def _check_sources(sources) -> tuple[SourceMaps, ...]:
    if isinstance(sources, (str, bytes, Mapping)) or not isinstance(sources, Sequence):
        raise UsageError(f"aggregator sources {sources!r}: pass a sequence of SourceMaps")
    sources = tuple(sources)
    if not sources:
        raise UsageError("aggregation network needs at least one feature source; none given")
    for source in sources:
        if not isinstance(source, SourceMaps):
            raise UsageError(f"aggregator source {source!r} is not a SourceMaps(name, layers, n_timesteps)")
        if not isinstance(source.name, str) or not SOURCE_NAME_PATTERN.match(source.name):
            raise UsageError(
                f"source name {source.name!r} is not allowed: use lower-case letters, digits, '_' and '-', "
                "starting with a letter or digit (e.g. 'sd', 'dinov2')"
            )
        _check_layers(tuple(source.layers), source.n_timesteps, where=f"source {source.name!r}: ")
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"source names must be unique; got {names}")
    return sources


def parameter_count_sources(sources: Sequence[SourceMaps], projection_dim: int = PROJECTION_DIM) -> int:
    """Parameters of `AggregationNetwork.over_sources(sources, projection_dim)`.

    One bottleneck per (source, layer) (480*C + 121,728 each at P=384) plus sum_s T_s * L_s
    mixing weights; for one source, `parameter_count(layers, P, T)`.
    """
    sources = _check_sources(sources)
    return sum(parameter_count(s.layers, projection_dim, s.n_timesteps) for s in sources)


def _layers_from_config(value, where: str) -> list[LayerInfo]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise UsageError(f"aggregator config: {where}layers {value!r} is not a list of layer dicts")
    try:
        return [LayerInfo(**dict(d)) for d in value]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"aggregator config: bad {where}layer table {value!r} ({exc})") from exc


class AggregationNetwork(nn.Module):
    """Bottleneck per layer (shared over timesteps) + one softmax over all L*T mixing weights.

    forward takes `{layer name: (B, T, C, H, W)}` at native resolution (any float dtype, e.g.
    fp16 straight from the cache) and returns (B, projection_dim, output_size, output_size).

    `AggregationNetwork(layers, n_timesteps, ...)` is the single-source (legacy) form;
    `AggregationNetwork.over_sources(sources, ...)` builds one over several feature sources
    (see the module docstring for the order). Attributes: `sources` (always a tuple of
    SourceMaps; the legacy form lists one, named `LEGACY_SOURCE_NAME` = ""), `multi_source`,
    `map_keys` (the input keys in order). In the multi-source form `layers` is every source's
    layer table concatenated (one entry per bottleneck, names may repeat across sources) and
    `n_timesteps` is None: use `sources`.
    """

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        n_timesteps: int,
        projection_dim: int = PROJECTION_DIM,
        output_size: int = DESCRIPTOR_GRID,
        num_groups: int = NORM_GROUPS,
    ):
        super().__init__()
        layers = tuple(layers)
        _check_layers(layers, n_timesteps)
        self._setup((SourceMaps(LEGACY_SOURCE_NAME, layers, n_timesteps),), projection_dim, output_size, num_groups)

    @classmethod
    def over_sources(
        cls,
        sources: Sequence[SourceMaps],
        projection_dim: int = PROJECTION_DIM,
        output_size: int = DESCRIPTOR_GRID,
        num_groups: int = NORM_GROUPS,
    ) -> AggregationNetwork:
        """A network over the maps of several feature sources, one softmax over all their weights.

        Source names must match `SOURCE_NAME_PATTERN` and be unique. With exactly ONE source
        this returns the legacy network `cls(source.layers, source.n_timesteps, ...)`: inputs
        keyed by bare layer names, the legacy `config`, and the source name is not kept
        (`sources[0].name == ""`). With two or more, bottleneck i is the i-th (source, layer)
        in order, so the first source's blocks are numbered as a network over it alone would
        number them, and forward takes `{map_key(source, layer): (B, T_s, C, H, W)}`.
        """
        sources = _check_sources(sources)
        if len(sources) == 1:
            only = sources[0]
            return cls(only.layers, only.n_timesteps, projection_dim, output_size, num_groups)
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._setup(sources, projection_dim, output_size, num_groups)
        return net

    def _setup(self, sources: tuple[SourceMaps, ...], projection_dim, output_size, num_groups) -> None:
        if not isinstance(output_size, int) or output_size < 1:
            raise UsageError(f"output_size={output_size!r}: must be a positive integer")
        if not isinstance(projection_dim, int) or projection_dim < 4 or projection_dim % 4:
            raise UsageError(f"projection_dim={projection_dim!r}: must be a positive multiple of 4")
        self.sources = sources
        self.multi_source = len(sources) > 1
        self.layers = tuple(layer for source in sources for layer in source.layers)
        self.n_timesteps = None if self.multi_source else sources[0].n_timesteps
        self.projection_dim = projection_dim
        self.output_size = output_size
        self.num_groups = num_groups
        # per source: index of its first bottleneck and of its first mixing weight
        self._block_offsets: list[int] = []
        self._weight_offsets: list[int] = []
        blocks = weights = 0
        for source in sources:
            self._block_offsets.append(blocks)
            self._weight_offsets.append(weights)
            blocks += len(source.layers)
            weights += len(source.layers) * source.n_timesteps
        self.bottlenecks = nn.ModuleList(
            BottleneckBlock(layer.channels, projection_dim // 4, projection_dim, num_groups) for layer in self.layers
        )
        # index i = t * L + l (timestep-major) within each source, sources concatenated, as the
        # reference for one source: released weights import as is
        self.mixing_weights = nn.Parameter(torch.ones(weights))

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def map_keys(self) -> list[str]:
        """The input keys in bottleneck order: layer names (one source) or "source:layer"."""
        if not self.multi_source:
            return self.layer_names
        return [map_key(source.name, layer.name) for source in self.sources for layer in source.layers]

    @property
    def config(self) -> dict:
        """Everything needed to rebuild this network (JSON-serialisable).

        One source: {"layers", "n_timesteps", "projection_dim", "output_size", "num_groups"};
        several: {"sources": [{"name", "layers", "n_timesteps"}, ...], "projection_dim",
        "output_size", "num_groups"}.
        """
        if self.multi_source:
            return {
                "sources": [source.as_dict() for source in self.sources],
                "projection_dim": self.projection_dim,
                "output_size": self.output_size,
                "num_groups": self.num_groups,
            }
        return {
            "layers": [layer.as_dict() for layer in self.layers],
            "n_timesteps": self.n_timesteps,
            "projection_dim": self.projection_dim,
            "output_size": self.output_size,
            "num_groups": self.num_groups,
        }

    @classmethod
    def from_config(cls, config: Mapping) -> AggregationNetwork:
        """Rebuild from either form of `config` (a "sources" key selects the multi-source form;
        a "sources" list of one entry gives the legacy network, as `over_sources` does)."""
        if not isinstance(config, Mapping):
            raise UsageError(f"aggregator config {config!r} is not a mapping; pass AggregationNetwork.config")
        if "sources" in config:
            return cls._from_sources_config(config)
        expected = {"layers", "n_timesteps", "projection_dim", "output_size", "num_groups"}
        keys = set(config)
        if keys != expected:
            raise UsageError(
                f"aggregator config keys {sorted(keys)} differ from {sorted(expected)}: "
                f"missing {sorted(expected - keys)}, unexpected {sorted(keys - expected)}; "
                "rebuild the checkpoint's config from AggregationNetwork.config"
            )
        try:
            layers = [LayerInfo(**dict(d)) for d in config["layers"]]
        except TypeError as exc:
            raise UsageError(f"aggregator config: bad layer table {config['layers']!r} ({exc})") from exc
        return cls(
            layers,
            n_timesteps=config["n_timesteps"],
            projection_dim=config["projection_dim"],
            output_size=config["output_size"],
            num_groups=config["num_groups"],
        )

    @classmethod
    def _from_sources_config(cls, config: Mapping) -> AggregationNetwork:
        expected = {"sources", "projection_dim", "output_size", "num_groups"}
        keys = set(config)
        if keys != expected:
            raise UsageError(
                f"multi-source aggregator config keys {sorted(keys)} differ from {sorted(expected)}: "
                f"missing {sorted(expected - keys)}, unexpected {sorted(keys - expected)}; "
                "rebuild the checkpoint's config from AggregationNetwork.config"
            )
        entries = config["sources"]
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence) or not entries:
            raise UsageError(
                f"aggregator config: sources {entries!r} is not a non-empty list of "
                '{"name", "layers", "n_timesteps"} dicts'
            )
        entry_keys = {"name", "layers", "n_timesteps"}
        sources = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or set(entry) != entry_keys:
                got = sorted(entry) if isinstance(entry, Mapping) else repr(entry)
                raise UsageError(
                    f"aggregator config: sources[{i}] has keys {got}; expected {sorted(entry_keys)}"
                )
            where = f"sources[{i}] ({entry['name']!r}) "
            sources.append(SourceMaps(entry["name"], tuple(_layers_from_config(entry["layers"], where)),
                                      entry["n_timesteps"]))
        return cls.over_sources(
            sources,
            projection_dim=config["projection_dim"],
            output_size=config["output_size"],
            num_groups=config["num_groups"],
        )

    def mixing_coefficients(self) -> torch.Tensor:
        """The effective weights: one softmax over all entries (not per layer, step or source)."""
        return torch.softmax(self.mixing_weights, dim=0)

    def mixing_weights_table(self) -> torch.Tensor:
        """Softmaxed weights as (T, L), rows = timesteps (clean first), for the heatmap figure.

        One source only; a multi-source network has one table per source: `mixing_weights_tables`.
        """
        if self.multi_source:
            raise UsageError(
                f"this aggregator mixes {len(self.sources)} sources {[s.name for s in self.sources]}; "
                "use mixing_weights_tables() for one (T, L) table per source"
            )
        return self.mixing_coefficients().detach().view(self.n_timesteps, len(self.layers))

    def mixing_weights_tables(self) -> dict[str, torch.Tensor]:
        """{source name: softmaxed weights (T_s, L_s)}, rows = timesteps (clean first).

        Slices of the one global softmax, so all tables together sum to 1. A single-source
        (legacy) network returns its one table under the key "" (`LEGACY_SOURCE_NAME`).
        """
        coeffs = self.mixing_coefficients().detach()
        tables = {}
        for source, start in zip(self.sources, self._weight_offsets):
            n_layers, t = len(source.layers), source.n_timesteps
            tables[source.name] = coeffs[start:start + t * n_layers].view(t, n_layers)
        return tables

    def _inputs(self):
        """(input key, source, layer index in source, bottleneck index) in bottleneck order."""
        for source, first in zip(self.sources, self._block_offsets):
            for l, layer in enumerate(source.layers):
                key = map_key(source.name, layer.name) if self.multi_source else layer.name
                yield key, source, l, first + l

    def _check_inputs(self, features: Mapping[str, torch.Tensor]) -> int:
        keys = self.map_keys
        wanted = set(keys)
        missing = [n for n in keys if n not in features]
        extra = [n for n in features if n not in wanted]
        if missing or extra:
            if self.multi_source:
                raise UsageError(
                    f"aggregator inputs: missing maps {missing}, unexpected maps {extra}; pass exactly "
                    f"the keys {keys} (\"source:layer\", see map_key)"
                )
            raise UsageError(
                f"aggregator inputs: missing layers {missing}, unexpected layers {extra}; "
                f"pass exactly the layer table {self.layer_names}"
            )
        batch = None
        for key, source, l, _ in self._inputs():
            layer = source.layers[l]
            x = features[key]
            if x.dim() != 5 or x.shape[1] != source.n_timesteps or x.shape[2] != layer.channels:
                of = f" (source {source.name!r})" if self.multi_source else ""
                raise UsageError(
                    f"aggregator input {key!r} has shape {tuple(x.shape)}; expected "
                    f"(B, T={source.n_timesteps}, C={layer.channels}, H, W){of}"
                )
            if not x.is_floating_point():
                raise UsageError(f"aggregator input {key!r} has dtype {x.dtype}; expected a float tensor")
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise UsageError(f"aggregator input {key!r} has batch {x.shape[0]}, others {batch}")
        return batch

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = self._check_inputs(features)
        param = self.mixing_weights
        size = (self.output_size, self.output_size)
        coeffs = self.mixing_coefficients()
        weights = {
            source.name: coeffs[start:start + source.n_timesteps * len(source.layers)].view(
                source.n_timesteps, len(source.layers))
            for source, start in zip(self.sources, self._weight_offsets)
        }
        out = None
        for key, source, l, b in self._inputs():
            block = self.bottlenecks[b]
            x = features[key].to(device=param.device, dtype=param.dtype)
            n, t, c, h, w = x.shape
            x = x.reshape(n * t, c, h, w)  # all timesteps through the one shared block at once
            # resized to the output grid as the reference's F.interpolate(mode="bilinear") does;
            # each map from its own native size (sources may differ: DINOv2 16x16, SD 8..64)
            y = block(x, size).view(batch, t, self.projection_dim, *size)
            term = torch.einsum("btchw,t->bchw", y, weights[source.name][:, l])
            out = term if out is None else out + term
        return out
