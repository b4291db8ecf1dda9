"""A training run's folder (RUN/): opened as a new run, a restart or a resume, with the options
to train with; on resume, the run's weights, optimizer and metrics brought back to its newest
complete checkpoint. `pipelines/train.py` calls `open_run` before the cache is read and
`start_run` once the network exists. Layout: dhf_cache/aggregator/checkpoint.py.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dhf_cache.aggregator.checkpoint import (MODEL_FILE, STATE_FILE, find_checkpoint, load_optimizer_state, load_weights,
                                  one_line_errors, promote_checkpoint, read_config, read_json, write_json)
from dhf_cache.config import TrainOptions
from dhf_cache.errors import CheckpointError
from dhf_cache.cache.fingerprint import spec_differences

if TYPE_CHECKING:
    from dhf_cache.pipelines.train import TrainRequest


# --resume takes every option from the run's config.json unless given. Given ones that decide
# what the run computes must equal the run's (these here; the network's shape, layers and
# timesteps are checked on the configs, against the cache, by `resume_differences`); those that
# only say how long, how fast or how often to go on (steps, lr, weight_decay, val_every,
# skip_missing) may differ.
RESUME_MUST_MATCH = ("split", "val_split", "pairs_per_step", "seed", "val_pairs_per_category", "val_load_size")


@dataclass
class RunFolder:
    """What --out holds before training starts."""

    options: TrainOptions  # what this run trains with
    previous: dict | None = None  # the run's config.json, when resuming from a checkpoint
    state: dict | None = None  # the state.json of RUN/last, when resuming


def open_run(request: TrainRequest, log) -> RunFolder:
    """Decide between a new run, a restart and a resume, and the options to train with. Reads
    only, except that a resumed run's newest complete checkpoint becomes RUN/last again."""
    out = request.out
    config_path = out / "config.json"
    if not config_path.is_file():
        if request.resume:
            log(f"--resume: {out} holds no run yet; starting one")
        return RunFolder(request.options)
    checkpoint = find_checkpoint(out, "last")
    if checkpoint is None:  # stopped before its first checkpoint: nothing trained was kept
        options = request.options
        if request.resume:
            try:
                options, _ = adopt_options(request, run_options(read_config(config_path), config_path))
            except CheckpointError:
                pass  # nothing to keep, so an unreadable config is replaced by the options given
        log(f"{out} holds a run stopped before its first checkpoint, so there is nothing to resume: "
            "starting again at step 0")
        return RunFolder(options)
    if not request.resume:
        raise CheckpointError(
            f"--out {out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    previous = read_config(config_path)
    options, problems = adopt_options(request, run_options(previous, config_path))
    if problems:
        raise CheckpointError(f"--resume {out}: {'; '.join(problems)}. Leave these options out: --resume takes "
                              "them from the run's config.json")
    taken = [f"{_option_name(name)} {_shown(getattr(options, name))}" for name in sorted(TrainOptions.model_fields)
             if request.given is not None and name not in request.given
             and getattr(options, name) != getattr(request.options, name)]
    if taken:
        log(f"--resume: from the run's config.json: {', '.join(taken)}")
    state = resume_state(promote_checkpoint(out, "last"))
    return RunFolder(options, previous, state)


def run_options(config: dict, path: Path) -> TrainOptions:
    """The training options a run's config.json records (CheckpointError naming it if malformed)."""
    training = config.get("training")
    raw = training.get("options") if isinstance(training, dict) else None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: records no training options (training.options); only runs of "
                              "`dhf-cache train` can be resumed")
    try:
        return TrainOptions.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: malformed training.options ({one_line_errors(exc)}); restore the run's "
                              "config.json, or train again in another --out") from None


def adopt_options(request: TrainRequest, run: TrainOptions) -> tuple[TrainOptions, list[str]]:
    """(the run's options overridden by those given, the given ones that must match and do not)."""
    given = request.given if request.given is not None else frozenset(TrainOptions.model_fields)
    values = {name: getattr(request.options if name in given else run, name) for name in TrainOptions.model_fields}
    problems = [f"{_option_name(name)}: run has {_shown(getattr(run, name))}, now {_shown(getattr(request.options, name))}"
                for name in RESUME_MUST_MATCH if name in given and getattr(request.options, name) != getattr(run, name)]
    return TrainOptions(**values), problems


def _option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def resume_state(checkpoint: Path) -> dict:
    """RUN/last/state.json with the fields a resume needs, checked (one CheckpointError line)."""
    path = checkpoint / STATE_FILE
    state = read_json(path)
    problems = []
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a JSON object; this checkpoint cannot be resumed")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problems.append(f"step {step!r} is not a step number")
    best_val, best_step = state.get("best_val"), state.get("best_step")
    if best_val is not None and (not isinstance(best_val, (int, float)) or isinstance(best_val, bool)):
        problems.append(f"best_val {best_val!r} is not a number")
    if best_step is not None and (not isinstance(best_step, int) or isinstance(best_step, bool)):
        problems.append(f"best_step {best_step!r} is not a step number")
    if (best_val is None) != (best_step is None):
        problems.append("best_val and best_step go together")
    if not isinstance(state.get("optimizer_param_groups"), list):
        problems.append("optimizer_param_groups is missing (weights only)")
    if problems:
        raise CheckpointError(f"{path}: malformed ({'; '.join(problems)}); this checkpoint cannot be resumed: "
                              "restore it, or train again in another --out")
    return state


def start_run(request: TrainRequest, folder: RunFolder, config: dict, network, optimizer,
               log) -> tuple[int, dict, bool]:
    """(start step, best so far, whether the start step still needs its validation): a fresh run
    folder, or the resumed run's weights and optimizer after checking that it reads the same
    features with the same network. Writes config.json."""
    out = request.out
    best = {"best_val": None, "best_step": None}
    if folder.state is None:
        out.mkdir(parents=True, exist_ok=True)
        # what a save killed before the first checkpoint left (incomplete: find_checkpoint passed
        # them over). A best/ written just before that kill stays: the first validation replaces it.
        for leftover in (".last.tmp", ".last.old"):
            shutil.rmtree(out / leftover, ignore_errors=True)
        (out / "metrics.jsonl").write_text("")
        write_json(out / "config.json", config)
        return 0, best, False
    problems = resume_differences(folder.previous, config)
    if problems:
        raise CheckpointError(f"--resume {out}: the run does not fit this cache or network:\n  " + "\n  ".join(problems))
    last, state = out / "last", folder.state
    load_weights(network, last / MODEL_FILE)
    load_optimizer_state(optimizer, last, state)
    for group in optimizer.param_groups:  # as given now (e.g. a lower --lr), else the run's
        group["lr"], group["weight_decay"] = folder.options.lr, folder.options.weight_decay
    best = {"best_val": state.get("best_val"), "best_step": state.get("best_step")}
    step = state["step"]
    truncate_metrics(out / "metrics.jsonl", step, log)
    log(f"resuming {out} from step {step}")
    write_json(out / "config.json", config)
    return step, best, bool(state.get("pending_validation"))


def resume_differences(old: dict, new: dict) -> list[str]:
    """Why the run's config.json `old` and the one a resume would write `new` disagree (each
    source's binding in turn when the network fuses several)."""
    old_sources, new_sources = (old.get("features") or {}).get("sources"), new["features"].get("sources")
    if old_sources is not None or new_sources is not None:
        if not isinstance(old_sources, dict) or new_sources is None or sorted(old_sources) != sorted(new_sources):
            return [f"sources: run has {sorted(old_sources) if isinstance(old_sources, dict) else 'one source'}, "
                    f"now {sorted(new_sources) if new_sources else 'one source'}"]
        problems = []
        for name in new_sources:
            problems += [f"{name}: {p}" for p in _binding_differences(old_sources[name], new_sources[name])]
        if old.get("network") != new["network"]:
            problems += [f"network {line}" for line in spec_differences(old.get("network", {}), new["network"])]
        return [p.replace("cache has", "run has").replace("requested", "now") for p in problems]
    problems = _binding_differences(old.get("features", {}), new["features"])
    if old.get("network") != new["network"]:
        problems += [f"network {line}" for line in spec_differences(old.get("network", {}), new["network"])]
    return [p.replace("cache has", "run has").replace("requested", "now") for p in problems]


def _binding_differences(old: dict, new: dict) -> list[str]:
    problems = []
    if old.get("feature_space") != new["feature_space"]:
        problems.append("feature space: the run was trained on another cache's features")
        problems += spec_differences(old.get("feature_space_spec") or {}, new["feature_space_spec"])
    for key in ("layers", "timesteps"):
        if old.get(key) != new[key]:
            problems.append(f"{key}: run has {old.get(key)}, now {new[key]}")
    return problems


def truncate_metrics(path: Path, step: int, log) -> None:
    """Drop metric lines past the resumed step (written after the last checkpoint). A torn last
    line (a kill mid-write) is dropped too; any other unreadable line is refused."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            line_step = record["step"]
            if not isinstance(line_step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                log(f"{path}: dropped its torn last line (written when the run was stopped)")
                continue
            raise CheckpointError(f"{path}: line {number} is not a metrics record ({line[:60]!r}); remove it "
                                  "or restore the file, then rerun") from None
        if line_step <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
