"""Stage one on a GPU: SD 1.5-config UNet in fp16, a sweep of batch sizes and speed levers
(issues 7 and 18).

Runs `build_overhead.py --model sd15 --device cuda --dtype float16 --image-size 512 --steps 50
--flops` once per configuration, each in its own process (so peak GPU memory, RSS and
torch.compile's caches are that configuration's own), and prints one table: images/s of the
build and of the bare inversion, build/bare, the bare UNet calls' achieved TFLOP/s and their
fraction of the card's dense fp16 peak, peak GPU memory, with the card's name. The reference
code needs ~13.7 GB of GPU memory for a batch of 2 (a 24 GB card); the last line compares.

A configuration is a batch size with levers joined by '+':
    cl                 --channels-last
    attn=KERNEL        --attention KERNEL (flash, efficient, cudnn, math)
    compile=MODE       --compile MODE (default, reduce-overhead, max-autotune)
    bf16               --dtype bfloat16 (else float16)
e.g. 32+cl+compile=reduce-overhead. The default list (issue 18's sweep) runs in priority order,
so that --budget-seconds leaves out the least needed: today's batch 8, then 32, channels-last,
compiled, 16, CUDA graphs, bf16.

    python bench/gpu_batches.py                               # the sweep, ~8-10 min on one H200
    python bench/gpu_batches.py --configs 8,16+cl             # a subset
    python bench/gpu_batches.py --device cpu --model tiny --image-size 64 --steps 5 \
        --configs 1,2+cl+attn=math,2+compile=default --compile-backend eager   # plumbing check

Each configuration builds `--images` images (default: 3 batches, at least 16) after one warm-up
run of each variant (with compile=..., the warm-up holds the compilations, reported apart);
the breakdown of where the time goes is printed for the first configuration without compile.
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
COMPILE_ESTIMATE_S = 150  # a guess at inductor's two SD 1.5 UNet compilations on a 16-core host
SWEEP = "8,32,32+cl,32+cl+compile=default,16,16+cl+compile=reduce-overhead,32+cl+bf16"


class ConfigFailed(Exception):
    """A configuration's process failed; the sweep goes on with the next one."""


class Config:
    """One row of the sweep: a batch size and its levers, parsed from e.g. '32+cl+compile=default'."""

    def __init__(self, text: str, dtype: str):
        parts = [p.strip() for p in text.split("+") if p.strip()]
        try:
            self.batch = int(parts[0])
        except (IndexError, ValueError):
            raise SystemExit(f"--configs {text!r}: starts with a batch size, e.g. 32+cl") from None
        if self.batch < 1:
            raise SystemExit(f"--configs {text!r}: the batch size must be >= 1")
        self.label, self.args, self.dtype, self.compiled = text, [], dtype, False
        for lever in parts[1:]:
            key, _, value = lever.partition("=")
            if key == "bf16":
                self.dtype = "bfloat16"
            elif key == "cl":
                self.args += ["--channels-last"]
            elif key == "attn" and value:
                self.args += ["--attention", value]
            elif key == "compile" and value:
                self.args += ["--compile", value]
                self.compiled = True
            else:
                raise SystemExit(f"--configs {text!r}: unknown lever {lever!r} (cl, attn=K, compile=M, bf16)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=os.environ.get("DHF_BENCH_GPU_CONFIGS", SWEEP),
                   help=f"comma-separated configurations, run in this order (default $DHF_BENCH_GPU_CONFIGS or {SWEEP})")
    p.add_argument("--batch-sizes", help="plain batch sizes, no levers (replaces --configs), e.g. 1,2,4,8")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: CPU plumbing check)")
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"], help="default sd15 (random weights)")
    p.add_argument("--device", default="cuda", help="default cuda")
    p.add_argument("--dtype", default="float16", help="default float16")
    p.add_argument("--image-size", type=int, default=512, help="default 512 (SD 1.5's own)")
    p.add_argument("--steps", type=int, default=50, help="inversion steps (default 50, METHOD.md)")
    p.add_argument("--images", type=int, help="images per run (default max(16, 3 x batch size))")
    p.add_argument("--repeats", type=int, default=1, help="measured A/B repetitions per batch size (default 1)")
    p.add_argument("--budget-seconds", type=float, default=float(os.environ.get("DHF_BENCH_GPU_BUDGET", 0)) or None,
                   help="start no further batch size once the time spent plus an estimate of the next one (the "
                        "last one's wall time, scaled by images) would pass this: for a lent device's command "
                        "limit (default: $DHF_BENCH_GPU_BUDGET, else no limit)")
    p.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    texts = args.batch_sizes if args.batch_sizes else args.configs
    args.configs = [Config(t, args.dtype) for t in texts.split(",") if t.strip()]
    if not args.configs:
        p.error("--configs: at least one, e.g. 8,32+cl")
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
    images = args.images or max(16, 3 * batch)
    return -(-images // batch) * batch  # whole batches (compiled runs keep one shape)


def estimate(last: dict, images: int, largest: bool) -> float:
    """Seconds the next batch size will take: the last one's setup, plus its measured runs scaled by
    images (conservative: larger batches are faster per image); the breakdown's two extra runs (on
    the largest batch size) count x 1.5, in the last one's time and in the next one's."""
    fixed = last.get("setup_seconds", 0.0)
    runs = max(0.0, last["wall_seconds"] - fixed) * images / last["images"]
    return fixed + runs * (1.5 if largest else 1.0) / (1.5 if last.get("breakdown") else 1.0)


def run_config(args, config: Config, breakdown: bool, folder: Path, number: int) -> dict:
    batch = config.batch
    images = images_for(args, batch)
    out = folder / f"config{number}.json"
    command = [sys.executable, str(HERE / "build_overhead.py"), "--model", args.model, "--device", args.device,
               "--dtype", config.dtype, "--image-size", str(args.image_size), "--steps", str(args.steps),
               "--images", str(images), "--batch-size", str(batch), "--repeats", str(args.repeats),
               "--breakdown-repeats", "1" if breakdown else "0", "--flops", "--compile-backend", args.compile_backend,
               *config.args, "--json", str(out)]
    print(f"== {config.label}: {images} images", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=HERE.parent, text=True, capture_output=True)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    keep = lines if breakdown else [l for l in lines if l.startswith(("build:", "bare:", "overhead:", "peak", "UNet FLOPs",
                                                                       "warm-up"))]
    for line in keep:
        print("  " + line, flush=True)
    if proc.returncode != 0:  # one failed configuration (e.g. a lever this torch cannot run) ends only itself
        print(proc.stderr[-3000:], file=sys.stderr)
        raise ConfigFailed(f"{config.label}: build_overhead.py exited with {proc.returncode}: "
                           + (proc.stderr.strip().splitlines() or ["no output"])[-1][:300])
    figures = json.loads(out.read_text())
    figures["wall_seconds"] = time.perf_counter() - start
    figures["images"] = images
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    card = device_name(args.device)
    print(describe_machine(machine_info(args.device)))
    print(f"device: {card}; {args.model}-config UNet and VAE (random weights), {args.image_size} px, "
          f"{args.steps} UNet calls per batch, METHOD.md's saved steps; dtype {args.dtype} unless bf16")
    rows, skipped, failed = [], [], []
    start, last = time.perf_counter(), None
    breakdown_done = False
    with tempfile.TemporaryDirectory(prefix="dhf-bench-gpu-") as tmp:
        for number, config in enumerate(args.configs):
            spent = time.perf_counter() - start
            needed = (estimate(last, images_for(args, config.batch), not breakdown_done and not config.compiled)
                      + (COMPILE_ESTIMATE_S if config.compiled else 0)) if last else 0
            if last and args.budget_seconds and spent + needed > args.budget_seconds:
                skipped.append(config.label)
                continue
            breakdown = not breakdown_done and not config.compiled
            try:
                figures = run_config(args, config, breakdown, Path(tmp), number)
            except ConfigFailed as exc:
                print(f"  FAILED: {exc}", flush=True)
                failed.append(str(exc))
                continue
            breakdown_done |= breakdown
            last = figures
            r = last["results"]
            rows.append({"config": config.label, "batch": config.batch, "images": last["images"],
                         "build_images_per_second": r["build_images_per_second"],
                         "bare_images_per_second": r["bare_images_per_second"],
                         "build_over_bare": r["ratio_of_medians"],
                         "bare_tflops_per_second": r.get("bare_tflops_per_second"),
                         "bare_fraction_of_peak": r.get("bare_fraction_of_peak"),
                         "warmup_seconds": r.get("warmup_seconds"),
                         "peak_gpu_mb": r.get("peak_gpu_mb_build"), "peak_rss_mb": r.get("peak_rss_mb")})
    print(f"\n{'configuration':<32} {'images':>6} {'build img/s':>11} {'bare img/s':>10} {'build/bare':>10} "
          f"{'bare TFLOP/s':>12} {'of peak':>7} {'peak GPU MiB':>12} {'warm-up s':>9}")
    for row in rows:
        gpu = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
        tflops = f"{row['bare_tflops_per_second']:.1f}" if row["bare_tflops_per_second"] is not None else "-"
        share = f"{row['bare_fraction_of_peak']:.0%}" if row["bare_fraction_of_peak"] is not None else "-"
        print(f"{row['config']:<32} {row['images']:>6} {row['build_images_per_second']:>11.2f} "
              f"{row['bare_images_per_second']:>10.2f} {row['build_over_bare']:>10.3f} {tflops:>12} {share:>7} "
              f"{gpu:>12} {row['warmup_seconds']:>9.1f}")
    if skipped:
        print(f"not run (--budget-seconds {args.budget_seconds:.0f}): {', '.join(skipped)}")
    for line in failed:
        print(f"failed: {line}")
    if not rows:
        raise SystemExit("no configuration ran")
    if args.json_out:
        write_json(args.json_out, {"machine": machine_info(args.device), "device": card, "rows": rows,
                                   "skipped_configs": skipped, "failed_configs": failed,
                                   "config": {k: v for k, v in vars(args).items() if k != "configs"},
                                   "configs": [c.label for c in args.configs]})
    best = max(rows, key=lambda row: row["build_images_per_second"])
    fastest = max((row for row in rows if row["bare_fraction_of_peak"] is not None),
                  key=lambda row: row["bare_fraction_of_peak"], default=None)
    share = (f"; bare UNet at {fastest['bare_fraction_of_peak']:.0%} of the dense fp16 peak ({fastest['config']}, "
             "target >= 40%)" if fastest else "")
    print(f"{card}: best {best['build_images_per_second']:.2f} stored images/s with {best['config']} "
          f"(build/bare {best['build_over_bare']:.2f}; target >= 8){share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
