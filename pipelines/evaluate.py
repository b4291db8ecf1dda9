"""Stage three: PCK from cached descriptors, with reports, plots and raw-feature baselines.

With a checkpoint, every image's descriptor map is computed once (one pass through the
aggregator over its cached features) and stored back into the cache under the checkpoint's
fingerprint; later evals of the same checkpoint reuse them. With `--raw LAYER@T` one cached map
is scored as is (one inverted map as a baseline); `--raw best` sweeps every layer x timestep on a
selection split (`--select-split`, default val), keeps the map `report.best_cell` names (highest
PCK, ties to the first in the table's order) and scores that map on the evaluated split.

One set of predictions is scored under every published convention (correspondence/conventions.py);
the protocol (`--protocol`, correspondence/protocols.py) names the headline, which is reported
with a bootstrap interval over pairs, with per-category and difficulty-flag breakdowns.

Everything a user can get wrong (the load size, a missing cache, pairs whose images are unusable
or not built) is refused with one line before the cache or the output folder is written.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dhf_cache.cache.feature_cache import FeatureCache, open_root, open_source, source_names
from dhf_cache.aggregator.checkpoint import (Checkpoint, check_features_match, checkpoint_selection, checkpoint_source,
                                  load_checkpoint)
from dhf_cache.config import EVAL_LOAD_SIZE, MAX_LOAD_SIZE, MIN_LOAD_SIZE, PCK_ALPHAS
from dhf_cache.datasets import Dataset, PairRecord, open_dataset
from dhf_cache.cache.descriptor_store import DescriptorStore
from dhf_cache.correspondence.descriptors import LRUDescriptors, aggregate
from dhf_cache.device import resolve_device
from dhf_cache.cache.disk_space import human_bytes
from dhf_cache.errors import CheckpointError, EvaluationError, ImageError, UsageError
from dhf_cache.cache.feature_loader import (FeatureReader, Prefetcher, SourcesReader, SourcesSelection, done_in_all,
                                            shared_fit)
from dhf_cache.correspondence.conventions import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, PairTable, convention_matrix, headline_tables
from dhf_cache.correspondence.matching import MATCH_AT, check_fit, parse_refine
from dhf_cache.correspondence.pck import bbox_length
from dhf_cache.correspondence.protocols import Protocol, get_protocol
from dhf_cache.progress import progress_bar
from dhf_cache.reports.report import best_cell, sweep_rank
from dhf_cache.correspondence.scoring import score_pairs

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
    source: str | None = None  # the cache's feature source (None: its only one, the checkpoint's, --raw's)
    protocol: str = "dhf"  # whose headline (protocols.PROTOCOLS); the matching options above are its by default
    match_at: str = "load"  # matching.MATCH_AT
    select_split: str | None = None  # where `--raw best` chooses its map (None: val, when the data set has one)
    bootstrap: int = BOOTSTRAP_RESAMPLES  # resamples of the headline's interval (0: none)
    seed: int = BOOTSTRAP_SEED
    subset: str | None = None  # a named subset (NAMED_SUBSETS): sets split and limit_per_category
    # other matchings ("MATCH_AT/REFINE") whose convention matrices are added from the same
    # descriptors (each one more matching pass); "all": every one besides the run's own
    matrix_matchings: tuple[str, ...] = ()


# Named pair subsets: (split, pairs per category). The reference validates on 20
# pairs per category of SPair-71k's val split (METHOD.md); here they are the first 20 of each
# category in the split's listed order.
NAMED_SUBSETS = {"ref360": ("val", 20)}  # the reference's validation subset


def resolve_subset(request: EvalRequest) -> EvalRequest:
    """The request with a named subset's split and per-category limit filled in."""
    if request.subset is None:
        return request
    if request.subset not in NAMED_SUBSETS:
        raise UsageError(f"--subset {request.subset!r}: unknown; use one of {', '.join(NAMED_SUBSETS)}")
    split, per_category = NAMED_SUBSETS[request.subset]
    if request.split not in ("test", split) or request.limit_per_category not in (None, per_category):
        raise UsageError(f"--subset {request.subset} sets --split {split} and --limit-per-category {per_category}; "
                         "drop those options")
    return dataclasses.replace(request, split=split, limit_per_category=per_category)


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
    """`LAYER@T` (T the UNet timestep, e.g. up_blocks.1.resnets.1@260) -> (layer, time position);
    a source without a time axis (DINOv2: one position) takes `LAYER` alone. A `SOURCE:` prefix
    (chosen by `_open_cache`) is dropped."""
    layers = [l.name for l in cache.layers]
    valid = f"source {cache.name}: layers: {', '.join(layers)}; timesteps: {', '.join(map(str, cache.timesteps))}"
    text = text.split(":", 1)[1] if ":" in text else text
    if "@" not in text and len(cache.timesteps) == 1 and text in layers:
        return text, 0
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


def check_load_size(load_size: int) -> None:
    """Refuse a load size outside [MIN_LOAD_SIZE, MAX_LOAD_SIZE] (see MAX_LOAD_SIZE for why)."""
    if not MIN_LOAD_SIZE <= int(load_size) <= MAX_LOAD_SIZE:
        per_keypoint = human_bytes(4 * int(load_size) ** 2) if load_size > 0 else "nothing"
        raise UsageError(
            f"--load-size {load_size}: expected {MIN_LOAD_SIZE} to {MAX_LOAD_SIZE} pixels (the paper: "
            f"{EVAL_LOAD_SIZE}); matching holds a LOAD_SIZE^2 similarity map per keypoint ({per_keypoint} here)"
        )


def run_eval(request: EvalRequest, log: Callable[[str], None] = print) -> EvalResult:
    if (request.checkpoint is None) == (request.raw is None):
        raise EvaluationError("give exactly one of --checkpoint RUN or --raw LAYER@T|best")
    request = resolve_subset(request)
    check_load_size(request.load_size)
    protocol = get_protocol(request.protocol)
    if request.match_at not in MATCH_AT:
        raise UsageError(f"--match-at {request.match_at!r}: unknown; use one of {', '.join(MATCH_AT)}")
    other_matchings = _other_matchings(request)  # refused before anything is read or written
    started = time.perf_counter()
    if request.threads:
        torch.set_num_threads(request.threads)
    refine = parse_refine(request.refine)
    caches = _open_caches(request)
    cache = next(iter(caches.values()))  # images are addressed by their index in this source
    fit = shared_fit(caches, "the sources read")
    if fit == "pad" and request.match_at == "square":
        # padded features already are SD+DINO's square (of side load_size): match on it
        request = dataclasses.replace(request, match_at="load")
    check_fit(fit, request.match_at)
    dataset = open_dataset(request.dataset)
    pairs = select_pairs(dataset.pairs(request.split), request.limit_per_category)
    pairs, input_skipped = check_pairs(pairs, cache, request, done_in_all(list(caches.values())))
    if not pairs:
        raise EvaluationError(f"no pairs to evaluate in split {request.split!r} of {request.dataset}")
    notes: list[str] = []
    if request.raw == "best":
        selection = _selection_pairs(dataset, cache, request, done_in_all(list(caches.values())))
    # a bad --checkpoint or --raw is refused before the output folder or a progress bar appears
    if request.checkpoint is not None:
        ckpt = load_checkpoint(request.checkpoint, resolve_device(request.device))
        notes += _check_checkpoint(ckpt, caches, request.checkpoint)
    elif "+" in request.raw:
        parts = [parse_raw_part(part, caches, request.raw) for part in request.raw.split("+")]
    elif request.raw != "best":
        layer, position = parse_raw(request.raw, cache)
    request.out.mkdir(parents=True, exist_ok=True)
    options = {
        "split": request.split, "alphas": list(request.alphas), "load_size": request.load_size,
        "refine": request.refine, "limit_per_category": request.limit_per_category,
        "match_at": request.match_at, "protocol": protocol.name, "subset": request.subset, "fit": fit,
    }
    score = lambda provider, **kw: score_pairs(pairs, provider, request.load_size, request.alphas, refine,  # noqa: E731
                                               match_at=request.match_at, fit=fit, **kw)
    raw_table = None
    mixing = None
    descriptor_counts = None
    checkpoint_fp = None
    trained_on = None
    # the raw sweep has its own bar (per map); a per-pair bar beside it would sit at 0
    bar = progress_bar(len(pairs), "match", unit="pair", enabled=request.progress and request.raw != "best")
    if request.checkpoint is not None:
        provider, descriptor_counts, note = _checkpoint_descriptors(ckpt, caches, pairs, request, log)
        notes += note
        options["descriptor"] = f"checkpoint {request.checkpoint}"
        checkpoint_fp = ckpt.fingerprint
        if ckpt.fused:
            trained_on = ",".join(ckpt.bindings)
            notes.append(f"fused checkpoint over sources {trained_on}: {len(ckpt.network.map_keys)} layers")
        else:
            trained_on = ckpt.binding.feature_source
            mixing = (ckpt.network.mixing_weights_table().cpu().numpy(), ckpt.layer_names, ckpt.timesteps)
        accumulator, predictions = score(provider, on_pair=lambda: bar.update(1))
    elif request.raw == "best":
        select_split, selection_pairs = selection
        raw_table, (layer, position) = _raw_sweep(cache, selection_pairs, request, refine, log, fit)
        best = f"{layer}@{cache.timesteps[position]}"
        raw_table["selected_on"] = {"split": select_split, "n_pairs": len(selection_pairs)}
        options["descriptor"] = f"raw best: {best} (chosen on the {select_split} split)"
        options["select_split"] = select_split
        provider = LRUDescriptors(_raw_provider(cache, layer, position), capacity=64)
        accumulator, predictions = score(provider, on_pair=lambda: bar.update(1))
    elif "+" in request.raw:
        provider = LRUDescriptors(_fused_raw_provider(caches, parts), capacity=64)
        options["descriptor"] = f"raw fused (SD+DINO: each map L2-normalised per pixel, concatenated) {request.raw}"
        accumulator, predictions = score(provider, on_pair=lambda: bar.update(1))
    else:
        provider = LRUDescriptors(_raw_provider(cache, layer, position), capacity=64)
        options["descriptor"] = f"raw {request.raw}"
        accumulator, predictions = score(provider, on_pair=lambda: bar.update(1))
    bar.close()
    summary = accumulator.summary()
    table = PairTable(accumulator.pairs)
    alphas = sorted(set(request.alphas) | {protocol.alpha})
    own = f"{request.match_at}/{request.refine}"
    conventions = [{**row, "matching": own} for row in convention_matrix(table, alphas)]
    for other in other_matchings:
        where, how = other.split("/")
        if fit == "pad" and where != "load":
            continue  # padded features are matched on their square only (matching.check_fit)
        acc, _ = score_pairs(pairs, provider, request.load_size, request.alphas, parse_refine(how), match_at=where,
                             fit=fit)
        conventions += [{**row, "matching": other} for row in convention_matrix(PairTable(acc.pairs), alphas)]
    base = protocol.threshold_base(dataset.default_threshold)
    tables = headline_tables(table, base, protocol.inequality, protocol.alpha, protocol.averagings,
                             request.bootstrap, request.seed)
    matching = _matching_record(request, protocol, cache, fit)
    notes += matching["notes"]
    metrics = {
        "n_pairs": summary["n_pairs"],
        "n_points": summary["n_points"],
        "pck": {k: {a: v[a] for a in ("per_point", "per_image", "per_category_mean")}
                for k, v in summary.items() if "@" in k},
        "categories": summary["categories"],
        "skipped": {**summary["skipped"], **input_skipped,
                    # keypoints the data set dropped from the scored pairs (a NaN or inf coordinate)
                    "dropped_nonfinite_points": sum(p.dropped_kps for p in pairs),
                    # pairs a benchmark loader left out, by reason (padded, invisible, out_of_image)
                    **{f"dataset_{reason}_pairs": n for reason, n in
                       dataset.skipped_pairs(request.split).items()}},
        "fingerprints": {"checkpoint": checkpoint_fp, "cache": cache.fingerprint},
        "options": options,
        "feature_source": getattr(cache.spec.feature_space, "source", cache.name),
        "checkpoint_feature_source": trained_on,
        "notes": notes,
        "descriptors": descriptor_counts,
        "dataset": request.dataset,
        "cache": request.cache_url,
        "protocol": {"name": protocol.name, "code": protocol.code, "threshold_base": base,
                     "inequality": protocol.inequality, "alpha": protocol.alpha, "averagings": list(protocol.averagings),
                     "matching": protocol.matching(), "matching_differs": matching["differs"]},
        "headline": tables["headline"],
        "bootstrap": tables["bootstrap"],
        "breakdowns": {"categories": tables["categories"], "flags": tables["flags"]},
        "conventions": conventions,
        "matching": {k: v for k, v in matching.items() if k != "notes"},
    }
    _write_outputs(request, dataset, pairs, predictions, metrics, raw_table, mixing, log)
    return EvalResult(request.out, metrics, time.perf_counter() - started, raw_table)


def _open_caches(request: EvalRequest) -> dict[str, FeatureCache]:
    """The sources eval reads, the one that addresses images first: several for a fused
    checkpoint or a `+`-joined --raw list, else one (`_open_cache`)."""
    if request.checkpoint is not None and request.source is None:
        named = checkpoint_source(request.checkpoint) or ""
        if "," in named:
            names = named.split(",")
            root = open_root(request.cache_url, request.storage_options)  # the names held, before opening any
            held = source_names(root, request.cache_url)
            missing = [n for n in names if n not in held]
            if missing:
                raise CheckpointError(f"--checkpoint {request.checkpoint} fuses maps of sources {', '.join(names)}; "
                                      f"the cache {request.cache_url} lacks {', '.join(missing)} (it holds "
                                      f"{', '.join(held)}): build them with `dhf-cache build --source NAME`")
            first = _open_cache(dataclasses.replace(request, source=names[0]))  # writable: descriptors go here
            return {names[0]: first, **{n: open_source(root, request.cache_url, n, held) for n in names[1:]}}
    if request.raw is not None and "+" in request.raw:
        everything = FeatureCache.open_all(request.cache_url, request.storage_options)
        names = []
        for part in request.raw.split("+"):
            name = raw_part_source(part, everything, request.raw)
            if name not in names:
                names.append(name)
        return {n: everything[n] for n in names}
    cache = _open_cache(request)
    return {cache.name: cache}


def raw_part_source(part: str, caches: dict[str, FeatureCache], whole: str) -> str:
    """The source of one map of a `+`-joined --raw list: its SOURCE: prefix, else the one source
    holding that layer; one EvaluationError line listing each source's maps otherwise."""
    source, sep, rest = part.partition(":")
    if sep:
        if source not in caches:
            raise EvaluationError(f"--raw {whole!r}: no source {source!r}; " + _maps_listing(caches))
        return source
    layer = part.rpartition("@")[0] or part
    holders = [n for n, c in caches.items() if layer in {l.name for l in c.layers}]
    if len(holders) != 1:
        raise EvaluationError(f"--raw {whole!r}: map {part!r} is in {'sources ' + ', '.join(holders) + '; write SOURCE:MAP' if holders else 'no source'}; "
                              + _maps_listing(caches))
    return holders[0]


def _maps_listing(caches: dict[str, FeatureCache]) -> str:
    return "the cache's maps: " + "; ".join(
        f"{n}: layers {', '.join(l.name for l in c.layers)}"
        + (f" @ t {', '.join(map(str, c.timesteps))}" if len(c.timesteps) > 1 else " (no time axis)")
        for n, c in caches.items())


def parse_raw_part(part: str, caches: dict[str, FeatureCache], whole: str) -> tuple[FeatureCache, str, int]:
    """One map of a `+`-joined --raw list as (its source, layer, time position)."""
    cache = caches[raw_part_source(part, caches, whole)]
    try:
        layer, position = parse_raw(part, cache)
    except EvaluationError as exc:
        raise EvaluationError(f"--raw {whole!r}: {exc}; " + _maps_listing(caches)) from None
    return cache, layer, position


def _fused_raw_provider(caches: dict[str, FeatureCache], parts) -> Callable[[str], torch.Tensor]:
    """The zero-shot fusion of SD+DINO (Zhang et al. 2023): each map L2-normalised over its
    channels at every pixel, resized to the largest map's grid (bilinear), then concatenated;
    matching's cosine similarity then weighs every map equally."""
    shapes = [{l.name: l for l in cache.layers}[layer] for cache, layer, _ in parts]
    side = max(max(info.height, info.width) for info in shapes)
    indexes = {id(c): c.index_of() for c, _, _ in parts}

    def compute(image_id: str) -> torch.Tensor:
        maps = []
        for cache, layer, position in parts:
            stored = cache.read_features(indexes[id(cache)][image_id], [layer], check_finite=True)[layer][position]
            x = torch.from_numpy(np.asarray(stored, dtype=np.float32))
            x = x / x.norm(dim=0, keepdim=True).clamp_min(1e-12)
            if tuple(x.shape[-2:]) != (side, side):
                x = F.interpolate(x[None], size=(side, side), mode="bilinear", align_corners=False)[0]
            maps.append(x)
        return torch.cat(maps)

    return compute


def _open_cache(request: EvalRequest) -> FeatureCache:
    """Writable when descriptors will be stored; a read-only cache still evaluates (in memory).
    Of a cache with several sources: --source, else the checkpoint's, else --raw's SOURCE: prefix."""
    url = request.cache_url
    source, prefer = request.source, None
    if source is None and request.raw is not None and ":" in request.raw:
        source = request.raw.split(":", 1)[0]
    if source is None and request.checkpoint is not None:
        prefer = checkpoint_source(request.checkpoint)
    if request.checkpoint is None:  # a missing cache is refused either way, and nothing created
        return FeatureCache.open(url, request.storage_options, source=source, prefer=prefer)
    try:
        return FeatureCache.open(request.cache_url, request.storage_options, mode="r+", source=source, prefer=prefer)
    except (PermissionError, OSError):
        return FeatureCache.open(request.cache_url, request.storage_options, source=source, prefer=prefer)


def _shown(items: list[str]) -> str:
    return ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")


def check_pairs(pairs: list[PairRecord], cache: FeatureCache, request: EvalRequest,
                done: np.ndarray | None = None) -> tuple[list[PairRecord], dict[str, int]]:
    """The pairs to score and how many were left out, by reason. Pairs whose images the data set
    cannot use (`PairRecord.error`: unsafe path, missing or unreadable file) and pairs with an
    image the cache has not built are refused in one line each, or skipped with --skip-missing."""
    unusable = [p for p in pairs if p.error]
    if unusable and not request.skip_missing:
        raise EvaluationError(
            f"{len(unusable)} {request.split} pairs of {request.dataset} use images that cannot be used: "
            + _shown([f"{p.name} ({p.error})" for p in unusable])
            + ". Fix the files or annotations, or pass --skip-missing to score the other pairs."
        )
    usable = [p for p in pairs if not p.error]
    index = cache.index_of()
    done = cache.done_mask() if done is None else done  # (several sources: done in each)
    ok = lambda i: i in index and bool(done[index[i]])  # noqa: E731
    missing = sorted({i for p in usable for i in (p.src, p.trg) if not ok(i)})
    if missing and not request.skip_missing:
        raise EvaluationError(
            f"{len(missing)} {request.split} images are not built in {request.cache_url}: {_shown(missing)}. "
            f"Build them with `dhf-cache build --dataset {request.dataset} --split {request.split} "
            f"--cache {request.cache_url}`, or pass --skip-missing to score the other pairs."
        )
    kept = [p for p in usable if ok(p.src) and ok(p.trg)]
    return kept, {"unusable_image_pairs": len(unusable), "missing_image_pairs": len(usable) - len(kept)}


def _check_checkpoint(ckpt: Checkpoint, caches: dict[str, FeatureCache], path: Path) -> list[str]:
    """Every source the checkpoint reads checked against its binding; notes for the report."""
    problems, notes = [], []
    fused = ckpt.fused
    for name, binding in ckpt.bindings.items():
        cache = caches[name] if fused else next(iter(caches.values()))
        where = f"source {name}: " if fused else ""
        problems += [where + p for p in check_features_match(binding, cache)]
        if binding.feature_space is None:
            notes.append("imported checkpoint not bound to a feature space: checked layer names, channels and "
                         "timesteps only")
        trained_pre = binding.preprocessing
        cache_pre = cache.spec.preprocessing.model_dump(mode="json")
        if trained_pre and trained_pre != cache_pre:
            diffs = [f"{k} {trained_pre.get(k)} -> {v}" for k, v in cache_pre.items() if trained_pre.get(k) != v]
            notes.append(where + "same feature space, other preprocessing than the training cache (allowed): "
                         + ", ".join(diffs))
    if problems:
        url = next(iter(caches.values())).url
        raise CheckpointError(
            f"--checkpoint {path} does not fit the cache {url}:\n  " + "\n  ".join(problems)
            + "\nEvaluate it on a cache built with the checkpoint's model and settings (see its config.json)."
        )
    return notes


def _checkpoint_descriptors(ckpt: Checkpoint, caches: dict[str, FeatureCache], pairs: list[PairRecord],
                            request: EvalRequest, log) -> tuple[Callable, dict, list[str]]:
    """Compute (once, stored in the cache) the descriptor map of every image the pairs use (a
    fused checkpoint's in the first source it reads)."""
    cache = next(iter(caches.values()))
    index = cache.index_of()
    net = ckpt.network
    size = net.output_size
    store = DescriptorStore(cache, ckpt.fingerprint, (net.projection_dim, size, size),
                            {"network": net.config, "checkpoint": str(request.checkpoint)})
    notes = [] if store.persistent else [f"descriptors kept in memory (cache not writable: {store.reason})"]
    needed = sorted({index[i] for p in pairs for i in (p.src, p.trg)})
    done = store.done_mask()
    todo = [i for i in needed if not done[i]]
    if ckpt.fused:
        selections = {name: checkpoint_selection(binding, caches[name])[0] for name, binding in ckpt.bindings.items()}
        reader = SourcesReader(caches, SourcesSelection(selections), check_finite=True)
    else:
        selection, selection_notes = checkpoint_selection(ckpt.binding, cache)
        notes += selection_notes
        reader = FeatureReader(cache, selection, check_finite=True)  # a NaN map would score silently
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


def _raw_maps(cache: FeatureCache, layer: str, index: dict[str, int]) -> Callable[[str], np.ndarray]:
    """image id -> its stored (T, C, H, W) maps of one layer, read through the cache's checked
    path: a missing or damaged chunk or a NaN is one CacheError naming the image, never zeros."""
    return lambda image_id: cache.read_features(index[image_id], [layer], check_finite=True)[layer]


def _raw_provider(cache: FeatureCache, layer: str, position: int) -> Callable[[str], torch.Tensor]:
    maps = _raw_maps(cache, layer, cache.index_of())
    return lambda image_id: torch.from_numpy(np.asarray(maps(image_id)[position], dtype=np.float32))


def _other_matchings(request: EvalRequest) -> list[str]:
    """The `MATCH_AT/REFINE` matchings besides the run's own whose matrices eval adds."""
    from dhf_cache.correspondence.matching import REFINE_CHOICES

    every = [f"{where}/{how}" for where in MATCH_AT for how in REFINE_CHOICES]
    own = f"{request.match_at}/{request.refine}"
    asked = every if tuple(request.matrix_matchings) == ("all",) else list(request.matrix_matchings)
    unknown = [m for m in asked if m not in every]
    if unknown:
        raise UsageError(f"--matrix-matchings {','.join(unknown)}: unknown; use all or any of {', '.join(every)}")
    return [m for m in dict.fromkeys(asked) if m != own]


def _selection_pairs(dataset: Dataset, cache: FeatureCache, request: EvalRequest,
                     done: np.ndarray) -> tuple[str, list[PairRecord]]:
    """The split `--raw best` chooses its map on and its pairs: never the evaluated split, so
    the baseline is not chosen on the pairs it is scored on."""
    split = request.select_split or ("val" if "val" in dataset.splits else None)
    if split is None:
        raise EvaluationError(
            f"--raw best chooses its map on a validation split, and {request.dataset} has none "
            f"(splits: {', '.join(dataset.splits) or 'none'}): pass --select-split NAME (not {request.split!r}) "
            "or score one map with --raw LAYER@T")
    if split == request.split:
        raise EvaluationError(f"--select-split {split}: the map would be chosen on the pairs it is scored on; "
                              f"choose it on another split (e.g. val) than --split {request.split}")
    selecting = dataclasses.replace(request, split=split)
    pairs, _ = check_pairs(select_pairs(dataset.pairs(split), request.limit_per_category), cache, selecting, done)
    if not pairs:
        raise EvaluationError(f"--select-split {split}: no pairs to choose the raw map on in {request.dataset}")
    return split, pairs


# The reference loads images at one load size for the model and matches at the same one
# (METHOD.md): 224/224 is the paper's test protocol, 512/512 its training validation.
PAPER_PROTOCOLS = {224: "the paper's test protocol (load size 224 for the model and for matching)",
                   512: "the reference's training validation protocol (load size 512 for both)"}


def _matching_record(request: EvalRequest, protocol: Protocol, cache: FeatureCache, fit: str) -> dict:
    """Where matching happened, whether it is the protocol's, and which of the reference's
    protocols it reproduces (or that the cache's load size differs from the matching one)."""
    ran = {"match_at": request.match_at, "load_size": request.load_size, "refine": request.refine}
    # on padded features, the load square is the protocol's aspect-kept square with its padding
    same_place = {("square", "load")} if fit == "pad" else set()
    differs = [f"{k} {ran[k]} (the protocol's: {v})" for k, v in protocol.matching().items()
               if ran[k] != v and (v, ran[k]) not in same_place
               and not (k == "load_size" and request.match_at == "original")]
    notes = []
    if differs:
        notes.append(f"matching differs from protocol {protocol.name}'s: " + ", ".join(differs)
                     + "; the headline uses its scoring rule on these predictions")
    cache_load = getattr(cache.spec.preprocessing, "load_size", None)
    reproduces = None
    if fit == "pad":
        notes.append("the cache's images were padded to squares (fit pad, as SD+DINO), not stretched as in the "
                     "reference: matched on the padded square")
    elif request.match_at == "load" and cache_load == request.load_size and cache_load in PAPER_PROTOCOLS:
        reproduces = PAPER_PROTOCOLS[cache_load]
    elif request.match_at == "load" and cache_load is not None and cache_load != request.load_size:
        notes.append(f"the cache was built at load size {cache_load} and is matched at {request.load_size}: the "
                     "reference uses one load size for both (224 in the paper's test, 512 in its training "
                     "validation), so this reproduces neither; see docs/evaluation.md")
    return {**ran, "cache_load_size": cache_load, "fit": fit, "reproduces": reproduces, "differs": bool(differs),
            "notes": notes}


def _raw_sweep(cache: FeatureCache, pairs: list[PairRecord], request: EvalRequest, refine, log, fit: str = "stretch"):
    """Score every single layer x timestep map on `pairs`; the table and the (layer, time
    position) of the map `best_cell` names."""
    layers = [l.name for l in cache.layers]
    table = np.full((len(cache.timesteps), len(layers)), np.nan)
    best_rank, best = None, (None, None)  # (value, name)
    bar = progress_bar(len(layers) * len(cache.timesteps), "raw sweep", unit="map", enabled=request.progress)
    index = cache.index_of()
    for l, layer in enumerate(layers):
        array = cache.feature_array(layer)
        chunk_bytes = array.nbytes // max(array.shape[0], 1)
        chunks = LRUDescriptors(lambda image_id, maps=_raw_maps(cache, layer, index): torch.from_numpy(maps(image_id)),
                                capacity=max(8, int(2**30 // max(chunk_bytes, 1))))
        for t in range(len(cache.timesteps)):
            provider = lambda image_id, t=t: chunks(image_id)[t].float()  # noqa: E731
            acc, _ = score_pairs(pairs, provider, request.load_size, request.alphas, refine, match_at=request.match_at,
                                 fit=fit)
            value = acc.summary()[SWEEP_METRIC]["per_point"]
            table[t, l] = np.nan if value is None else value
            # the sweep runs layer by layer; sweep_rank orders maps as best_cell does
            if value is not None and (best_rank is None or sweep_rank(value, t, l) > best_rank):
                best_rank, best = sweep_rank(value, t, l), (value, f"{layer}@{cache.timesteps[t]}")
            bar.update(1)
    bar.close()
    if best[1] is None:
        raise EvaluationError("the raw sweep scored no keypoints; check the pairs")
    log(f"best raw map: {best[1]} ({SWEEP_METRIC} per point {best[0]:.4f})")
    t_best, l_best = best_cell(table)
    assert f"{layers[l_best]}@{cache.timesteps[t_best]}" == best[1], "one tie rule for the sweep and its table"
    raw_table = {
        "layers": layers, "timesteps": list(cache.timesteps),
        "pck": [[None if np.isnan(v) else float(v) for v in row] for row in table],
        "metric": f"{SWEEP_METRIC} per point",
        "best": {"layer": layers[l_best], "timestep": cache.timesteps[t_best], "pck": float(table[t_best, l_best])},
    }
    return raw_table, (layers[l_best], t_best)


def _write_outputs(request: EvalRequest, dataset: Dataset, pairs, predictions, metrics, raw_table, mixing, log) -> None:
    from dhf_cache.reports import plots
    from dhf_cache.reports import report

    out = request.out
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    with open(out / "predictions.jsonl", "w") as f:
        for pair, pred in zip(pairs, predictions):
            f.write(json.dumps({
                "pair": pair.name, "category": pair.category,
                "src_kps": pair.src_kps.tolist(), "trg_kps": pair.trg_kps.tolist(),
                "pred_kps": [[None if not np.isfinite(v) else round(float(v), 3) for v in p] for p in pred],
                "trg_bndbox": list(pair.trg_bbox), "trg_imsize": list(pair.trg_size), "flags": pair.flags,
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
    paths = {r.id: r.path for r in dataset.images(request.split) if r.path is not None and not r.error}
    drawings = out / "correspondences"
    drawings.mkdir(exist_ok=True)
    from dhf_cache.datasets.images import load_image

    for k, (pair, pred) in enumerate(zip(pairs[: request.drawings], predictions)):
        if pair.src not in paths or pair.trg not in paths or len(pred) == 0:
            continue
        length = bbox_length(pair.trg_bbox)
        dist = np.linalg.norm(pred - pair.trg_kps, axis=1)
        correct = dist <= 0.1 * length if length else None
        try:
            images = load_image(paths[pair.src]), load_image(paths[pair.trg])
        except ImageError as exc:  # the scores come from the cache; a drawing is not worth failing for
            log(f"no drawing of pair {pair.name}: {exc}")
            continue
        plots.draw_correspondences(*images, pair.src_kps, pred, correct,
                                   drawings / f"{k:02d}_{_safe_name(pair.name)}.png")
    log(f"wrote {out / 'metrics.json'}, predictions.jsonl, report.md and plots")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
