"""Stage one on a GPU: SD 1.5-config UNet in fp16 at batch sizes 1, 2, 4 and 8 (issue 7's GPU part).

Runs `build_overhead.py --model sd15 --device cuda --dtype float16 --image-size 512 --steps 50`
once per batch size, each in its own process (so peak GPU memory and RSS are that batch size's
own), and prints one table: images/s of the build and of the bare inversion, build/bare, peak
GPU memory (torch.cuda.max_memory_allocated) and peak RSS, with the card's name. The reference
code needs ~13.7 GB of GPU memory for a batch of 2 (a 24 GB card); the last line compares.

    python bench/gpu_batches.py                       # ~4-6 min on one H100 (random weights)
    python bench/gpu_batches.py --batch-sizes 1,8     # a subset
    python bench/gpu_batches.py --device cpu --model tiny --image-size 64 --steps 5   # plumbing check

Each batch size builds `--images` images (default: 2 batches, at least 8) after one warm-up
run of each variant; the breakdown of where the time goes is printed for the largest batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import describe_machine, machine_info, write_json

HERE = Path(__file__).resolve().parent
REFERENCE_GB_BATCH_2 = 13.7


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default=os.environ.get("DHF_BENCH_GPU_BATCHES", "2,8,1,4"),
                   help="comma-separated, run in this order (default $DHF_BENCH_GPU_BATCHES or 2,8,1,4: the "
                        "reference's batch and the largest first, in case --budget-seconds stops early); "
                        "the table is sorted")
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"], help="default sd15 (random weights)")
    p.add_argument("--device", default="cuda", help="default cuda")
    p.add_argument("--dtype", default="float16", help="default float16")
    p.add_argument("--image-size", type=int, default=512, help="default 512 (SD 1.5's own)")
    p.add_argument("--steps", type=int, default=50, help="inversion steps (default 50, METHOD.md)")
    p.add_argument("--images", type=int, help="images per run (default max(8, 2 x batch size))")
    p.add_argument("--repeats", type=int, default=1, help="measured A/B repetitions per batch size (default 1)")
    p.add_argument("--budget-seconds", type=float, default=float(os.environ.get("DHF_BENCH_GPU_BUDGET", 0)) or None,
                   help="start no further batch size once the time spent plus an estimate of the next one (the "
                        "last one's wall time, scaled by images) would pass this: for a lent device's command "
                        "limit (default: $DHF_BENCH_GPU_BUDGET, else no limit)")
    p.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes: positive integers, e.g. 1,2,4,8")
    return args


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here (use --device cpu for a plumbing check)")
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return "CPU"


def images_for(args, batch: int) -> int:
    return args.images or max(8, 2 * batch)


def estimate(last: dict, images: int, largest: bool) -> float:
    """Seconds the next batch size will take: the last one's setup, plus its measured runs scaled by
    images (conservative: larger batches are faster per image); the breakdown's two extra runs (on
    the largest batch size) count x 1.5, in the last one's time and in the next one's."""
    fixed = last.get("setup_seconds", 0.0)
    runs = max(0.0, last["wall_seconds"] - fixed) * images / last["images"]
    return fixed + runs * (1.5 if largest else 1.0) / (1.5 if last.get("breakdown") else 1.0)


def run_batch(args, batch: int, largest: bool, folder: Path) -> dict:
    images = images_for(args, batch)
    out = folder / f"batch{batch}.json"
    command = [sys.executable, str(HERE / "build_overhead.py"), "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--image-size", str(args.image_size), "--steps", str(args.steps),
               "--images", str(images), "--batch-size", str(batch), "--repeats", str(args.repeats),
               "--breakdown-repeats", "1" if largest else "0", "--json", str(out)]
    print(f"== batch {batch}: {images} images", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=HERE.parent, text=True, capture_output=True)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    keep = lines if largest else [l for l in lines if l.startswith(("build:", "bare:", "overhead:", "peak"))]
    for line in keep:
        print("  " + line, flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"batch {batch}: build_overhead.py exited with {proc.returncode}")
    figures = json.loads(out.read_text())
    figures["wall_seconds"] = time.perf_counter() - start
    figures["images"] = images
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    card = device_name(args.device)
    print(describe_machine(machine_info(args.device)))
    print(f"device: {card}; {args.model}-config UNet and VAE (random weights), {args.dtype}, {args.image_size} px, "
          f"{args.steps} UNet calls per batch, METHOD.md's saved steps")
    rows, skipped = [], []
    start, last = time.perf_counter(), None
    with tempfile.TemporaryDirectory(prefix="dhf-bench-gpu-") as tmp:
        for batch in args.batch_sizes:
            spent = time.perf_counter() - start
            largest = batch == max(args.batch_sizes)
            if last and args.budget_seconds and spent + estimate(last, images_for(args, batch), largest) > args.budget_seconds:
                skipped.append(batch)
                continue
            last = run_batch(args, batch, largest, Path(tmp))
            figures = last
            r = figures["results"]
            rows.append({"batch": batch, "images": figures["images"],
                         "build_images_per_second": r["build_images_per_second"],
                         "bare_images_per_second": r["bare_images_per_second"],
                         "build_over_bare": r["ratio_of_medians"],
                         "peak_gpu_mb": r.get("peak_gpu_mb_build"), "peak_rss_mb": r.get("peak_rss_mb")})
    print(f"\n{'batch':>5} {'images':>6} {'build img/s':>11} {'bare img/s':>10} {'build/bare':>10} "
          f"{'peak GPU MiB':>12} {'peak RSS MiB':>12}")
    for row in sorted(rows, key=lambda r: r["batch"]):
        gpu = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
        rss = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] is not None else "-"
        print(f"{row['batch']:>5} {row['images']:>6} {row['build_images_per_second']:>11.2f} "
              f"{row['bare_images_per_second']:>10.2f} {row['build_over_bare']:>10.3f} {gpu:>12} {rss:>12}")
    if skipped:
        print(f"not run (--budget-seconds {args.budget_seconds:.0f}): batch size(s) {', '.join(map(str, skipped))}")
    if args.json_out:
        write_json(args.json_out, {"machine": machine_info(args.device), "device": card, "rows": rows,
                                   "skipped_batch_sizes": skipped, "config": vars(args)})
    best = max(rows, key=lambda row: row["build_images_per_second"])
    two = next((row for row in rows if row["batch"] == 2 and row["peak_gpu_mb"] is not None), None)
    memory = (f"peak GPU memory at batch 2 {two['peak_gpu_mb'] / 1024:.1f} GiB vs the reference's "
              f"~{REFERENCE_GB_BATCH_2} GB" if two else "no GPU memory figure at batch 2")
    print(f"{card}: best {best['build_images_per_second']:.2f} images/s at batch {best['batch']} "
          f"(build/bare {best['build_over_bare']:.2f}); {memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
