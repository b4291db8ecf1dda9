"""`dhf-cache import-checkpoint`: the authors' released aggregator as a dhf-cache run folder.

With `--cache`, the network is bound to that cache's feature space after checking that its
layer channels and number of timesteps fit. Without it, the run records the reference's layer
table (SD 1.5/2.1 up-block resnets) and time axis, and eval checks those against the cache.
"""

from __future__ import annotations

from pathlib import Path

from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.aggregator.checkpoint import CHECKPOINT_NAMES, find_checkpoint, make_config, save_checkpoint, write_json
from dhf_cache.config import SD15_SAVE_STEPS, SchedulerSpec
from dhf_cache.errors import CheckpointError, ReferenceCheckpointError
from dhf_cache.cache.feature_loader import select_features
from dhf_cache.aggregator.interop import load_reference_aggregator, load_reference_checkpoint, reference_layout, reference_time_axis
from dhf_cache.cache.layers import LayerInfo
from dhf_cache.pipelines.train import features_binding

# Native sizes at 512 px of the reference's up-block resnets, in its order (METHOD.md).
_SD_SIDES = (8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64)


def _reference_timesteps(file: Path, config: dict, n_timesteps: int) -> list[int]:
    from dhf_cache.sources.sd.inversion import make_schedule

    try:
        axis = reference_time_axis(config)
    except ReferenceCheckpointError as exc:
        raise ReferenceCheckpointError(f"{file}: {exc}; pass --cache to bind it to a cache instead") from None
    if axis is None:  # no config in the file: the released SD 1.5 (11 steps) or one-step (1) variants
        axis = (50, SD15_SAVE_STEPS) if n_timesteps == 11 else (1, (0,)) if n_timesteps == 1 else (0, ())
    steps, save = axis
    if len(save) != n_timesteps:
        raise ReferenceCheckpointError(
            f"the checkpoint mixes {n_timesteps} timesteps but its config lists {len(save)} saved steps "
            f"({list(save)}); pass --cache to bind it to a cache with {n_timesteps} timesteps"
        )
    schedule = make_schedule(SchedulerSpec(), steps)
    return [schedule.timestep_of_step(s) for s in save]


def import_reference_checkpoint(file: Path, out: Path, cache_url: str | None, storage_options: dict) -> dict:
    """Write OUT/last (weights) and then OUT/config.json: config.json is written last, so an import
    killed before it leaves no run, and rerunning the same command completes it."""
    if (out / "config.json").exists() and any(find_checkpoint(out, which) for which in CHECKPOINT_NAMES):
        raise CheckpointError(f"--out {out} already holds a run; choose another folder")
    state, ref_config = load_reference_checkpoint(file)
    layout = reference_layout(state)
    n_layers, n_t = len(layout["channels"]), layout["n_timesteps"]
    if cache_url:
        cache = FeatureCache.open(cache_url, storage_options)
        if len(cache.layers) != n_layers or len(cache.timesteps) != n_t:
            raise ReferenceCheckpointError(
                f"{file} mixes {n_layers} layers x {n_t} timesteps; the cache {cache_url} holds "
                f"{len(cache.layers)} x {len(cache.timesteps)}"
            )
        selection = select_features(cache)
        layers = list(selection.layers)
        features = features_binding(cache, selection)
    else:
        if n_layers != len(_SD_SIDES):
            raise ReferenceCheckpointError(
                f"{file} has {n_layers} layers, not the 12 up-block resnets of SD 1.5/2.1; pass --cache to bind it"
            )
        names = [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]
        layers = [LayerInfo(n, c, s, s) for n, c, s in zip(names, layout["channels"], _SD_SIDES)]
        features = {"layers": [layer.as_dict() for layer in layers],
                    "timesteps": _reference_timesteps(file, ref_config, n_t), "feature_space": None}
    network, _ = load_reference_aggregator(file, layers, n_t)
    features["reference"] = {"file": str(file), "config": ref_config}
    step = ref_config.get("step")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, "last", network, {"step": step if isinstance(step, int) and not isinstance(step, bool) else None,
                                           "imported_from": str(file)})
    write_json(out / "config.json", make_config(network, features, None, source=f"imported:{Path(file).name}"))
    return {"layers": n_layers, "timesteps": n_t, "projection_dim": layout["projection_dim"]}
