"""Stage one's overhead over a bare inversion: build time / bare time, and where build time goes.

    build  the real stage-one loop, `pipelines.build.build_images`, into a fresh Zarr cache:
           image decode + preprocess, VAE encode, UNet calls with forward hooks capturing the
           saved steps, fp16 copies, the non-finite check, zstd + crc32c compression and file
           writes on the writer thread, done flags.
    bare   the same VAE encodes and the same UNet calls (same inputs, batch size, number of
           calls, dtype, torch.inference_mode, thread count) with no hooks registered on the
           UNet, nothing captured and nothing written: the honest lower bound.

The two are measured in one process, interleaved (ABBA order, so drift and other processes on
the machine hit both alike) after an unmeasured warm-up of each; medians are reported, and the
last line printed is the ratio (median of the per-repetition ratios), e.g.

    build/bare = 1.04 (target <= 1.10)

Then instrumented runs (timers around every piece; CUDA synchronised per piece, so they are
kept apart from the A/B repetitions) give the breakdown: UNet calls, VAE, hooks, capture
copies, non-finite check, compression and writes on the writer thread, image loading.

    python bench/build_overhead.py                       # tiny model, 8 images at 64 px, 50 steps
    python bench/build_overhead.py --model sd15          # SD 1.5-config UNet, random weights,
                                                         # 1 image at 192 px, 5 steps (~2-3 min CPU)
    python bench/build_overhead.py --model sd15 --device cuda --dtype float16 \
        --image-size 512 --steps 50 --images 8 --batch-size 4 --json out.json

Whole processes (`--whole-process`): `dhf-cache build` as a user runs it, against a plain
diffusers loop written without dhf-cache (bench/plain_build.py: `from_pretrained`, VAE encode,
the same 50 UNet calls, nothing kept), each its own process in the environment this benchmark
was started with, ABBA, quiet and beside one busy single-threaded process. Start-up, imports,
model loading and exit count. Default: 12 photos at 64 px, 50 steps, batch 1; last line

    dhf-cache build / plain loop = 0.80 quiet, 0.40 loaded (target <= 1.10)

    python bench/build_overhead.py --whole-process   # ~6-8 min on 2 cores

Speed levers (issue 18; sources/acceleration.py): `--channels-last`, `--attention KERNEL` and
`--compile MODE` apply to both variants alike (the bare one gets its own compiled copy of the
UNet, without hooks, so neither recompiles when the other runs); `--flops` counts one UNet call's
FLOPs (torch's FlopCounterMode, before the levers) and reports the achieved TFLOP/s of the UNet
calls and their fraction of the card's dense fp16/bf16 peak (PEAK_TFLOPS below, or
$DHF_PEAK_TFLOPS).

Everything is made offline in a temporary folder (tiny model, sample images); nothing is
downloaded. The SD 1.5 configuration builds its models in memory (random weights).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import _common  # noqa: E402, F401  (first: it records the environment the benchmark was started with)
from dhf_cache.openmp import settle_wait_policy  # noqa: E402

settle_wait_policy(print)  # before torch loads, as the CLI's compute commands do (dhf_cache/openmp.py)

import torch  # noqa: E402

from _common import (Patches, Timers, describe_machine, interleaved_processes, machine_info, median,  # noqa: E402
                     peak_rss_mb, ratios_by_load, synchronize, user_environment, work_folder, write_json)

TARGET = 1.10

# The prompt embedding is computed once, so only the width (768, what the UNet cross-attends
# to) matters; one layer keeps construction fast.
SD15_TEXT_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 1024,
    "num_hidden_layers": 1,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}

DEFAULTS = {  # per model: images, image size, steps, batch size, repeats
    "tiny": {"images": 8, "image_size": 64, "steps": 50, "batch_size": 4, "repeats": 5, "breakdown_repeats": 1},
    "sd15": {"images": 1, "image_size": 192, "steps": 5, "batch_size": 1, "repeats": 2, "breakdown_repeats": 1},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(DEFAULTS), default="tiny",
                   help="tiny: the offline tiny pipeline; sd15: SD 1.5-config UNet/VAE with random weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--images", type=int, help="number of images (tiny: 8, sd15: 1)")
    p.add_argument("--image-size", type=int, help="model input size, px (tiny: 64, sd15: 192; 512 is SD's own)")
    p.add_argument("--batch-size", type=int, help="images per batch (tiny: 4, sd15: 1)")
    p.add_argument("--steps", type=int, help="inversion steps = UNet calls per batch (tiny: 50, sd15: 5)")
    p.add_argument("--save-steps", help="comma-separated step indices, clean first "
                   "(default: METHOD.md's 11 for 50 steps, else evenly spaced; sd15: 3)")
    p.add_argument("--repeats", type=int, help="measured A/B repetitions (tiny: 5, sd15: 2)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each variant first (default 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--breakdown-repeats", type=int,
                   help="instrumented bare + build runs for the time breakdown, 0 to skip (default 1)")
    p.add_argument("--workdir", help="keep inputs and caches here (default: a temporary folder, removed)")
    p.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true", help="speed lever: the UNet in channels-last format")
    p.add_argument("--attention", default="auto", help="speed lever: auto, flash, efficient, cudnn or math")
    p.add_argument("--compile", default="off", help="speed lever: off, default, reduce-overhead or max-autotune")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; eager for a quick plumbing check on the CPU)")
    p.add_argument("--flops", action="store_true",
                   help="count a UNet call's FLOPs; report achieved TFLOP/s and the fraction of the device's peak")
    p.add_argument("--whole-process", action="store_true",
                   help="dhf-cache build vs a plain diffusers loop (bench/plain_build.py), whole processes, "
                        "quiet and loaded (tiny model; defaults 12 images, batch 1, 3 repetitions)")
    p.add_argument("--loads", default="0,1",
                   help="--whole-process: busy single-threaded processes beside the runs, one figure each (default 0,1)")
    args = p.parse_args(argv)
    if args.whole_process:
        if args.model != "tiny":
            p.error("--whole-process measures the tiny model (the plain loop loads a pipeline folder)")
        for key, value in {"images": 12, "batch_size": 1, "repeats": 3}.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.loads = [int(v) for v in args.loads.split(",") if v.strip()]
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.images < 1 or args.batch_size < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--images, --batch-size, --steps and --repeats must be >= 1")
    if args.breakdown_repeats < 0 or args.warmup < 0:
        p.error("--breakdown-repeats and --warmup must be >= 0")
    if args.image_size % 8:
        p.error(f"--image-size must be a multiple of 8, got {args.image_size}")
    if args.compile != "off":
        if args.images % args.batch_size:  # the bare variant's batches are not padded
            p.error(f"--compile: --images ({args.images}) must be a multiple of --batch-size ({args.batch_size})")
        args.breakdown_repeats = 0  # the breakdown's timers wrap the hooks, which live inside the compiled graph
    if args.save_steps:
        args.save_steps = tuple(int(s) for s in args.save_steps.split(",") if s.strip())
    elif args.model == "sd15" and args.steps != 50:
        args.save_steps = tuple(sorted({args.steps - 1, (args.steps - 1) // 2, 0}, reverse=True))
    else:
        from dhf_cache.config import default_save_steps

        args.save_steps = default_save_steps(args.steps)
    return args


# ------------------------------------------------------------------------------------ setup
def quiet(_msg: str) -> None:
    pass


def prepare_images(work: Path, n_images: int, seed: int):
    """Sample data in the SPair layout (real photographs, warped); `n_images` records spread
    over the categories."""
    from dhf_cache.datasets.spair import SPairDataset
    from dhf_cache.datasets.sample_data import PHOTOS, write_sample_data

    per_photo = max(6, math.ceil(n_images / len(PHOTOS)))
    views = {"trn": per_photo - 4, "val": 2, "test": 2}
    root = work / "data"
    if not (root / "PairAnnotation").is_dir():
        write_sample_data(root, seed=seed, split_views=views)
    dataset = SPairDataset(root, f"spair:{root}")
    records = dataset.images()
    if len(records) < n_images:
        raise SystemExit(f"--images {n_images}: the sample data holds only {len(records)} images")
    step = len(records) / n_images
    return dataset, [records[int(i * step)] for i in range(n_images)]


def tiny_extractor(args, work: Path, dataset, device: torch.device):
    from dhf_cache.config import Preprocessing
    from dhf_cache.pipelines.build import BuildRequest, load_extractor
    from dhf_cache.sources.sd.tiny_model import write_tiny_model

    model_dir = work / "tiny-model"
    if not (model_dir / "unet" / "config.json").is_file():
        write_tiny_model(model_dir, seed=args.seed)
    request = BuildRequest(
        dataset=dataset, cache_url=str(work / "unused"), model=str(model_dir), steps=args.steps,
        save_steps=args.save_steps, preprocessing=Preprocessing(load_size=args.image_size, image_size=args.image_size),
        dtype=args.dtype,
    )
    extractor, spec = load_extractor(request, str(device), quiet)
    return extractor, spec, request


def sd15_extractor(args, dataset, device: torch.device):
    """SD 1.5-config UNet (860M), SD's VAE config and a one-layer 768-wide CLIP text encoder, all
    random and in memory, assembled into a Backbone as `load_extractor` would."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from dhf_cache.sources.sd.backbone import Backbone

    from dhf_cache.sources.loading import DTYPES, quiet_libraries
    from dhf_cache.sources.sd.capture import resolve_layers
    from dhf_cache.config import ModelIdentity, Preprocessing
    from dhf_cache.sources.sd.extract import FeatureExtractor
    from dhf_cache.pipelines.build import BuildRequest, make_spec
    from dhf_cache.sources.sd.tiny_model import SD15_VAE_CONFIG, build_sd15_unet, build_tokenizer

    quiet_libraries()
    dtype_name = args.dtype if args.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    tokenizer = build_tokenizer()
    unet = build_sd15_unet(seed=args.seed)
    torch.manual_seed(args.seed + 1)
    vae = AutoencoderKL(**SD15_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **SD15_TEXT_CONFIG,
    ))
    # Hashing 860M parameters takes a while and says nothing here: a placeholder identity.
    identity = ModelIdentity(unet_class=type(unet).__name__, unet_sha256="random-sd15-config",
                             vae_sha256="random-sd15-vae-config", text_encoder_sha256="random-768")
    backbone = Backbone(unet.to(dtype), vae.to(dtype), text_encoder.to(dtype), tokenizer,
                        source="sd15-config-random", _identity=identity)
    backbone.to(device)
    request = BuildRequest(
        dataset=dataset, cache_url="unused", model="sd15-config-random", steps=args.steps,
        save_steps=args.save_steps, preprocessing=Preprocessing(load_size=args.image_size, image_size=args.image_size),
        dtype=dtype_name,
    )
    spec = make_spec(request, resolve_layers(unet, "up"), identity, dtype_name)
    extractor = FeatureExtractor(backbone, spec.feature_space, spec.preprocessing, device, dtype)
    return extractor, spec, request


# ------------------------------------------------------------------------------------ whole processes
def whole_process(args, work: Path, info: dict) -> int:
    """`dhf-cache build` vs bench/plain_build.py, each a whole process, quiet and loaded."""
    from dhf_cache.sources.sd.tiny_model import write_tiny_model

    _, records = prepare_images(work, args.images, args.seed)
    photos = work / "photos"
    photos.mkdir(exist_ok=True)
    for record in records:  # a folder: data set of exactly these images
        shutil.copyfile(record.path, photos / Path(record.path).name)
    model = work / "tiny-model"
    if not (model / "unet" / "config.json").is_file():
        write_tiny_model(model, seed=args.seed)
    size = str(args.image_size)
    steps = ["--steps", str(args.steps)]
    variants = {
        "dhf-cache build": lambda rep: [
            sys.executable, "-m", "dhf_cache.cli.main", "build", "--dataset", f"folder:{photos}",
            "--cache", str(work / f"process-cache-{time.monotonic_ns()}"), "--model", str(model),
            "--load-size", size, "--image-size", size, "--batch-size", str(args.batch_size), *steps, "--no-progress"],
        "plain loop": lambda rep: [
            sys.executable, str(Path(__file__).with_name("plain_build.py")), str(model),
            *sorted(str(f) for f in photos.iterdir()), "--size", size, "--batch-size", str(args.batch_size), *steps],
    }
    env = user_environment()
    print(f"whole processes: {args.images} images at {size} px, batch {args.batch_size}, {args.steps} steps; "
          f"{args.repeats} ABBA repetitions per load; environment as given "
          f"(OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY', 'unset')})", flush=True)
    results = {}
    for load in args.loads:
        got = interleaved_processes(variants, env, args.repeats, load)
        results[f"load_{load}"] = got
        m = got["medians"]
        print(f"  {load} busy process(es): dhf-cache build {m['dhf-cache build']:.1f} s, plain loop {m['plain loop']:.1f} s "
              f"(medians, whole processes); ratio {got['ratio']:.2f}", flush=True)
    if args.json_out:
        write_json(args.json_out, {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "json_out"},
                                   "whole_process": results})
        print(f"figures written to {args.json_out}")
    print(f"dhf-cache build / plain loop = {ratios_by_load(results, args.loads)} (target <= {TARGET:.2f})")
    return 0


# ------------------------------------------------------------------------------------ FLOPs
# Dense (no sparsity) fp16/bf16 tensor-core peak in TFLOP/s, from the vendors' data sheets; the
# first key contained in torch's device name wins ($DHF_PEAK_TFLOPS overrides).
PEAK_TFLOPS = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "GH200": 989.4,
               "A100": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
               "RTX 4090": 165.2, "V100": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    import os

    if os.environ.get("DHF_PEAK_TFLOPS"):
        return float(os.environ["DHF_PEAK_TFLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def unet_flops(bench) -> float:
    """FLOPs of one UNet call at the bench's batch size (torch's FlopCounterMode: matmuls,
    convolutions and attention; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    ext = bench.extractor
    pixels, ids = bench.batches[0]
    with torch.inference_mode():
        x = ext.encode_latents(pixels, ids).float()
        emb = ext.prompt_embedding.expand(x.shape[0], -1, -1)
        with FlopCounterMode(display=False) as counter:
            bench.unet(x.to(ext.dtype), torch.tensor(0, device=bench.device), encoder_hidden_states=emb)
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------ the two variants
class Bench:
    def __init__(self, args, work: Path, extractor, spec, request, records):
        from dhf_cache.config import BuildOptions
        from dhf_cache.datasets.images import load_image, preprocess
        from dhf_cache.pipelines.build import batch_groups

        self.args = args
        self.work = work
        self.extractor = extractor
        self.spec = spec
        self.request = request
        self.records = records
        self.device = extractor.device
        self.unet = extractor.backbone.unet
        self.options = BuildOptions(batch_size=args.batch_size, device=str(self.device), progress=False,
                                    channels_last=args.channels_last, attention=args.attention, compile=args.compile)
        self.layer_table = extractor.layer_table()
        self.latent_shape = extractor.latent_shape
        n_saved = len(self.spec.feature_space.save_steps)
        self.raw_bytes_per_image = sum(n_saved * l.channels * l.height * l.width * 2 for l in self.layer_table)
        self.n_caches = 0
        self.last_info: dict | None = None
        # The bare loop's inputs: the same pixels, batched exactly as build_images batches them
        # (by position in a fresh cache, which is the order of `records`).
        index = {r.id: i for i, r in enumerate(records)}
        pre = extractor.preprocessing
        self.batches = []
        for group in batch_groups(records, index, args.batch_size):
            pixels = torch.stack([preprocess(load_image(r.path), pre.load_size, pre.image_size) for r in group])
            self.batches.append((pixels, [r.id for r in group]))
        self.flops_per_call = unet_flops(self) if args.flops else None
        # The extractor registered its hooks when it was made; the bare runs must have none.
        self.compiled = args.compile != "off"
        self.bare_unet = self.unet
        if self.compiled:  # a copy without hooks for the bare runs, each compiled once (hooks change the graph)
            import copy

            from dhf_cache.sources.acceleration import accelerate

            # torch.compile does not guard on module hooks by default: without this, the bare copy's
            # graph (compiled from the same code) would later be taken for the hooked UNet too
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            self.bare_unet = copy.deepcopy(self.unet)
            for module in self.bare_unet.modules():
                module._forward_hooks.clear()
            accelerate(self.bare_unet, args.channels_last, args.attention, args.compile, args.compile_backend)
            extractor.accelerate(args.channels_last, args.attention, args.compile, args.compile_backend)
        else:
            self.extractor.capture.remove()
            if args.channels_last or args.attention != "auto":
                extractor.accelerate(args.channels_last, args.attention)

    def sync(self) -> None:
        synchronize(self.device)

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak_gpu_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return None

    def _fresh_cache(self):
        from dhf_cache.cache.feature_cache import FeatureCache

        url = self.work / "caches" / f"build-{self.n_caches}"
        self.n_caches += 1
        shutil.rmtree(url, ignore_errors=True)
        start = time.perf_counter()
        cache = FeatureCache.prepare(
            str(url), self.spec, self.layer_table, self.extractor.timesteps, [r.id for r in self.records],
            latent_shape=self.latent_shape, provenance={"model_source": self.request.model, "bench": "build_overhead"},
        )
        return cache, url, time.perf_counter() - start

    def run_build(self, timers: Timers | None = None) -> dict:
        """One real build into a fresh cache; `timers` instruments it (breakdown run only)."""
        from dhf_cache.sources.sd.capture import FeatureCapture
        from dhf_cache.pipelines.build import build_images

        cache, url, prepare_s = self._fresh_cache()
        with Patches() as patches:
            if timers is not None:
                self._instrument(patches, timers, cache)
            if not self.compiled:  # compiled: the extractor's own capture stays (new hooks would recompile)
                self.extractor.capture = FeatureCapture(self.unet, self.spec.feature_space.layers)
            try:
                self.sync()
                self._reset_peak()
                cpu_start, start = time.process_time(), time.perf_counter()
                result = build_images(self.extractor, cache, self.records, self.options, quiet)
                self.sync()
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            finally:
                if not self.compiled:
                    self.extractor.capture.remove()
        if result.failures or result.n_built != len(self.records):
            raise SystemExit(f"build wrote {result.n_built}/{len(self.records)} images; failures: {result.failures}")
        if timers is not None or self.last_info is None:
            self.last_info = cache.info()
        shutil.rmtree(url, ignore_errors=True)
        return {"seconds": seconds, "cpu_seconds": cpu, "prepare_seconds": prepare_s,
                "peak_gpu_mb": self._peak_gpu_mb()}

    def run_bare(self, timers: Timers | None = None) -> dict:
        """The same VAE encodes and UNet calls as the build, with nothing captured or written."""
        from dhf_cache.sources.sd.inversion import ddim_inversion_step

        n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.bare_unet.modules())
        if n_hooks:
            raise SystemExit(f"bare run: {n_hooks} hooks are still registered on the UNet")
        ext = self.extractor
        sched = ext.schedule
        last_call = max(ext.save_positions)  # build_images makes exactly these calls
        sync = self.sync if timers is not None else None
        encode = timers.wrap("vae", ext.encode_latents, sync) if timers else ext.encode_latents
        unet = timers.wrap("unet", self.bare_unet, sync) if timers else self.bare_unet
        self.sync()
        self._reset_peak()
        cpu_start, start = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            for pixels, ids in self.batches:
                x = encode(pixels, ids).float()
                emb = ext.prompt_embedding.expand(x.shape[0], -1, -1)
                for i in range(last_call + 1):
                    t, t_next = sched.call_timesteps[i], sched.next_timesteps[i]
                    timestep = torch.tensor(t, device=self.device)
                    eps = unet(x.to(ext.dtype), timestep, encoder_hidden_states=emb).sample.float()
                    if i < last_call:
                        x = ddim_inversion_step(x, eps, sched.alpha(t), sched.alpha(t_next))
        self.sync()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return {"seconds": seconds, "cpu_seconds": cpu, "peak_gpu_mb": self._peak_gpu_mb()}

    # -------------------------------------------------------------------------------- breakdown
    def _instrument(self, patches: Patches, timers: Timers, cache) -> None:
        """Timers around every piece of the build, in this process only (restored afterwards)."""
        import zarr.codecs.crc32c_ as zcrc
        import zarr.codecs.zstd as zzstd
        import zarr.storage._local as zlocal

        import dhf_cache.sources.sd.extract as extract_mod
        import dhf_cache.pipelines.build as build_mod
        from dhf_cache.sources.sd.capture import FeatureCapture

        ext, sync = self.extractor, self.sync
        patches.set(build_mod, "load_image", timers.wrap("load: decode", build_mod.load_image))
        patches.set(ext, "preprocess", timers.wrap("load: preprocess", ext.preprocess))
        patches.set(ext, "extract", timers.wrap("extract (all)", ext.extract, sync))
        patches.set(ext, "encode_latents", timers.wrap("vae", ext.encode_latents, sync))
        patches.set(ext, "invert", timers.wrap("invert (all)", ext.invert, sync))
        patches.set(ext, "unet_noise", timers.wrap("unet", ext.unet_noise, sync))
        patches.set(extract_mod, "ddim_inversion_step", timers.wrap("ddim step", extract_mod.ddim_inversion_step))
        patches.set(extract_mod, "nonfinite_reasons", timers.wrap("non-finite check", extract_mod.nonfinite_reasons))
        original_hook_for = FeatureCapture._hook_for

        def timed_hook_for(capture, name):
            return timers.wrap("hooks", original_hook_for(capture, name))

        patches.set(FeatureCapture, "_hook_for", timed_hook_for)
        patches.set(build_mod._Writer, "put", timers.wrap("main waits: writer queue full", build_mod._Writer.put))
        patches.set(build_mod._Writer, "close", timers.wrap("main waits: writer at the end", build_mod._Writer.close))
        patches.set(cache, "write_image", timers.wrap("writer: write_image (all)", cache.write_image))
        # the writer's chunk writes run concurrently: these pieces are read as wall time busy (Timers.busy)
        io = "writer: codecs + file writes"
        patches.set(zzstd.ZstdCodec, "_encode_sync", timers.wrap("writer: zstd", zzstd.ZstdCodec._encode_sync, group=io))
        patches.set(zcrc.Crc32cCodec, "_encode_sync",
                    timers.wrap("writer: crc32c", zcrc.Crc32cCodec._encode_sync, group=io))
        patches.set(zlocal, "_put", timers.wrap("writer: file writes", zlocal._put, group=io))
        # local default-codec feature chunks skip zarr's codecs (dhf_cache/cache/direct_chunks.py): the same pieces
        import dhf_cache.cache.direct_chunks as direct_mod

        patches.set(direct_mod, "zstd_compress", timers.wrap("writer: zstd", direct_mod.zstd_compress, group=io))
        patches.set(direct_mod, "crc32c_bytes", timers.wrap("writer: crc32c", direct_mod.crc32c_bytes, group=io))
        patches.set(direct_mod, "store_atomically",
                    timers.wrap("writer: file writes", direct_mod.store_atomically, group=io))


def breakdown(build_s: float, t: Timers, bare_t: Timers | None, n_calls: int, raw_mb: float = 0.0) -> dict:
    """Main-thread fractions of the instrumented build's wall time, and the writer thread's
    (which runs alongside, so its fractions overlap the main thread's)."""
    s = t.seconds
    load = s["load: decode"] + s["load: preprocess"]
    capture = s["invert (all)"] - s["unet"] - s["ddim step"]
    extract_other = s["extract (all)"] - s["vae"] - s["invert (all)"] - s["non-finite check"]
    main = {
        "image loading (decode + preprocess)": load,
        "VAE encode + latent sampling": s["vae"],
        "UNet calls (hooks included)": s["unet"],
        "  of which hooks": s["hooks"],
        "DDIM update": s["ddim step"],
        "capture: fp16 copies into buffers + to CPU": capture,
        "non-finite check": s["non-finite check"],
        "extract: latents to CPU, per-image split": max(0.0, extract_other),  # < 0: timer noise
        "waiting for the writer (queue full)": s["main waits: writer queue full"],
        "waiting for the writer (end of build)": s["main waits: writer at the end"],
    }
    accounted = sum(v for k, v in main.items() if not k.startswith("  "))
    main["other (batching, torch.stack, cache reads, bookkeeping)"] = max(0.0, build_s - accounted)  # < 0: timer noise
    write_all = s["writer: write_image (all)"]
    busy = t.busy  # wall time with at least one of the concurrent chunk writes in that piece
    writer = {
        "zstd compression": busy["writer: zstd"],
        "crc32c checksum": busy["writer: crc32c"],
        "file writes (temp + rename)": busy["writer: file writes"],
        "other (zarr for small arrays, threads, buffers)":
            max(0.0, write_all - busy["writer: codecs + file writes"]),
        "writer busy (all of write_image)": write_all,
    }
    out = {
        "build_seconds": build_s,
        "main_thread_seconds": main,
        "main_thread_fraction": {k: v / build_s for k, v in main.items()},
        "writer_thread_seconds": writer,
        "writer_thread_fraction_of_wall": {k: v / build_s for k, v in writer.items()},
        "raw_feature_mb_per_run": raw_mb,
        "zstd_thread_seconds": s["writer: zstd"],  # CPU cost, summed over the concurrent chunk writes
        "unet_seconds_per_call_build": s["unet"] / max(1, t.calls["unet"]),
        "unet_calls": t.calls["unet"],
    }
    if bare_t is not None:
        out["bare_seconds"] = {"vae": bare_t.seconds["vae"], "unet": bare_t.seconds["unet"]}
        out["unet_seconds_per_call_bare"] = bare_t.seconds["unet"] / max(1, bare_t.calls["unet"])
        out["vae_seconds_bare"] = bare_t.seconds["vae"]
    return out


def projection(args, bare_s: float, build_s: float, vae_s: float, unet_per_call: float) -> dict | None:
    """With fewer steps or another number of saved steps than METHOD.md's 50 / 11, scale: the
    bare time by UNet calls, the overhead (build - bare) by saved steps. A rough guide only."""
    n_saved = len(args.save_steps)
    calls = args.steps - min(args.save_steps)  # the build stops after the last saved call
    if args.steps == 50 and n_saved == 11:
        return None
    n_batches = math.ceil(args.images / args.batch_size)
    bare_50 = vae_s + unet_per_call * 50 * n_batches
    overhead_11 = (build_s - bare_s) * 11 / n_saved
    return {
        "calls_measured": calls,
        "saved_measured": n_saved,
        "bare_seconds_at_50_calls": bare_50,
        "build_seconds_at_50_calls_11_saved": bare_50 + overhead_11,
        "ratio": (bare_50 + overhead_11) / bare_50,
    }


def run_breakdown(args, bench: Bench, n_calls: int, build_s: float, bare_s: float) -> dict:
    """Instrumented runs (bare then build, `--breakdown-repeats` times); seconds are summed over
    the runs, so fractions stay consistent with each other."""
    timers, bare_timers = Timers(), Timers()
    wall = 0.0
    for _ in range(args.breakdown_repeats):
        bench.run_bare(bare_timers)
        wall += bench.run_build(timers)["seconds"]
    raw_mb = len(bench.records) * bench.raw_bytes_per_image / 1e6
    report = breakdown(wall, timers, bare_timers, n_calls, raw_mb)
    runs = args.breakdown_repeats
    print(f"breakdown of {runs} instrumented build(s) ({wall / runs:.3f} s each; every piece synchronised, "
          "so a little slower than above):")
    print("  main thread (fractions of build wall time):")
    for key, value in report["main_thread_seconds"].items():
        print(f"    {key:<58} {value / runs:8.3f} s  {value / wall:6.1%}")
    print("  writer thread (runs alongside the main thread; wall time with a chunk write in that piece, "
          "as fractions of build wall time):")
    for key, value in report["writer_thread_seconds"].items():
        print(f"    {key:<58} {value / runs:8.3f} s  {value / wall:6.1%}")
    raw = report["raw_feature_mb_per_run"]
    if raw:
        print(f"  per raw feature MB (fp16, {raw:.1f} MB a run): zstd {report['zstd_thread_seconds'] * 1000 / (raw * runs):.2f} ms (thread time), "
              f"non-finite check {report['main_thread_seconds']['non-finite check'] * 1000 / (raw * runs):.2f} ms, "
              f"all of write_image {report['writer_thread_seconds']['writer busy (all of write_image)'] * 1000 / (raw * runs):.2f} ms")
    per_call_build = report["unet_seconds_per_call_build"]
    per_call_bare = report["unet_seconds_per_call_bare"]
    print(f"  UNet per call: build {per_call_build * 1000:.1f} ms, bare {per_call_bare * 1000:.1f} ms "
          f"({per_call_build / per_call_bare - 1:+.1%}: hooks, the writer thread competing for cores, noise)")
    tail = report["main_thread_seconds"]["waiting for the writer (end of build)"] / runs
    steady = (build_s - tail) / bare_s
    report["ratio_without_end_of_build_wait"] = steady
    print(f"  without the end-of-build wait for the last batch's writes (amortised over a real data set): "
          f"build/bare ~ {steady:.3f}")
    proj = projection(args, bare_s, build_s - tail, bare_timers.seconds["vae"] / runs, per_call_bare)
    if proj:
        report["projection_50_steps_11_saved"] = proj
        print(f"  projected to 50 calls / 11 saved steps (bare scaled by calls, overhead by saved steps, "
              f"no end wait): build/bare ~ {proj['ratio']:.3f}")
    return report


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    info = machine_info(str(device))
    print(describe_machine(info))
    if args.whole_process:
        with work_folder(args.workdir, "dhf-bench-") as work:
            return whole_process(args, work, info)

    with work_folder(args.workdir, "dhf-bench-") as work:
        t0 = time.perf_counter()
        dataset, records = prepare_images(work, args.images, args.seed)
        if args.model == "tiny":
            extractor, spec, request = tiny_extractor(args, work, dataset, device)
        else:
            extractor, spec, request = sd15_extractor(args, dataset, device)
        bench = Bench(args, work, extractor, spec, request, records)
        setup_s = time.perf_counter() - t0
        n_calls = max(extractor.save_positions) + 1
        dtype_name = str(extractor.dtype).removeprefix("torch.")
        config = {
            "model": args.model, "device": str(device), "dtype": dtype_name, "images": args.images,
            "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
            "save_steps": list(args.save_steps), "unet_calls_per_batch": n_calls,
            "layers": len(spec.feature_space.layers), "repeats": args.repeats, "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(), "channels_last": args.channels_last,
            "attention": args.attention, "compile": args.compile,
        }
        print(
            f"config: {args.model} on {device} ({dtype_name}), {args.images} image(s) at {args.image_size} px, "
            f"batch {args.batch_size}, {n_calls} UNet calls per batch, {len(args.save_steps)} saved steps x "
            f"{config['layers']} layers; {args.repeats} A/B repetitions after {args.warmup} warm-up (setup {setup_s:.1f} s)"
            f"; levers: channels_last={args.channels_last}, attention={args.attention}, compile={args.compile}"
        )
        warm_start = time.perf_counter()

        for _ in range(args.warmup):
            bench.run_build()
            bench.run_bare()

        warmup_s = time.perf_counter() - warm_start  # with --compile: the compilations
        if args.compile != "off":
            print(f"warm-up (compiling both variants' UNets): {warmup_s:.1f} s", flush=True)
        runs = {"build": [], "bare": []}
        ratios = []
        for rep in range(args.repeats):
            order = ("build", "bare") if rep % 2 == 0 else ("bare", "build")
            got = {}
            for variant in order:
                got[variant] = bench.run_build() if variant == "build" else bench.run_bare()
                runs[variant].append(got[variant])
            ratios.append(got["build"]["seconds"] / got["bare"]["seconds"])
            print(
                f"  rep {rep + 1}: build {got['build']['seconds']:.3f} s, bare {got['bare']['seconds']:.3f} s, "
                f"ratio {ratios[-1]:.3f}", flush=True,
            )

        n = args.images
        build_s = median([r["seconds"] for r in runs["build"]])
        bare_s = median([r["seconds"] for r in runs["bare"]])
        ratio = median(ratios)
        results = {
            "build_seconds": [r["seconds"] for r in runs["build"]],
            "bare_seconds": [r["seconds"] for r in runs["bare"]],
            "ratios": ratios,
            "build_seconds_median": build_s,
            "bare_seconds_median": bare_s,
            "build_seconds_per_image": build_s / n,
            "bare_seconds_per_image": bare_s / n,
            "build_images_per_second": n / build_s,
            "bare_images_per_second": n / bare_s,
            "overhead_seconds_per_image": (build_s - bare_s) / n,
            "ratio_of_medians": build_s / bare_s,
            "ratio_median_of_pairs": ratio,
            "ratio_of_minimums": min(r["seconds"] for r in runs["build"]) / min(r["seconds"] for r in runs["bare"]),
            "build_cpu_seconds_median": median([r["cpu_seconds"] for r in runs["build"]]),
            "bare_cpu_seconds_median": median([r["cpu_seconds"] for r in runs["bare"]]),
            "cache_prepare_seconds_median": median([r["prepare_seconds"] for r in runs["build"]]),
        }
        results["warmup_seconds"] = warmup_s
        if bench.flops_per_call is not None:
            flops = bench.flops_per_call * n_calls * len(bench.batches)  # the UNet calls of one run
            results["unet_tflops_per_call"] = bench.flops_per_call / 1e12
            results["bare_tflops_per_second"] = flops / bare_s / 1e12
            results["build_tflops_per_second"] = flops / build_s / 1e12
            peak = peak_tflops(device)
            results["peak_tflops"] = peak
            share = f" = {results['bare_tflops_per_second'] / peak:.1%} of the device's {peak:.0f} TFLOP/s dense peak" if peak else ""
            if peak:
                results["bare_fraction_of_peak"] = results["bare_tflops_per_second"] / peak
            print(f"UNet FLOPs: {bench.flops_per_call / 1e9:.1f} GFLOP per call at batch {args.batch_size}; "
                  f"bare {results['bare_tflops_per_second']:.2f} TFLOP/s{share}; build "
                  f"{results['build_tflops_per_second']:.2f} TFLOP/s (UNet calls only)")
        if device.type == "cuda":
            results["peak_gpu_mb_build"] = max(r["peak_gpu_mb"] for r in runs["build"])
            results["peak_gpu_mb_bare"] = max(r["peak_gpu_mb"] for r in runs["bare"])

        print(f"build: {build_s / n:.4f} s/image ({n / build_s:.2f} images/s), median of {args.repeats}")
        print(f"bare:  {bare_s / n:.4f} s/image ({n / bare_s:.2f} images/s), median of {args.repeats}")
        cpu_ratio = results["build_cpu_seconds_median"] / results["bare_cpu_seconds_median"]
        results["cpu_ratio_of_medians"] = cpu_ratio
        print(f"overhead: {(build_s - bare_s) / n * 1000:+.1f} ms/image; ratio of medians {build_s / bare_s:.3f}, "
              f"of minimums {results['ratio_of_minimums']:.3f}; CPU time (all threads) build/bare {cpu_ratio:.3f}")
        print(f"cache prepare (coordinator, not in build time): {results['cache_prepare_seconds_median'] * 1000:.0f} ms")
        if device.type == "cuda":
            print(f"peak GPU memory: build {results['peak_gpu_mb_build']:.0f} MiB, bare {results['peak_gpu_mb_bare']:.0f} MiB")

        report = None
        if args.breakdown_repeats:
            report = run_breakdown(args, bench, n_calls, build_s, bare_s)
        if bench.last_info:
            cache_info = bench.last_info
            per_image = cache_info["feature_bytes"] / max(1, cache_info["n_done"])
            results["stored_feature_bytes_per_image"] = per_image
            results["compression_ratio"] = cache_info["compression_ratio"]
            print(f"cache: {per_image / 2**20:.2f} MiB of features per image stored, compression "
                  f"{cache_info['compression_ratio']:.2f}x (random weights: not what real weights give)")
        results["peak_rss_mb"] = peak_rss_mb()
        print(f"peak RSS: {results['peak_rss_mb']:.0f} MiB; torch threads {torch.get_num_threads()} for both variants")
        if args.json_out:
            write_json(args.json_out, {"machine": info, "config": config, "results": results, "breakdown": report,
                                       "setup_seconds": setup_s})
            print(f"figures written to {args.json_out}")
        print(f"build/bare = {ratio:.2f} (target <= {TARGET:.2f})")
        return 0


if __name__ == "__main__":
    sys.exit(main())
