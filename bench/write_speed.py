"""The build writer's throughput: direct chunk writes vs zarr's write path, side by side.

Why: on an H200 the build of SD 1.5 at batch 8 stored 1.41 images/s while the bare inversion
ran 3.99 (docs/benchmarks.md, "GPU"): one writer thread pushed every chunk through zarr's codec
pipeline, whose copies hold the GIL that the main thread needs to launch kernels. Feature
chunks of local default-codec caches are now written by `dhf_cache/cache/direct_chunks.py` from a
thread pool. This benchmark measures that change where no GPU is: `FeatureCache.write_image`
on SD 1.5-shaped images (12 layers x 11 steps, 156.8 MB of fp16 each, random values), once with
direct writes and once through zarr (`DHF_CACHE_DIRECT_WRITES=0`'s path), interleaved, each
repetition into a fresh cache; and again while a second thread runs pure Python (holding the
GIL as a GPU build's main thread does while it launches kernels) to show the contention.

    python bench/write_speed.py                    # 4 images, 3 repetitions (~1-2 min on 2 cores)
    python bench/write_speed.py --images 2 --repeats 1

Last line: direct / zarr write throughput, without and with the GIL-holding thread.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, machine_info, median, peak_rss_mb, work_folder, write_json  # noqa: E402
from train_speed import sd15_layers, sd15_random_features  # noqa: E402

TIMESTEPS = [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4, help="SD 1.5-shaped images written per run (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="measured repetitions of each variant (default 3)")
    p.add_argument("--workdir", help="keep the caches here (default: a temporary folder, removed)")
    p.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def prepare(url: Path, n_images: int):
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.config import BuildSpec, FeatureSpace, ModelIdentity

    layers = sd15_layers()
    identity = ModelIdentity(unet_class="UNet2DConditionModel", unet_sha256="random-sd15-config",
                             vae_sha256="random", text_encoder_sha256="random")
    spec = BuildSpec(feature_space=FeatureSpace(model=identity, layers=tuple(l.name for l in layers)))
    return FeatureCache.prepare(str(url), spec, layers, TIMESTEPS, [f"img{i}" for i in range(n_images)],
                                latent_shape=(4, 64, 64), provenance={"bench": "write_speed"})


class GilLoad:
    """A thread running pure Python until stopped: it holds the GIL whenever it can."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        x = 0
        while not self._stop.is_set():
            for i in range(2000):
                x += i

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_run(work: Path, images: list, direct: bool, load: bool, tag: str) -> float:
    """Seconds to write every image into a fresh cache, one `write_image` after another."""
    import dhf_cache.cache.feature_cache as cache_mod

    url = work / f"{tag}.zarr"
    shutil.rmtree(url, ignore_errors=True)
    cache = prepare(url, len(images))
    saved = cache_mod.DIRECT_WRITES
    cache_mod.DIRECT_WRITES = direct
    try:
        with GilLoad() if load else contextlib.nullcontext():
            start = time.perf_counter()
            for i, image in enumerate(images):
                cache.write_image(i, image, (512, 512))
            seconds = time.perf_counter() - start
    finally:
        cache_mod.DIRECT_WRITES = saved
    assert cache_mod.FeatureCache.open(str(url)).done_mask().all()
    shutil.rmtree(url)
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    from dhf_cache.cache.feature_cache import _write_pool
    from dhf_cache.sources.sd.extract import ExtractedImage

    print(describe_machine(machine_info("cpu")))
    gen = torch.Generator().manual_seed(args.seed)
    images = []
    for _ in range(args.images):
        feats = {name: value.numpy() for name, value in sd15_random_features(gen).items()}
        images.append(ExtractedImage(np.zeros((4, 64, 64), np.float32), feats))
    raw_mb = sum(v.nbytes for v in images[0].features.values()) / 1e6
    print(f"{args.images} SD 1.5-shaped images (12 layers x 11 steps, {raw_mb:.1f} MB fp16 each, random values); "
          f"direct writes use {_write_pool()._max_workers} threads")
    results = {}
    with work_folder(args.workdir, "dhf-bench-writes-") as work:
        work = Path(work)
        # one unmeasured run of each (page cache, thread pool, zarr's event loop)
        for direct in (True, False):
            write_run(work, images[:1], direct, False, "warmup")
        for load in (False, True):
            times = {"direct": [], "zarr": []}
            for rep in range(args.repeats):
                order = ("direct", "zarr") if rep % 2 == 0 else ("zarr", "direct")  # ABBA
                for name in order:
                    times[name].append(write_run(work, images, name == "direct", load, name))
            key = "with_gil_load" if load else "alone"
            d, z = median(times["direct"]), median(times["zarr"])
            results[key] = {"direct_seconds": times["direct"], "zarr_seconds": times["zarr"],
                            "direct_mb_per_s": raw_mb * args.images / d, "zarr_mb_per_s": raw_mb * args.images / z,
                            "direct_over_zarr_throughput": z / d}
            label = "beside a GIL-holding thread" if load else "writer alone"
            print(f"{label:<27}: direct {d / args.images * 1000:6.0f} ms/image ({raw_mb * args.images / d:5.0f} MB/s), "
                  f"zarr {z / args.images * 1000:6.0f} ms/image ({raw_mb * args.images / z:5.0f} MB/s): "
                  f"direct {z / d:.2f}x as fast (medians of {args.repeats})")
    print(f"peak RSS {peak_rss_mb():.0f} MiB")
    if args.json_out:
        write_json(args.json_out, {"machine": machine_info("cpu"), "raw_mb_per_image": raw_mb,
                                   "images": args.images, "repeats": args.repeats, **results})
    alone, loaded = results["alone"], results["with_gil_load"]
    print(f"direct / zarr write throughput = {alone['direct_over_zarr_throughput']:.2f}x alone, "
          f"{loaded['direct_over_zarr_throughput']:.2f}x beside a GIL-holding thread")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
