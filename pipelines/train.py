"""Stage two: train the aggregation network straight from the cache (no diffusers, no inversion).

Each step reads the cached maps of one pair (or `pairs_per_step` pairs), prefetched in the
background, runs the network on both images and takes an AdamW step on the symmetric
cross-entropy of METHOD.md. The pair order is a pure function of (seed, step), so a resumed run
computes exactly what an uninterrupted one does.

Every interruption can be resumed by rerunning the same command with --resume: a run killed
before its first checkpoint starts again at step 0 (nothing trained was kept), one killed
mid-save resumes from its newest complete checkpoint (dhf_cache/aggregator/checkpoint.py), and Ctrl-C
saves the last finished step before exiting. metrics.jsonl is flushed every step, before the
checkpoint of that step, so a checkpoint at step s always has the metric lines up to s.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dhf_cache.aggregator.network import AggregationNetwork
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.aggregator.checkpoint import checkpoint_source, make_config, save_checkpoint
from dhf_cache.config import TrainOptions
from dhf_cache.datasets import PairRecord, open_dataset
from dhf_cache.correspondence.descriptors import LRUDescriptors, network_descriptors
from dhf_cache.device import resolve_device
from dhf_cache.errors import TrainingError, UsageError
from dhf_cache.cache.feature_loader import (FeatureReader, FeatureSelection, Prefetcher, SourcesReader, select_across_sources,
                                     select_features, shared_fit)
from dhf_cache.aggregator.losses import grid_keypoints, symmetric_ce_loss
from dhf_cache.progress import progress_bar
from dhf_cache.pipelines.run_folder import open_run, start_run
from dhf_cache.correspondence.scoring import score_pairs

VAL_METRIC = "bbox@0.1"


@dataclass(frozen=True)
class TrainRequest:
    cache_url: str
    dataset: str
    out: Path
    options: TrainOptions = TrainOptions()
    device: str = "auto"
    resume: bool = False
    storage_options: dict = field(default_factory=dict)
    source: str | None = None  # the cache's feature source (None: its only one)
    progress: bool = True
    # TrainOptions fields the user set (None: all of them). With --resume the others come from
    # the run's config.json, and a given one that must match the run and does not is refused.
    given: frozenset[str] | None = None
    prefetch: int | None = None  # steps read ahead (None: Prefetcher's default, loader_workers + 2)
    loader_workers: int | None = None  # reader threads (None: Prefetcher's default, default_loader_workers())
    threads: int | None = None  # torch intra-op threads (None: torch's own choice; CPU results depend on it)


@dataclass
class TrainResult:
    run: Path
    start_step: int
    end_step: int
    n_pairs: int
    skipped: dict[str, int]
    final_loss: float | None
    best_val: float | None
    best_step: int | None
    last_val: float | None
    seconds: float  # the whole run, setup included
    loop_seconds: float  # the training loop: steps, validations, checkpoints
    loader_wait_seconds: float
    peak_rss_mb: float
    loader_workers: int


@dataclass
class _Example:
    pair: PairRecord
    src_kps: torch.Tensor  # (K, 2) long on the descriptor grid
    trg_kps: torch.Tensor


class PairSchedule:
    """Which pairs step s (1-based) trains on: epoch-wise permutations seeded by (seed, epoch)."""

    def __init__(self, n_pairs: int, pairs_per_step: int, seed: int):
        self.n, self.per_step, self.seed = n_pairs, pairs_per_step, seed
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, step: int) -> list[int]:
        out = []
        for k in range((step - 1) * self.per_step, step * self.per_step):
            epoch, pos = divmod(k, self.n)
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
            out.append(int(self._perms[epoch][pos]))
        return out


def usable_pairs(pairs: list[PairRecord], index: dict[str, int], done: np.ndarray, skip_missing: bool,
                 what: str, hint: str) -> tuple[list[PairRecord], dict[str, int]]:
    """Drop pairs without keypoints (counted); refuse (or with skip_missing, drop) pairs whose
    images the data set cannot read (`PairRecord.error`) or the cache has not built. The
    counts also hold the keypoints the data set dropped for not being finite."""
    dropped_kps = sum(p.dropped_kps for p in pairs)
    unreadable = [p for p in pairs if p.error]
    if unreadable and not skip_missing:
        shown = "; ".join(f"{p.name}: {p.error}" for p in unreadable[:3])
        more = f"; ... ({len(unreadable)} in all)" if len(unreadable) > 3 else ""
        raise TrainingError(
            f"{len(unreadable)} {what} pairs use images that cannot be read ({shown}{more}). Fix the data set, "
            f"or pass --skip-missing to go on with the other {len(pairs) - len(unreadable)} pairs."
        )
    pairs = [p for p in pairs if not p.error]
    no_kps = [p for p in pairs if len(p.src_kps) == 0]
    pairs = [p for p in pairs if len(p.src_kps) > 0]
    ok = lambda image_id: image_id in index and bool(done[index[image_id]])  # noqa: E731
    missing = [p for p in pairs if not (ok(p.src) and ok(p.trg))]
    if missing and not skip_missing:
        images = sorted({i for p in missing for i in (p.src, p.trg) if not ok(i)})
        shown = ", ".join(images[:10]) + (f", ... ({len(images)} in all)" if len(images) > 10 else "")
        raise TrainingError(
            f"{len(missing)} {what} pairs use images the cache has not built: {shown}. Build them "
            f"({hint}), or pass --skip-missing to go on with the other {len(pairs) - len(missing)} pairs."
        )
    kept = [p for p in pairs if ok(p.src) and ok(p.trg)]
    return kept, {"no_keypoints": len(no_kps), "missing_images": len(missing), "unreadable_images": len(unreadable),
                  "nonfinite_keypoints": dropped_kps}


def pick_val_pairs(pairs: list[PairRecord], per_category: int, seed: int) -> list[PairRecord]:
    """Up to `per_category` pairs of each category (METHOD.md: 20, i.e. 360 for SPair)."""
    rng = np.random.default_rng(seed)
    by_cat: dict[str, list[PairRecord]] = {}
    for pair in pairs:
        by_cat.setdefault(pair.category, []).append(pair)
    chosen = []
    for cat in sorted(by_cat):
        items = by_cat[cat]
        picks = sorted(rng.permutation(len(items))[:per_category])
        chosen += [items[i] for i in picks]
    return chosen


def features_binding(cache: FeatureCache, selection: FeatureSelection) -> dict:
    """What a checkpoint records about the features it reads (checked on resume and in eval)."""
    return {
        "source": cache.name,  # which of the cache's sources (format 2); eval opens the same one
        "layers": [layer.as_dict() for layer in selection.layers],
        "timesteps": list(selection.timesteps),
        "cache_timesteps": list(cache.timesteps),  # the whole time axis, aligned with save_steps
        "feature_space": cache.fingerprint["feature_space"],
        "feature_space_spec": cache.spec.feature_space.model_dump(mode="json"),
        "preprocessing": cache.spec.preprocessing.model_dump(mode="json"),
        "cache_fingerprint": cache.fingerprint,
        "cache_url": cache.url,
        "model_source": recorded_model_source(cache.meta.get("provenance", {}).get("model_source")),
    }


@dataclass
class TrainingMaps:
    """The cached maps a run reads: of one source (the network of METHOD.md over its layers x
    timesteps) or of several (a bottleneck per (source, layer), one softmax over every map)."""

    primary: FeatureCache  # images are addressed by their index here
    reader: FeatureReader | SourcesReader
    done: np.ndarray  # per primary index: done in every source read
    binding: dict  # config.json's "features"
    shape: str  # for the log line
    sources: list | None = None  # SourceMaps of a fused network; None: one source
    selection: FeatureSelection | None = None  # one source's selection

    def network(self, opts: TrainOptions) -> AggregationNetwork:
        if self.sources is not None:
            return AggregationNetwork.over_sources(self.sources, opts.projection_dim, opts.output_size, opts.norm_groups)
        return AggregationNetwork(self.selection.layers, len(self.selection.positions), opts.projection_dim,
                                  opts.output_size, opts.norm_groups)


def open_maps(request: TrainRequest, opts: TrainOptions) -> TrainingMaps:
    """The cache's sources a run reads: --source (one, or a comma-separated list to fuse), else
    the resumed run's, else the cache's only source."""
    named = request.source or (checkpoint_source(request.out) if request.resume else None)
    names = [part.strip() for part in named.split(",") if part.strip()] if named else []
    if len(names) <= 1:
        cache = FeatureCache.open(request.cache_url, request.storage_options, source=names[0] if names else None)
        selection = select_features(cache, opts.layers, opts.timesteps)
        return TrainingMaps(cache, FeatureReader(cache, selection), cache.done_mask(), features_binding(cache, selection),
                            f"source {cache.name}: {len(selection.layers)} layers x {len(selection.positions)} timesteps",
                            selection=selection)
    caches = FeatureCache.open_all(request.cache_url, request.storage_options)
    chosen = select_across_sources(caches, names, opts.layers, opts.timesteps)
    shared_fit({name: caches[name] for name in chosen.selections}, "--source " + ",".join(names))
    reader = SourcesReader(caches, chosen)
    shape = " + ".join(f"{name}: {len(sel.layers)} layers x {len(sel.positions)} timesteps"
                       for name, sel in chosen.selections.items())
    binding = {"sources": {name: features_binding(caches[name], sel) for name, sel in chosen.selections.items()}}
    return TrainingMaps(reader.primary, reader, reader.done_mask(), binding, f"{shape} ({chosen.n_maps} maps fused)",
                        sources=chosen.source_maps())


def recorded_model_source(source: str | None) -> str | None:
    """The backbone as a checkpoint records it: a local folder (relative to the working folder)
    as an absolute path, so match and the Python API find it from anywhere; a hub id as is."""
    if not source:
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source


def run_train(request: TrainRequest, log: Callable[[str], None] = print) -> TrainResult:
    started = time.perf_counter()
    if request.threads:
        torch.set_num_threads(request.threads)
    folder = open_run(request, log)
    opts = folder.options
    if folder.state is not None and folder.state["step"] >= opts.steps and not folder.state.get("pending_validation"):
        step = folder.state["step"]
        log(f"{request.out} is already at step {step} of {opts.steps}: nothing to train "
            "(pass a larger --steps to train further)")
        return TrainResult(
            run=request.out, start_step=step, end_step=step, n_pairs=0, skipped={}, final_loss=None,
            best_val=folder.state.get("best_val"), best_step=folder.state.get("best_step"), last_val=None,
            seconds=time.perf_counter() - started, loop_seconds=0.0, loader_wait_seconds=0.0,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, loader_workers=0,
        )
    maps = open_maps(request, opts)
    cache, reader = maps.primary, maps.reader
    dataset = open_dataset(request.dataset)
    index, done = cache.index_of(), maps.done
    build_hint = f"dhf-cache build --dataset {request.dataset} --split {opts.split} --cache {request.cache_url}"
    train_pairs, skipped = usable_pairs(dataset.pairs(opts.split), index, done, opts.skip_missing, "training", build_hint)
    if not train_pairs:
        raise TrainingError(f"no usable training pairs in split {opts.split!r} of {request.dataset}")
    val_pairs: list[PairRecord] = []
    if opts.val_split and opts.val_split in dataset.splits:
        hint = f"dhf-cache build --dataset {request.dataset} --split {opts.val_split} --cache {request.cache_url}"
        candidates = pick_val_pairs(dataset.pairs(opts.val_split), opts.val_pairs_per_category, opts.seed)
        val_pairs, val_skipped = usable_pairs(candidates, index, done, opts.skip_missing, "validation", hint)
        skipped.update({f"val_{k}": v for k, v in val_skipped.items()})
    elif opts.val_split and opts.val_split != TrainOptions().val_split:  # a split asked for by name
        raise UsageError(f"--val-split {opts.val_split!r}: {request.dataset} has no such split; it has "
                         f"{', '.join(dataset.splits) or 'none'} (or '' to train without validation)")
    elif opts.val_split:  # the default, on a data set without it (e.g. pairs: with one split)
        log(f"no {opts.val_split!r} split in {request.dataset}: training without validation")

    device = resolve_device(request.device)
    check_precision(opts.precision, device)
    torch.manual_seed(opts.seed)
    network = maps.network(opts).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    config = make_config(network, maps.binding,
                         {"options": opts.model_dump(mode="json"), "dataset": request.dataset}, source="trained")
    start_step, best, pending_validation = start_run(request, folder, config, network, optimizer, log)

    schedule = PairSchedule(len(train_pairs), opts.pairs_per_step, opts.seed)
    grid = opts.output_size
    fit, fit_side = maps.primary.spec.preprocessing.fit, maps.primary.spec.preprocessing.load_size
    examples = [
        _Example(p, grid_keypoints(p.src_kps, p.src_size, grid, fit, fit_side),
                 grid_keypoints(p.trg_kps, p.trg_size, grid, fit, fit_side))
        for p in train_pairs
    ]

    def load(step: int):
        batch = [examples[i] for i in schedule(step)]
        feats = [(reader.read(index[e.pair.src]), reader.read(index[e.pair.trg])) for e in batch]
        return step, batch, feats

    log(
        f"training on {len(train_pairs)} pairs ({skipped['no_keypoints']} without keypoints, "
        f"{skipped['missing_images']} with missing images, {skipped['unreadable_images']} with unreadable images "
        f"skipped; {skipped['nonfinite_keypoints']} non-finite keypoints dropped), {len(val_pairs)} validation pairs; "
        f"{maps.shape}, "
        f"{sum(p.numel() for p in network.parameters()):,} parameters, on {device}"
        + (" (bf16 autocast)" if opts.precision == "bf16" else "")
    )
    prefetcher = Prefetcher(load, range(start_step + 1, opts.steps + 1), request.prefetch, request.loader_workers)
    log(f"loader: {prefetcher.workers} reader threads, {prefetcher.depth} steps read ahead")
    bar = progress_bar(opts.steps, "train", unit="step", enabled=request.progress)
    bar.update(start_step)
    losses: list[float] = []
    last_val = None
    out = request.out
    done_step = saved_step = start_step  # the last step whose update finished; the step last/ holds
    validating: int | None = None  # the step being validated (its checkpoint is written after)
    guard = DeferredInterrupt()
    loop_start = time.perf_counter()
    staging = StepInputs(device)

    def validate_and_save(step: int) -> None:
        """Validate at `step`, then write best/ (if better), the metrics record and last/."""
        nonlocal best, last_val, saved_step, validating
        validating = step
        record: dict = {"step": step}
        if val_pairs:
            summary = validate(network, reader, index, val_pairs, opts.val_load_size, device, fit)
            last_val = summary[VAL_METRIC]["per_point"]
            record["val"] = {k: v for k, v in summary.items() if "@" in k}
        with guard.deferred():
            if val_pairs:
                if best["best_val"] is None or (last_val is not None and last_val > best["best_val"]):
                    best = {"best_val": last_val, "best_step": step}
                    save_checkpoint(out, "best", network, {"step": step, "val_pck": last_val})
                bar.write(f"step {step}: val PCK {VAL_METRIC} per point = {last_val:.4f} "
                          f"(best {best['best_val']:.4f} at {best['best_step']})", file=sys.stderr)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            save_checkpoint(out, "last", network, {"step": step, **best}, optimizer)
            saved_step, validating = step, None

    with guard, open(out / "metrics.jsonl", "a") as metrics:
        batches = iter(prefetcher)
        try:
            if pending_validation:  # Ctrl-C came during this step's validation: do it now
                validate_and_save(start_step)
            for step, batch, feats in batches:
                with guard.deferred():  # an update cut short would leave weights of no step
                    network.train()
                    loss = _train_step(network, optimizer, batch, feats, device, staging, opts.precision)
                    if not np.isfinite(loss):
                        save_checkpoint(out, "last", network, {"step": step - 1, **best}, optimizer)
                        raise _non_finite_loss(loss, step, batch, feats, request, out)
                    done_step = step
                    losses.append(loss)
                    metrics.write(json.dumps({"step": step, "loss": loss}) + "\n")
                    metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
                if step % opts.val_every == 0 or step == opts.steps:
                    validate_and_save(step)
        except KeyboardInterrupt:
            with guard.deferred():
                if done_step > saved_step or validating is not None:
                    pending = {"pending_validation": True} if validating == done_step else {}
                    save_checkpoint(out, "last", network, {"step": done_step, **best, **pending}, optimizer)
            log(f"interrupted: {out / 'last'} holds step {done_step}; rerun the same command with --resume to continue")
            raise
        finally:
            batches.close()
    bar.close()
    loop_seconds = time.perf_counter() - loop_start
    return TrainResult(
        run=request.out, start_step=start_step, end_step=max(done_step, start_step), n_pairs=len(train_pairs),
        skipped=skipped, final_loss=float(np.mean(losses[-50:])) if losses else None,
        best_val=best["best_val"], best_step=best["best_step"], last_val=last_val,
        seconds=time.perf_counter() - started, loop_seconds=loop_seconds, loader_wait_seconds=min(prefetcher.wait_seconds, loop_seconds),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, loader_workers=prefetcher.workers,
    )


def check_precision(precision: str, device: torch.device) -> None:
    """One line when the device cannot run the step's autocast dtype."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use --precision fp32")


def _non_finite_loss(loss: float, step: int, batch: list[_Example], feats, request: TrainRequest, out: Path) -> TrainingError:
    """Why the loss of `step` is not finite: damaged cached features (named), else the step size.
    Only run once the loss is found non-finite, so it costs nothing on the happy path."""
    kept = f"The weights before this step are kept in {out / 'last'} (step {step - 1})"
    damaged = [f"{image_id} (layer {name})"
               for example, pair_feats in zip(batch, feats)
               for image_id, maps in zip((example.pair.src, example.pair.trg), pair_feats)
               for name, tensor in maps.items() if not bool(torch.isfinite(tensor).all())]
    if damaged:
        shown = ", ".join(damaged[:4]) + (f" and {len(damaged) - 4} more" if len(damaged) > 4 else "")
        return TrainingError(
            f"the loss became {loss} at step {step} because the cached features of {shown} are not finite "
            f"(NaN or inf): the cache {request.cache_url} is damaged. Run `dhf-cache verify {request.cache_url} "
            f"--repair`, rebuild with `dhf-cache build --dataset {request.dataset} --cache {request.cache_url}`, "
            f"then rerun with --resume. {kept}."
        )
    return TrainingError(
        f"the loss became {loss} at step {step} (pair {batch[0].pair.name}); stopped. {kept}; lower --lr and resume."
    )


class DeferredInterrupt:
    """Ctrl-C (SIGINT) held back inside `deferred()` blocks and raised as KeyboardInterrupt when
    the outermost one ends; raised at once elsewhere.

    Why: an optimizer step or a checkpoint cut short leaves weights of no step; outside those
    blocks the weights are those of the last finished step, which the caller then saves. Only
    the main thread can take signals, and a SIGINT ignored by the parent stays ignored."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self._previous = None

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt


class StepInputs:
    """A step's inputs, stacked into host buffers kept from step to step and moved to `device`.

    Why: a fresh 314 MB stack per step (an SD 1.5 pair) costs its page faults every time:
    137 ms vs 37 ms into a reused buffer on this project's CPU (bench/gpu_train_step.py,
    "of which moving the pair's inputs"). On CUDA the buffers are pinned, so the copy is a DMA;
    reusing them is safe because every step ends by reading the loss, which waits for the GPU."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, names, feats) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            parts = [img[name] for pair in feats for img in pair]
            shape, dtype = (len(parts), *parts[0].shape), parts[0].dtype
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
                pin = self.device.type == "cuda"
                buffer = self._buffers[name] = torch.empty(shape, dtype=dtype, pin_memory=pin)
            torch.stack(parts, out=buffer)
            out[name] = buffer.to(self.device, non_blocking=True)
        return out


def _train_step(network, optimizer, batch: list[_Example], feats, device, staging: StepInputs | None = None,
                precision: str = "fp32") -> float:
    """One optimizer step on `batch` (`staging`: buffers reused across steps; None stacks afresh).

    bf16: the network's forward pass under autocast (its convolutions in bf16); the descriptors
    are then cast back, so the loss (cosines scaled by 1/0.07, where bf16's 8 bits would move a
    logit by ~0.05) and the gradients of the fp32 weights stay fp32."""
    inputs = (staging or StepInputs(device))(network.map_keys, feats)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        desc = network(inputs)  # (2 * pairs, P, S, S): src, trg, src, trg, ...
    desc = desc.float()
    loss = sum(
        symmetric_ce_loss(desc[2 * i], desc[2 * i + 1], e.src_kps, e.trg_kps) for i, e in enumerate(batch)
    ) / len(batch)
    if not torch.isfinite(loss):
        return float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def validate(network, reader: FeatureReader, index: dict[str, int], pairs: list[PairRecord],
             load_size: int, device, fit: str = "stretch") -> dict:
    """PCK of the current network on `pairs`, from the cache (the protocol of `dhf-cache eval`)."""
    provider = LRUDescriptors(network_descriptors(network, reader, index, device), capacity=64)
    accumulator, _ = score_pairs(pairs, provider, load_size, alphas=(0.1,), fit=fit)
    return accumulator.summary()
