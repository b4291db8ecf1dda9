"""Import the aggregation networks the DHF authors released (SD 1.5, SD 1.5 one-step, SD 2.1).

Their `.pt` files are `torch.save` of the training checkpoint dict
`{"step", "config", "aggregation_network": state_dict, "optimizer_state_dict"}`
(`save_model` in their train_hyperfeatures.py; extract_hyperfeatures.py loads
`torch.load(path)["aggregation_network"]`). Their state dict names one bottleneck stage per
layer: `bottleneck_layers.{l}.0.{conv1,conv2,conv3,shortcut}.weight` and
`...{conv}.norm.{weight,bias}` (Detectron2 convs carry their GroupNorm as `.norm`), plus
`mixing_weights` of length T*L in the same timestep-major order as ours. `logit_scale` is a
plain attribute there, so it is not in the file.

Files are read with `weights_only=True` only: a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from dhf_cache.aggregator.network import AggregationNetwork
from dhf_cache.errors import DhfCacheError, ReferenceCheckpointError, first_line
from dhf_cache.cache.layers import LayerInfo

REFERENCE_NUM_GROUPS = 32  # GroupNorm groups of every released network (not stored in the file)

# our BottleneckBlock key -> the reference's key inside `bottleneck_layers.{l}.0.`
_BLOCK_KEYS = {
    "conv1.weight": "conv1.weight",
    "norm1.weight": "conv1.norm.weight",
    "norm1.bias": "conv1.norm.bias",
    "conv2.weight": "conv2.weight",
    "norm2.weight": "conv2.norm.weight",
    "norm2.bias": "conv2.norm.bias",
    "conv3.weight": "conv3.weight",
    "norm3.weight": "conv3.norm.weight",
    "norm3.bias": "conv3.norm.bias",
    "shortcut.weight": "shortcut.weight",
    "shortcut_norm.weight": "shortcut.norm.weight",
    "shortcut_norm.bias": "shortcut.norm.bias",
}
_SHORTCUT_KEYS = {"shortcut.weight", "shortcut_norm.weight", "shortcut_norm.bias"}
_LAYER_KEY = re.compile(r"^bottleneck_layers\.(\d+)\.")
_UP_RESNET = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)$")


def _ref_key(l: int, ours: str) -> str:
    return f"bottleneck_layers.{l}.0.{_BLOCK_KEYS[ours]}"


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _unwrap(state: Mapping) -> Mapping:
    """Accept the whole training checkpoint as well as its `aggregation_network` entry."""
    if "aggregation_network" in state and isinstance(state["aggregation_network"], Mapping):
        return state["aggregation_network"]
    return state


def reference_layout(state: Mapping) -> dict:
    """What a reference state dict implies: channels per layer (their order), P, T."""
    state = _unwrap(state)
    indices = {int(m.group(1)) for key in state if (m := _LAYER_KEY.match(key))}
    if not indices:
        raise ReferenceCheckpointError(
            f"no `bottleneck_layers.*` keys in this state dict (keys: {_listing(list(state))}); "
            "pass a Diffusion Hyperfeatures aggregation network checkpoint"
        )
    n_layers = max(indices) + 1
    if indices != set(range(n_layers)):
        raise ReferenceCheckpointError(
            f"reference bottleneck layers {sorted(indices)} are not numbered 0..{n_layers - 1}; the file is incomplete"
        )
    channels = []
    for l in range(n_layers):
        conv1 = state.get(_ref_key(l, "conv1.weight"))
        if not isinstance(conv1, torch.Tensor) or conv1.dim() != 4:
            raise ReferenceCheckpointError(f"reference key {_ref_key(l, 'conv1.weight')} is missing or not a conv weight")
        channels.append(int(conv1.shape[1]))
    conv3 = state.get(_ref_key(0, "conv3.weight"))
    if not isinstance(conv3, torch.Tensor) or conv3.dim() != 4:
        raise ReferenceCheckpointError(f"reference key {_ref_key(0, 'conv3.weight')} is missing or not a conv weight")
    mixing = state.get("mixing_weights")
    if not isinstance(mixing, torch.Tensor) or mixing.dim() != 1 or mixing.numel() % n_layers:
        shape = tuple(mixing.shape) if isinstance(mixing, torch.Tensor) else None
        raise ReferenceCheckpointError(
            f"reference mixing_weights has shape {shape}; expected (T * {n_layers},) for {n_layers} layers"
        )
    p = int(conv3.shape[0])
    if p < 4 or p % 4 or mixing.numel() == 0:
        raise ReferenceCheckpointError(
            f"reference layout does not make a network: projection dim {p} (conv3 output channels; a positive "
            f"multiple of 4 is needed), {mixing.numel()} mixing weights for {n_layers} layers"
        )
    return {"channels": channels, "projection_dim": p, "n_timesteps": mixing.numel() // n_layers}


def reference_positions(layers: Sequence[LayerInfo]) -> list[int]:
    """Position of each of our layers in the reference's layer order.

    The reference stacks `unet.up_blocks[i].resnets[j]` in UNet order, i.e. sorted by (i, j).
    When every name has that form, our table may list them in any order; otherwise the table
    is taken to be in the reference's order already.
    """
    parsed = [_UP_RESNET.match(layer.name) for layer in layers]
    if not all(parsed):
        return list(range(len(layers)))
    keys = [(int(m.group(1)), int(m.group(2))) for m in parsed]
    ranked = sorted(range(len(layers)), key=lambda l: keys[l])
    positions = [0] * len(layers)
    for rank, l in enumerate(ranked):
        positions[l] = rank
    return positions


def convert_reference_state_dict(state: Mapping, layers: Sequence[LayerInfo], n_timesteps: int) -> dict:
    """Map a reference state dict onto `AggregationNetwork(layers, n_timesteps, P).state_dict()` keys.

    Strict: every key must be used and every expected key present, with the shape our network
    has; the channels per layer (read from the conv weights) must equal the layer table's.
    """
    state = _unwrap(state)
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ReferenceCheckpointError(f"reference state dict entries that are not tensors: {_listing(not_tensors)}")
    layout = reference_layout(state)
    n_layers = len(layers)
    if len(layout["channels"]) != n_layers:
        raise ReferenceCheckpointError(
            f"the checkpoint has {len(layout['channels'])} bottleneck layers (channels {layout['channels']}), "
            f"the layer table {n_layers} ({[l.name for l in layers]}); use a cache with the same layers"
        )
    positions = reference_positions(layers)
    wrong = [
        f"{layer.name}: cache {layer.channels}, checkpoint {layout['channels'][r]}"
        for layer, r in zip(layers, positions)
        if layer.channels != layout["channels"][r]
    ]
    if wrong:
        raise ReferenceCheckpointError(
            f"channels per layer differ ({'; '.join(wrong)}); the checkpoint was trained on another "
            "backbone or layer set: use its model (SD 1.5 vs 2.1) and the 12 up-block resnets"
        )
    if layout["n_timesteps"] != n_timesteps:
        raise ReferenceCheckpointError(
            f"the checkpoint mixes {layout['n_timesteps']} timesteps ({layout['n_timesteps'] * n_layers} mixing "
            f"weights), the cache has {n_timesteps}; use a cache with the checkpoint's save steps"
        )
    p = layout["projection_dim"]
    p4 = p // 4
    out: dict[str, torch.Tensor] = {}
    expected_ref: set[str] = {"mixing_weights"}
    shape_errors = []
    for l, (layer, r) in enumerate(zip(layers, positions)):
        c = layer.channels
        shapes = {
            "conv1.weight": (p4, c, 1, 1), "norm1.weight": (p4,), "norm1.bias": (p4,),
            "conv2.weight": (p4, p4, 3, 3), "norm2.weight": (p4,), "norm2.bias": (p4,),
            "conv3.weight": (p, p4, 1, 1), "norm3.weight": (p,), "norm3.bias": (p,),
            "shortcut.weight": (p, c, 1, 1), "shortcut_norm.weight": (p,), "shortcut_norm.bias": (p,),
        }
        for ours, shape in shapes.items():
            if ours in _SHORTCUT_KEYS and c == p:
                continue  # identity shortcut, as in the reference when C == P
            ref = _ref_key(r, ours)
            expected_ref.add(ref)
            if ref not in state:
                continue
            if tuple(state[ref].shape) != shape:
                shape_errors.append(f"{ref}: {tuple(state[ref].shape)}, expected {shape}")
            out[f"bottlenecks.{l}.{ours}"] = state[ref]
    missing = sorted(expected_ref - set(state))
    unexpected = sorted(set(state) - expected_ref)
    if missing or unexpected:
        raise ReferenceCheckpointError(
            "reference state dict does not match the aggregation network: "
            f"missing keys [{_listing(missing)}], unexpected keys [{_listing(unexpected)}]; "
            "only single-block Diffusion Hyperfeatures checkpoints (num_res_blocks=1) are supported"
        )
    if shape_errors:
        raise ReferenceCheckpointError(f"reference tensor shapes do not fit: {'; '.join(shape_errors)}")
    # mixing weight t * L + r (reference layer r) -> t * L + l (our layer l)
    mixing = state["mixing_weights"].view(n_timesteps, n_layers)
    out["mixing_weights"] = mixing[:, positions].reshape(-1).clone()
    return out


def _unpickler_detail(exc: Exception) -> str:
    """The part of torch's long message that says what was refused."""
    text = str(exc)
    tail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def load_reference_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """Read a released `.pt` safely: (their state dict, their training config or {})."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceCheckpointError(
            f"{path}: no such file; download the authors' weights (e.g. aggregation_network.pt from "
            "huggingface.co/g-luo/diffusion-hyperfeatures) and pass its path"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if "global" in detail.lower():
            raise ReferenceCheckpointError(
                f"{path} holds non-tensor Python objects that only a full unpickle could build; it is refused "
                f"(unpickling runs arbitrary code). Re-save just the state dict and config. Detail: {detail}"
            ) from exc
        raise ReferenceCheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint of tensors (the safe loader stopped: {detail}); "
            "check the download"
        ) from exc
    except Exception as exc:  # corrupt zip, truncated file, not a torch file
        raise ReferenceCheckpointError(f"{path} cannot be read as a PyTorch checkpoint: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise ReferenceCheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "aggregation_network" in obj:
        state, config = obj["aggregation_network"], obj.get("config") or {}
    elif "mixing_weights" in obj:
        state, config = obj, {}
    else:
        raise ReferenceCheckpointError(
            f"{path} has neither `aggregation_network` nor `mixing_weights` (keys: {_listing(list(obj))}); "
            "it is not a Diffusion Hyperfeatures checkpoint"
        )
    if not isinstance(state, Mapping) or not isinstance(config, Mapping):
        raise ReferenceCheckpointError(f"{path}: `aggregation_network` or `config` is not a dict")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ReferenceCheckpointError(f"{path}: state dict entries that are not tensors: {_listing(not_tensors)}")
    try:
        config = _plain(config, "config")
    except ReferenceCheckpointError as exc:
        raise ReferenceCheckpointError(f"{path}: {exc}") from None
    return dict(state), config


def reference_time_axis(config: Mapping) -> tuple[int, tuple[int, ...]] | None:
    """(steps, save steps in the features' order) of a reference config, or None if absent.

    Same convention as our FeatureSpace (step index steps-1 = cleanest; the released configs list
    [49, 45, ..., 0], clean first). With `flip_timesteps` their loader reversed the stored list
    after the extractor had kept the original, so the features ran in the reverse of the saved list.
    """
    if "save_timestep" not in config or "num_timesteps" not in config:
        return None
    total, saved, flip = config["num_timesteps"], config["save_timestep"], config.get("flip_timesteps", False)
    if not _is_int(total) or total < 1:
        raise ReferenceCheckpointError(f"reference config num_timesteps {total!r}: expected a positive integer")
    if (not isinstance(saved, (list, tuple)) or not saved
            or not all(_is_int(s) and 0 <= s < total for s in saved) or len(set(saved)) != len(saved)):
        raise ReferenceCheckpointError(
            f"reference config save_timestep {saved!r}: expected a list of distinct step indices in 0..{total - 1}"
        )
    if not isinstance(flip, bool):
        raise ReferenceCheckpointError(f"reference config flip_timesteps {flip!r}: expected true or false")
    steps = tuple(int(s) for s in saved)
    return int(total), steps[::-1] if flip else steps


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain(value, where: str):
    """`value` as JSON data (a run folder records the reference's config); tensors of one number
    become that number. ReferenceCheckpointError naming `where` for anything else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ReferenceCheckpointError(f"reference {where} has keys that are not strings: {bad[:3]!r}")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ReferenceCheckpointError(
        f"reference {where} is a {type(value).__name__}, not plain data (numbers, strings, lists, dicts)"
    )


def load_reference_aggregator(
    path: str | Path, layers: Sequence[LayerInfo], n_timesteps: int | None = None, output_size: int = 64
) -> tuple[AggregationNetwork, dict]:
    """A ready AggregationNetwork with the released weights (strict load), and their config."""
    state, config = load_reference_checkpoint(path)
    layout = reference_layout(state)
    t = layout["n_timesteps"] if n_timesteps is None else n_timesteps
    converted = convert_reference_state_dict(state, layers, t)
    try:
        net = AggregationNetwork(
            layers, t, projection_dim=layout["projection_dim"], output_size=output_size, num_groups=REFERENCE_NUM_GROUPS
        )
        net.load_state_dict(converted, strict=True)
    except (DhfCacheError, RuntimeError) as exc:  # e.g. a projection dim GroupNorm(32) cannot split
        detail = first_line(exc, None)
        raise ReferenceCheckpointError(f"{path}: the reference network cannot be rebuilt ({detail})") from None
    return net, config
