"""Stage one on a dask.distributed cluster: one coordinator, many workers, one cache.

The client is the coordinator: it loads the model once to fix the spec (weight identity, layer
table), creates or checks the cache, and plans the work. Tasks are the build's fixed batch
groups, so every image is computed with the neighbours a serial build gives it. Each worker
loads the model once and keeps it; it writes only its images' chunks and done flags. A worker
that dies mid-task leaves its images not done; the scheduler reruns the task elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from dhf_cache.config import BuildOptions, BuildSpec
from dhf_cache.datasets import ImageRecord
from dhf_cache.cache.disk_space import check_free_space
from dhf_cache.errors import UsageError
from dhf_cache.pipelines.build import (
    BuildPlan,
    BuildRequest,
    BuildResult,
    batch_groups,
    build_images,
    open_build,
    plan_build,
    request_records,
)
from dhf_cache.progress import progress_bar

# Per worker process: the loaded extractor, keyed by what it was loaded with.
_WORKER_EXTRACTORS: dict[tuple, Any] = {}


def _worker_extractor(job: dict):
    """Load the model once per worker (per model, spec and device) and check it is the spec's."""
    import torch

    from dhf_cache.device import resolve_device, spread_device
    from dhf_cache.pipelines.build import accelerate_extractor, extractor_for_spec

    device_name = spread_device(job["device"], _local_worker_index() if job.get("spread_gpus") else None)
    key = (job["model"], job["spec_fingerprint"], device_name, job.get("compile"), job.get("attention"),
           job.get("channels_last"))
    if key not in _WORKER_EXTRACTORS:
        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        device = resolve_device(device_name)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # stray default-device work (and the context) on this GPU, not GPU 0
        extractor = extractor_for_spec(job["model"], BuildSpec.model_validate(job["spec"]), device,
                                       who=f"worker {os.uname().nodename}: ")
        accelerate_extractor(extractor, _job_options(job), log=lambda _: None)
        _WORKER_EXTRACTORS[key] = extractor
    return _WORKER_EXTRACTORS[key]


def _local_worker_index() -> int | None:
    """This worker's number in a LocalCluster (named 0..N-1 there), else None."""
    from dask.distributed import get_worker

    try:
        name = get_worker().name
    except ValueError:  # not inside a worker
        return None
    return name if isinstance(name, int) else None


def _job_options(job: dict) -> BuildOptions:
    """A worker's build options, from what the coordinator sent."""
    return BuildOptions(batch_size=job["batch_size"], device=job["device"], max_pixels=job["max_pixels"], progress=False,
                        channels_last=job.get("channels_last", False), attention=job.get("attention", "auto"),
                        compile=job.get("compile", "off"))


def build_group_task(job: dict, records: list[ImageRecord], plan: BuildPlan) -> dict:
    """One task on a worker: build one batch group into the cache; returns what happened."""
    from dhf_cache.cache.feature_cache import FeatureCache

    extractor = _worker_extractor(job)
    cache = FeatureCache.open(job["url"], job["storage_options"], mode="r+", source=job.get("source"))
    options = _job_options(job).model_copy(update={"device": str(extractor.device)})
    result = build_images(extractor, cache, records, options, log=lambda _: None, plan=plan)
    return {"built": result.n_built, "failures": result.failures, "pid": os.getpid(),
            "device": str(extractor.device)}


def parse_scheduler(text: str) -> tuple[str, int | None]:
    """`local:N` (a LocalCluster of N worker processes) or a scheduler address."""
    if text.startswith("local:"):
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--scheduler {text!r}: local:N needs N >= 1 workers, e.g. local:2")
        return "local", n
    return text, None


def start_client(scheduler: str, threads_per_worker: int = 1):
    """A dask Client: a fresh LocalCluster for `local:N` (one torch thread per worker unless
    told otherwise), else a connection to a running scheduler."""
    import dask
    from dask.distributed import Client, LocalCluster

    address, n_workers = parse_scheduler(scheduler)
    if address == "local":
        threads = str(threads_per_worker)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
               "OMP_WAIT_POLICY": "PASSIVE"}
        # dask's nanny writes its pre-spawn variables (OMP_NUM_THREADS=1, ...) into *this*
        # process's os.environ at every worker (re)spawn, so everything the caller starts later
        # would run on one thread (the test suite's later CLI runs took 1.7x as long). The
        # workers get the same variables through `env` instead.
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, env=env)
        return Client(cluster), cluster
    try:
        return Client(address, timeout="30s"), None
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"--scheduler {scheduler}: cannot reach the dask scheduler ({exc})") from None


def run_distributed_build(request: BuildRequest, options: BuildOptions, scheduler: str,
                          log: Callable[[str], None] = print, client=None) -> BuildResult:
    """Build on a dask cluster; the calling process coordinates and shows cluster-wide progress."""
    from dask.distributed import as_completed

    start = time.perf_counter()
    records = request_records(request)
    if options.limit:
        records = records[: options.limit]
    local = parse_scheduler(scheduler)[0] == "local"
    if request.dtype == "auto":  # the workers' device decides, not the coordinator's
        request = dataclasses.replace(request, dtype=_worker_dtype(options.device, local))
    extractor, cache = open_build(request, [r.id for r in records], "cpu", log)
    plan = plan_build(cache, records)
    check_free_space(cache, len(plan.todo), log)
    groups = [g for g in batch_groups(records, plan.index, options.batch_size) if any(r.id in plan.todo for r in g)]
    n_skipped = len(records) - len(plan.todo)
    log(f"cache {cache.url}: {len(records)} images, {n_skipped} already done, {len(plan.todo)} to build "
        f"in {len(groups)} tasks on {scheduler}")
    del extractor  # the coordinator's copy of the model is no longer needed
    job = {
        "model": request.model, "spec": cache.meta["spec"], "spec_fingerprint": cache.fingerprint["spec"],
        "source": cache.name,
        "url": request.cache_url, "storage_options": request.storage_options, "device": options.device,
        "batch_size": options.batch_size, "max_pixels": options.max_pixels, "threads": options.threads or 1,
        "spread_gpus": local,  # our own LocalCluster: one GPU per worker on a multi-GPU machine
        "channels_last": options.channels_last, "attention": options.attention, "compile": options.compile,
    }
    own = client is None
    cluster = None
    if own:
        client, cluster = start_client(scheduler, options.threads or 1)
    failures: list[tuple[str, str]] = []
    n_built = 0
    devices: dict[str, set[int]] = {}  # device -> worker processes that built on it
    bar = progress_bar(len(plan.todo), "build (cluster)", unit="img", enabled=options.progress)
    try:
        futures = {
            client.submit(build_group_task, job, group, plan, key=f"dhf-build-{plan.index[group[0].id]}",
                          pure=False, retries=2): group
            for group in groups
        }
        for future in as_completed(futures):
            outcome = future.result()
            n_built += outcome["built"]
            devices.setdefault(outcome.get("device", "?"), set()).add(outcome["pid"])
            failures += [tuple(f) for f in outcome["failures"]]
            bar.update(sum(1 for r in futures[future] if r.id in plan.todo))
            bar.set_postfix(failed=len(failures), refresh=False)
    finally:
        bar.close()
        if own:
            client.close()
            if cluster is not None:
                cluster.close()
    if devices:
        log("workers: " + ", ".join(f"{len(pids)} on {d}" for d, pids in sorted(devices.items())))
    return BuildResult(cache.url, len(records), n_skipped, n_built, failures, time.perf_counter() - start)


def _worker_dtype(device: str, local: bool) -> str:
    """Compute dtype for `--dtype auto` on a cluster: what the workers' device calls for. A
    local cluster's workers see this machine's devices; a remote cluster's device is known only
    when named (`--device cuda`), so `auto` there means float32, safe everywhere."""
    if device == "auto" and local:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "float16" if device.startswith("cuda") else "float32"
