"""`dhf-cache view`: how long a click takes (request to heatmap bytes) from stored descriptors,
and the first view of a pair, on this machine.

The viewer runs as a user starts it (`dhf-cache view ... --port 0`, its own process) and this
script is its browser: plain HTTP requests, timed from sending the request to the last byte of
the answer (the click's JSON carries the heatmap as a base64 PNG). Two settings:

    demo     the demo's cache, run and evaluation (`make demo`; P=64 descriptors on a 32 x 32 grid)
    sd15     the paper's descriptor size, P=384 on a 64 x 64 grid: a checkpoint of that shape
             (random weights over the demo's maps at one timestep) evaluated once on a copy of
             the demo's cache, so its descriptors are stored there exactly as `dhf-cache eval` does

Measured per setting, at load size 224 (the paper's) and 512:

    click        warm: the pair's descriptors read and its target prepared by an earlier click;
                 clicks at random pixels of the source (median, 90th percentile, max)
    first click  the first click on a pair whose images were not seen yet: both descriptor
                 maps read from the cache (chunk checked), the target's norm map prepared
    first view   what a user waits for on choosing a new pair: the pair's record and both
                 photos (requested together, as the page does), then its first click at 224

The last line: the warm click's median at 224 of the sd15 setting against the target (< 100 ms).

    python bench/view_latency.py            # ~1 min with an existing demo-out/ (+5 min to make it)
    python bench/view_latency.py --quick    # fewer clicks
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import _common  # noqa: F401  (first: it records the environment the benchmark was started with)

import numpy as np  # noqa: E402

from _common import describe_machine, machine_info, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_MS = 100.0
LOADS = (224, 512)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="demo-out", help="a `dhf-cache demo` work folder to reuse or create (default demo-out)")
    p.add_argument("--clicks", type=int, help="warm clicks per setting and load size (default 60)")
    p.add_argument("--quick", action="store_true", help="20 clicks per setting and load size")
    p.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.clicks is None:
        args.clicks = 20 if args.quick else 60
    return args


def log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------ settings
def demo_paths(demo_dir: Path) -> dict:
    """The demo's cache, run and evaluation; `dhf-cache demo` makes them when missing."""
    evaluation = demo_dir / "eval" / "trained"
    if not (evaluation / "predictions.jsonl").is_file():
        log(f"{demo_dir}: no demo outputs yet; running `dhf-cache demo` (~5 min on a 2-core CPU)")
        subprocess.run([sys.executable, "-c", "from dhf_cache.cli.main import main; main()", "demo", "--workdir",
                        str(demo_dir), "--no-progress"], cwd=ROOT, check=True)
    return {"cache": demo_dir / "features.zarr", "run": demo_dir / "run", "eval": evaluation,
            "dataset": f"spair:{demo_dir / 'sample-data'}"}


def sd15_setting(demo: dict, work: Path) -> dict:
    """A P=384, 64 x 64 checkpoint over the demo's maps, evaluated on a copy of the demo's cache
    (which stores its descriptors there, as eval does)."""
    from dhf_cache.aggregator.checkpoint import build_network, save_checkpoint, write_json as write_config
    from dhf_cache.pipelines.evaluate import EvalRequest, run_eval

    import torch

    cache = work / "features.zarr"
    shutil.copytree(demo["cache"], cache)
    run = work / "run-sd15-size"
    run.mkdir()
    config = json.loads((demo["run"] / "config.json").read_text())
    # the descriptor's shape is what a click costs; every layer at one timestep (a subset the cache
    # holds, as `train --timesteps` makes) keeps computing the stored set short
    config["network"].update({"projection_dim": 384, "output_size": 64, "num_groups": 32, "n_timesteps": 1})
    config["features"]["timesteps"] = config["features"]["timesteps"][:1]
    write_config(run / "config.json", config)
    torch.manual_seed(0)
    network = build_network(config, run / "config.json")
    save_checkpoint(run, "best", network, {"step": 0})
    out = work / "eval-sd15-size"
    started = time.perf_counter()
    run_eval(EvalRequest(cache_url=str(cache), dataset=demo["dataset"], out=out, checkpoint=run, device="cpu",
                         progress=False, drawings=0), log=lambda _: None)
    log(f"sd15 setting: checkpoint P=384 x 64 x 64 evaluated on a copy of the demo cache in "
        f"{time.perf_counter() - started:.1f} s (descriptors stored)")
    return {"cache": cache, "run": run, "eval": out, "dataset": demo["dataset"]}


# ------------------------------------------------------------------------------------ the viewer
class Viewer:
    """`dhf-cache view` in its own process, and a keep-alive HTTP connection to it."""

    def __init__(self, setting: dict):
        command = [sys.executable, "-c", "from dhf_cache.cli.main import main; main()", "view", "--cache",
                   str(setting["cache"]), "--checkpoint", str(setting["run"]), "--eval", str(setting["eval"]),
                   "--dataset", setting["dataset"], "--port", "0", "--device", "cpu"]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.errors: list[str] = []
        threading.Thread(target=lambda: self.errors.extend(self.process.stderr), daemon=True).start()
        line = self.process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not found:
            self.process.kill()
            raise SystemExit(f"the viewer did not start: {line!r} {''.join(self.errors)[-2000:]}")
        self.port = int(found.group(1))
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def get(self, path: str) -> tuple[float, bytes]:
        """(seconds from sending the request to the answer's last byte, the answer)."""
        started = time.perf_counter()
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        body = response.read()
        seconds = time.perf_counter() - started
        if response.status != 200:
            raise SystemExit(f"GET {path}: {response.status} {body[:300]!r}")
        return seconds, body

    def get_together(self, paths: list[str]) -> float:
        """Seconds until every answer is in, the requests sent together (as a page loads them)."""
        def fetch(path: str, times: list) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            times.append(response.status)
            connection.close()

        started = time.perf_counter()
        statuses: list[int] = []
        threads = [threading.Thread(target=fetch, args=(path, statuses)) for path in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if statuses != [200] * len(paths):
            raise SystemExit(f"{paths}: answered {statuses}")
        return time.perf_counter() - started

    def json(self, path: str):
        return json.loads(self.get(path)[1])

    def close(self) -> None:
        self.connection.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def stats(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "max_ms": float(ms.max()), "min_ms": float(ms.min())}


def line(name: str, s: dict) -> str:
    return (f"  {name:<34} median {s['median_ms']:7.1f} ms  p90 {s['p90_ms']:7.1f} ms  max {s['max_ms']:7.1f} ms  "
            f"(n={s['n']})")


def click_path(pair: int, key: str, x: float, y: float, load: int) -> str:
    return f"/api/click?eval=0&pair={pair}&desc={key}&x={x:.3f}&y={y:.3f}&load={load}"


def measure(name: str, setting: dict, args, rng: np.random.Generator) -> dict:
    viewer = Viewer(setting)
    try:
        info = viewer.json("/api/info")
        key = info["evals"][0]["default"]
        shape = info["checkpoints"][0]["shape"]
        rows = viewer.json("/api/pairs?eval=0")["pairs"]
        log(f"== {name}: descriptors {key} of shape {shape} ({info['checkpoints'][0]['stored']} stored), "
            f"{len(rows)} pairs")
        result: dict = {"descriptor_shape": shape, "pairs": len(rows)}
        # first views and first clicks: pairs whose two images no earlier request touched
        seen: set[str] = set()
        fresh = []
        for row in rows:
            if row["src"] not in seen and row["trg"] not in seen:
                fresh.append(row)
                seen.update((row["src"], row["trg"]))
        views, first_clicks = [], []
        for row in fresh:
            photos = [f"/api/photo?id={quote(row['src'])}", f"/api/photo?id={quote(row['trg'])}"]
            pair_seconds, body = viewer.get(f"/api/pair?eval=0&pair={row['i']}")
            detail = json.loads(body)
            together = viewer.get_together(photos)
            w, h = detail["src_size"]
            click_seconds, _ = viewer.get(click_path(row["i"], key, rng.uniform(0, w), rng.uniform(0, h), 224))
            first_clicks.append(click_seconds)
            views.append(pair_seconds + together + click_seconds)
        result["first_view"] = stats(views)
        result["first_click"] = stats(first_clicks)
        log(line("first view (pair, photos, click)", result["first_view"]))
        log(line("first click on a new pair, 224", result["first_click"]))
        # warm clicks, at each load size, over the fresh pairs in turn
        for load in LOADS:
            for row in fresh:  # prepare every target at this load first (its first click)
                viewer.get(click_path(row["i"], key, 1.0, 1.0, load))
            seconds, server_ms = [], []
            for n in range(args.clicks):
                row = fresh[n % len(fresh)]
                detail = viewer.json(f"/api/pair?eval=0&pair={row['i']}")
                w, h = detail["src_size"]
                elapsed, body = viewer.get(click_path(row["i"], key, rng.uniform(0, w), rng.uniform(0, h), load))
                seconds.append(elapsed)
                answer = json.loads(body)
                server_ms.append(answer["ms"])
            result[f"click_{load}"] = {**stats(seconds), "server_compute_median_ms": float(np.median(server_ms)),
                                       "answer_bytes": len(body)}
            log(line(f"click at load {load} (warm)", result[f"click_{load}"])
                + f"; of which the server computes {np.median(server_ms):.1f} ms; answer {len(body) / 1024:.0f} KiB")
        return result
    finally:
        viewer.close()
        problems = [l for l in viewer.errors if "error" in l.lower() or "Traceback" in l]
        if problems:
            log("viewer log: " + "".join(problems)[-2000:])


def main(argv=None) -> int:
    args = parse_args(argv)
    log(describe_machine(machine_info("cpu")))
    rng = np.random.default_rng(args.seed)
    demo = demo_paths(ROOT / args.demo_dir)  # relative to the repository, as `make demo` writes it
    work = Path(tempfile.mkdtemp(prefix="view-latency-"))
    try:
        results = {"demo": measure("demo", demo, args, rng)}
        results["sd15"] = measure("sd15", sd15_setting(demo, work), args, rng)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json_out:
        write_json(args.json_out, {"machine": machine_info("cpu"), "results": results, "target_ms": TARGET_MS})
    sd = results["sd15"]
    verdict = "meets" if sd["click_224"]["median_ms"] < TARGET_MS else "misses"
    log(f"click at load 224 (P=384 x 64 x 64, stored): median {sd['click_224']['median_ms']:.1f} ms ({verdict} < "
        f"{TARGET_MS:.0f} ms); at 512: {sd['click_512']['median_ms']:.1f} ms; first view of a pair: "
        f"{sd['first_view']['median_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
