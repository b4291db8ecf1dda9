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

    from dhf_cache.cache.feature_loader import usable_cores

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


# ------------------------------------------------------------------ whole processes, side by side
@contextmanager
def competing_load(processes: int):
    """`processes` single-threaded busy loops (another user's work) running while the block runs."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        if procs:
            time.sleep(0.5)  # running, not starting up
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def timed_process(command: list[str], env: dict[str, str], cwd: str | Path | None = None) -> tuple[float, dict | None]:
    """Wall seconds of a whole process (start-up, imports and exit included) and the JSON object
    on the last line of its stdout, if there is one. A failed process ends the benchmark."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    try:
        return wall, json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        try:  # a pretty-printed object (dhf-cache --json) spans every line
            return wall, json.loads(proc.stdout)
        except json.JSONDecodeError:
            return wall, None


def interleaved_processes(variants: dict[str, Callable[[int], list[str]]], env: dict[str, str], repeats: int,
                          load: int = 0, figure: Callable[[str, float, dict | None], float] | None = None) -> dict:
    """Each variant's command (a function of the repetition) as a whole process, `repeats` times
    in ABBA order beside `load` busy processes; `figure(variant, wall, json)` picks the number
    compared (default: the wall time). Returns every figure and the median ratio of the first
    variant over the second, repetition by repetition."""
    names = list(variants)
    runs: dict[str, list[float]] = {name: [] for name in names}
    walls: dict[str, list[float]] = {name: [] for name in names}
    with competing_load(load):
        for rep in range(repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):
                wall, out = timed_process(variants[name](rep), env)
                walls[name].append(wall)
                runs[name].append(figure(name, wall, out) if figure else wall)
                print(f"    {'loaded' if load else 'quiet'} rep {rep + 1}: {name} {runs[name][-1]:.3f} "
                      f"(process {wall:.1f} s)", flush=True)
    a, b = names
    ratios = [x / y for x, y in zip(runs[a], runs[b])]
    return {"runs": runs, "medians": {n: median(v) for n, v in runs.items()}, "ratio": median(ratios),
            "ratios": ratios, "walls": walls, "wall_medians": {n: median(v) for n, v in walls.items()},
            "load_processes": load}


def ratios_by_load(results: dict, loads: list[int]) -> str:
    """'0.88 quiet, 0.44 beside 1 busy process(es)': each load's median ratio, for a last line."""
    return ", ".join(f"{results[f'load_{n}']['ratio']:.2f} {'quiet' if n == 0 else f'beside {n} busy process(es)'}"
                     for n in loads)


def user_environment() -> dict[str, str]:
    """The environment this benchmark was started with, before it chose anything for itself:
    what a user's own command or script would get."""
    return dict(_USER_ENV)


_USER_ENV = dict(os.environ)
