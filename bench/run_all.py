"""`make bench`: run every benchmark, one after the other, and rewrite docs/benchmarks.md.

Each benchmark runs in its own process (so peak RSS is its own), writes its figures as JSON
under bench-out/, and prints its ratio on its last line; this script collects the last lines
into a summary table and keeps every benchmark's full output in the document, with the
machine and the command that produced them. Benchmarks never run during `make test`.

    python bench/run_all.py                    # everything (~20 min on a 2-core CPU, +5 min to make demo-out if missing)
    python bench/run_all.py --only eval,codecs # a subset; the other sections keep their old text
    python bench/run_all.py --quick            # the quick variants, for checking the suite works
    python bench/run_all.py --only gpu-train,gpu,gpu-sources   # on a CUDA machine: SD 1.5 training step (fp32,
                                      # bf16); build sweep of batch sizes and levers; SDXL and DINOv2 builds
                                      # (all three skipped without CUDA)
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
OUT = ROOT / "bench-out"

# name: (title, script and arguments, quick arguments, what the issue asks)
BENCHMARKS = {
    "build": ("1-2. Build overhead and where stage one's time goes (tiny model)",
              ["build_overhead.py"], ["build_overhead.py", "--images", "4", "--repeats", "2", "--breakdown-repeats", "1"],
              "build / bare inversion <= 1.10"),
    "build-sd15": ("1-2. Build overhead, SD 1.5-config UNet (random weights)",
                   ["build_overhead.py", "--model", "sd15"],
                   ["build_overhead.py", "--model", "sd15", "--steps", "2", "--image-size", "128", "--repeats", "1",
                    "--breakdown-repeats", "1"],
                   "build / bare inversion <= 1.10"),
    "build-process": ("CPU at the floor: `dhf-cache build` vs a plain diffusers loop, whole processes, quiet and loaded",
                      ["build_overhead.py", "--whole-process"],
                      ["build_overhead.py", "--whole-process", "--images", "2", "--steps", "5", "--repeats", "1"],
                      "dhf-cache build / plain loop <= 1.10, quiet and loaded"),
    "writes": ("2. The build writer: direct chunk writes vs zarr's write path (SD 1.5-shaped images)",
               ["write_speed.py"], ["write_speed.py", "--images", "2", "--repeats", "1"],
               "direct / zarr >= 1, also beside a GIL-holding thread"),
    "train": ("3-4. Training from the cache vs the reference approach; the loader",
              ["train_speed.py"], ["train_speed.py", "--quick"], "reference / cache >= 20x; loader wait <= 10%"),
    "train-process": ("CPU at the floor: `dhf-cache train` step vs a plain torch loop, whole processes, quiet and loaded",
                      ["train_speed.py", "--whole-process"],
                      ["train_speed.py", "--whole-process", "--process-steps", "10", "--repeats", "1"],
                      "dhf-cache train step / plain loop step <= 1.10, quiet and loaded"),
    "sources": ("Feature sources: build vs bare per source (SD, SDXL, DINOv2), bytes per image, fused training step",
                ["sources.py"], ["sources.py", "--quick"], "build / bare <= 1.10 per source; fused step vs SD alone"),
    "eval": ("5. Eval cost vs pairs and images", ["eval_scaling.py"], ["eval_scaling.py", "--quick"],
             "SPair test (12,234 pairs) < 60 s; flat in pairs"),
    "view": ("The viewer: click latency (request to heatmap bytes) from stored descriptors, first view of a pair",
             ["view_latency.py"], ["view_latency.py", "--quick"], "click at load 224 < 100 ms"),
    "cluster": ("Cluster build throughput; loader reads from S3, local disk and plain file reads",
                ["cluster_throughput.py"], ["cluster_throughput.py", "--images", "4", "--steps", "5", "--repeats", "1",
                                            "--read-passes", "1"],
                "2 workers / 1 worker >= 1.6"),
    "codecs": ("6. Storage codecs: bytes per image, throughput, error, PCK change",
               ["storage_codecs.py"], ["storage_codecs.py", "--keepbits", "5", "--no-sd15"], "recommendation"),
    "gpu": ("1, 2, 7, 18 on a GPU: SD 1.5-config UNet, batch sizes to 32 and the speed levers",
            ["gpu_batches.py"], ["gpu_batches.py", "--configs", "8,32+cl", "--steps", "10"],
            "stored images/s >= 8 at 512 px, 50 calls; bare UNet >= 40% of the dense fp16 peak; build/bare <= 1.10"),
    "gpu-train": ("3, 7 on a GPU: a training step at the paper's size from SD 1.5-shaped cached features",
                  ["gpu_train_step.py"], ["gpu_train_step.py", "--steps", "3", "--unet-calls", "2"],
                  "reference / cache step time; training step <= 60 ms (fp32 and bf16); peak GPU memory"),
    "gpu-sources": ("18 on a GPU: feature sources at their real sizes (SDXL 1024 px, DINOv2-base 224, -large 448)",
                    ["gpu_sources.py"], ["gpu_sources.py", "--sources", "dinov2-base", "--images", "8"],
                    "stored images/s and peak GPU memory per source"),
}
NEEDS_CUDA = {"gpu", "gpu-train", "gpu-sources"}  # left out of a full run on machines without CUDA (its old section stays)
BEGIN, END = "<!-- bench:{} begin -->", "<!-- bench:{} end -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="the quick variants (figures not representative)")
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return p.parse_args(argv)


def run_one(name: str, argv: list[str]) -> dict:
    OUT.mkdir(exist_ok=True)
    command = [sys.executable, str(HERE / argv[0]), *argv[1:], "--json", str(OUT / f"{name}.json")]
    shown = "python bench/" + " ".join(argv)
    print(f"== {name}: {shown}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    proc.wait()
    seconds = time.perf_counter() - start
    text = [l for l in lines if l.strip()]
    # progress bars and warnings are noise in the document; keep the figures
    text = [l for l in text if not re.search(r"\d+%\|", l) and "Warning" not in l]
    return {"command": shown, "rc": proc.returncode, "seconds": seconds, "output": text,
            "last": text[-1] if text else "(no output)"}


def section(name: str, result: dict) -> str:
    title, _, _, target = BENCHMARKS[name]
    status = "" if result["rc"] == 0 else f"\n**Failed with exit code {result['rc']}.**\n"
    body = "\n".join(result["output"])
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{BEGIN.format(name)}\n### {title}\n\n`{result['command']}` ({result['seconds'] / 60:.1f} min, "
            f"finished {when}; target: {target}){status}\n\n```\n{body}\n```\n{END.format(name)}")


def where_and_when(text: str) -> str:
    """'date, machine' of a section: the date from its header, the CPU (or the GPU, for the gpu
    benchmark) from its output, so a partial rerun on another machine is attributed right."""
    when = re.search(r"finished (\d{4}-\d\d-\d\d)", text)
    card = re.search(r"^device: ([^;,]+)", text, re.M)
    cpu = re.search(r"^machine: ([^,]+)", text, re.M)
    where = card.group(1) if card and card.group(1) != "CPU" else (cpu.group(1) if cpu else "?")
    return f"{when.group(1) if when else 'earlier'}, {where}"


def summary_rows(sections: dict[str, str]) -> list[str]:
    rows = ["| benchmark | target | result (the benchmark's last line) | run |", "|---|---|---|---|"]
    for name, (title, _, _, target) in BENCHMARKS.items():
        text = sections.get(name, "")
        found = re.search(r"```\n(.*?)\n```", text, re.S)
        last = found.group(1).splitlines()[-1] if found else "not run yet"
        run = where_and_when(text) if found else "-"
        rows.append(f"| {name} | {target} | {last.replace('|', '/')} | {run} |")
    return rows


def old_sections() -> dict[str, str]:
    if not DOC.is_file():
        return {}
    text = DOC.read_text()
    found = {}
    for name in BENCHMARKS:
        m = re.search(re.escape(BEGIN.format(name)) + ".*?" + re.escape(END.format(name)), text, re.S)
        if m:
            found[name] = m.group(0)
    return found


def machine_line() -> str:
    sys.path.insert(0, str(HERE))
    from _common import describe_machine, machine_info

    return describe_machine(machine_info("cpu"))


def write_doc(sections: dict[str, str], quick: bool) -> None:
    head = DOC.read_text().split("<!-- bench:summary begin -->")[0] if DOC.is_file() else "# Benchmarks\n\n"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = "\n".join([
        "<!-- bench:summary begin -->",
        f"Last written by `make bench` ({'--quick, not representative' if quick else 'python bench/run_all.py'}) "
        f"on {when} on {machine_line().removeprefix('machine: ')}.  ",
        "Each row says when and where its figures were measured (`--only` reruns a subset, perhaps elsewhere).",
        "",
        *summary_rows(sections),
        "<!-- bench:summary end -->",
    ])
    parts = [head.rstrip() + "\n\n" + summary, "## Full output of each benchmark"]
    parts += [sections[name] for name in BENCHMARKS if name in sections]
    DOC.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {DOC.relative_to(ROOT)}")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    if not args.only and not _cuda_available():
        skipped = [n for n in names if n in NEEDS_CUDA]
        names = [n for n in names if n not in NEEDS_CUDA]
        print(f"no CUDA device here: skipping {', '.join(skipped)} (run `--only gpu` on a GPU machine)", flush=True)
    sections = old_sections()
    failed = []
    for name in names:
        _, full, quick, _ = BENCHMARKS[name]
        result = run_one(name, quick if args.quick else full)
        sections[name] = section(name, result)
        if result["rc"]:
            failed.append(name)
        (OUT / f"{name}.log").write_text("\n".join(result["output"]) + "\n")
        if not args.no_doc:  # after each benchmark, so an interrupted suite keeps what it measured
            write_doc(sections, args.quick)
    print("\n".join(summary_rows(sections)))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
