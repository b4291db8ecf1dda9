"""The aggregation network of Diffusion Hyperfeatures (METHOD.md, "Aggregation network").

One Detectron2-style bottleneck per layer, shared by all timesteps, projects every
(layer, timestep) map to `projection_dim` channels at `output_size`; a softmax over all
L*T mixing weights jointly blends them into one descriptor map.

Ordering contract (it decides whether released weights import correctly): mixing weight
i = t * L + l belongs to timestep t (position on the cache's time axis, clean first) and layer l
(position in the layer table). That is the reference's order: it concatenates all layers of one
timestep, then the next timestep, and uses bottleneck `i % L` for chunk i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dhf_cache.config import DESCRIPTOR_GRID, NORM_GROUPS, PROJECTION_DIM
from dhf_cache.errors import UsageError
from dhf_cache.layers import LayerInfo


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
            resize = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
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


class AggregationNetwork(nn.Module):
    """Bottleneck per layer (shared over timesteps) + one softmax over all L*T mixing weights.

    forward takes `{layer name: (B, T, C, H, W)}` at native resolution (any float dtype, e.g.
    fp16 straight from the cache) and returns (B, projection_dim, output_size, output_size).
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
        if not layers:
            raise UsageError("aggregation network needs at least one layer; the layer table is empty")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise UsageError(f"layer table names a layer twice: {names}")
        if not isinstance(n_timesteps, int) or n_timesteps < 1:
            raise UsageError(f"n_timesteps={n_timesteps!r}: must be a positive integer")
        if not isinstance(output_size, int) or output_size < 1:
            raise UsageError(f"output_size={output_size!r}: must be a positive integer")
        if not isinstance(projection_dim, int) or projection_dim < 4 or projection_dim % 4:
            raise UsageError(f"projection_dim={projection_dim!r}: must be a positive multiple of 4")
        self.layers = layers
        self.n_timesteps = n_timesteps
        self.projection_dim = projection_dim
        self.output_size = output_size
        self.num_groups = num_groups
        self.bottlenecks = nn.ModuleList(
            BottleneckBlock(layer.channels, projection_dim // 4, projection_dim, num_groups) for layer in layers
        )
        # index i = t * L + l (timestep-major), as the reference: released weights import as is
        self.mixing_weights = nn.Parameter(torch.ones(len(layers) * n_timesteps))

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def config(self) -> dict:
        """Everything needed to rebuild this network (JSON-serialisable)."""
        return {
            "layers": [layer.as_dict() for layer in self.layers],
            "n_timesteps": self.n_timesteps,
            "projection_dim": self.projection_dim,
            "output_size": self.output_size,
            "num_groups": self.num_groups,
        }

    @classmethod
    def from_config(cls, config: Mapping) -> AggregationNetwork:
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

    def mixing_coefficients(self) -> torch.Tensor:
        """The effective weights: one softmax over all L*T entries (not per layer or per step)."""
        return torch.softmax(self.mixing_weights, dim=0)

    def mixing_weights_table(self) -> torch.Tensor:
        """Softmaxed weights as (T, L), rows = timesteps (clean first), for the heatmap figure."""
        return self.mixing_coefficients().detach().view(self.n_timesteps, len(self.layers))

    def _check_inputs(self, features: Mapping[str, torch.Tensor]) -> int:
        missing = [n for n in self.layer_names if n not in features]
        extra = [n for n in features if n not in self.layer_names]
        if missing or extra:
            raise UsageError(
                f"aggregator inputs: missing layers {missing}, unexpected layers {extra}; "
                f"pass exactly the layer table {self.layer_names}"
            )
        batch = None
        for layer in self.layers:
            x = features[layer.name]
            if x.dim() != 5 or x.shape[1] != self.n_timesteps or x.shape[2] != layer.channels:
                raise UsageError(
                    f"aggregator input {layer.name!r} has shape {tuple(x.shape)}; expected "
                    f"(B, T={self.n_timesteps}, C={layer.channels}, H, W)"
                )
            if not x.is_floating_point():
                raise UsageError(f"aggregator input {layer.name!r} has dtype {x.dtype}; expected a float tensor")
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise UsageError(f"aggregator input {layer.name!r} has batch {x.shape[0]}, others {batch}")
        return batch

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = self._check_inputs(features)
        param = self.mixing_weights
        size = (self.output_size, self.output_size)
        weights = self.mixing_coefficients().view(self.n_timesteps, len(self.layers))
        out = None
        for l, (layer, block) in enumerate(zip(self.layers, self.bottlenecks)):
            x = features[layer.name].to(device=param.device, dtype=param.dtype)
            b, t, c, h, w = x.shape
            x = x.reshape(b * t, c, h, w)  # all timesteps through the one shared block at once
            # resized to the output grid as the reference's F.interpolate(mode="bilinear") does
            y = block(x, size).view(batch, t, self.projection_dim, *size)
            term = torch.einsum("btchw,t->bchw", y, weights[:, l])
            out = term if out is None else out + term
        return out
