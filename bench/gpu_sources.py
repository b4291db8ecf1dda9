"""Feature sources on a GPU at their real sizes: stored images/s and peak GPU memory of a build per
source (issue 18's last target), random weights in each model's real configuration.

    sdxl            SDXL base 1.0's UNet config (2.6B parameters) and SD's VAE config, one-layer
                    text encoders of SDXL's widths (768 + 1280; the prompt is encoded once), fp16,
                    1024 px, 50 inversion steps, METHOD.md's 11 saved steps, the 9 up-block resnets
    dinov2-base     DINOv2-base (768 channels, 12 blocks, patch 14) at 224 px, the last layer
    dinov2-large    DINOv2-large (1024 channels, 24 blocks) at 448 px, the last layer

Each model is written with `save_pretrained` (fp16) and loaded through the build's own loader,
then `build_images` stores a warm-up batch and, into a fresh cache, `--images` images; the
figure is the second build's images/s (decode, model, capture, compression and writes), with
peak GPU memory (torch.cuda.max_memory_allocated) and bytes stored per image.

    python bench/gpu_sources.py                                     # CUDA, ~2-3 min on one H200
    python bench/gpu_sources.py --sources dinov2-base --images 64   # one source
    python bench/gpu_sources.py --device cpu --tiny --images 4      # plumbing check (tiny models, CPU)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (first: it records the environment the benchmark was started with)
import torch
from _common import describe_machine, machine_info, work_folder, write_json

SOURCES = {  # name: (family, image size, default batch size)
    "sdxl": ("sdxl", 1024, 4),
    "dinov2-base": ("dinov2", 224, 32),
    "dinov2-large": ("dinov2", 448, 16),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default="dinov2-base,sdxl,dinov2-large", help="comma-separated, run in this order")
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=16, help="images of the measured build (default 16)")
    p.add_argument("--batch-size", type=int, help="default: per source (sdxl 4, dinov2-base 32, dinov2-large 16)")
    p.add_argument("--steps", type=int, default=50, help="SDXL inversion steps (default 50)")
    p.add_argument("--tiny", action="store_true", help="the tiny test models at 64/56 px (plumbing check)")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = set(args.sources) - set(SOURCES)
    if unknown:
        p.error(f"--sources: unknown {sorted(unknown)}; choose from {', '.join(SOURCES)}")
    return args


def write_sdxl_config(folder: Path, device: str = "cpu") -> Path:
    """SDXL base's UNet config with random weights, SD's VAE config (SDXL's scaling factor), and
    one-layer CLIP text encoders of SDXL's widths, saved as an SDXL pipeline in fp16. The UNet's
    2.6B random weights are drawn on `device` (84 s on 2 CPU cores)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dhf_cache.sources.sdxl import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=0)

    def text(model_class, tokenizer, hidden: int, heads: int):
        return model_class(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, hidden_size=hidden, intermediate_size=4 * hidden,
            num_hidden_layers=1, num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
            hidden_act="gelu"))

    torch.manual_seed(0)
    with torch.device(device):
        pipe.unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.float16)
    pipe.vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    pipe.text_encoder = text(CLIPTextModel, pipe.tokenizer, 768, 12)
    pipe.text_encoder_2 = text(CLIPTextModelWithProjection, pipe.tokenizer_2, 1280, 20)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def write_dinov2(folder: Path, large: bool, device: str = "cpu") -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16) if large else Dinov2Config()
    with torch.device(device):
        model = Dinov2Model(config)
    model.to(torch.float16).save_pretrained(folder)
    return folder


def write_model(name: str, work: Path, tiny: bool, device: str) -> Path:
    folder = work / name
    if tiny:
        from dhf_cache.sources.dinov2 import write_tiny_dinov2
        from dhf_cache.sources.sdxl import write_tiny_sdxl

        return write_tiny_sdxl(folder, 0) if name == "sdxl" else write_tiny_dinov2(folder, 0)
    if name == "sdxl":
        return write_sdxl_config(folder, device)
    return write_dinov2(folder, name == "dinov2-large", device)


def measure(name: str, args, work: Path, data: Path) -> dict:
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.config import BuildOptions, Preprocessing
    from dhf_cache.datasets import open_dataset
    from dhf_cache.pipelines.build import BuildRequest, build_images, load_extractor

    family, size, batch = SOURCES[name]
    size = (64 if family == "sdxl" else 56) if args.tiny else size
    batch = args.batch_size or batch
    start = time.perf_counter()
    model = write_model(name, work, args.tiny, args.device)
    written_s = time.perf_counter() - start
    dataset = open_dataset(f"spair:{data}")
    records = dataset.images(None)
    if len(records) < args.images + batch:
        raise SystemExit(f"--images {args.images}: the sample data holds {len(records)} images")
    extra = {"steps": args.steps} if family == "sdxl" else {}
    cuda = torch.device(args.device).type == "cuda"
    figures = {"source": name, "image_size": size, "batch_size": batch, "images": args.images,
               "model_written_seconds": written_s}
    options = BuildOptions(batch_size=batch, device=args.device, progress=False)
    request = BuildRequest(dataset=dataset, cache_url="unused", model=str(model), family=family,
                           dtype="float16" if cuda else "float32",
                           preprocessing=Preprocessing(load_size=size, image_size=size), **extra)
    start = time.perf_counter()
    extractor, spec = load_extractor(request, args.device, lambda _: None)  # once for both builds
    loaded_s = time.perf_counter() - start
    layer_table = extractor.layer_table()
    for attempt, chosen in (("warm-up", records[-batch:]), ("measured", records[:args.images])):
        cache = FeatureCache.prepare(str(work / f"{name}-{attempt}.zarr"), spec, layer_table, extractor.timesteps,
                                     [r.id for r in chosen], latent_shape=extractor.latent_shape)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = build_images(extractor, cache, chosen, options, lambda _: None)
        seconds = time.perf_counter() - start
        if not result.ok:
            raise SystemExit(f"{name}: the {attempt} build failed: {result.failures[:2]}")
    del extractor
    if cuda:
        torch.cuda.empty_cache()
    info = cache.info()
    figures.update({"load_seconds": loaded_s, "build_seconds": seconds, "images_per_second": args.images / seconds,
                    "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                    "stored_bytes_per_image": info["bytes"] / args.images,
                    "maps_per_image": len(cache.layers) * len(cache.timesteps)})
    gpu = f"{figures['peak_gpu_mb'] / 1024:.1f} GiB" if cuda else "-"
    print(f"{name}: {size} px, batch {batch}: {figures['images_per_second']:.2f} stored images/s over {args.images} "
          f"images; peak GPU memory {gpu}; {figures['stored_bytes_per_image'] / 2**20:.1f} MiB stored per image "
          f"({figures['maps_per_image']} maps); model written in {written_s:.0f} s, loaded in {loaded_s:.0f} s",
          flush=True)
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (use --device cpu --tiny for a plumbing check)")
    info = machine_info(args.device)
    print(describe_machine(info))
    from dhf_cache.datasets.sample_data import PHOTOS, write_sample_data

    rows, failed = [], []
    card = torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda" else "CPU"
    print(f"device: {card}; random weights in each model's configuration, fp16 on CUDA", flush=True)
    with work_folder(None, "dhf-bench-gpu-sources-") as work:
        work = Path(work)
        data = work / "data"
        views = max(4, -(-(args.images + 32) // len(PHOTOS)))  # enough images for the largest warm-up batch too
        write_sample_data(data, seed=0, size=256, split_views={"trn": views}, photos=PHOTOS)
        for name in args.sources:
            try:
                rows.append(measure(name, args, work, data))
            except Exception as exc:  # noqa: BLE001 - one source's failure must not cost the others' figures
                print(f"{name}: FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                failed.append(name)
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
    if args.json_out:
        write_json(args.json_out, {"machine": info, "rows": rows, "failed": failed, "config": vars(args)})
    if not rows:
        raise SystemExit("no source was measured")
    print(f"{card}: " + "; ".join(
        f"{r['source']} {r['images_per_second']:.2f} images/s"
        + (f", {r['peak_gpu_mb'] / 1024:.1f} GiB" if r["peak_gpu_mb"] is not None else "") for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
