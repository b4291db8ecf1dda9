"""Storage codecs side by side: bytes per image, write/read throughput, error, and PCK change.

For every codec option the same stored features are re-encoded into a fresh cache (the real
`FeatureCache.prepare` + `write_image` path, so the bytes are exactly what a build with that
`--codec/--keepbits` stores) and read back with `FeatureCache.read_features`:

    zstd            lossless (the default), zstd level 3 + crc32c
    bitround K      mantissa rounded to K of fp16's 10 bits, then zstd + crc32c (K = 7, 5, 3, 2)
    quant8          each (timestep, channel) map as uint8 codes with an fp32 minimum and step,
                    then zstd + crc32c (dhf_cache/cache/quant8.py)

Two sources of features:
- the demo's cache (tiny model, 64 px, 50 steps, 11 saved: `dhf-cache demo`'s own cache,
  reused from `--demo-dir` or built there): bytes, throughput, error, and the change of PCK
  (bbox@0.1 per point and per image, test split, load size 224) of the demo's trained
  checkpoint, evaluated on each re-encoded cache;
- one SD 1.5-config UNet image (random weights, 512 px, `--sd15-steps` saved calls):
  bytes per image (scaled to METHOD.md's 11 saved steps) against METHOD.md's native fp16
  figure, and the error. Random weights: real SD features are smoother and compress better, so
  these ratios are conservative.

The last line: bytes per image of the recommended setting against native fp16, with its PCK
change.

    python bench/storage_codecs.py                     # ~3 min with an existing demo-out/
    python bench/storage_codecs.py --no-sd15           # demo cache only
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import _common  # noqa: E402, F401  (first: it records the environment the benchmark was started with)
from dhf_cache.openmp import settle_wait_policy  # noqa: E402

settle_wait_policy(print)  # before torch loads, as the CLI's compute commands do (dhf_cache/openmp.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import describe_machine, machine_info, peak_rss_mb, work_folder, write_json  # noqa: E402

KEEPBITS = (7, 5, 3, 2)
RECOMMENDED = "quant8"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="demo-out", help="a `dhf-cache demo` work folder to reuse or create "
                   "(default demo-out, the one `make demo` writes)")
    p.add_argument("--keepbits", default=",".join(map(str, KEEPBITS)), help="bitround settings to measure")
    p.add_argument("--no-sd15", action="store_true", help="skip the SD 1.5-config image (~1 min, ~6 GB)")
    p.add_argument("--sd15-steps", type=int, default=3, help="saved UNet calls of the SD 1.5 image (default 3)")
    p.add_argument("--workdir", help="keep the re-encoded caches here (default: a temporary folder)")
    p.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ the codecs
def codec_variants(keepbits) -> list[tuple[str, dict]]:
    """(label, CodecSpec fields)."""
    return [("zstd", {"name": "zstd"})] + [(f"bitround {k}", {"name": "bitround", "keepbits": k}) for k in keepbits] \
        + [("quant8", {"name": "quant8"})]


def errors(reference: dict[str, np.ndarray], stored: dict[str, np.ndarray]) -> dict:
    """Relative error over normal fp16 values (|x| >= 2^-14), and RMSE relative to each layer's std."""
    max_rel, sum_rel, n, nrmse = 0.0, 0.0, 0, []
    for name, ref in reference.items():
        a = ref.astype(np.float32)
        b = stored[name].astype(np.float32)
        mask = np.abs(a) >= 2.0 ** -14
        rel = np.abs(b[mask] - a[mask]) / np.abs(a[mask])
        if rel.size:
            max_rel = max(max_rel, float(rel.max()))
            sum_rel += float(rel.sum())
            n += rel.size
        nrmse.append(float(np.sqrt(np.mean((b - a) ** 2)) / (a.std() + 1e-12)))
    return {"max_rel_error": max_rel, "mean_rel_error": sum_rel / max(n, 1), "nrmse": float(np.mean(nrmse))}


def merge_errors(parts: list[dict], weights: list[int]) -> dict:
    total = sum(weights)
    return {"max_rel_error": max(p["max_rel_error"] for p in parts),
            "mean_rel_error": sum(p["mean_rel_error"] * w for p, w in zip(parts, weights)) / total,
            "nrmse": sum(p["nrmse"] * w for p, w in zip(parts, weights)) / total}


# ------------------------------------------------------------------------------------ re-encoding
def reencode(source, url: str, codec: dict, images: list[tuple[int, object]]) -> dict:
    """Write `images` (index, ExtractedImage) into a fresh cache with `codec`; time writes and
    reads; measure bytes and errors."""
    from dhf_cache.cache.feature_cache import FEATURES, FeatureCache
    from dhf_cache.config import CodecSpec
    from dhf_cache.cache.storage import stored_bytes

    spec = source.spec
    storage = spec.storage.model_copy(update={"codec": CodecSpec(**codec)})
    spec = spec.model_copy(update={"storage": storage})
    latent_shape = tuple(source.group["latents"].shape[1:])
    ids = [source.image_ids[i] for i, _ in images]
    cache = FeatureCache.prepare(url, spec, source.layers, source.timesteps, ids, latent_shape)
    sizes = source.sizes()
    native = sum(v.nbytes for _, im in images for v in im.features.values())
    start = time.perf_counter()
    for j, (index, image) in enumerate(images):
        cache.write_image(j, image, tuple(int(s) for s in sizes[index]))
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    read_back = [cache.read_features(j) for j in range(len(images))]
    read_s = time.perf_counter() - start
    feature_bytes = stored_bytes(cache.group.store, FEATURES)
    parts = [errors(image.features, got) for (_, image), got in zip(images, read_back)]
    return {"bytes_per_image": feature_bytes / len(images), "native_bytes_per_image": native / len(images),
            "ratio": native / feature_bytes, "write_mb_s": native / write_s / 1e6, "read_mb_s": native / read_s / 1e6,
            "write_s": write_s, "read_s": read_s, **merge_errors(parts, [1] * len(parts))}


def demo_part(args, work: Path, log) -> tuple[list[dict], dict]:
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.sources.sd.extract import ExtractedImage
    from dhf_cache.pipelines.demo import DemoPaths, run_demo
    from dhf_cache.pipelines.evaluate import EvalRequest, run_eval

    demo_dir = Path(args.demo_dir)
    log(f"demo cache and checkpoint: {demo_dir} (made by `dhf-cache demo` if missing)")
    run_demo(demo_dir, None, "cpu", log=lambda m: None, progress=False)
    paths = DemoPaths(demo_dir)
    source = FeatureCache.open(str(paths.cache))
    done = np.flatnonzero(source.done_mask())
    images = [(int(i), ExtractedImage(latent=source.read_latent(int(i)), features=source.read_features(int(i))))
              for i in done]
    dataset = f"spair:{paths.data}"
    rows = []
    for label, codec in codec_variants(args.keepbits):
        url = str(work / f"demo-{label.replace(' ', '-')}.zarr")
        shutil.rmtree(url, ignore_errors=True)
        row = {"codec": label, **reencode(source, url, codec, images)}
        result = run_eval(EvalRequest(cache_url=url, dataset=dataset, out=work / f"eval-{label.replace(' ', '-')}",
                                      checkpoint=paths.run, load_size=224, device="cpu", progress=False, drawings=0),
                          log=lambda m: None)
        pck = result.metrics["pck"]["bbox@0.1"]
        row.update(pck_point=pck["per_point"], pck_image=pck["per_image"])
        rows.append(row)
        shutil.rmtree(url, ignore_errors=True)
    base = rows[0]
    for row in rows:
        row["pck_point_change"] = row["pck_point"] - base["pck_point"]
        row["pck_image_change"] = row["pck_image"] - base["pck_image"]
    setting = {"images": len(images), "layers": len(source.layers), "timesteps": len(source.timesteps),
               "n_pairs": result.metrics["n_pairs"], "n_points": result.metrics["n_points"]}
    return rows, setting


def sd15_part(args, work: Path, log) -> tuple[list[dict], dict]:
    from build_overhead import sd15_extractor

    from dhf_cache.datasets.images import load_image, preprocess
    from dhf_cache.datasets.sample_data import write_sample_data

    data = work / "sd15-data"
    if not (data / "JPEGImages").is_dir():
        write_sample_data(data, seed=0)
    photo = sorted((data / "JPEGImages").rglob("*.jpg"))[0]
    steps = args.sd15_steps
    ns = SimpleNamespace(dtype="float32", seed=0, steps=steps, save_steps=tuple(range(steps - 1, -1, -1)),
                         image_size=512)
    log(f"SD 1.5-config UNet (random weights), 512 px, {steps} saved calls on {photo.name} ...")
    extractor, spec, _ = sd15_extractor(ns, None, torch.device("cpu"))
    pixels = preprocess(load_image(photo), 512, 512)[None]
    start = time.perf_counter()
    image = extractor.extract(pixels, [photo.name])[0]
    extract_s = time.perf_counter() - start
    layers = extractor.layer_table()
    timesteps = extractor.timesteps
    del extractor
    source = SimpleNamespace(spec=spec, layers=layers, timesteps=timesteps, image_ids=[photo.name],
                             group={"latents": SimpleNamespace(shape=(1, *image.latent.shape))},
                             sizes=lambda: np.array([[512, 512]], dtype=np.int32))
    rows = []
    scale = 11 / steps
    for label, codec in codec_variants(args.keepbits):
        url = str(work / f"sd15-{label.replace(' ', '-')}.zarr")
        shutil.rmtree(url, ignore_errors=True)
        row = {"codec": label, **reencode(source, url, codec, [(0, image)])}
        row["bytes_per_image_11_steps"] = row["bytes_per_image"] * scale
        row["native_bytes_per_image_11_steps"] = row["native_bytes_per_image"] * scale
        rows.append(row)
        shutil.rmtree(url, ignore_errors=True)
    return rows, {"saved_calls": steps, "extract_seconds": extract_s,
                  "native_bytes_11_steps": rows[0]["native_bytes_per_image_11_steps"]}


def table(rows: list[dict], pck: bool) -> list[str]:
    head = f"  {'codec':<13} {'bytes/image':>12} {'vs fp16':>8} {'write MB/s':>10} {'read MB/s':>9} " \
           f"{'max rel err':>11} {'mean rel err':>12} {'NRMSE':>8}"
    if pck:
        head += f" {'PCK pt':>7} {'change':>7} {'PCK img':>7} {'change':>7}"
    lines = [head]
    for r in rows:
        line = (f"  {r['codec']:<13} {r.get('bytes_per_image_11_steps', r['bytes_per_image']) / 1e6:>10.3f}MB "
                f"{r['ratio']:>7.2f}x {r['write_mb_s']:>10.1f} {r['read_mb_s']:>9.1f} {r['max_rel_error']:>11.2e} "
                f"{r['mean_rel_error']:>12.2e} {r['nrmse']:>8.2e}")
        if pck:
            line += (f" {100 * r['pck_point']:>6.1f}% {100 * r['pck_point_change']:>+6.1f} "
                     f"{100 * r['pck_image']:>6.1f}% {100 * r['pck_image_change']:>+6.1f}")
        lines.append(line)
    if any(r["codec"] == "quant8" for r in rows):
        lines.append("  (quant8's error is absolute, <= 1/510 of each map's range, so values near zero have large relative "
                     "errors; NRMSE = RMS error / the layer's std compares the codecs)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    args.keepbits = tuple(int(k) for k in args.keepbits.split(",") if k)
    info = machine_info("cpu")
    print(describe_machine(info))
    from dhf_cache.sources.loading import quiet_libraries

    quiet_libraries()
    log = lambda m: print(m, flush=True)  # noqa: E731
    results: dict = {}
    with work_folder(args.workdir, "dhf-bench-codecs-") as work:
        demo_rows, demo_setting = demo_part(args, work, log)
        print(f"demo cache: {demo_setting['images']} images, {demo_setting['layers']} layers x "
              f"{demo_setting['timesteps']} steps (tiny model, 64 px); PCK bbox@0.1 of the demo's trained checkpoint "
              f"on {demo_setting['n_pairs']} test pairs ({demo_setting['n_points']} points), load size 224")
        print("\n".join(table(demo_rows, pck=True)))
        results["demo"] = {"setting": demo_setting, "rows": demo_rows}
        if not args.no_sd15:
            sd_rows, sd_setting = sd15_part(args, work, log)
            print(f"SD 1.5-config UNet, one 512 px image, {sd_setting['saved_calls']} saved calls; bytes scaled to 11 "
                  f"saved steps (native fp16 {sd_setting['native_bytes_11_steps'] / 1e6:.1f} MB, METHOD.md ~157 MB)")
            print("\n".join(table(sd_rows, pck=False)))
            results["sd15"] = {"setting": sd_setting, "rows": sd_rows}
        results["peak_rss_mb"] = peak_rss_mb()
        if args.json_out:
            write_json(args.json_out, {"machine": info, "results": results})
        rec = next(r for r in demo_rows if r["codec"] == RECOMMENDED)
        sd = next((r for r in results.get("sd15", {}).get("rows", []) if r["codec"] == RECOMMENDED), None)
        where = (f"SD 1.5 {sd['bytes_per_image_11_steps'] / 1e6:.0f} MB/image, {sd['ratio']:.2f}x smaller than fp16; "
                 if sd else "")
        error = f"NRMSE {rec['nrmse']:.1e}" if rec["codec"] == "quant8" else f"max rel error {rec['max_rel_error']:.1e}"
        print(f"recommended {RECOMMENDED}: {where}demo {rec['ratio']:.2f}x smaller, {error}, PCK bbox@0.1 change "
              f"{100 * rec['pck_point_change']:+.1f} points")
        return 0


if __name__ == "__main__":
    sys.exit(main())
