"""Feature sources side by side: build vs bare forward passes per source, bytes per image, and a
fused SD + DINOv2 training step vs SD alone, all from one cache.

    build  `pipelines.build.build_images` of N images into a fresh source of a cache (decode,
           preprocess, the model, capture, fp16 copies, compression and writes, done flags)
    bare   the same model calls on the same preprocessed batches, nothing captured or written
           (SD, SDXL: VAE encode + the inversion's UNet calls with hooks disabled; DINOv2: one
           forward pass with hidden states)

Build and bare alternate (ABBA) after a warm-up; medians. Then one cache gets an SD and a DINOv2
source and a small aggregator trains from it: on SD's maps alone and fused with DINOv2's last
layer (`--source sd,dinov2 --layers dinov2:layernorm`), interleaved; the step time ratio is the
cost of fusing. Tiny models (seeded random weights) on the CPU by default.

    python bench/sources.py                 # 8 images at 64 px (DINOv2 at 56), 50 steps
    python bench/sources.py --quick         # 4 images, 10 steps, 1 repetition
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (sets the benchmark's thread and OpenMP environment)
import torch
from _common import describe_machine, machine_info, median, peak_rss_mb, work_folder, write_json

from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.config import BuildOptions, Preprocessing, TrainOptions
from dhf_cache.datasets import open_dataset
from dhf_cache.datasets.images import load_image
from dhf_cache.pipelines.build import BuildRequest, build_images, load_extractor, open_build, plan_build
from dhf_cache.pipelines.train import TrainRequest, run_train
from dhf_cache.datasets.sample_data import PHOTOS, write_sample_data


def quiet(_msg: str) -> None:
    pass


def write_models(work: Path) -> dict[str, Path]:
    from dhf_cache.sources.dinov2 import write_tiny_dinov2
    from dhf_cache.sources.sdxl import write_tiny_sdxl
    from dhf_cache.sources.sd.tiny_model import write_tiny_model

    return {"sd": write_tiny_model(work / "sd", 0), "sdxl": write_tiny_sdxl(work / "sdxl", 0),
            "dinov2": write_tiny_dinov2(work / "dinov2", 0)}


def write_dinov2_base(work: Path) -> Path:
    """DINOv2-base's configuration (768 channels, 12 blocks, patch 14) with seeded random weights."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = work / "dinov2-base"
    Dinov2Model(Dinov2Config()).save_pretrained(folder)
    return folder


def request_for(family: str, model: Path, data: Path, cache: str, args, side: int | None = None) -> BuildRequest:
    side = side or (56 if family == "dinov2" else 64)  # DINOv2's side: a multiple of its patch (14) and of 8
    extra = {} if family == "dinov2" else {"steps": args.steps}
    return BuildRequest(dataset=open_dataset(f"spair:{data}"), cache_url=cache, model=str(model), family=family,
                        layers="all" if family == "dinov2" else "up",
                        preprocessing=Preprocessing(load_size=side, image_size=side), **extra)


def bare(extractor, pixels: torch.Tensor, ids: list[str], family: str) -> None:
    """The model calls alone: no hooks enabled, nothing kept or written."""
    with torch.inference_mode():
        if family == "dinov2":
            extractor.backbone.model(pixel_values=pixels, output_hidden_states=True)
            return
        latents = extractor.encode_latents(pixels, ids)
        extractor.capture.enabled = False
        schedule = extractor.schedule
        last = max(extractor.save_positions)
        x = latents
        from dhf_cache.sources.sd.inversion import ddim_inversion_step

        for k, t in enumerate(schedule.call_timesteps[: last + 1]):
            eps = extractor.unet_noise(x, t)  # the very call the build makes
            x = ddim_inversion_step(x, eps, schedule.alpha(t), schedule.alpha(schedule.next_timesteps[k]))


def source_figures(family: str, model: Path, data: Path, work: Path, args, side: int | None = None,
                   label: str | None = None) -> dict:
    request = request_for(family, model, data, str(work / f"{family}-probe.zarr"), args, side)
    extractor, _spec = load_extractor(request, "cpu", quiet)
    records = request.dataset.images(None)[: args.images]
    images = [load_image(r.path) for r in records]
    pixels = torch.stack([extractor.preprocess(im) for im in images])
    ids = [r.id for r in records]
    options = BuildOptions(batch_size=args.batch_size, device="cpu", progress=False)
    build_s, bare_s = [], []

    def one_build(k: int) -> float:
        url = str(work / f"{label or family}-{k}.zarr")
        cache = FeatureCache.prepare(url, _spec, extractor.layer_table(), extractor.timesteps, ids,
                                     latent_shape=extractor.latent_shape)
        start = time.perf_counter()
        build_images(extractor, cache, records, options, quiet, plan=plan_build(cache, records))
        return time.perf_counter() - start

    def one_bare() -> float:
        start = time.perf_counter()
        for i in range(0, len(ids), args.batch_size):
            bare(extractor, pixels[i:i + args.batch_size], ids[i:i + args.batch_size], family)
        return time.perf_counter() - start

    one_build(-1), one_bare()  # warm-up
    for k in range(args.repeats):
        if k % 2:
            bare_s.append(one_bare()), build_s.append(one_build(k))
        else:
            build_s.append(one_build(k)), bare_s.append(one_bare())
    cache = FeatureCache.open(str(work / f"{label or family}-0.zarr"))
    info = cache.info()
    return {"family": label or family, "images": len(ids), "build_s": median(build_s), "bare_s": median(bare_s),
            "build_img_per_s": len(ids) / median(build_s), "bare_img_per_s": len(ids) / median(bare_s),
            "build_over_bare": median([b / a for b, a in zip(build_s, bare_s)]),
            "overhead_ms_per_image": 1000 * (median(build_s) - median(bare_s)) / len(ids),
            "bytes_per_image": info["bytes"] / len(ids), "maps": len(cache.layers) * len(cache.timesteps),
            "raw_fp16_bytes_per_image": cache.raw_bytes_per_image}


def fused_training(models: dict[str, Path], data: Path, work: Path, args) -> dict:
    url = str(work / "two.zarr")
    for family in ("sd", "dinov2"):
        request = request_for(family, models[family], data, url, args)
        extractor, cache = open_build(request, [r.id for r in request.dataset.images(None)], "cpu", quiet)
        build_images(extractor, cache, request.dataset.images(None), BuildOptions(device="cpu", progress=False), quiet)
    base = dict(projection_dim=32, norm_groups=8, output_size=16, steps=args.train_steps, val_split="",
                val_every=10**6)
    variants = {"sd": TrainOptions(**base), "fused": TrainOptions(**base, layers=("dinov2:layernorm",))}
    sources = {"sd": "sd", "fused": "sd,dinov2"}
    times = {name: [] for name in variants}
    for k in range(args.repeats):
        for name in (list(variants) if k % 2 == 0 else list(variants)[::-1]):
            out = work / f"run-{name}-{k}"
            result = run_train(TrainRequest(cache_url=url, dataset=f"spair:{data}", out=out, options=variants[name],
                                            device="cpu", source=sources[name], progress=False), log=quiet)
            times[name].append(1000 * result.loop_seconds / args.train_steps)
    return {"sd_step_ms": median(times["sd"]), "fused_step_ms": median(times["fused"]),
            "fused_over_sd": median([f / s for f, s in zip(times["fused"], times["sd"])])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default="bench-out/sources.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.steps, args.repeats, args.train_steps = 4, 10, 1, 5
    info = machine_info()
    print(describe_machine(info))
    with work_folder(args.work, "dhf-sources-") as work:
        work = Path(work)
        data = work / "data"
        write_sample_data(data, seed=0, size=64, split_views={"trn": 2, "test": 2}, photos=PHOTOS[:2])
        models = write_models(work)
        rows = [source_figures(family, models[family], data, work, args) for family in ("sd", "sdxl", "dinov2")]
        if not args.quick:  # the per-image overhead against a forward pass of a real size
            rows.append(source_figures("dinov2", write_dinov2_base(work), data, work, args, side=224,
                                       label="dinov2-base (random weights, 224 px)"))
        training = fused_training(models, data, work, args)
    print("| source | images | build img/s | bare img/s | build/bare | overhead ms/image | maps | bytes/image (stored) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['images']} | {row['build_img_per_s']:.2f} | {row['bare_img_per_s']:.2f} | "
              f"{row['build_over_bare']:.2f} | {row['overhead_ms_per_image']:.1f} | {row['maps']} | "
              f"{row['bytes_per_image']:,.0f} |")
    print(f"\ntraining step (P=32, 16x16, {args.train_steps} steps): SD alone {training['sd_step_ms']:.1f} ms, "
          f"SD + DINOv2 fused {training['fused_step_ms']:.1f} ms; peak RSS {peak_rss_mb():.0f} MB")
    write_json(args.json, {"machine": info, "sources": rows, "training": training, "args": vars(args)})
    ratios = ", ".join(f"{row['family'].split(' ')[0]} {row['build_over_bare']:.2f}" for row in rows)
    print(f"build/bare: {ratios} (target <= 1.10); fused/SD step = {training['fused_over_sd']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
