"""Stages two and three on a GPU at the paper's size: a training step from SD 1.5-shaped cached
features vs the reference's step (which first inverts both images), and the per-image descriptor
pass of eval; step times and peak GPU memory (issue 7's items 3 and 7 on a GPU).

Measured in one process, on random weights and features (nothing is downloaded):
    read      two SD 1.5-sized images (12 layers x 11 steps, 157 MB of fp16 each) written to a
              local Zarr cache with the library's codecs, read back with FeatureReader (warm page
              cache: this is the decode cost, not the disk's), then through the training loader
              with 1, 2 and the default number of reader threads
    unet      one SD 1.5-config UNet call at batch 2 on a 64x64 latent in fp16 (median of several)
    step      `_train_step` of `dhf-cache train` at P=384, 64x64, GroupNorm 32 on SD 1.5's layer
              table (6.5M parameters, fp32 weights, fp16 inputs staged in reused host buffers and moved each step),
              once per --precisions entry (fp32: the reference; bf16: `--precision bf16`, autocast), from the
              same start on the same inputs: step time, peak memory, and how far bf16's losses are from fp32's
    transfer  the step's first lines alone: a pair's features stacked and moved to the device,
              afresh (pageable, as before StepInputs), through reused pinned buffers (StepInputs,
              what the step does), and image by image with the stack on the device
    describe  the aggregator's forward pass for one image in eval mode (what eval stores per image)
The reference recomputes both images' features every step: 50 UNet calls at batch 2 + the step.
Training from the cache: read + step, or max(read, step) with the loader's prefetch overlapping.
The loader line says what the fastest step needs (two images per step) against what each reader
thread count delivers.

    python bench/gpu_train_step.py                          # CUDA, paper size (~1-2 min)
    python bench/gpu_train_step.py --device cpu --size 32/16/8 --steps 2 --unet-calls 1   # plumbing check
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: E402, F401  (first: it records the environment the benchmark was started with)
from dhf_cache.openmp import settle_wait_policy  # noqa: E402

settle_wait_policy(print)  # before torch loads, as the CLI's compute commands do (dhf_cache/openmp.py)

import torch  # noqa: E402

from _common import describe_machine, machine_info, median, peak_rss_mb, synchronize, write_json  # noqa: E402
from train_speed import SD15_STEPS_PER_IMAGE, sd15_layers, sd15_random_features, sd15_read  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="default cuda")
    p.add_argument("--size", default="384/64/32", help="network P/GRID/GROUPS (default 384/64/32, the paper's)")
    p.add_argument("--steps", type=int, default=10, help="measured training steps after 2 warm-up steps (default 10)")
    p.add_argument("--unet-calls", type=int, default=5, help="measured UNet calls after 1 warm-up, 0 skips (default 5)")
    p.add_argument("--keypoints", type=int, default=15, help="keypoints per pair (default 15)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="training step precisions to measure, fp32 first (default fp32,bf16; bf16 is skipped on a GPU "
                        "without it)")
    p.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.dim, args.grid, args.groups = (int(v) for v in args.size.split("/"))
    except ValueError:
        p.error(f"--size {args.size!r}: P/GRID/GROUPS, e.g. 384/64/32")
    if args.steps < 1 or args.unet_calls < 0:
        p.error("--steps must be >= 1 and --unet-calls >= 0")
    args.precisions = [v.strip() for v in args.precisions.split(",") if v.strip()]
    if not args.precisions or set(args.precisions) - {"fp32", "bf16"}:
        p.error("--precisions: fp32 and/or bf16")
    return args


class GpuMemory:
    """Peak allocated memory between reset() and peak_mb(); None off CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None


def fmt_mb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.2f} GiB"


def unet_call(args, device: torch.device, memory: GpuMemory) -> dict:
    from dhf_cache.sources.loading import quiet_libraries
    from dhf_cache.sources.sd.tiny_model import build_sd15_unet

    quiet_libraries()  # diffusers' note about casting with .to() says nothing here
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    unet = build_sd15_unet(seed=args.seed).eval().to(device, dtype)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(2, 4, 64, 64, generator=gen).to(device, dtype)
    emb = torch.randn(2, 77, 768, generator=gen).to(device, dtype)
    times = []
    memory.reset()
    with torch.inference_mode():
        for i in range(args.unet_calls + 1):
            synchronize(device)
            start = time.perf_counter()
            unet(x, torch.tensor(500, device=device), encoder_hidden_states=emb)
            synchronize(device)
            if i:  # the first call is the warm-up
                times.append(time.perf_counter() - start)
    peak = memory.peak_mb()
    del unet, x, emb
    gc.collect()
    return {"unet_build_seconds": build_s, "unet_call_seconds_batch2": median(times), "unet_calls": times,
            "unet_dtype": str(dtype).replace("torch.", ""), "peak_gpu_mb_unet": peak}


def network(args, device: torch.device, memory: GpuMemory, precisions: list[str]) -> dict:
    """Training steps once per precision, each from the same start on the same inputs; then the
    input transfer and eval's descriptor pass, once."""
    from dhf_cache.aggregator.network import AggregationNetwork
    from dhf_cache.pipelines.train import StepInputs, _Example, _train_step

    layers = sd15_layers()
    gen = torch.Generator().manual_seed(args.seed)
    feats = [tuple(sd15_random_features(gen) for _ in range(2))]
    grid = args.grid
    batch = [_Example(None, torch.randint(0, grid, (args.keypoints, 2), generator=gen),
                      torch.randint(0, grid, (args.keypoints, 2), generator=gen))]
    steps = {}
    for precision in precisions:
        torch.manual_seed(args.seed)
        net = AggregationNetwork(layers, 11, args.dim, grid, args.groups).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        net.train()
        times, losses = [], []
        staging = StepInputs(device)  # as run_train: host buffers reused from step to step
        memory.reset()
        for i in range(args.steps + 2):  # 2 warm-up steps
            synchronize(device)
            start = time.perf_counter()
            losses.append(_train_step(net, opt, batch, feats, device, staging, precision))  # float(loss) synchronises
            synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        steps[precision] = {"network_step_seconds": median(times), "network_steps": times, "losses": losses,
                            "peak_gpu_mb_train_step": memory.peak_mb()}
    transfer = input_transfer(net.layer_names, feats, device)
    net.eval()
    describe = []
    memory.reset()
    with torch.inference_mode():
        for i in range(4):
            inputs = {name: feats[0][0][name][None].to(device) for name in net.layer_names}
            synchronize(device)
            start = time.perf_counter()
            net(inputs).to(torch.float16).cpu()
            synchronize(device)
            if i:
                describe.append(time.perf_counter() - start)
    describe_peak = memory.peak_mb()
    n_params = sum(p.numel() for p in net.parameters())
    del net, opt, feats
    gc.collect()
    return {**steps[precisions[0]], "steps": steps, "parameters": n_params,
            "describe_seconds_per_image": median(describe), "peak_gpu_mb_describe": describe_peak, **transfer}


def input_transfer(names, feats, device: torch.device, repeats: int = 5) -> dict:
    """What the step spends moving a pair's features to the device (its first lines): stacking
    into fresh pageable memory + copy (what `_train_step` did before `StepInputs`), vs a pinned
    staging buffer reused from step to step (what `StepInputs` does), vs copying each image's (already touched)
    memory and stacking on the device. On the CPU all three are just a stack: fresh memory in
    the first and third, a reused buffer in the second."""
    from dhf_cache.pipelines.train import StepInputs

    def pageable():
        return {n: torch.stack([img[n] for pair in feats for img in pair]).to(device, non_blocking=True) for n in names}

    pinned = functools.partial(StepInputs(device), names, feats)  # the step's own staging

    def per_image():  # no host-side stack: each image's tensor copied, stacked on the device
        return {n: torch.stack([img[n].to(device, non_blocking=True) for pair in feats for img in pair])
                for n in names}

    times = {"pageable": [], "pinned": [], "per_image": []}
    for i in range(repeats + 1):  # the first of each unmeasured
        for name, fn in (("pageable", pageable), ("pinned", pinned), ("per_image", per_image)):
            synchronize(device)
            start = time.perf_counter()
            moved = fn()
            synchronize(device)
            if i:
                times[name].append(time.perf_counter() - start)
            del moved
    nbytes = sum(img[n].numel() * img[n].element_size() for pair in feats for img in pair for n in names)
    return {"input_bytes_per_step": nbytes, "input_transfer_seconds_pageable": median(times["pageable"]),
            "input_transfer_seconds_pinned": median(times["pinned"]),
            "input_transfer_seconds_per_image": median(times["per_image"])}


def loader_widths(url: Path, raw_bytes: int, reads: int = 16) -> list[dict]:
    """Images/s of the training loader (Prefetcher over FeatureReader) at 1, 2 and the default
    number of reader threads: how far a many-core GPU host keeps up with the network step."""
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.cache.feature_loader import FeatureReader, Prefetcher, default_loader_workers, select_features

    cache = FeatureCache.open(str(url))
    reader = FeatureReader(cache, select_features(cache))
    out = []
    for workers in sorted({1, 2, default_loader_workers()}):
        start = time.perf_counter()
        for _ in Prefetcher(lambda i: reader.read(i % 2), range(reads), depth=workers + 2, workers=workers):
            pass
        seconds = time.perf_counter() - start
        out.append({"workers": workers, "images_per_second": reads / seconds,
                    "mb_per_second": reads * raw_bytes / 1e6 / seconds})
        print(f"  loader with {workers} reader thread(s): {reads / seconds:.1f} images/s "
              f"({reads * raw_bytes / 1e6 / seconds:.0f} MB/s)", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (use --device cpu for a plumbing check)")
    info = machine_info(args.device)
    print(describe_machine(info))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {card}; network P={args.dim}, {args.grid}x{args.grid}, GroupNorm {args.groups}, SD 1.5's 12 layers "
          f"x 11 steps; random weights and features", flush=True)
    memory = GpuMemory(device)
    with tempfile.TemporaryDirectory(prefix="dhf-bench-gpu-train-") as tmp:
        read = sd15_read(Path(tmp), args.seed, repeats=3)
        print(f"read 2 images from a local Zarr cache (FeatureReader, {read['raw_bytes_per_image'] / 1e6:.1f} MB fp16 "
              f"each, warm page cache): {read['read_seconds_two_images']:.3f} s "
              f"({2 * read['raw_bytes_per_image'] / 1e6 / read['read_seconds_two_images']:.0f} MB/s)", flush=True)
        widths = loader_widths(Path(tmp) / "sd15-cache", read["raw_bytes_per_image"])
    read["loader_widths"] = widths
    best = max(widths, key=lambda w: w["mb_per_second"])
    read["read_seconds_two_images"] = 2 * read["raw_bytes_per_image"] / 1e6 / best["mb_per_second"]  # the loader's pace
    precisions = [p for p in args.precisions
                  if not (p == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported())]
    net = network(args, device, memory, precisions)
    steps = net["steps"]
    for precision, one in steps.items():
        print(f"training step, {precision} ({net['parameters']:,} parameters, {args.keypoints} keypoints): "
              f"{one['network_step_seconds'] * 1000:.1f} ms (median of {args.steps}); peak GPU memory "
              f"{fmt_mb(one['peak_gpu_mb_train_step'])}; loss {one['losses'][0]:.3f} -> {one['losses'][-1]:.3f}",
              flush=True)
    if "bf16" in steps and "fp32" in steps:  # same start, same inputs: how far autocast moves the losses
        a, b = steps["fp32"]["losses"], steps["bf16"]["losses"]
        drift = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        speedup = steps["fp32"]["network_step_seconds"] / steps["bf16"]["network_step_seconds"]
        steps["bf16"].update({"speedup_over_fp32": speedup, "max_relative_loss_difference": drift})
        print(f"  bf16 step speed / fp32's: {speedup:.2f}x; losses of the {len(a)} steps within {drift * 100:.2f}% of "
              "fp32's", flush=True)
    fastest = min(one["network_step_seconds"] for one in steps.values())
    need = 2 * read["raw_bytes_per_image"] / 1e6 / fastest  # MB/s: two images per step
    keeps_up = [w["workers"] for w in widths if w["mb_per_second"] >= need]
    net["loader_needs_mb_per_second"] = need
    print(f"  the loader must deliver {need:.0f} MB/s to keep up with a {fastest * 1000:.1f} ms step; "
          + (f"{min(keeps_up)} reader thread(s) do" if keeps_up else
             f"none of {', '.join(str(w['workers']) for w in widths)} reader threads does (best "
             f"{best['mb_per_second']:.0f} MB/s): read-bound"), flush=True)
    print(f"  of which moving the pair's inputs ({net['input_bytes_per_step'] / 1e6:.0f} MB) to the device: "
          f"{net['input_transfer_seconds_pageable'] * 1000:.1f} ms stacked afresh + pageable copy (before StepInputs); "
          f"{net['input_transfer_seconds_pinned'] * 1000:.1f} ms through a reused (pinned) buffer (StepInputs); "
          f"{net['input_transfer_seconds_per_image'] * 1000:.1f} ms copying each image and stacking on the device",
          flush=True)
    print(f"descriptor pass for one image (eval): {net['describe_seconds_per_image'] * 1000:.1f} ms; peak GPU memory "
          f"{fmt_mb(net['peak_gpu_mb_describe'])}", flush=True)
    results = {**read, **net, "device": card, "config": {k: v for k, v in vars(args).items()}}
    if args.unet_calls:
        unet = unet_call(args, device, memory)
        results.update(unet)
        print(f"SD 1.5-config UNet call, batch 2, 64x64 latent, {unet['unet_dtype']}: "
              f"{unet['unet_call_seconds_batch2'] * 1000:.1f} ms (median of {args.unet_calls}; building it "
              f"{unet['unet_build_seconds']:.1f} s, not counted); peak GPU memory {fmt_mb(unet['peak_gpu_mb_unet'])}",
              flush=True)
        step, rd = net["network_step_seconds"], read["read_seconds_two_images"]
        reference = SD15_STEPS_PER_IMAGE * unet["unet_call_seconds_batch2"] + step
        cache, overlapped = rd + step, max(rd, step)  # rd: a pair at the widest loader's pace
        results.update({"reference_step_seconds": reference, "cache_step_seconds": cache,
                        "cache_step_seconds_overlapped": overlapped, "ratio": reference / cache,
                        "ratio_overlapped": reference / overlapped})
        print(f"reference step ~ {SD15_STEPS_PER_IMAGE} x {unet['unet_call_seconds_batch2'] * 1000:.1f} ms + "
              f"{step * 1000:.1f} ms = {reference:.2f} s [VAE encode and image decode left out]")
        print(f"cache step     ~ {rd:.3f} s read (a pair, at the pace of {best['workers']} reader threads) + {step:.3f} s "
              f"step = {cache:.3f} s; {overlapped:.3f} s with the prefetch overlapping "
              f"({'read' if rd > step else 'network'}-bound)")
    results["peak_rss_mb"] = peak_rss_mb()
    print(f"peak RSS {results['peak_rss_mb']:.0f} MiB")
    if args.json_out:
        write_json(args.json_out, {"machine": info, "results": results})
    steps_line = ", ".join(f"{p} {one['network_step_seconds'] * 1000:.1f} ms ({fmt_mb(one['peak_gpu_mb_train_step'])})"
                           for p, one in steps.items())
    if args.unet_calls:
        print(f"{card}: reference/cache training step = {results['ratio']:.1f}x ({results['ratio_overlapped']:.1f}x "
              f"overlapped); step {steps_line} (target <= 60 ms)")
    else:
        print(f"{card}: training step {steps_line} (target <= 60 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
