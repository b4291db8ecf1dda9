"""Stage two's training step from the cache against the reference approach, side by side.

    cache      the real training step as `run_train` does it: both images' cached maps read by
               `FeatureReader` through a `Prefetcher` (run_train's `load`, depth 4, 2 threads),
               then `pipelines.train._train_step` (network forward on both images, the symmetric
               cross-entropy, AdamW step)
    reference  the same step with both images' features computed by the inversion in the step,
               as the reference code does: `FeatureExtractor.extract` on the two preprocessed
               images batched together (VAE encode, 50 UNet calls with the layer hooks), then
               the same `_train_step` on the same network and optimizer

Same pairs (the same `PairSchedule` steps), same network, same thread count; measured
interleaved (ABBA blocks, after a warm-up of each) for several network sizes, because on a CPU
the aggregation network's own cost dominates at the paper's size (P=384, 64x64, GroupNorm 32).
Image decoding and preprocessing are left out of the reference step (they favour it).

Then:
- loader share: `run_train` itself, in a child process (so its peak RSS is the training
  process's own), for N steps at the default size: `Prefetcher.wait_seconds / loop seconds`, and
  the step time with the real loader against the same run with every image's features preloaded
  in memory (`FeatureReader` swapped for a dict), and with the real loader reading every chunk
  through zarr (`DHF_CACHE_DIRECT_READS=0`, what it did before direct_chunks.py), interleaved;
- a projection to SD 1.5: one SD 1.5-config UNet call (random weights, 64x64 latent, batch 2),
  one network step at the paper's size on SD 1.5's layer table (random fp16 features of the
  right shapes, 11 timesteps), and the read of two SD 1.5-sized images (2 x 157 MB) from a Zarr
  cache: reference ~ 50 calls at batch 2 + network step, cache ~ read + network step.

The last line is the reference/cache ratio at the default size (P=32, 16x16 grid, GroupNorm 8:
the fastest step, so both the most favourable ratio and the hardest case for the loader).

    python bench/train_speed.py                      # sizes p64, p32 + SD 1.5 projection (~4-5 min)
    python bench/train_speed.py --sizes paper,p64,p32  # adds the paper's size (+~2.5 min on 2 cores)
    python bench/train_speed.py --quick              # p32 only, no SD 1.5 projection (~1.5 min)

Whole processes (`--whole-process`): `dhf-cache train` as a user runs it against a plain torch
loop around the same network and loss on features preloaded in memory (bench/plain_train.py),
each its own process in the environment this benchmark was started with, ABBA, quiet and beside
one busy single-threaded process; the figure compared is the mean step time (dhf-cache's
`loop_seconds` / steps: loader, metrics and the final checkpoint included), whole-process times
are printed beside it. Default: 60 steps at P=64, 32x32, GroupNorm 16; last line

    dhf-cache train step / plain loop step = 1.00 quiet, 0.60 loaded (target <= 1.10)

Everything is made offline in a temporary folder (tiny model, sample images, a cache built with
`run_build` at 64 px, 50 steps, METHOD.md's 11 saved steps); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: E402, F401  (first: it records the environment the benchmark was started with)
from dhf_cache.openmp import settle_wait_policy  # noqa: E402

settle_wait_policy(print)  # before torch loads, as the CLI's compute commands do (dhf_cache/openmp.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import (Patches, describe_machine, interleaved_processes, machine_info, median, peak_rss_mb,  # noqa: E402
                     ratios_by_load, user_environment, work_folder, write_json)

TARGET_RATIO = 20.0
TARGET_LOADER_SHARE = 0.10
SIZES = {  # name: (projection_dim P, output grid, GroupNorm groups)
    "paper": (384, 64, 32),
    "p64": (64, 32, 16),
    "p32": (32, 16, 8),
}
DEFAULT_SIZE = "p32"
# SD 1.5's up_blocks resnets at 512 px (METHOD.md): 3 x each
SD15_LAYERS = [(1280, 8)] * 3 + [(1280, 16)] * 3 + [(640, 32)] * 3 + [(320, 64)] * 3
SD15_STEPS_PER_IMAGE = 50


def parse_size(text: str) -> tuple[str, tuple[int, int, int]]:
    if text in SIZES:
        return text, SIZES[text]
    try:
        p, s, g = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: a name ({', '.join(SIZES)}) or P/GRID/GROUPS, e.g. 64/32/16") from None
    return f"p{p}-{s}-g{g}", (p, s, g)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help="comma-separated network sizes: paper (384/64/32), p64 (64/32/16), p32 (32/16/8) "
                   "or P/GRID/GROUPS (default p64,p32; --quick: p32)")
    p.add_argument("--default-size", default=DEFAULT_SIZE, help=f"size of the last line and the loader run (default {DEFAULT_SIZE})")
    p.add_argument("--repeats", type=int, help="interleaved A/B repetitions per size (default 3; paper size: 1)")
    p.add_argument("--loader-steps", type=int, help="run_train steps per loader-share run (default 24, --quick 16)")
    p.add_argument("--loader-repeats", type=int, default=2,
                   help="real/preloaded/zarr-reads run_train runs each, ABC CBA (default 2)")
    p.add_argument("--no-sd15", action="store_true", help="skip the SD 1.5 projection (~2 min, ~10 GB of memory)")
    p.add_argument("--views", type=int, default=2, help="training views per sample photo (default 2: 10 images, 10 pairs)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help="p32 only, fewer steps, no SD 1.5 projection (~1.5 min)")
    p.add_argument("--workdir", help="keep the model, data and cache here (default: a temporary folder, removed)")
    p.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--whole-process", action="store_true",
                   help="dhf-cache train vs a plain torch loop (bench/plain_train.py), whole processes, quiet and loaded")
    p.add_argument("--process-steps", type=int, default=60, help="--whole-process: training steps per run (default 60)")
    p.add_argument("--loads", default="0,1",
                   help="--whole-process: busy single-threaded processes beside the runs, one figure each (default 0,1)")
    p.add_argument("--child-loader", help=argparse.SUPPRESS)  # internal: the loader-share child process
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = DEFAULT_SIZE if args.quick else "p64,p32"
    args.sizes = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
    args.default_size = parse_size(args.default_size)
    if args.loader_steps is None:
        args.loader_steps = 16 if args.quick else 24
    if args.quick:
        args.no_sd15 = True
    if args.views < 2:
        p.error("--views must be at least 2 (pairs need two views of a photo)")
    args.loads = [int(v) for v in args.loads.split(",") if v.strip()]
    return args


def quiet(_msg: str) -> None:
    pass


# ------------------------------------------------------------------------------------ setup
def prepare(args, work: Path):
    """Tiny model, sample data (training views only) and a cache built with `run_build`."""
    from dhf_cache.config import BuildOptions, Preprocessing
    from dhf_cache.datasets.spair import SPairDataset
    from dhf_cache.pipelines.build import BuildRequest, run_build
    from dhf_cache.datasets.sample_data import write_sample_data
    from dhf_cache.sources.sd.tiny_model import write_tiny_model

    model_dir, data, cache_url = work / "tiny-model", work / "data", work / "cache"
    timings = {}
    start = time.perf_counter()
    if not (model_dir / "unet" / "config.json").is_file():
        write_tiny_model(model_dir, seed=args.seed)
    if not (data / "PairAnnotation").is_dir():
        write_sample_data(data, seed=args.seed, split_views={"trn": args.views})
    timings["model_and_data"] = time.perf_counter() - start
    dataset = SPairDataset(data, f"spair:{data}")
    request = BuildRequest(dataset=dataset, cache_url=str(cache_url), model=str(model_dir), split="trn", steps=50,
                           preprocessing=Preprocessing(load_size=64, image_size=64))
    start = time.perf_counter()
    result = run_build(request, BuildOptions(batch_size=4, device="cpu", progress=False), log=quiet)
    if not result.ok:
        raise SystemExit(f"building the cache failed: {result.failures}")
    timings["build"] = time.perf_counter() - start
    return dataset, request, str(cache_url), timings


class Setting:
    """What both variants share: pairs, schedule, cache reader, preprocessed pixels, extractor."""

    def __init__(self, args, dataset, request, cache_url: str):
        from dhf_cache.cache.feature_cache import FeatureCache
        from dhf_cache.cache.feature_loader import FeatureReader, select_features
        from dhf_cache.datasets.images import load_image, preprocess
        from dhf_cache.pipelines.build import load_extractor
        from dhf_cache.pipelines.train import PairSchedule, usable_pairs

        self.args = args
        self.cache = FeatureCache.open(cache_url)
        self.selection = select_features(self.cache)
        self.reader = FeatureReader(self.cache, self.selection)
        self.index = self.cache.index_of()
        self.pairs, _ = usable_pairs(dataset.pairs("trn"), self.index, self.cache.done_mask(), False, "training", "")
        self.schedule = PairSchedule(len(self.pairs), 1, args.seed)
        # the reference's inputs: each image preprocessed once, up front (decode left out of its step)
        pre = self.cache.spec.preprocessing
        paths = {r.id: r.path for r in dataset.images("trn")}
        self.pixels = {i: preprocess(load_image(paths[i]), pre.load_size, pre.image_size) for i in paths}
        self.extractor, _ = load_extractor(request, "cpu", quiet)  # same model, steps, saved steps, layers
        self.device = torch.device("cpu")
        self.n_calls = max(self.extractor.save_positions) + 1

    def examples(self, step: int, grid: int):
        from dhf_cache.aggregator.losses import grid_keypoints
        from dhf_cache.pipelines.train import _Example

        out = []
        for i in self.schedule(step):
            p = self.pairs[i]
            out.append(_Example(p, grid_keypoints(p.src_kps, p.src_size, grid), grid_keypoints(p.trg_kps, p.trg_size, grid)))
        return out

    def network(self, size: tuple[int, int, int]):
        from dhf_cache.aggregator.network import AggregationNetwork

        p, s, g = size
        torch.manual_seed(self.args.seed)
        net = AggregationNetwork(self.selection.layers, len(self.selection.positions), p, s, g).to(self.device)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)

    # ---------------------------------------------------------------- the two steps
    def cache_block(self, net, opt, steps: list[int], grid: int) -> dict:
        """`len(steps)` real training steps, features through FeatureReader + Prefetcher as
        run_train's loop (a fresh Prefetcher, started inside the timed region)."""
        from dhf_cache.cache.feature_loader import Prefetcher
        from dhf_cache.pipelines.train import StepInputs, _train_step

        reader, index = self.reader, self.index
        staging = StepInputs(self.device)  # as run_train

        def load(step: int):
            batch = self.examples(step, grid)
            feats = [(reader.read(index[e.pair.src]), reader.read(index[e.pair.trg])) for e in batch]
            return step, batch, feats

        net.train()
        start = time.perf_counter()
        prefetcher = Prefetcher(load, steps, 4, 2)
        losses = [_train_step(net, opt, batch, feats, self.device, staging) for _, batch, feats in prefetcher]
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "per_step": seconds / len(steps), "wait": prefetcher.wait_seconds,
                "loss": float(np.mean(losses))}

    def reference_block(self, net, opt, steps: list[int], grid: int) -> dict:
        """The same steps with both images' features from the inversion, batched together."""
        from dhf_cache.pipelines.train import StepInputs, _train_step

        net.train()
        staging = StepInputs(self.device)  # the same step as the cache's
        extract_s = 0.0
        losses = []
        start = time.perf_counter()
        for step in steps:
            batch = self.examples(step, grid)
            feats = []
            for e in batch:
                t0 = time.perf_counter()
                ids = [e.pair.src, e.pair.trg]
                results = self.extractor.extract(torch.stack([self.pixels[i] for i in ids]), ids)
                extract_s += time.perf_counter() - t0
                feats.append(tuple({name: torch.from_numpy(r.features[name]) for name in self.selection.layer_names}
                                   for r in results))
            losses.append(_train_step(net, opt, batch, feats, self.device, staging))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "per_step": seconds / len(steps), "extract": extract_s,
                "loss": float(np.mean(losses))}


def measure_size(st: Setting, name: str, size: tuple[int, int, int], repeats: int, warmup: bool) -> dict:
    p, grid, g = size
    net, opt = st.network(size)
    n_params = sum(x.numel() for x in net.parameters())
    block_c = 1
    if warmup:  # one step of each, unmeasured; its cache step sets the cache block length
        w = st.cache_block(net, opt, [1], grid)
        st.reference_block(net, opt, [1], grid)
        block_c = max(2, min(8, math.ceil(1.5 / max(w["per_step"], 1e-3))))
    cache_runs, ref_runs, ratios = [], [], []
    for rep in range(repeats):
        steps = list(range(2 + rep * block_c, 2 + (rep + 1) * block_c))  # the reference runs the first of them
        order = ("cache", "reference") if rep % 2 == 0 else ("reference", "cache")
        got = {}
        for variant in order:
            if variant == "cache":
                got[variant] = st.cache_block(net, opt, steps, grid)
            else:
                got[variant] = st.reference_block(net, opt, steps[:1], grid)
        cache_runs.append(got["cache"])
        ref_runs.append(got["reference"])
        ratios.append(got["reference"]["per_step"] / got["cache"]["per_step"])
        print(f"    rep {rep + 1}: cache {got['cache']['per_step']:.3f} s/step ({block_c} steps), reference "
              f"{got['reference']['per_step']:.3f} s/step (inversion {got['reference']['extract']:.3f} s), "
              f"ratio {ratios[-1]:.2f}", flush=True)
    cache_s = median([r["per_step"] for r in cache_runs])
    ref_s = median([r["per_step"] for r in ref_runs])
    extract_s = median([r["extract"] for r in ref_runs])
    wait_share = sum(r["wait"] for r in cache_runs) / sum(r["seconds"] for r in cache_runs)
    return {
        "name": name, "projection_dim": p, "grid": grid, "groups": g, "parameters": n_params,
        "cache_block_steps": block_c, "repeats": repeats, "warmup": warmup,
        "cache_seconds_per_step": cache_s, "reference_seconds_per_step": ref_s,
        "reference_inversion_seconds": extract_s, "network_step_seconds_est": ref_s - extract_s,
        "ratio_median_of_pairs": median(ratios), "ratio_of_medians": ref_s / cache_s, "ratios": ratios,
        "cache_block_wait_share": wait_share,
        "cache_runs": cache_runs, "reference_runs": ref_runs, "peak_rss_mb_after": peak_rss_mb(),
    }


# ------------------------------------------------------------------------------------ loader share (child)
VARIANTS = ["real", "preloaded", "zarr reads"]


def loader_share_child(spec_path: str) -> int:
    """Runs in a fresh process: run_train with the real loader, with preloaded features and with
    zarr-only reads, interleaved (ABC CBA ...)."""
    import dhf_cache.cache.feature_cache as cache_mod
    import dhf_cache.pipelines.train as train_mod
    from dhf_cache.config import TrainOptions
    from dhf_cache.cache.feature_loader import FeatureReader, Prefetcher

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    p, s, g = spec["size"]
    options = TrainOptions(steps=spec["steps"], val_split=None, projection_dim=p, output_size=s, norm_groups=g,
                           val_every=spec["steps"], seed=spec["seed"])
    loops: list[tuple[float, float]] = []

    class TimedPrefetcher(Prefetcher):  # records when run_train's loop starts and ends
        def __iter__(self):
            start = time.perf_counter()
            yield from super().__iter__()
            loops.append((start, time.perf_counter()))

    preloaded: dict[int, dict] = {}

    class PreloadedReader(FeatureReader):  # the same tensors, already in memory
        def read(self, index: int):
            if index not in preloaded:
                preloaded[index] = super().read(index)
            return preloaded[index]

    step_s: list[float] = []
    real_step = train_mod._train_step

    def timed_step(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_step(*a, **k)
        finally:
            step_s.append(time.perf_counter() - t0)

    runs = []
    order = []
    for rep in range(spec["repeats"]):
        order += VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
    for k, variant in enumerate(order):
        if variant == "preloaded" and not preloaded:  # fill the memory copy outside any timed run
            reader = PreloadedReader(*_reader_args(spec["cache"]))
            for i in range(len(reader.cache.image_ids)):
                reader.read(i)
        out = Path(spec["work"]) / f"run-{k}-{variant}"
        request = train_mod.TrainRequest(cache_url=spec["cache"], dataset=spec["dataset"], out=out, options=options,
                                         device="cpu", progress=False)
        step_s.clear()
        with Patches() as patches:
            patches.set(train_mod, "Prefetcher", TimedPrefetcher)
            patches.set(train_mod, "_train_step", timed_step)
            if variant == "preloaded":
                patches.set(train_mod, "FeatureReader", PreloadedReader)
            if variant == "zarr reads":
                patches.set(cache_mod, "DIRECT_READS", False)
            result = train_mod.run_train(request, log=quiet)
        start, end = loops[-1]
        loop_s = end - start
        runs.append({"variant": variant, "steps": result.end_step - result.start_step, "loop_seconds": loop_s,
                     "wait_seconds": result.loader_wait_seconds, "train_step_seconds": sum(step_s),
                     "per_step": loop_s / max(1, result.end_step - result.start_step),
                     "wait_share": result.loader_wait_seconds / loop_s, "peak_rss_mb": result.peak_rss_mb,
                     "total_seconds": result.seconds, "final_loss": result.final_loss})
    Path(spec["out"]).write_text(json.dumps(runs, indent=2))
    return 0


def _reader_args(cache_url: str):
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.cache.feature_loader import select_features

    cache = FeatureCache.open(cache_url)
    return cache, select_features(cache)


def measure_loader(args, work: Path, cache_url: str, dataset_spec: str) -> dict:
    name, size = args.default_size
    spec = {"size": list(size), "steps": args.loader_steps, "repeats": args.loader_repeats, "seed": args.seed,
            "cache": cache_url, "dataset": dataset_spec, "work": str(work / "loader-runs"),
            "out": str(work / "loader-share.json"), "threads": args.threads}
    spec_path = work / "loader-spec.json"
    spec_path.write_text(json.dumps(spec))
    start = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-loader", str(spec_path)], check=True)
    wall = time.perf_counter() - start
    runs = json.loads(Path(spec["out"]).read_text())
    real = [r for r in runs if r["variant"] == "real"]
    pre = [r for r in runs if r["variant"] == "preloaded"]
    via_zarr = [r for r in runs if r["variant"] == "zarr reads"]
    real_step, pre_step = median([r["per_step"] for r in real]), median([r["per_step"] for r in pre])
    zarr_step = median([r["per_step"] for r in via_zarr])
    return {
        "size": name, "steps_per_run": args.loader_steps, "runs": runs, "child_wall_seconds": wall,
        "wait_share_real": median([r["wait_share"] for r in real]),
        "wait_share_real_max": max(r["wait_share"] for r in real),
        "wait_share_preloaded": median([r["wait_share"] for r in pre]),
        "step_seconds_real": real_step, "step_seconds_preloaded": pre_step,
        "real_over_preloaded": real_step / pre_step,
        "step_seconds_zarr_reads": zarr_step, "zarr_reads_over_preloaded": zarr_step / pre_step,
        "wait_share_zarr_reads": median([r["wait_share"] for r in via_zarr]),
        "peak_rss_mb": real[0]["peak_rss_mb"],  # the first real run: before anything was preloaded
    }


# ------------------------------------------------------------------------------------ SD 1.5 projection
def sd15_layers():
    from dhf_cache.cache.layers import LayerInfo

    return [LayerInfo(f"up_blocks.{i // 3}.resnets.{i % 3}", c, s, s) for i, (c, s) in enumerate(SD15_LAYERS)]


def sd15_random_features(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One image's maps on SD 1.5's layer table, 11 steps, random fp16 (what a cache read returns)."""
    return {l.name: torch.randn(11, l.channels, l.height, l.width, generator=gen).to(torch.float16)
            for l in sd15_layers()}


def sd15_read(work: Path, seed: int, repeats: int = 2) -> dict:
    """Two SD 1.5-sized images (random fp16 features, 11 steps) written to a Zarr cache with the
    library's codecs, then read back with FeatureReader (what a training step loads)."""
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.config import BuildSpec, FeatureSpace, ModelIdentity
    from dhf_cache.sources.sd.extract import ExtractedImage
    from dhf_cache.cache.feature_loader import FeatureReader, select_features

    layers = sd15_layers()
    identity = ModelIdentity(unet_class="UNet2DConditionModel", unet_sha256="random-sd15-config",
                             vae_sha256="random", text_encoder_sha256="random")
    spec = BuildSpec(feature_space=FeatureSpace(model=identity, layers=tuple(l.name for l in layers)))
    timesteps = [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]
    url = work / "sd15-cache"
    cache = FeatureCache.prepare(str(url), spec, layers, timesteps, ["a", "b"], latent_shape=(4, 64, 64),
                                 provenance={"bench": "train_speed"})
    gen = torch.Generator().manual_seed(seed)
    raw = 0
    for i in range(2):
        feats = {name: value.numpy() for name, value in sd15_random_features(gen).items()}
        raw = sum(v.nbytes for v in feats.values())
        cache.write_image(i, ExtractedImage(np.zeros((4, 64, 64), np.float32), feats), (512, 512))
        del feats
    cache = FeatureCache.open(str(url))
    reader = FeatureReader(cache, select_features(cache))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = [reader.read(0), reader.read(1)]
        times.append(time.perf_counter() - start)
        del out
    return {"raw_bytes_per_image": raw, "read_seconds_two_images": median(times), "reads": times,
            "stored_bytes": sum(f.stat().st_size for f in url.rglob("*") if f.is_file())}


def sd15_unet_call(seed: int) -> dict:
    from dhf_cache.sources.sd.tiny_model import build_sd15_unet

    start = time.perf_counter()
    unet = build_sd15_unet(seed=seed).eval()
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        unet(torch.randn(1, 4, 16, 16, generator=gen), torch.tensor(-1),
             encoder_hidden_states=torch.randn(1, 77, 768, generator=gen))  # small warm-up (library init)
        x = torch.randn(2, 4, 64, 64, generator=gen)
        emb = torch.randn(2, 77, 768, generator=gen)
        start = time.perf_counter()
        unet(x, torch.tensor(500), encoder_hidden_states=emb)
        call_s = time.perf_counter() - start
    del unet
    gc.collect()
    return {"unet_build_seconds": build_s, "unet_call_seconds_batch2": call_s}


def sd15_network_step(seed: int) -> dict:
    """One training step at the paper's size on SD 1.5's layer table (random fp16 inputs)."""
    from dhf_cache.aggregator.network import AggregationNetwork
    from dhf_cache.pipelines.train import _Example, _train_step

    layers = sd15_layers()
    gen = torch.Generator().manual_seed(seed)
    feats = [tuple(sd15_random_features(gen) for _ in range(2))]
    kps = torch.randint(0, 64, (15, 2), generator=gen)
    batch = [_Example(None, kps, torch.randint(0, 64, (15, 2), generator=gen))]
    torch.manual_seed(seed)
    net = AggregationNetwork(layers, 11, 384, 64, 32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    start = time.perf_counter()
    _train_step(net, opt, batch, feats, torch.device("cpu"))
    step_s = time.perf_counter() - start
    n_params = sum(p.numel() for p in net.parameters())
    del net, opt, feats
    gc.collect()
    return {"network_step_seconds": step_s, "parameters": n_params}


def measure_sd15(args, work: Path) -> dict:
    print("SD 1.5 projection (random weights and features, CPU fp32; each piece measured once):", flush=True)
    read = sd15_read(work, args.seed)
    print(f"  read of 2 images from a Zarr cache (FeatureReader, {read['raw_bytes_per_image'] / 1e6:.1f} MB raw fp16 each): "
          f"{read['read_seconds_two_images']:.2f} s", flush=True)
    unet = sd15_unet_call(args.seed)
    print(f"  one SD 1.5-config UNet call, 64x64 latent, batch 2: {unet['unet_call_seconds_batch2']:.2f} s "
          f"(building the UNet: {unet['unet_build_seconds']:.1f} s, not counted)", flush=True)
    net = sd15_network_step(args.seed)
    print(f"  one network step at P=384, 64x64, GroupNorm 32 on SD 1.5's layers ({net['parameters']:,} parameters), "
          f"11 timesteps: {net['network_step_seconds']:.2f} s", flush=True)
    calls = SD15_STEPS_PER_IMAGE
    ref = calls * unet["unet_call_seconds_batch2"] + net["network_step_seconds"]
    cache = read["read_seconds_two_images"] + net["network_step_seconds"]
    overlapped = max(read["read_seconds_two_images"], net["network_step_seconds"])
    out = {**read, **unet, **net, "unet_calls_batch2": calls, "reference_step_seconds": ref,
           "cache_step_seconds": cache, "cache_step_seconds_overlapped": overlapped, "ratio": ref / cache,
           "ratio_overlapped": ref / overlapped}
    print(f"  reference step ~ {calls} x {unet['unet_call_seconds_batch2']:.2f} s (UNet calls at batch 2) + "
          f"{net['network_step_seconds']:.2f} s (network step) = {ref:.1f} s  [VAE encode and image decode left out]")
    print(f"  cache step     ~ {read['read_seconds_two_images']:.2f} s (read 2 x {read['raw_bytes_per_image'] / 1e6:.0f} MB) + "
          f"{net['network_step_seconds']:.2f} s (network step) = {cache:.1f} s  "
          f"[{overlapped:.1f} s when the prefetcher overlaps the read]")
    print(f"  projected SD 1.5 reference/cache on this CPU: {ref / cache:.1f}x ({ref / overlapped:.1f}x overlapped)")
    return out


# ------------------------------------------------------------------------------------ whole processes
def whole_process(args, work: Path, info: dict) -> int:
    """`dhf-cache train` vs bench/plain_train.py: mean step time, each a whole process, quiet and loaded."""
    dataset, _, cache_url, _ = prepare(args, work)
    name, (p, s, g) = args.sizes[-1] if len(args.sizes) == 1 else ("p64", SIZES["p64"])
    net = ["--projection-dim", str(p), "--output-size", str(s), "--norm-groups", str(g)]
    steps = str(args.process_steps)
    variants = {
        "dhf-cache train": lambda rep: [
            sys.executable, "-m", "dhf_cache.cli.main", "train", "--cache", cache_url, "--dataset", dataset.spec,
            "--out", str(work / f"process-run-{time.monotonic_ns()}"), "--steps", steps, *net, "--val-split", "",
            "--no-progress", "--json"],
        "plain loop": lambda rep: [
            sys.executable, str(Path(__file__).with_name("plain_train.py")), cache_url, str(dataset.root),
            "--steps", steps, *net],
    }

    def step_seconds(variant: str, wall: float, out: dict | None) -> float:
        if variant == "plain loop":
            return out["step_s"]
        return out["loop_seconds"] / out["steps_this_run"]

    env = user_environment()
    repeats = args.repeats or 3
    print(f"whole processes: {args.process_steps} steps at P={p}, {s}x{s}, GroupNorm {g}; {repeats} ABBA repetitions "
          f"per load; environment as given (OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY', 'unset')})", flush=True)
    results = {}
    for load in args.loads:
        got = interleaved_processes(variants, env, repeats, load, step_seconds)
        results[f"load_{load}"] = got
        m, w = got["medians"], got["wall_medians"]
        print(f"  {load} busy process(es): step {m['dhf-cache train'] * 1000:.0f} vs {m['plain loop'] * 1000:.0f} ms "
              f"(ratio {got['ratio']:.2f}); whole processes {w['dhf-cache train']:.1f} vs {w['plain loop']:.1f} s", flush=True)
    if args.json_out:
        write_json(args.json_out, {"machine": info, "config": {"size": [p, s, g], "steps": args.process_steps,
                                                               "repeats": repeats, "loads": args.loads},
                                   "whole_process": results})
        print(f"figures written to {args.json_out}")
    print(f"dhf-cache train step / plain loop step = {ratios_by_load(results, args.loads)} (target <= 1.10)")
    return 0


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_loader:
        return loader_share_child(args.child_loader)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    print(describe_machine(info))
    if args.whole_process:
        with work_folder(args.workdir, "dhf-bench-train-") as work:
            return whole_process(args, work, info)
    with work_folder(args.workdir, "dhf-bench-train-") as work:
        t0 = time.perf_counter()
        dataset, request, cache_url, timings = prepare(args, work)
        st = Setting(args, dataset, request, cache_url)
        setup_s = time.perf_counter() - t0
        layer_desc = ", ".join(sorted({f"{l.channels}ch {l.height}x{l.width}" for l in st.selection.layers}))
        print(f"config: tiny model, {len(st.cache.image_ids)} images at 64 px in a cache built with run_build "
              f"({timings['build']:.1f} s), {st.n_calls} UNet calls per inversion, {len(st.selection.positions)} saved steps "
              f"x {len(st.selection.layers)} layers ({layer_desc}); {len(st.pairs)} training pairs, 1 pair per step; "
              f"torch threads {torch.get_num_threads()} for both variants; setup {setup_s:.1f} s")
        config = {"images": len(st.cache.image_ids), "pairs": len(st.pairs), "unet_calls": st.n_calls,
                  "saved_steps": len(st.selection.positions), "layers": len(st.selection.layers),
                  "torch_threads": torch.get_num_threads(), "sizes": {n: list(s) for n, s in args.sizes},
                  "default_size": args.default_size[0], "setup_seconds": setup_s, "setup": timings,
                  "quick": args.quick}

        rows = []
        for name, size in args.sizes:
            paper = size == SIZES["paper"]
            repeats = args.repeats or (1 if paper else 3)
            print(f"size {name}: P={size[0]}, {size[1]}x{size[1]} grid, GroupNorm {size[2]} "
                  f"({'no warm-up, ' if paper else ''}{repeats} interleaved repetition(s))", flush=True)
            rows.append(measure_size(st, name, size, repeats, warmup=not paper))
        print(f"{'size':<8} {'P':>4} {'grid':>5} {'GN':>3} {'params':>10} {'cache s/step':>13} {'reference s/step':>17} "
              f"{'(inversion)':>12} {'ref/cache':>10} {'loader wait':>12}")
        for r in rows:
            print(f"{r['name']:<8} {r['projection_dim']:>4} {r['grid']:>5} {r['groups']:>3} {r['parameters']:>10,} "
                  f"{r['cache_seconds_per_step']:>13.3f} {r['reference_seconds_per_step']:>17.3f} "
                  f"{r['reference_inversion_seconds']:>12.3f} {r['ratio_median_of_pairs']:>9.1f}x "
                  f"{r['cache_block_wait_share']:>11.1%}")
        print("  (loader wait: the cache blocks' Prefetcher.wait_seconds / block time, including each fresh "
              "prefetcher's first read)")
        results: dict = {"sizes": rows}
        del st.extractor
        gc.collect()

        print(f"loader share: run_train itself in a child process, {args.default_size[0]}, {args.loader_steps} steps a run, "
              f"real loader vs features preloaded in memory vs the loader reading through zarr only, "
              f"{args.loader_repeats} of each (ABC CBA)", flush=True)
        loader = measure_loader(args, work, cache_url, dataset.spec)
        for r in loader["runs"]:
            print(f"    {r['variant']:<10} {r['per_step']:.3f} s/step (loop {r['loop_seconds']:.2f} s, of which "
                  f"_train_step {r['train_step_seconds']:.2f} s, waiting on the loader {r['wait_seconds']:.3f} s = "
                  f"{r['wait_share']:.1%})")
        print(f"  loader wait / loop time (real loader): {loader['wait_share_real']:.1%} median, "
              f"{loader['wait_share_real_max']:.1%} max (target <= {TARGET_LOADER_SHARE:.0%})")
        print(f"  step time real loader / preloaded: {loader['real_over_preloaded']:.3f} "
              f"({loader['step_seconds_real']:.3f} vs {loader['step_seconds_preloaded']:.3f} s; target <= 1.10); "
              f"reading through zarr only: {loader['zarr_reads_over_preloaded']:.3f} "
              f"(loader wait {loader['wait_share_zarr_reads']:.1%})")
        print(f"  peak RSS of the cache-training process (run_train's own figure): {loader['peak_rss_mb']:.0f} MiB")
        results["loader"] = loader

        if not args.no_sd15:
            results["sd15"] = measure_sd15(args, work)

        results["peak_rss_mb_benchmark"] = peak_rss_mb()
        default = next((r for r in rows if (r["projection_dim"], r["grid"], r["groups"]) == args.default_size[1]), None)
        if args.json_out:
            write_json(args.json_out, {"machine": info, "config": config, "results": results})
            print(f"figures written to {args.json_out}")
        if default is None:
            print(f"(default size {args.default_size[0]} not measured; last measured size shown)")
            default = rows[-1]
        p, s, g = default["projection_dim"], default["grid"], default["groups"]
        print(f"reference/cache step time = {default['ratio_median_of_pairs']:.1f}x at P={p}, {s}x{s} grid, GroupNorm {g} "
              f"(tiny model, CPU, {torch.get_num_threads()} threads; target >= {TARGET_RATIO:.0f}x)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
