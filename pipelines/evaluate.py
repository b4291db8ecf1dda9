"""Stage three: PCK from cached descriptors, with reports, plots and raw-feature baselines.

With a checkpoint, every image's descriptor map is computed once (one pass through the
aggregator over its cached features) and stored back into the cache under the checkpoint's
fingerprint; later evals of the same checkpoint reuse them. With `--raw LAYER@T` one cached map
is scored as is (the DIFT-style baseline); `--raw best` sweeps every layer x timestep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dhf_cache.cache import FeatureCache
from dhf_cache.checkpoint import Checkpoint, check_features_match, checkpoint_selection, load_checkpoint
from dhf_cache.config import EVAL_LOAD_SIZE, PCK_ALPHAS
from dhf_cache.datasets import Dataset, PairRecord, open_dataset
from dhf_cache.descriptor_store import DescriptorStore
from dhf_cache.descriptors import LRUDescriptors, aggregate
from dhf_cache.device import resolve_device
from dhf_cache.errors import CheckpointError, EvaluationError
from dhf_cache.feature_loader import FeatureReader, Prefetcher
from dhf_cache.matching import parse_refine
from dhf_cache.pck import bbox_length
from dhf_cache.progress import progress_bar
from dhf_cache.scoring import score_pairs

SWEEP_METRIC = "bbox@0.1"


@dataclass(frozen=True)
class EvalRequest:
    cache_url: str
    dataset: str
    out: Path
    checkpoint: Path | None = None
    raw: str | None = None
    split: str = "test"
    alphas: tuple[float, ...] = PCK_ALPHAS
    load_size: int = EVAL_LOAD_SIZE
    refine: str = "none"
    limit_per_category: int | None = None
    skip_missing: bool = False
    device: str = "auto"
    storage_options: dict = field(default_factory=dict)
    progress: bool = True
    drawings: int = 6
    threads: int | None = None  # torch intra-op threads (None: torch's own choice)


@dataclass
class EvalResult:
    out: Path
    metrics: dict[str, Any]
    seconds: float
    raw_table: dict | None = None


def select_pairs(pairs: list[PairRecord], limit_per_category: int | None) -> list[PairRecord]:
    if not limit_per_category:
        return pairs
    seen: dict[str, int] = {}
    kept = []
    for pair in pairs:
        if seen.get(pair.category, 0) < limit_per_category:
            kept.append(pair)
            seen[pair.category] = seen.get(pair.category, 0) + 1
    return kept


def parse_raw(text: str, cache: FeatureCache) -> tuple[str, int]:
    """`LAYER@T` (T the UNet timestep, e.g. up_blocks.1.resnets.1@260) -> (layer, time position)."""
    layers = [l.name for l in cache.layers]
    valid = f"layers: {', '.join(layers)}; timesteps: {', '.join(map(str, cache.timesteps))}"
    layer, sep, step = text.rpartition("@")
    if not sep or layer not in layers:
        raise EvaluationError(f"--raw {text!r}: expected LAYER@T or best, with a layer and UNet timestep of the cache ({valid})")
    try:
        t = int(step)
    except ValueError:
        raise EvaluationError(f"--raw {text!r}: {step!r} is not a timestep ({valid})") from None
    if t not in cache.timesteps:
        raise EvaluationError(f"--raw {text!r}: timestep {t} is not in the cache ({valid})")
    return layer, cache.timesteps.index(t)


def run_eval(request: EvalRequest, log: Callable[[str], None] = print) -> EvalResult:
    if (request.checkpoint is None) == (request.raw is None):
        raise EvaluationError("give exactly one of --checkpoint RUN or --raw LAYER@T|best")
    started = time.perf_counter()
    if request.threads:
        torch.set_num_threads(request.threads)
    refine = parse_refine(request.refine)
    cache = _open_cache(request)
    dataset = open_dataset(request.dataset)
    pairs = select_pairs(dataset.pairs(request.split), request.limit_per_category)
    pairs = _check_images(pairs, cache, request)
    if not pairs:
        raise EvaluationError(f"no pairs to evaluate in split {request.split!r} of {request.dataset}")
    notes: list[str] = []
    # a bad --checkpoint or --raw is refused before the output folder or a progress bar appears
    if request.checkpoint is not None:
        ckpt = load_checkpoint(request.checkpoint, resolve_device(request.device))
        notes += _check_checkpoint(ckpt, cache, request.checkpoint)
    elif request.raw != "best":
        layer, position = parse_raw(request.raw, cache)
    request.out.mkdir(parents=True, exist_ok=True)
    options = {
        "split": request.split, "alphas": list(request.alphas), "load_size": request.load_size,
        "refine": request.refine, "limit_per_category": request.limit_per_category,
    }
    raw_table = None
    mixing = None
    descriptor_counts = None
    checkpoint_fp = None
    checkpoint_source = None
    # the raw sweep has its own bar (per map); a per-pair bar beside it would sit at 0
    bar = progress_bar(len(pairs), "match", unit="pair", enabled=request.progress and request.raw != "best")
    if request.checkpoint is not None:
        provider, descriptor_counts, note = _checkpoint_descriptors(ckpt, cache, pairs, request, log)
        notes += note
        options["descriptor"] = f"checkpoint {request.checkpoint}"
        checkpoint_fp = ckpt.fingerprint
        checkpoint_source = (ckpt.features.get("feature_space_spec") or {}).get("source", "inversion")
        mixing = (ckpt.network.mixing_weights_table().cpu().numpy(), ckpt.layer_names, ckpt.timesteps)
        accumulator, predictions = score_pairs(pairs, provider, request.load_size, request.alphas, refine,
                                               on_pair=lambda: bar.update(1))
    elif request.raw == "best":
        accumulator, predictions, raw_table, best = _raw_sweep(cache, pairs, request, refine, log)
        options["descriptor"] = f"raw best: {best}"
    else:
        provider = LRUDescriptors(_raw_provider(cache, layer, position), capacity=64)
        options["descriptor"] = f"raw {request.raw}"
        accumulator, predictions = score_pairs(pairs, provider, request.load_size, request.alphas, refine,
                                               on_pair=lambda: bar.update(1))
    bar.close()
    summary = accumulator.summary()
    metrics = {
        "n_pairs": summary["n_pairs"],
        "n_points": summary["n_points"],
        "pck": {k: {a: v[a] for a in ("per_point", "per_image", "per_category_mean")}
                for k, v in summary.items() if "@" in k},
        "categories": summary["categories"],
        "skipped": summary["skipped"],
        "fingerprints": {"checkpoint": checkpoint_fp, "cache": cache.fingerprint},
        "options": options,
        "feature_source": cache.spec.feature_space.source,
        "checkpoint_feature_source": checkpoint_source,
        "notes": notes,
        "descriptors": descriptor_counts,
        "dataset": request.dataset,
        "cache": request.cache_url,
    }
    _write_outputs(request, dataset, pairs, predictions, metrics, raw_table, mixing, log)
    return EvalResult(request.out, metrics, time.perf_counter() - started, raw_table)


def _open_cache(request: EvalRequest) -> FeatureCache:
    """Writable when descriptors will be stored; a read-only cache still evaluates (in memory)."""
    if request.checkpoint is None:
        return FeatureCache.open(request.cache_url, request.storage_options)
    try:
        return FeatureCache.open(request.cache_url, request.storage_options, mode="r+")
    except (PermissionError, OSError):
        return FeatureCache.open(request.cache_url, request.storage_options)


def _check_images(pairs: list[PairRecord], cache: FeatureCache, request: EvalRequest) -> list[PairRecord]:
    index, done = cache.index_of(), cache.done_mask()
    ok = lambda i: i in index and bool(done[index[i]])  # noqa: E731
    missing = sorted({i for p in pairs for i in (p.src, p.trg) if not ok(i)})
    if missing and not request.skip_missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise EvaluationError(
            f"{len(missing)} test images are not built in {request.cache_url}: {shown}. Build them with "
            f"`dhf-cache build --dataset {request.dataset} --split {request.split} --cache {request.cache_url}`, "
            "or pass --skip-missing to score the other pairs."
        )
    return [p for p in pairs if ok(p.src) and ok(p.trg)]


def _check_checkpoint(ckpt: Checkpoint, cache: FeatureCache, path: Path) -> list[str]:
    problems = check_features_match(ckpt.features, cache)
    if problems:
        raise CheckpointError(
            f"--checkpoint {path} does not fit the cache {cache.url}:\n  " + "\n  ".join(problems)
            + "\nEvaluate it on a cache built with the checkpoint's model and settings (see its config.json)."
        )
    notes = []
    if ckpt.features.get("feature_space") is None:
        notes.append("imported checkpoint not bound to a feature space: checked layer names, channels and "
                     "timesteps only")
    trained_pre = ckpt.features.get("preprocessing")
    cache_pre = cache.spec.preprocessing.model_dump(mode="json")
    if trained_pre and trained_pre != cache_pre:
        diffs = [f"{k} {trained_pre.get(k)} -> {v}" for k, v in cache_pre.items() if trained_pre.get(k) != v]
        notes.append("same feature space, other preprocessing than the training cache (allowed): " + ", ".join(diffs))
    return notes


def _checkpoint_descriptors(ckpt: Checkpoint, cache: FeatureCache, pairs: list[PairRecord],
                            request: EvalRequest, log) -> tuple[Callable, dict, list[str]]:
    """Compute (once, stored in the cache) the descriptor map of every image the pairs use."""
    index = cache.index_of()
    net = ckpt.network
    size = net.output_size
    store = DescriptorStore(cache, ckpt.fingerprint, (net.projection_dim, size, size),
                            {"network": net.config, "checkpoint": str(request.checkpoint)})
    notes = [] if store.persistent else [f"descriptors kept in memory (cache not writable: {store.reason})"]
    needed = sorted({index[i] for p in pairs for i in (p.src, p.trg)})
    done = store.done_mask()
    todo = [i for i in needed if not done[i]]
    selection, selection_notes = checkpoint_selection(ckpt.features, cache)
    notes += selection_notes
    reader = FeatureReader(cache, selection)
    device = next(net.parameters()).device
    log(f"descriptors: {len(needed)} images, {len(needed) - len(todo)} stored, {len(todo)} to compute")
    bar = progress_bar(len(todo), "descriptors", unit="img", enabled=request.progress)
    for i, features in Prefetcher(lambda i: (i, reader.read(i)), todo):
        store.write(i, aggregate(net, features, device))
        bar.update(1)
    bar.close()
    # Keep up to ~2 GiB of descriptors (SD 1.5 size: ~330 images) so each is read about once.
    capacity = max(64, (2 << 30) // (4 * int(np.prod(store.shape))))
    provider = LRUDescriptors(lambda image_id: store.read(index[image_id]), capacity=capacity)
    return provider, {"computed": len(todo), "reused": len(needed) - len(todo), "stored_in_cache": store.persistent}, notes


def _raw_provider(cache: FeatureCache, layer: str, position: int) -> Callable[[str], torch.Tensor]:
    index = cache.index_of()
    array = cache.feature_array(layer)
    return lambda image_id: torch.from_numpy(np.asarray(array[index[image_id], position], dtype=np.float32))


def _raw_sweep(cache: FeatureCache, pairs: list[PairRecord], request: EvalRequest, refine, log):
    """Score every single layer x timestep map; keep the best one's full results."""
    layers = [l.name for l in cache.layers]
    table = np.full((len(cache.timesteps), len(layers)), np.nan)
    best = (-1.0, None, None, None)
    bar = progress_bar(len(layers) * len(cache.timesteps), "raw sweep", unit="map", enabled=request.progress)
    index = cache.index_of()
    for l, layer in enumerate(layers):
        array = cache.feature_array(layer)
        chunk_bytes = array.nbytes // max(array.shape[0], 1)
        chunks = LRUDescriptors(lambda image_id, a=array: torch.from_numpy(np.asarray(a[index[image_id]])),
                                capacity=max(8, int(2**30 // max(chunk_bytes, 1))))
        for t in range(len(cache.timesteps)):
            provider = lambda image_id, t=t: chunks(image_id)[t].float()  # noqa: E731
            acc, preds = score_pairs(pairs, provider, request.load_size, request.alphas, refine)
            value = acc.summary()[SWEEP_METRIC]["per_point"]
            table[t, l] = np.nan if value is None else value
            if value is not None and value > best[0]:
                best = (value, f"{layer}@{cache.timesteps[t]}", acc, preds)
            bar.update(1)
    bar.close()
    if best[1] is None:
        raise EvaluationError("the raw sweep scored no keypoints; check the pairs")
    log(f"best raw map: {best[1]} ({SWEEP_METRIC} per point {best[0]:.4f})")
    flat = int(np.nanargmax(table))
    t_best, l_best = divmod(flat, len(layers))
    raw_table = {
        "layers": layers, "timesteps": list(cache.timesteps),
        "pck": [[None if np.isnan(v) else float(v) for v in row] for row in table],
        "metric": f"{SWEEP_METRIC} per point",
        "best": {"layer": layers[l_best], "timestep": cache.timesteps[t_best], "pck": float(table[t_best, l_best])},
    }
    return best[2], best[3], raw_table, best[1]


def _write_outputs(request: EvalRequest, dataset: Dataset, pairs, predictions, metrics, raw_table, mixing, log) -> None:
    from dhf_cache import plots, report

    out = request.out
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    with open(out / "predictions.jsonl", "w") as f:
        for pair, pred in zip(pairs, predictions):
            f.write(json.dumps({
                "pair": pair.name, "category": pair.category,
                "src_kps": pair.src_kps.tolist(), "trg_kps": pair.trg_kps.tolist(),
                "pred_kps": [[None if not np.isfinite(v) else round(float(v), 3) for v in p] for p in pred],
                "trg_bndbox": list(pair.trg_bbox), "trg_imsize": list(pair.trg_size),
            }) + "\n")
    if raw_table is not None:
        (out / "raw_sweep.json").write_text(json.dumps(raw_table, indent=2) + "\n")
        plots.plot_pck_table(np.array(raw_table["pck"], dtype=float), raw_table["layers"], raw_table["timesteps"],
                             out / "raw_sweep.png", raw_table["metric"])
    report.write_report(out / "report.md", metrics, raw_table)
    plots.plot_category_bars(metrics, out / "pck_per_category.png")
    if mixing is not None:
        table, names, timesteps = mixing
        plots.plot_mixing_weights(table, names, timesteps, out / "mixing_weights.png")
    paths = {r.id: r.path for r in dataset.images(request.split) if r.path is not None}
    drawings = out / "correspondences"
    drawings.mkdir(exist_ok=True)
    from dhf_cache.images import load_image

    for k, (pair, pred) in enumerate(zip(pairs[: request.drawings], predictions)):
        if pair.src not in paths or pair.trg not in paths or len(pred) == 0:
            continue
        length = bbox_length(pair.trg_bbox)
        dist = np.linalg.norm(pred - pair.trg_kps, axis=1)
        correct = dist <= 0.1 * length if length else None
        plots.draw_correspondences(load_image(paths[pair.src]), load_image(paths[pair.trg]), pair.src_kps, pred,
                                   correct, drawings / f"{k:02d}_{_safe_name(pair.name)}.png")
    log(f"wrote {out / 'metrics.json'}, predictions.jsonl, report.md and plots")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
