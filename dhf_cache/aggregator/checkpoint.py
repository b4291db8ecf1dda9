"""Aggregator checkpoints: safetensors weights + JSON config, never pickle.

    RUN/config.json               network shape, the features it reads (layers, timesteps, the
                                  cache's feature_space fingerprint and spec), training options
    RUN/last/model.safetensors    weights after the latest checkpointed step
    RUN/last/optimizer.safetensors + state.json (step, best val PCK): what --resume needs
    RUN/best/...                  the weights with the best validation PCK
    RUN/metrics.jsonl             one line per step (loss) and per validation (PCK)

A checkpoint RUN/<which> is **complete** when its state.json (written last, after every other
file is on disk) reads as a JSON object and every file it lists loads: the safetensors header
covers the file exactly and its sha256 is the one state.json records. A save writes
RUN/.<which>.tmp, then renames RUN/<which> to RUN/.<which>.old and the temporary to RUN/<which>,
then removes the old one. A kill at any point leaves at least one complete checkpoint, and the
newest complete one is, in this order: the temporary (a save that finished writing but not
renaming), RUN/<which>, the old one (killed between the renames). `find_checkpoint` picks it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from dhf_cache import __version__
from dhf_cache.aggregator.network import AggregationNetwork
from dhf_cache.errors import CheckpointError, DhfCacheError, first_line
from dhf_cache.cache.fingerprint import sha256_of, spec_differences

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAMES = ("best", "last")
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"


@dataclass
class Checkpoint:
    """A loaded aggregator with the description of the features it expects."""

    network: AggregationNetwork
    config: dict[str, Any]
    state: dict[str, Any]
    path: Path  # the weights folder: RUN/best, RUN/last (or a save's temporary name, see above)

    @property
    def run(self) -> Path:
        """The run folder (holds config.json)."""
        return self.path.parent

    @property
    def features(self) -> dict[str, Any]:
        return self.config["features"]

    @property
    def fused(self) -> bool:
        """True for a network over maps of several sources."""
        return "sources" in self.config["features"]

    @functools.cached_property
    def bindings(self) -> dict[str, SourceBinding]:
        """Each source's binding by source name, in the network's order (one entry unless fused;
        runs from before format 2 and imported weights read the `sd` source). config.json was
        checked when the checkpoint loaded (`check_config`), so these parse."""
        features = self.config["features"]
        if self.fused:  # in the network's order (config.json's objects are written with sorted keys)
            return {entry["name"]: SourceBinding.model_validate(features["sources"][entry["name"]])
                    for entry in self.config["network"]["sources"]}
        return {features.get("source") or "sd": SourceBinding.model_validate(features)}

    @property
    def binding(self) -> SourceBinding:
        """The binding of a one-source checkpoint (fused ones: `bindings`)."""
        if self.fused:
            raise CheckpointError(f"{self.run}: fuses maps of {', '.join(self.bindings)}; use its per-source bindings")
        return next(iter(self.bindings.values()))

    @property
    def layer_names(self) -> list[str]:
        return self.binding.layer_names

    @property
    def timesteps(self) -> list[int]:
        return list(self.binding.timesteps)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies these weights and what they read: the key of descriptors stored by eval."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.network.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return sha256_of({"weights": digest.hexdigest(), "features": self.features})


def checkpoint_source(run: Path) -> str | None:
    """The cache source a run was trained on, from its config.json (None when unreadable: loading
    the checkpoint reports why). Runs of format-1 caches, and imported weights, read SD maps."""
    try:
        config = json.loads((Path(run) / "config.json").read_text())
        features, network = config.get("features", {}), config.get("network", {})
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(features, dict) and isinstance(features.get("sources"), dict):  # a fused run: its sources in order
        try:
            return ",".join(entry["name"] for entry in network["sources"])
        except (KeyError, TypeError):
            return ",".join(features["sources"])  # malformed: loading the checkpoint says why
    source = features.get("source") if isinstance(features, dict) else None
    return source if isinstance(source, str) else "sd"


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None


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


# --- config.json: what a run folder must hold before anything is built from it -------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LayerEntry(_Strict):
    name: str = Field(min_length=1)
    channels: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)


class _NetworkShape(_Strict):
    """What every network config has beside the maps it reads."""

    projection_dim: int = Field(ge=4)
    output_size: int = Field(ge=1)
    num_groups: int = Field(ge=1)


class _NetworkEntry(_NetworkShape):
    layers: list[LayerEntry] = Field(min_length=1)
    n_timesteps: int = Field(ge=1)


class SourceBinding(_Strict):
    """What a checkpoint reads from one source of a cache (config.json `features`, or one entry
    of `features.sources`): the typed form every reader of a checkpoint uses."""

    model_config = ConfigDict(strict=True, extra="allow")  # cache_url, reference, ...: informative
    layers: list[LayerEntry] = Field(min_length=1)
    timesteps: list[int] = Field(min_length=1)
    feature_space: str | None = None  # the source's feature_space fingerprint (None: imported, unbound)
    feature_space_spec: dict | None = None
    cache_timesteps: list[int] | None = None  # the training source's whole time axis
    preprocessing: dict | None = None
    model_source: str | None = None
    source: str | None = None  # the source's name in the cache (None: before format 2, i.e. "sd")

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def kind(self) -> str | None:
        """The source's family as its feature space records it (None: SD 1.x/2.x)."""
        return (self.feature_space_spec or {}).get("kind")

    @property
    def feature_source(self) -> str:
        """inversion or generation (what the SD features were captured from)."""
        return (self.feature_space_spec or {}).get("source", "inversion")


def _one_or_fused(value: Any) -> str:
    return "fused" if isinstance(value, dict) and "sources" in value else "one"


class _SourceMapsEntry(_Strict):
    name: str = Field(min_length=1)
    layers: list[LayerEntry] = Field(min_length=1)
    n_timesteps: int = Field(ge=1)


class _FusedNetworkEntry(_NetworkShape):
    """A network over maps of several sources (AggregationNetwork.over_sources)."""

    sources: list[_SourceMapsEntry] = Field(min_length=2)


class _FusedFeaturesEntry(_Strict):
    """What a fused network reads: each source's binding, in the network's source order."""

    model_config = ConfigDict(strict=True, extra="allow")
    sources: dict[str, SourceBinding] = Field(min_length=2)


class _RunConfig(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    format: Literal["dhf-cache-checkpoint"]
    format_version: int
    # which model validates is decided by the "sources" key, so errors name the fields of the one
    # that applies (not both alternatives of a union)
    network: Annotated[Annotated[_NetworkEntry, Tag("one")] | Annotated[_FusedNetworkEntry, Tag("fused")],
                       Discriminator(_one_or_fused)]
    features: Annotated[Annotated[SourceBinding, Tag("one")] | Annotated[_FusedFeaturesEntry, Tag("fused")],
                        Discriminator(_one_or_fused)]
    training: dict | None = None


def one_line_errors(exc: ValidationError, limit: int = 3) -> str:
    """A pydantic ValidationError as `where: why (got VALUE)` for its first few errors, on one line."""
    parts = []
    for error in exc.errors()[:limit]:
        # the discriminator's tags ("one"/"fused") are not fields of the file: left out of the path
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("one", "fused")) or "(top level)"
        got = repr(error.get("input"))
        got = got if len(got) <= 40 else got[:37] + "..."
        reason = str(error.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {reason}" + ("" if error.get("type") == "missing" else f" (got {got})"))
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def check_config(config: Any, path: Path) -> dict:
    """`config` (read from `path`) if it describes a network and the features it reads
    consistently; one CheckpointError line naming `path` otherwise."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(config).__name__}, not a checkpoint config object")
    if config.get("format") != "dhf-cache-checkpoint":
        raise CheckpointError(f"{path}: not a dhf-cache checkpoint config (format {config.get('format')!r}); "
                              "pass a run folder written by `dhf-cache train` or `dhf-cache import-checkpoint`")
    version = config.get("format_version")
    if isinstance(version, int) and version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this version reads "
                              f"({CHECKPOINT_FORMAT}); upgrade dhf-cache")
    try:
        parsed = _RunConfig.model_validate(config)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: malformed ({one_line_errors(exc)}); restore the run's config.json "
                              "or train again") from None
    network, features = parsed.network, parsed.features
    if isinstance(network, _FusedNetworkEntry) != isinstance(features, _FusedFeaturesEntry):
        raise CheckpointError(f"{path}: inconsistent (network and features disagree on whether the network fuses "
                              "several sources); restore the run's config.json or train again")
    if isinstance(network, _FusedNetworkEntry):
        problems = []
        if sorted(s.name for s in network.sources) != sorted(features.sources):  # (config.json sorts keys)
            problems.append(f"network.sources {[s.name for s in network.sources]} and features.sources "
                            f"{list(features.sources)} differ")
        else:
            for entry in network.sources:
                problems += [f"{entry.name}: {p}" for p in _binding_problems(entry, features.sources[entry.name])]
    else:
        problems = _binding_problems(network, features)
    if problems:
        raise CheckpointError(f"{path}: inconsistent ({'; '.join(problems)}); restore the run's config.json or train again")
    return config


def _binding_problems(network, features: SourceBinding) -> list[str]:
    """Why one source's network entry (layers, n_timesteps) and features binding disagree."""
    problems = []
    if [layer.model_dump() for layer in features.layers] != [layer.model_dump() for layer in network.layers]:
        problems.append("features.layers and network.layers name different layers")
    if len(features.timesteps) != network.n_timesteps:
        problems.append(f"{len(features.timesteps)} features.timesteps for network.n_timesteps {network.n_timesteps}")
    if (features.cache_timesteps is not None and features.feature_space_spec is not None
            and features.feature_space_spec.get("kind") is None):  # SD only: DINOv2 has no inversion steps
        # both or neither are read (`_checkpoint_steps`: a timestep's step index, by position)
        save_steps = features.feature_space_spec.get("save_steps")
        if (not isinstance(save_steps, list) or len(save_steps) != len(features.cache_timesteps)
                or not all(isinstance(s, int) for s in save_steps)):
            problems.append("features.feature_space_spec.save_steps does not align with features.cache_timesteps")
        outside = [t for t in features.timesteps if t not in features.cache_timesteps]
        if outside:
            problems.append(f"features.timesteps {outside} are not in features.cache_timesteps")
    return problems


def read_config(path: Path) -> dict:
    """RUN/config.json, checked (`check_config`)."""
    return check_config(read_json(path), path)


def build_network(config: dict, path: Path) -> AggregationNetwork:
    """The network `config` (checked by `check_config`) describes; CheckpointError naming `path`
    when its numbers cannot make one (e.g. GroupNorm groups that do not divide the channels)."""
    try:
        return AggregationNetwork.from_config(config["network"])
    except DhfCacheError as exc:
        raise CheckpointError(f"{path}: network cannot be built ({exc})") from None


# --- writing and finding complete checkpoints --------------------------------------------------


def _write_synced(path: Path, data: bytes) -> str:
    """Write `data` to `path` and flush it to the disk; returns its sha256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the renames still order the writes
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _slots(run: Path, which: str) -> tuple[Path, Path, Path]:
    """(RUN/.which.tmp, RUN/which, RUN/.which.old): newest first."""
    return run / f".{which}.tmp", run / which, run / f".{which}.old"


def save_checkpoint(run: Path, which: str, network: AggregationNetwork, state: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write RUN/<which>/ so that a kill at any moment leaves a complete checkpoint (module doc)."""
    tmp, final, old = _slots(run, which)
    if not final.exists():
        promote_checkpoint(run, which)  # a save killed between its renames: its temporary is the newest
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {MODEL_FILE: _write_synced(tmp / MODEL_FILE, save(
        {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}))}
    if optimizer is not None:
        tensors, groups = _optimizer_to_tensors(optimizer)
        files[OPTIMIZER_FILE] = _write_synced(tmp / OPTIMIZER_FILE, save(tensors))
        state = {**state, "optimizer_param_groups": groups}
    # state.json last: it marks the checkpoint complete and records what its files must hash to
    _write_synced(tmp / STATE_FILE, (json.dumps({**state, "files": files}, indent=2, sort_keys=True) + "\n").encode())
    _sync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _sync_dir(run)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` is not a complete checkpoint, as `FILE: reason` (None when it is)."""
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        return f"{state_path}: missing (a save that did not finish)"
    try:
        state = json.loads(state_path.read_text())
    except (ValueError, OSError) as exc:
        return f"{state_path}: not valid JSON ({exc})"
    if not isinstance(state, dict):
        return f"{state_path}: not a JSON object"
    recorded = state.get("files", {})
    if not isinstance(recorded, dict):
        return f"{state_path}: `files` is not an object of sha256 digests"
    names = [MODEL_FILE] + ([OPTIMIZER_FILE] if "optimizer_param_groups" in state else [])
    for name in names:  # only these names: a crafted state.json cannot point at other files
        path = directory / name
        if not path.is_file():
            return f"{path}: missing"
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            return f"{path}: truncated or damaged ({first_line(exc, None)})"
        if name in recorded and _file_sha256(path) != recorded[name]:
            return f"{path}: its sha256 differs from the one state.json records (the file is damaged)"
    return None


def find_checkpoint(run: Path, which: str) -> Path | None:
    """The newest complete RUN/<which> checkpoint (see the module doc), or None when there is none.

    A damaged RUN/<which> itself is refused (CheckpointError naming the file), not skipped: no
    save leaves one, so older weights would be a silent surprise."""
    tmp, final, old = _slots(run, which)
    if tmp.is_dir() and checkpoint_problem(tmp) is None:
        return tmp
    if final.exists():
        problem = checkpoint_problem(final)
        if problem:
            raise CheckpointError(f"{problem}; the checkpoint {final} cannot be used: restore it, or train again")
        return final
    if old.is_dir() and checkpoint_problem(old) is None:
        return old
    return None


def promote_checkpoint(run: Path, which: str) -> Path | None:
    """Make the newest complete checkpoint RUN/<which> again (after a save killed mid-way) and
    remove what that save left; returns RUN/<which>, or None when there is no complete checkpoint."""
    tmp, final, old = _slots(run, which)
    found = find_checkpoint(run, which)
    if found is None:
        return None
    if found == final:  # the others are older or incomplete
        shutil.rmtree(tmp, ignore_errors=True)
    elif found == tmp:
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    else:  # the old one: the temporary is incomplete
        shutil.rmtree(tmp, ignore_errors=True)
        os.replace(old, final)
    _sync_dir(run)
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
    """Restore `optimizer` from `directory` (a complete checkpoint); CheckpointError naming the
    file when its contents do not fit this optimizer."""
    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; this checkpoint cannot be resumed (it holds weights only)")
    groups = state.get("optimizer_param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{directory / STATE_FILE}: optimizer_param_groups is missing or malformed; "
                              "this checkpoint cannot be resumed")
    try:
        tensors = load_file(path)
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            pid, name = key.split(".", 1)
            per_param.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        detail = first_line(exc)
        raise CheckpointError(f"{path}: does not fit the network's optimizer ({detail}); "
                              "this checkpoint cannot be resumed") from None


def load_weights(network: AggregationNetwork, path: Path) -> None:
    """Load `path` (model.safetensors) into `network` strictly; one CheckpointError line naming
    the file and the first differences when it does not fit."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({str(exc).strip() or type(exc).__name__})") from None
    expected = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{name} {tuple(tensors[name].shape)} (network: {shape})"
              for name, shape in expected.items() if name in tensors and tuple(tensors[name].shape) != shape]
    not_float = [name for name, t in tensors.items() if name in expected and not t.is_floating_point()]
    if missing or unexpected or shapes or not_float:
        parts = [f"{label}: {', '.join(items[:3])}" + (f" and {len(items) - 3} more" if len(items) > 3 else "")
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("wrong shape", shapes), ("not floating point", not_float)) if items]
        raise CheckpointError(f"{path}: does not fit the network in config.json ({'; '.join(parts)})")
    network.load_state_dict(tensors, strict=True)


def resolve_checkpoint_dir(path: str | Path) -> tuple[Path, Path]:
    """(run dir, weights dir): RUN means RUN/best if present, else RUN/last; RUN/last works too.
    Either is the newest complete checkpoint of that name (module doc)."""
    path = Path(path)
    if (path.parent / "config.json").is_file() and (path.name in CHECKPOINT_NAMES or (path / MODEL_FILE).is_file()):
        if path.name not in CHECKPOINT_NAMES:  # a checkpoint folder by another name: taken as it is
            problem = checkpoint_problem(path)
            if problem:
                raise CheckpointError(f"{problem}; the checkpoint {path} cannot be used")
            return path.parent, path
        found = find_checkpoint(path.parent, path.name)
        if found is None:
            raise CheckpointError(f"--checkpoint {path}: no complete checkpoint there (nothing saved yet)")
        return path.parent, found
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"--checkpoint {path}: no config.json there; pass a run folder written by `dhf-cache train` "
            "or `dhf-cache import-checkpoint`"
        )
    for which in CHECKPOINT_NAMES:
        found = find_checkpoint(path, which)
        if found is not None:
            return path, found
    raise CheckpointError(f"--checkpoint {path}: holds no weights yet (no complete best/ or last/ checkpoint)")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """The network of a run folder (or one of its checkpoint folders), checked: a malformed
    config.json, missing, damaged or ill-fitting weights give one CheckpointError line."""
    run, weights = resolve_checkpoint_dir(path)
    config = read_config(run / "config.json")
    network = build_network(config, run / "config.json")
    load_weights(network, weights / MODEL_FILE)
    state = read_json(weights / STATE_FILE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights / STATE_FILE}: not a JSON object")
    return Checkpoint(network.to(device).eval(), config, state, weights)


TRANSFER_FIELDS = ("source", "generation")  # what may differ when inversion weights read generation features


def _transfer(binding: SourceBinding, cache) -> bool:
    """An inversion-trained checkpoint reading a generation cache (the paper's transfer claim)."""
    return binding.feature_source == "inversion" and getattr(cache.spec.feature_space, "source", None) == "generation"


def _checkpoint_steps(binding: SourceBinding) -> list[int] | None:
    """Inversion step indices of the checkpoint's timesteps (None when the checkpoint lacks the
    time axis of its training cache)."""
    spec, axis = binding.feature_space_spec, binding.cache_timesteps
    if not spec or not axis:
        return None
    return [spec["save_steps"][axis.index(t)] for t in binding.timesteps]


def as_binding(binding: SourceBinding | dict) -> SourceBinding:
    """A binding as its typed form (config.json's `features` object is accepted as well)."""
    return binding if isinstance(binding, SourceBinding) else SourceBinding.model_validate(binding)


def check_features_match(binding: SourceBinding | dict, cache) -> list[str]:
    """Why a checkpoint cannot read this cache source's features ([] when it can).

    The same feature space (or, for imported checkpoints without one, the same layer names,
    channels and timesteps) is required, except that a checkpoint trained on inversion features
    may read generation features of the same model, steps and layers: matched by step index.
    """
    binding = as_binding(binding)
    problems = []
    transfer = _transfer(binding, cache)
    bound = binding.feature_space
    if bound is not None and bound != cache.fingerprint["feature_space"]:
        differences = spec_differences(cache.spec.feature_space, binding.feature_space_spec or {})
        if transfer:
            differences = [d for d in differences if d.split(":")[0].split(".")[0] not in TRANSFER_FIELDS]
        if differences or not transfer:
            problems.append("feature_space fingerprint differs")
            problems += [d.replace("requested", "checkpoint has") for d in differences]
    by_name = {layer.name: layer for layer in cache.layers}
    for layer in binding.layers:
        have = by_name.get(layer.name)
        if have is None:
            problems.append(f"layer {layer.name}: not in the cache")
        elif have.channels != layer.channels:
            problems.append(f"layer {layer.name}: {have.channels} channels in the cache, {layer.channels} in the checkpoint")
    if transfer:
        steps = _checkpoint_steps(binding)
        if steps is None:
            problems.append("this checkpoint does not record the time axis of its training cache, so its "
                            "inversion steps cannot be matched to generation steps")
        else:
            missing = [s for s in steps if s not in cache.spec.feature_space.save_steps]
            if missing:
                problems.append(f"step indices {missing}: not saved in the cache (it holds {list(cache.spec.feature_space.save_steps)})")
    else:
        missing = [t for t in binding.timesteps if t not in cache.timesteps]
        if missing:
            problems.append(f"timesteps {missing}: not in the cache (it holds {cache.timesteps})")
    return problems


def checkpoint_selection(binding: SourceBinding | dict, cache):
    """(FeatureSelection, notes): the cached maps a checkpoint reads, once `check_features_match`
    found none missing. Same source: by UNet t; transfer: by step index (the generation pass
    calls the same step index at another t)."""
    from dhf_cache.cache.feature_loader import select_features

    binding = as_binding(binding)
    names = binding.layer_names
    if not _transfer(binding, cache):
        return select_features(cache, names, binding.timesteps), []
    steps = _checkpoint_steps(binding)
    timesteps = [cache.timesteps[cache.spec.feature_space.save_steps.index(s)] for s in steps]
    note = (f"transfer: a checkpoint trained on inversion features reads generation features, matched by "
            f"step index (inversion t {binding.timesteps} -> generation t {timesteps})")
    return select_features(cache, names, timesteps), [note]
