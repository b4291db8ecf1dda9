"""Helpers shared by the benchmarks in bench/: machine description, timers, memory, JSON output.

Benchmarks import this as `_common` (they run as scripts, so bench/ is on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch/zarr versions and (on CUDA) the GPU: printed with every figure."""
    import torch

    from dhf_cache.feature_loader import usable_cores

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for name in ("zarr", "numcodecs", "diffusers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing version is not worth failing a benchmark
            pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict[str, Any]) -> str:
    text = (
        f"machine: {info['cpu']}, {info['cores_usable']}/{info['cores']} cores usable, "
        f"torch {info['torch']} ({info['torch_threads']} threads), zarr {info.get('zarr', '?')}, "
        f"OMP_WAIT_POLICY {info['omp_wait_policy']}, load avg {info['load_average_1m']:.2f}"
    )
    if "gpu" in info:
        text += f", GPU {info['gpu']} (CUDA {info['cuda']})"
    return text


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


class Timers:
    """Named wall-clock accumulators, safe to add to from several threads.

    `seconds` sums every call's duration (thread-seconds when calls overlap); `busy` is the wall
    time during which at least one call of the name (or of its `group`) was running, which is
    what a fraction of wall time means when a thread pool runs the calls concurrently."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.busy: dict[str, float] = defaultdict(float)
        self._running: dict[str, int] = defaultdict(int)
        self._since: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def _enter(self, keys: tuple[str, ...]) -> None:
        with self._lock:
            now = time.perf_counter()
            for key in keys:
                if self._running[key] == 0:
                    self._since[key] = now
                self._running[key] += 1

    def _leave(self, keys: tuple[str, ...]) -> None:
        with self._lock:
            now = time.perf_counter()
            for key in keys:
                self._running[key] -= 1
                if self._running[key] == 0:
                    self.busy[key] += now - self._since.pop(key)

    @contextmanager
    def time(self, name: str, sync: Callable[[], None] | None = None, group: str | None = None):
        keys = (name,) if group is None else (name, group)
        if sync:
            sync()
        start = time.perf_counter()
        self._enter(keys)
        try:
            yield
        finally:
            if sync:
                sync()
            self._leave(keys)
            self.add(name, time.perf_counter() - start)

    def wrap(self, name: str, fn: Callable, sync: Callable[[], None] | None = None,
             group: str | None = None) -> Callable:
        def timed(*args, **kwargs):
            with self.time(name, sync, group):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn
        return timed


class Patches:
    """Replace attributes for the length of a `with` block and put them back afterwards."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object, bool]] = []

    def set(self, owner: object, name: str, value: object) -> None:
        had_own = name in vars(owner)
        self._saved.append((owner, name, vars(owner).get(name), had_own))
        setattr(owner, name, value)

    def __enter__(self) -> Patches:
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, old, had_own in reversed(self._saved):
            if had_own:
                setattr(owner, name, old)
            else:  # the patch shadowed an inherited or class attribute: remove the shadow
                delattr(owner, name)
        self._saved.clear()


@contextmanager
def work_folder(path: str | Path | None, prefix: str):
    """`path` (created if missing, kept afterwards), or a temporary folder removed afterwards."""
    if path:
        work = Path(path)
        work.mkdir(parents=True, exist_ok=True)
        yield work
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
