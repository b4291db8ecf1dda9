"""Aggregator checkpoints: safetensors weights + JSON config, never pickle.

    RUN/config.json               network shape, the features it reads (layers, timesteps, the
                                  cache's feature_space fingerprint and spec), training options
    RUN/last/model.safetensors    weights after the latest checkpointed step
    RUN/last/optimizer.safetensors + state.json (step, best val PCK): what --resume needs
    RUN/best/...                  the weights with the best validation PCK
    RUN/metrics.jsonl             one line per step (loss) and per validation (PCK)

A checkpoint directory is written to a temporary name and renamed into place, so a crash
mid-write leaves the previous one intact.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dhf_cache import __version__
from dhf_cache.aggregator import AggregationNetwork
from dhf_cache.errors import CheckpointError
from dhf_cache.fingerprint import sha256_of, spec_differences

CHECKPOINT_FORMAT = 1


@dataclass
class Checkpoint:
    """A loaded aggregator with the description of the features it expects."""

    network: AggregationNetwork
    config: dict[str, Any]
    state: dict[str, Any]
    path: Path

    @property
    def features(self) -> dict[str, Any]:
        return self.config["features"]

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.features["layers"]]

    @property
    def timesteps(self) -> list[int]:
        return list(self.features["timesteps"])

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies these weights and what they read: the key of descriptors stored by eval."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.network.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return sha256_of({"weights": digest.hexdigest(), "features": self.features})


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def make_config(network: AggregationNetwork, features: dict, training: dict | None, source: str) -> dict:
    return {
        "format": "dhf-cache-checkpoint",
        "format_version": CHECKPOINT_FORMAT,
        "created_by": f"dhf-cache {__version__}",
        "source": source,
        "network": network.config,
        "features": features,
        "training": training,
    }


def save_checkpoint(run: Path, which: str, network: AggregationNetwork, state: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write RUN/<which>/ atomically (temp dir + rename)."""
    final = run / which
    tmp = run / f".{which}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, tmp / "model.safetensors")
    if optimizer is not None:
        tensors, groups = _optimizer_to_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {**state, "optimizer_param_groups": groups}
    write_json(tmp / "state.json", state)
    old = run / f".{which}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            tensors[f"{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_state(optimizer: torch.optim.Optimizer, directory: Path, state: dict) -> None:
    path = directory / "optimizer.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; this checkpoint cannot be resumed (it holds weights only)")
    tensors = load_file(path)
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})


def resolve_checkpoint_dir(path: str | Path) -> tuple[Path, Path]:
    """(run dir, weights dir): RUN means RUN/best if present, else RUN/last; RUN/last works too."""
    path = Path(path)
    if (path / "model.safetensors").is_file() and (path.parent / "config.json").is_file():
        return path.parent, path
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"--checkpoint {path}: no config.json there; pass a run folder written by `dhf-cache train` "
            "or `dhf-cache import-checkpoint`"
        )
    for which in ("best", "last"):
        if (path / which / "model.safetensors").is_file():
            return path, path / which
    raise CheckpointError(f"--checkpoint {path}: holds no weights yet (no best/ or last/ with model.safetensors)")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    run, weights = resolve_checkpoint_dir(path)
    config = read_json(run / "config.json")
    if config.get("format") != "dhf-cache-checkpoint" or config.get("format_version", 99) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{run / 'config.json'}: not a dhf-cache checkpoint of a format this version reads")
    network = AggregationNetwork.from_config(config["network"])
    try:
        network.load_state_dict(load_file(weights / "model.safetensors"), strict=True)
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{weights / 'model.safetensors'}: does not fit the network in config.json ({exc})") from None
    state = read_json(weights / "state.json") if (weights / "state.json").is_file() else {}
    return Checkpoint(network.to(device).eval(), config, state, weights)


TRANSFER_FIELDS = ("source", "generation")  # what may differ when inversion weights read generation features


def _transfer(checkpoint_features: dict, cache) -> bool:
    """An inversion-trained checkpoint reading a generation cache (the paper's transfer claim)."""
    spec = checkpoint_features.get("feature_space_spec") or {}
    return spec.get("source", "inversion") == "inversion" and cache.spec.feature_space.source == "generation"


def _checkpoint_steps(checkpoint_features: dict) -> list[int] | None:
    """Inversion step indices of the checkpoint's timesteps (None when the checkpoint lacks the
    time axis of its training cache)."""
    spec, axis = checkpoint_features.get("feature_space_spec"), checkpoint_features.get("cache_timesteps")
    if not spec or not axis:
        return None
    return [spec["save_steps"][axis.index(t)] for t in checkpoint_features["timesteps"]]


def check_features_match(checkpoint_features: dict, cache) -> list[str]:
    """Why a checkpoint cannot read this cache's features ([] when it can).

    The same feature space (or, for imported checkpoints without one, the same layer names,
    channels and timesteps) is required, except that a checkpoint trained on inversion features
    may read generation features of the same model, steps and layers: matched by step index.
    """
    problems = []
    transfer = _transfer(checkpoint_features, cache)
    bound = checkpoint_features.get("feature_space")
    if bound is not None and bound != cache.fingerprint["feature_space"]:
        differences = spec_differences(cache.spec.feature_space, checkpoint_features.get("feature_space_spec") or {})
        if transfer:
            differences = [d for d in differences if d.split(":")[0].split(".")[0] not in TRANSFER_FIELDS]
        if differences or not transfer:
            problems.append("feature_space fingerprint differs")
            problems += [d.replace("requested", "checkpoint has") for d in differences]
    by_name = {layer.name: layer for layer in cache.layers}
    for layer in checkpoint_features["layers"]:
        have = by_name.get(layer["name"])
        if have is None:
            problems.append(f"layer {layer['name']}: not in the cache")
        elif have.channels != layer["channels"]:
            problems.append(f"layer {layer['name']}: {have.channels} channels in the cache, {layer['channels']} in the checkpoint")
    if transfer:
        steps = _checkpoint_steps(checkpoint_features)
        if steps is None:
            problems.append("this checkpoint does not record the time axis of its training cache, so its "
                            "inversion steps cannot be matched to generation steps")
        else:
            missing = [s for s in steps if s not in cache.spec.feature_space.save_steps]
            if missing:
                problems.append(f"step indices {missing}: not saved in the cache (it holds {list(cache.spec.feature_space.save_steps)})")
    else:
        missing = [t for t in checkpoint_features["timesteps"] if t not in cache.timesteps]
        if missing:
            problems.append(f"timesteps {missing}: not in the cache (it holds {cache.timesteps})")
    return problems


def checkpoint_selection(checkpoint_features: dict, cache):
    """(FeatureSelection, notes): the cached maps a checkpoint reads, once `check_features_match`
    found none missing. Same source: by UNet t; transfer: by step index (the generation pass
    calls the same step index at another t)."""
    from dhf_cache.feature_loader import select_features

    names = [layer["name"] for layer in checkpoint_features["layers"]]
    if not _transfer(checkpoint_features, cache):
        return select_features(cache, names, checkpoint_features["timesteps"]), []
    steps = _checkpoint_steps(checkpoint_features)
    timesteps = [cache.timesteps[cache.spec.feature_space.save_steps.index(s)] for s in steps]
    note = (f"transfer: a checkpoint trained on inversion features reads generation features, matched by "
            f"step index (inversion t {checkpoint_features['timesteps']} -> generation t {timesteps})")
    return select_features(cache, names, timesteps), [note]
