"""Sharing caches: build throughput with 2 dask workers vs 1, and loader reads from S3 vs disk.

1. The same images built into fresh caches by a LocalCluster of 1 worker and of 2 workers
   (one torch thread each, the cluster started outside the timed region), alternated; the
   ratio is images/s with 2 workers over images/s with 1 (target >= 1.6 on 2 cores).
2. The training loader (`FeatureReader` + `Prefetcher`, as `dhf-cache train` reads) over one
   cache copied to local disk and to an S3 server on loopback (`rclone serve s3`), alternated;
   reported as MB/s of decoded feature bytes and the S3/local ratio (each pass opens its arrays
   before the clock starts, as a training run does once). Alongside, plain sequential reads of
   the same chunk files (`open().read()`, no decoding), as stored MB/s: the loader's
   stored-bytes rate over it is what decoding, checksums and tensors cost. Local reads take
   dhf-cache's direct path (dhf_cache/cache/direct_chunks.py); S3 reads go through zarr.

The last line prints the 2-vs-1-worker ratio.
"""

from __future__ import annotations


import _common  # noqa: E402, F401  (first: it records the environment the benchmark was started with)
from dhf_cache.openmp import settle_wait_policy  # noqa: E402

settle_wait_policy(print)  # before torch loads, as the CLI's compute commands do (dhf_cache/openmp.py)

import argparse  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, machine_info, median, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="inversion steps (saved: 11 or fewer, evenly spaced)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--read-passes", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def prepare(work: Path, n_images: int):
    from dhf_cache.datasets.sample_data import PHOTOS, write_sample_data
    from dhf_cache.sources.sd.tiny_model import write_tiny_model

    model = work / "tiny"
    if not (model / "model_index.json").exists():
        write_tiny_model(model, seed=0)
    data = work / "data"
    if not (data / "Layout").exists():
        per_photo = max(2, -(-n_images // len(PHOTOS)))
        write_sample_data(data, seed=0, size=64, split_views={"test": per_photo})
    return model, data


def timed_cluster_build(client, request, options, url: str) -> float:
    from dhf_cache.pipelines.distributed import run_distributed_build

    shutil.rmtree(url, ignore_errors=True)
    start = time.perf_counter()
    result = run_distributed_build(request, options, "cluster", log=lambda _: None, client=client)
    assert result.ok and result.n_built == result.n_images, result
    return time.perf_counter() - start


def cluster_benchmark(args, model, data, work) -> dict:
    import dataclasses
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)  # scheduler/nanny INFO lines at shutdown

    from dask.distributed import Client, LocalCluster

    from dhf_cache.config import BuildOptions, Preprocessing
    from dhf_cache.datasets import open_dataset
    from dhf_cache.pipelines.build import BuildRequest

    request = BuildRequest(dataset=open_dataset(f"spair:{data}"), cache_url="", model=str(model), steps=args.steps,
                           preprocessing=Preprocessing(load_size=64, image_size=64))
    options = BuildOptions(batch_size=args.batch_size, device="cpu", progress=False, threads=1, limit=args.images)
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                dashboard_address=":0", env=env, silence_logs=logging.ERROR)
                for n in (1, 2)}
    clients = {n: Client(c) for n, c in clusters.items()}
    try:
        for n, client in clients.items():  # warm-up: each worker loads the model once
            timed_cluster_build(client, dataclasses.replace(request, cache_url=str(work / f"warm{n}.zarr")),
                                options, str(work / f"warm{n}.zarr"))
        times = {1: [], 2: []}
        for _ in range(args.repeats):
            for n in (1, 2, 2, 1):
                url = str(work / f"c{n}.zarr")
                times[n].append(timed_cluster_build(clients[n], dataclasses.replace(request, cache_url=url),
                                                    options, url))
    finally:
        for name in list(logging.root.manager.loggerDict):  # quiet shutdown (dask sets its own levels)
            if name.startswith("distributed"):
                logging.getLogger(name).setLevel(logging.ERROR)
        for n in (1, 2):
            clients[n].close()
            clusters[n].close()
    n_images = args.images
    ips = {n: n_images / median(t) for n, t in times.items()}
    return {"seconds": times, "images_per_second": ips, "ratio_2_vs_1": ips[2] / ips[1], "images": n_images}


def start_s3(root: Path):
    rclone = Path(sys.executable).parent / "rclone"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(rclone), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", "KEY,SECRET",
                             "--config", "/dev/null", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return proc, {"key": "KEY", "secret": "SECRET", "endpoint_url": f"http://127.0.0.1:{port}"}


def read_pass(url: str, options: dict) -> tuple[float, int]:
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.cache.feature_loader import FeatureReader, Prefetcher, select_features

    cache = FeatureCache.open(url, options)
    reader = FeatureReader(cache, select_features(cache))
    reader.read(0)  # opens every layer's array (metadata reads), once per training run: not timed
    n_bytes = 0
    start = time.perf_counter()
    for features in Prefetcher(reader.read, range(len(cache.image_ids)), depth=4, workers=2):
        n_bytes += sum(t.numel() * t.element_size() for t in features.values())
    return time.perf_counter() - start, n_bytes


def plain_pass(cache_dir: Path) -> tuple[float, int]:
    """Read every feature chunk file of the cache front to back, no decoding."""
    files = sorted(p for p in (cache_dir / "features").rglob("*") if p.is_file() and p.name != "zarr.json")
    n_bytes = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            n_bytes += len(f.read())
    return time.perf_counter() - start, n_bytes


def loader_benchmark(args, work: Path) -> dict:
    source = work / "warm2.zarr"
    s3_root = work / "s3"
    (s3_root / "bucket").mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, s3_root / "bucket" / "cache.zarr", dirs_exist_ok=True)
    proc, opts = start_s3(s3_root)
    try:
        read_pass(str(source), {})
        read_pass("s3://bucket/cache.zarr", opts)  # warm-up both
        plain_pass(source)
        times = {"local": [], "s3": [], "plain": []}
        n_bytes = stored = 0
        for _ in range(args.read_passes):
            for name, url, o in (("local", str(source), {}), ("s3", "s3://bucket/cache.zarr", opts)):
                seconds, n_bytes = read_pass(url, o)
                times[name].append(seconds)
            seconds, stored = plain_pass(source)
            times["plain"].append(seconds)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    mbps = {k: n_bytes / 1e6 / median(v) for k, v in times.items() if k != "plain"}
    stored_mbps = {k: stored / 1e6 / median(v) for k, v in times.items()}
    return {"seconds": times, "MB_per_second": mbps, "stored_MB_per_second": stored_mbps, "bytes_per_pass": n_bytes,
            "stored_bytes_per_pass": stored, "s3_over_local": mbps["s3"] / mbps["local"],
            "loader_over_plain": stored_mbps["local"] / stored_mbps["plain"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    info = machine_info()
    print(describe_machine(info), flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dhf-bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(work, args.images)
    cluster = cluster_benchmark(args, model, data, work)
    print(f"build, {cluster['images']} tiny-model images at 64 px, {args.steps} inversion steps, batch "
          f"{args.batch_size}, one torch thread per worker: 1 worker {cluster['images_per_second'][1]:.3f} img/s, "
          f"2 workers {cluster['images_per_second'][2]:.3f} img/s", flush=True)
    loader = loader_benchmark(args, work)
    print(f"training loader reads ({loader['bytes_per_pass'] / 1e6:.1f} MB of features a pass): local disk "
          f"{loader['MB_per_second']['local']:.1f} MB/s, S3 on loopback (rclone) {loader['MB_per_second']['s3']:.1f} "
          f"MB/s, S3/local = {loader['s3_over_local']:.2f}", flush=True)
    print(f"stored bytes ({loader['stored_bytes_per_pass'] / 1e6:.1f} MB a pass): plain sequential file reads "
          f"{loader['stored_MB_per_second']['plain']:.1f} MB/s, loader on local disk "
          f"{loader['stored_MB_per_second']['local']:.1f} MB/s (loader/plain = {loader['loader_over_plain']:.2f}; "
          "the loader also decodes zstd, checks crc32c and makes tensors)", flush=True)
    if args.json:
        write_json(args.json, {"machine": info, "cluster": cluster, "loader": loader, "args": vars(args)})
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"2 workers / 1 worker build throughput = {cluster['ratio_2_vs_1']:.2f} (target >= 1.6)")


if __name__ == "__main__":
    main()
