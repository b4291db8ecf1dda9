"""Stage three's cost once descriptors exist: PCK of P pairs over I images from stored descriptors.

The setting is synthetic, no diffusion model: random descriptor maps (P=384 x 64 x 64, fp16,
post-ReLU like the aggregator's output) for `--images` images, written into a cache with
`DescriptorStore` exactly as `dhf-cache eval` stores them, and random `PairRecord`s (10-20
keypoints, SPair-like image sizes and boxes) spread over 18 categories. Every timed run takes
the real path of `dhf-cache eval --checkpoint`: the provider from
`pipelines.evaluate._checkpoint_descriptors` once every descriptor is stored (an `LRUDescriptors`
over `DescriptorStore.read`, nothing computed), then `score_pairs` and the PCK summary.

    series P   fixed images, growing pairs (e.g. 250, 1,000, 12,234 = SPair's test size)
    series I   fixed pairs, growing images
    breakdown  where one run's time goes, with one scoring worker so the pieces add up:
               descriptor reads, prepare_target (norm map), the source lookup, the s.T matmul,
               the upsampling of the similarity maps, x inv_norm, the argmax, mapping back, the
               PCK bookkeeping; then the same pairs with the default workers, and whether the
               predictions agree
    naive      METHOD.md's per-pair protocol (`match_points_reference`: upsample both maps in
               full, read both descriptors per pair) on a few pairs, projected to 12,234

The last line: the 12,234-pair time of the library path against the target (< 60 s).

    python bench/eval_scaling.py            # ~5 min on a 2-core CPU
    python bench/eval_scaling.py --quick    # ~1 min, smaller series, no 12,234-pair runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common  # noqa: E402, F401  (first: it records the environment the benchmark was started with)
from dhf_cache.openmp import settle_wait_policy  # noqa: E402

settle_wait_policy(print)  # before torch loads, as the CLI's compute commands do (dhf_cache/openmp.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import (Patches, Timers, describe_machine, machine_info, peak_rss_mb, work_folder,  # noqa: E402
                     write_json)

SPAIR_TEST_PAIRS = 12_234
TARGET_SECONDS = 60.0
CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
              "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor")
LAYER = "up_blocks.0.resnets.0"  # the synthetic cache's one (tiny) feature layer: only descriptors are read


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, help="images with stored descriptors (default 300)")
    p.add_argument("--categories", type=int, default=18, help="categories the images and pairs spread over (default 18)")
    p.add_argument("--pairs", help="series P: comma-separated pair counts over all images (default 1000,12234; "
                   "the 250-pair point over all images is series I's last run)")
    p.add_argument("--image-counts", help="series I: comma-separated image counts (default 60,150,300)")
    p.add_argument("--series-pairs", type=int, help="series I: pairs per run (default 250)")
    p.add_argument("--load-size", type=int, default=224, help="PCK load size (default 224, the paper's)")
    p.add_argument("--dim", type=int, default=384, help="descriptor channels P (default 384)")
    p.add_argument("--grid", type=int, default=64, help="descriptor grid (default 64)")
    p.add_argument("--kps", default="10,20", help="keypoints per pair, min,max (default 10,20)")
    p.add_argument("--breakdown-pairs", type=int, help="pairs of the instrumented run (default 250, 0 skips)")
    p.add_argument("--naive-pairs", type=int, help="pairs for the naive per-pair protocol (default 8, 0 skips)")
    p.add_argument("--quick", action="store_true", help="small series (~1 min): no 12,234-pair run, projected instead")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--workdir", help="keep the synthetic cache here (default: a temporary folder, removed)")
    p.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    full = {"images": 300, "pairs": "1000,12234", "image_counts": "60,150,300", "series_pairs": 250,
            "breakdown_pairs": 250, "naive_pairs": 8}
    quick = {"images": 150, "pairs": "1000", "image_counts": "50,150", "series_pairs": 250,
             "breakdown_pairs": 250, "naive_pairs": 4}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.pairs = [int(x) for x in str(args.pairs).split(",") if x.strip()]
    args.image_counts = sorted({min(int(x), args.images) for x in str(args.image_counts).split(",") if x.strip()})
    args.kps = tuple(int(x) for x in args.kps.split(","))
    if len(args.kps) != 2 or not 1 <= args.kps[0] <= args.kps[1]:
        p.error("--kps takes MIN,MAX with 1 <= MIN <= MAX")
    if args.images < 2 * args.categories:
        p.error(f"--images {args.images}: need at least 2 per category ({args.categories} categories)")
    if min(args.image_counts) < 2 * args.categories:
        p.error(f"--image-counts: every count needs at least 2 images per category ({args.categories})")
    return args


# ------------------------------------------------------------------------------------ synthetic setting
class Synthetic:
    """Image ids, sizes and boxes; descriptor maps stored in a cache; pair lists on demand."""

    def __init__(self, args, work: Path):
        from dhf_cache.cache.feature_cache import FeatureCache
        from dhf_cache.config import BuildSpec, FeatureSpace, ModelIdentity
        from dhf_cache.cache.descriptor_store import DescriptorStore
        from dhf_cache.cache.layers import LayerInfo

        self.args = args
        rng = np.random.default_rng(args.seed)
        cats = CATEGORIES[: args.categories] if args.categories <= len(CATEGORIES) else \
            tuple(f"category{c:02d}" for c in range(args.categories))
        # round-robin categories, so the first I images of the list cover every category evenly
        self.ids = [f"{cats[i % len(cats)]}/{2008 + i % 5}_{i:06d}" for i in range(args.images)]
        self.category = {image_id: image_id.split("/")[0] for image_id in self.ids}
        self.sizes, self.boxes = {}, {}
        for image_id in self.ids:  # PASCAL-like: long side 500, short side 280-500, either orientation
            long_, short = 500, int(rng.integers(280, 501))
            w, h = (long_, short) if rng.random() < 0.6 else (short, long_)
            bw, bh = rng.uniform(0.3, 0.95) * w, rng.uniform(0.3, 0.95) * h
            x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            self.sizes[image_id] = (w, h)
            self.boxes[image_id] = (round(x1, 1), round(y1, 1), round(x1 + bw, 1), round(y1 + bh, 1))

        identity = ModelIdentity(unet_class="synthetic", unet_sha256="synthetic", vae_sha256="synthetic",
                                 text_encoder_sha256="synthetic")
        spec = BuildSpec(feature_space=FeatureSpace(model=identity, steps=50, save_steps=(49,), layers=(LAYER,)))
        url = work / "synthetic-cache"
        self.cache = FeatureCache.prepare(str(url), spec, [LayerInfo(LAYER, 4, 1, 1)], [-1], self.ids,
                                          latent_shape=(4, 1, 1), provenance={"bench": "eval_scaling"})
        self.index = self.cache.index_of()
        # the descriptor set a checkpoint's eval would have stored, under a stand-in fingerprint
        shape = (args.dim, args.grid, args.grid)
        self.store = DescriptorStore(self.cache, "synthetic-eval-scaling-" + "0" * 40, shape, {"bench": "eval_scaling"})
        done = self.store.done_mask()
        gen = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        # post-ReLU like the aggregator's output (about half zeros); a pool of random maps, each
        # image a different roll of one of them (drawing 300 x 1.5M normals costs more than it says)
        pool = [torch.relu(torch.randn(shape, generator=gen)) for _ in range(8)]

        def write(i: int) -> None:
            shift = (i * 7) % args.grid
            self.store.write(i, pool[i % len(pool)].roll((shift, 3 * shift), dims=(1, 2)))

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as writers:  # one writer per chunk, as eval's own writes
            list(writers.map(write, [i for i in range(len(self.ids)) if not done[i]]))
        self.write_seconds = time.perf_counter() - start
        # the descriptor sets sit in the source's folder (format 2: sources/<name>/descriptors)
        folder = next(p for p in sorted(url.rglob("descriptors")) if p.is_dir())
        self.stored_bytes_per_image = _stored_bytes(folder) / len(self.ids)

    def pairs(self, n_pairs: int, n_images: int, seed: int) -> list:
        """`n_pairs` pairs over the first `n_images` images: a category at random (weighted by
        its images), then two distinct images of it; keypoints inside each image's box."""
        from dhf_cache.datasets import PairRecord

        rng = np.random.default_rng([self.args.seed, seed, n_images])
        images = self.ids[:n_images]
        by_cat: dict[str, list[str]] = {}
        for image_id in images:
            by_cat.setdefault(self.category[image_id], []).append(image_id)
        cats = sorted(by_cat)
        weights = np.array([len(by_cat[c]) for c in cats], dtype=float)
        weights /= weights.sum()
        lo, hi = self.args.kps
        out = []
        for n in range(n_pairs):
            cat = cats[rng.choice(len(cats), p=weights)]
            src, trg = rng.choice(by_cat[cat], size=2, replace=False)
            k = int(rng.integers(lo, hi + 1))
            kps = []
            for image_id in (src, trg):
                x1, y1, x2, y2 = self.boxes[image_id]
                kps.append(np.round(rng.uniform([x1, y1], [x2, y2], size=(k, 2)), 1))
            out.append(PairRecord(
                name=f"{n}-{src.split('/')[1]}-{trg.split('/')[1]}:{cat}", category=cat, src=src, trg=trg,
                src_kps=kps[0], trg_kps=kps[1], src_bbox=self.boxes[src], trg_bbox=self.boxes[trg],
                src_size=self.sizes[src], trg_size=self.sizes[trg],
            ))
        return out

    def provider(self, pairs):
        """What `dhf-cache eval --checkpoint` scores with once every descriptor is stored: the
        same provider `_checkpoint_descriptors` returns (an LRU over `DescriptorStore.read`, sized
        as it sizes it)."""
        import numpy as np

        from dhf_cache.correspondence.descriptors import LRUDescriptors

        needed = {i for p in pairs for i in (p.src, p.trg)}
        done = self.store.done_mask()
        if not all(done[self.index[i]] for i in needed):
            raise SystemExit("the synthetic store lacks descriptors")
        capacity = max(64, (2 << 30) // (4 * int(np.prod(self.store.shape))))
        return LRUDescriptors(lambda image_id: self.store.read(self.index[image_id]), capacity=capacity)


def _stored_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------ the library path
ALPHAS = (0.05, 0.1, 0.15)  # dhf-cache eval's default


def run_library(syn: Synthetic, pairs, workers: int | None = None) -> dict:
    """One eval-like run: fresh provider (nothing read yet), score_pairs, PCK summary."""
    from dhf_cache.correspondence.scoring import score_pairs

    start = time.perf_counter()
    provider = syn.provider(pairs)
    acc, preds = score_pairs(pairs, provider, syn.args.load_size, ALPHAS, workers=workers)
    summary = acc.summary()
    seconds = time.perf_counter() - start
    # what eval adds since issue 16: the convention matrix and the bootstrapped headline with
    # its breakdowns, from the same predictions (timed apart, so the ratio to the headline is plain)
    from dhf_cache.correspondence.conventions import PairTable, convention_matrix, headline_tables

    t0 = time.perf_counter()
    table = PairTable(acc.pairs)
    convention_matrix(table, ALPHAS)
    t1 = time.perf_counter()
    headline_tables(table, "bbox", "<=", 0.1, ("per_point",))
    t2 = time.perf_counter()
    return {"seconds": seconds, "matrix_seconds": t1 - t0, "bootstrap_seconds": t2 - t1,
            "pairs": len(pairs), "images": len({i for p in pairs for i in (p.src, p.trg)}),
            "targets": len({p.trg for p in pairs}), "descriptor_reads": provider.computed,
            "keypoints": int(sum(len(p.src_kps) for p in pairs)),
            "pck_bbox_0.1": summary["bbox@0.1"]["per_point"], "predictions": preds}


def _row(r: dict) -> str:
    return (f"{r['pairs']:>7,} pairs {r['images']:>5} images {r['targets']:>5} targets "
            f"{r['descriptor_reads']:>6} reads  {r['seconds']:8.2f} s  {r['seconds'] / r['pairs'] * 1000:7.2f} ms/pair")


# ------------------------------------------------------------------------------------ breakdown
class _TimedF:
    """Stands in for `torch.nn.functional` inside dhf_cache.correspondence.scoring: times `interpolate` calls
    made on similarity maps (one channel), delegates everything else."""

    def __init__(self, timers: Timers):
        self._timers = timers

    def interpolate(self, x, *a, **k):
        name = "upsample similarity maps to load size" if x.dim() == 4 and x.shape[1] == 1 and x.shape[-1] > 1 else "interpolate (other)"
        with self._timers.time(name):
            return F.interpolate(x, *a, **k)

    def __getattr__(self, name):
        return getattr(F, name)


def run_breakdown(syn: Synthetic, pairs) -> dict:
    """The library path with timers around each piece (same code, wrapped in this process only),
    with one scoring worker so that the pieces add up to the wall time.

    `score_pairs` (dhf_cache/correspondence/scoring.py) per target: prepare_target, then for each pair the
    source rows (`source_px`, `lookup`, normalise), then one `_match_rows` over all of the
    target's keypoints (s.T matmul per pair, upsample, x inv_norm, `peaks`), then mapping back
    and the PCK bookkeeping."""
    import dhf_cache.correspondence.scoring as scoring
    from dhf_cache.cache.descriptor_store import DescriptorStore
    from dhf_cache.correspondence.pck import PCKAccumulator

    timers = Timers()
    original_peaks = scoring.peaks

    def timed_peaks(sim, refine, load_size):
        with timers.time("argmax (peaks)"):
            return original_peaks(sim, refine, load_size)

    base_matmul, base_mul_ = torch._C.TensorBase.__matmul__, torch._C.TensorBase.mul_
    load = syn.args.load_size

    def timed_matmul(a, b):  # the only `@` on the library path is s @ T in _match_rows
        with timers.time("s.T matmul (K x P x h*w)"):
            return base_matmul(a, b)

    def timed_mul_(a, b):  # only the (K, load, load) product: up(s.T) x inv_norm
        if a.dim() == 3 and a.shape[-2:] == (load, load):
            with timers.time("x inv_norm at load size"):
                return base_mul_(a, b)
        return base_mul_(a, b)

    with Patches() as patches:
        patches.set(DescriptorStore, "read", timers.wrap("descriptor reads (DescriptorStore.read)", DescriptorStore.read))
        patches.set(scoring, "prepare_target", timers.wrap("prepare_target (norm map, once per target)", scoring.prepare_target))
        patches.set(scoring, "_source_rows", timers.wrap("source rows (all)", scoring._source_rows))
        patches.set(scoring, "lookup", timers.wrap("source descriptor lookup (lookup)", scoring.lookup))
        patches.set(scoring, "source_px", timers.wrap("keypoints to load pixels", scoring.source_px))
        patches.set(scoring, "_match_rows", timers.wrap("match rows (all)", scoring._match_rows))
        patches.set(scoring, "peaks", timed_peaks)
        patches.set(scoring, "to_original", timers.wrap("map back to original pixels", scoring.to_original))
        patches.set(scoring, "F", _TimedF(timers))
        patches.set(torch.Tensor, "__matmul__", timed_matmul)
        patches.set(torch.Tensor, "mul_", timed_mul_)
        patches.set(PCKAccumulator, "add_record", timers.wrap("PCK bookkeeping (add_record)", PCKAccumulator.add_record))
        patches.set(PCKAccumulator, "summary", timers.wrap("PCK summary", PCKAccumulator.summary))
        result = run_library(syn, pairs, workers=1)
    s = timers.seconds
    in_match = ("s.T matmul (K x P x h*w)", "upsample similarity maps to load size", "x inv_norm at load size",
                "argmax (peaks)")
    pieces = {
        "descriptor reads (DescriptorStore.read)": s["descriptor reads (DescriptorStore.read)"],
        "prepare_target (norm map, once per target)": s["prepare_target (norm map, once per target)"],
        "keypoints to load pixels": s["keypoints to load pixels"],
        "source descriptor lookup (lookup)": s["source descriptor lookup (lookup)"],
        "source rows: normalise, checks": s["source rows (all)"] - s["source descriptor lookup (lookup)"],
        **{k: s[k] for k in in_match},
        "rest of _match_rows (cat, chunking)": s["match rows (all)"] - sum(s[k] for k in in_match),
        "map back to original pixels": s["map back to original pixels"],
        "PCK bookkeeping (add_record)": s["PCK bookkeeping (add_record)"],
        "PCK summary": s["PCK summary"],
    }
    accounted = sum(pieces.values())
    pieces["other (sorting, LRU, provider setup, Python)"] = result["seconds"] - accounted
    parallel = run_library(syn, pairs)  # the default workers, uninstrumented
    return {"seconds": result["seconds"], "pairs": len(pairs), "targets": result["targets"],
            "descriptor_reads": result["descriptor_reads"], "pieces": pieces,
            "calls": {k: timers.calls[k] for k in timers.calls},
            "default_workers_seconds": parallel["seconds"],
            "default_workers_agreement": agreement(result["predictions"], parallel["predictions"])}


def print_breakdown(report: dict) -> None:
    wall = report["seconds"]
    print(f"breakdown of one instrumented run with one scoring worker ({report['pairs']:,} pairs, "
          f"{report['targets']} targets, {report['descriptor_reads']} descriptor reads, {wall:.2f} s):")
    for key, value in report["pieces"].items():
        print(f"    {key:<50} {value:8.3f} s  {value / wall:6.1%}  {value / report['pairs'] * 1000:7.3f} ms/pair")
    workers, threads = _scoring_workers()
    print(f"the same pairs uninstrumented with the default {workers} scoring workers x {threads} torch threads: "
          f"{report['default_workers_seconds']:.2f} s; same prediction as the one-worker run for "
          f"{report['default_workers_agreement']:.2%} of keypoints")


# ------------------------------------------------------------------------------------ naive
def agreement(a: list, b: list) -> float:
    """Fraction of keypoints predicted at exactly the same place."""
    same = total = 0
    for x, y in zip(a, b):
        same += int(np.all(np.isclose(x, y, equal_nan=True), axis=1).sum())
        total += len(x)
    return same / max(total, 1)


def run_naive(syn: Synthetic, pairs) -> dict:
    """The per-pair protocol: both descriptors read per pair (nothing kept), both maps upsampled
    in full to the load size, `match_points_reference`."""
    from dhf_cache.correspondence.matching import match_points_reference

    preds = []
    start = time.perf_counter()
    for pair in pairs:
        src = syn.store.read(syn.index[pair.src])
        trg = syn.store.read(syn.index[pair.trg])
        preds.append(match_points_reference(src, trg, pair.src_kps, pair.src_size, pair.trg_size, syn.args.load_size))
    return {"seconds": time.perf_counter() - start, "pairs": len(pairs), "predictions": preds}


# ------------------------------------------------------------------------------------ main
def _scoring_workers() -> tuple[int, int]:
    from dhf_cache.correspondence.scoring import scoring_workers

    return scoring_workers()


def fit_linear(rows: list[dict]) -> dict | None:
    """seconds ~ a * images + b * pairs (least squares over every library run)."""
    if len(rows) < 3:
        return None
    x = np.array([[r["images"], r["pairs"]] for r in rows], dtype=float)
    y = np.array([r["seconds"] for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"seconds_per_image": float(coef[0]), "seconds_per_pair": float(coef[1])}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    print(describe_machine(info))
    results: dict = {}
    with work_folder(args.workdir, "dhf-bench-eval-") as work:
        t0 = time.perf_counter()
        syn = Synthetic(args, work)
        setup_s = time.perf_counter() - t0
        config = {"images": args.images, "categories": args.categories, "descriptor": [args.dim, args.grid, args.grid],
                  "dtype": "float16", "load_size": args.load_size, "keypoints_per_pair": list(args.kps),
                  "alphas": list(ALPHAS), "lru_capacity": 64, "torch_threads": torch.get_num_threads(),
                  "scoring_workers": list(_scoring_workers()),
                  "quick": args.quick}
        print(f"config: {args.images} images in {args.categories} categories, descriptors {args.dim}x{args.grid}x{args.grid} "
              f"fp16 ({syn.stored_bytes_per_image / 2**20:.2f} MiB stored per image), load size {args.load_size}, "
              f"{args.kps[0]}-{args.kps[1]} keypoints per pair, {config['scoring_workers'][0]} scoring workers x "
              f"{config['scoring_workers'][1]} torch threads; setup {setup_s:.1f} s "
              f"(descriptor writes {syn.write_seconds:.1f} s)")
        results["setup_seconds"] = setup_s
        results["stored_bytes_per_image"] = syn.stored_bytes_per_image

        # warm-up: the first reads and allocations
        run_library(syn, syn.pairs(20, args.images, seed=99))
        strip = lambda r: {k: v for k, v in r.items() if k != "predictions"}  # noqa: E731

        print(f"series I: {args.series_pairs:,} pairs, growing images (library path: _checkpoint_descriptors + "
              "score_pairs + PCK summary, fresh provider each run)")
        series_i = []
        for n_img in args.image_counts:
            r = run_library(syn, syn.pairs(args.series_pairs, n_img, seed=2))
            print("  " + _row(r), flush=True)
            series_i.append(r)
        print(f"series P: {args.images} images, growing pairs")
        series_p = []
        full = None
        for n in args.pairs:
            pairs = syn.pairs(n, args.images, seed=1)
            r = run_library(syn, pairs)
            print("  " + _row(r), flush=True)
            series_p.append(r)
            if n == SPAIR_TEST_PAIRS:
                full = r
            print(f"    + convention matrix {r['matrix_seconds']:.2f} s, bootstrapped headline with breakdowns "
                  f"{r['bootstrap_seconds']:.2f} s: whole / headline-only "
                  f"{(r['seconds'] + r['matrix_seconds'] + r['bootstrap_seconds']) / r['seconds']:.3f}", flush=True)
        fit = fit_linear(series_i + series_p)
        if fit:
            print(f"  least squares over the library runs: seconds ~ {fit['seconds_per_image'] * 1000:.1f} ms x images "
                  f"+ {fit['seconds_per_pair'] * 1000:.2f} ms x pairs")
        results["series_images"] = [strip(r) for r in series_i]
        results["series_pairs"] = [strip(r) for r in series_p]
        results["fit"] = fit

        if args.breakdown_pairs:
            report = run_breakdown(syn, syn.pairs(args.breakdown_pairs, args.images, seed=1))
            print_breakdown(report)
            results["breakdown"] = report

        if args.naive_pairs:
            pairs = syn.pairs(args.naive_pairs, args.images, seed=4)
            naive = run_naive(syn, pairs)
            lib = run_library(syn, pairs)
            agree = agreement(naive["predictions"], lib["predictions"])
            per_pair = naive["seconds"] / naive["pairs"]
            if full is not None:
                lib_per_pair, basis = full["seconds"] / full["pairs"], f"its {SPAIR_TEST_PAIRS:,}-pair run"
            elif fit:
                lib_per_pair = (fit["seconds_per_image"] * args.images + fit["seconds_per_pair"] * SPAIR_TEST_PAIRS) / SPAIR_TEST_PAIRS
                basis = f"the fit at {SPAIR_TEST_PAIRS:,} pairs"
            else:
                biggest = max(series_p, key=lambda r: r["pairs"])
                lib_per_pair, basis = biggest["seconds"] / biggest["pairs"], f"its {biggest['pairs']:,}-pair run"
            print(f"naive per-pair protocol (both descriptors read and both maps upsampled to {args.load_size} per pair, "
                  f"match_points_reference), {naive['pairs']} pairs: {per_pair * 1000:.0f} ms/pair, "
                  f"{per_pair * SPAIR_TEST_PAIRS / 60:.0f} min for {SPAIR_TEST_PAIRS:,} pairs; the library "
                  f"{lib_per_pair * 1000:.1f} ms/pair ({basis}) is {per_pair / lib_per_pair:.0f}x faster; same "
                  f"prediction for {agree:.2%} of keypoints")
            results["naive"] = {"pairs": naive["pairs"], "seconds_per_pair": per_pair,
                                "projected_seconds_12234": per_pair * SPAIR_TEST_PAIRS,
                                "library_seconds_per_pair": lib_per_pair, "speedup": per_pair / lib_per_pair,
                                "agreement_with_library": agree}

        results["peak_rss_mb"] = peak_rss_mb()
        print(f"peak RSS: {results['peak_rss_mb']:.0f} MiB")
        if full is not None:
            seconds, how = full["seconds"], "measured"
        elif fit:
            seconds = fit["seconds_per_image"] * args.images + fit["seconds_per_pair"] * SPAIR_TEST_PAIRS
            how = "projected with the least-squares fit"
        else:
            biggest = max(series_p, key=lambda r: r["pairs"])
            seconds, how = biggest["seconds"] / biggest["pairs"] * SPAIR_TEST_PAIRS, \
                f"projected from {biggest['pairs']:,} pairs"
        results["seconds_12234"] = seconds
        results["seconds_12234_how"] = how
        if args.json_out:
            write_json(args.json_out, {"machine": info, "config": config, "results": results})
            print(f"figures written to {args.json_out}")
        print(f"PCK of {SPAIR_TEST_PAIRS:,} pairs over {args.images} images at load {args.load_size}: {seconds:.1f} s "
              f"({how}; target < {TARGET_SECONDS:.0f} s)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
