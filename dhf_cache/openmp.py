"""How torch's OpenMP threads wait, chosen once per process before torch loads its runtime.

libgomp reads OMP_WAIT_POLICY when it loads (with torch), so the choice must be made before the
first `import torch` of the process. Its default, spinning for a few milliseconds at the end of
every parallel region, is right on an idle CPU and very wrong on a busy one: a thread spinning
at a barrier takes the core its partner needs. Passive waits (a futex sleep at once) are the
opposite. Measured on a 2-core machine (docs/benchmarks.md, "CPU threads"): a tiny-model build
took 2.7x longer with passive waits on an idle CPU, and 3x longer with spinning waits beside
one other busy process; the same held for a plain diffusers loop written without dhf-cache.

So a compute command looks at its CPUs for a moment before torch loads: if other processes keep
them busy, its OpenMP threads wait passively; otherwise libgomp's own default stays, which is
what a plain PyTorch program gets. The policy never changes a computed value (only how idle
threads wait), unlike the thread count, which is left alone so that results do not depend on
load. The user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping

# Other processes' load on our CPUs (in cores) from which passive waits are chosen. One busy
# single-threaded process reads 1.00 on an idle 2-core machine; an idle one 0.0-0.1.
BUSY_CORES = 0.5
SAMPLE_SECONDS = 0.1  # /proc/stat counts in 10 ms ticks: 10 ticks per CPU per sample
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def busy_cores(window: float = SAMPLE_SECONDS, stat_path: str = "/proc/stat") -> float | None:
    """How many of this process's usable CPUs were busy over `window` seconds (0.0 to their
    count), by the kernel's per-CPU counters; None where there are none (not Linux).

    The caller sleeps meanwhile, so the figure is other processes' load (and, in a VM, the time
    the hypervisor gave our CPUs to others, `steal`, which hurts spinning threads the same way).
    """
    try:
        cpus = os.sched_getaffinity(0)
        before = _cpu_times(stat_path, cpus)
        time.sleep(window)
        after = _cpu_times(stat_path, cpus)
    except (OSError, AttributeError, ValueError):
        return None
    busy = 0.0
    for cpu, (total, idle) in after.items():
        if cpu in before:
            d_total, d_idle = total - before[cpu][0], idle - before[cpu][1]
            if d_total > 0:
                busy += 1.0 - d_idle / d_total
    return busy if before else None


def _cpu_times(stat_path: str, cpus: set[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (all ticks, idle + iowait ticks)} from the `cpuN` lines of /proc/stat."""
    times = {}
    with open(stat_path) as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *fields = line.split()
                cpu = int(name[3:])
                if cpu in cpus:
                    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                    times[cpu] = (sum(ticks), ticks[3] + ticks[4])
    return times


def settle_wait_policy(log: Callable[[str], None] | None = None, environ: MutableMapping[str, str] | None = None,
                       measure: Callable[[], float | None] = busy_cores, modules: Mapping | None = None) -> str:
    """Choose how OpenMP threads wait for this process (see the module docstring); returns why.

    Sets OMP_WAIT_POLICY=PASSIVE in the environment when the CPUs are busy; logs only then."""
    env = os.environ if environ is None else environ
    chosen = next((name for name in USER_SETTINGS if env.get(name, "").strip()), None)
    if chosen:
        return f"{chosen}={env[chosen]} set by the user"
    if "torch" in (sys.modules if modules is None else modules):
        return "torch already loaded: its OpenMP runtime keeps the policy it started with"
    load = measure()
    if load is None or load < BUSY_CORES:
        return "CPU idle: OpenMP's default waits" if load is not None else "CPU load unknown: OpenMP's default waits"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    reason = (f"CPU busy ({load:.1f} of {len(os.sched_getaffinity(0))} cores used by other processes): OpenMP "
              "threads wait passively (set OMP_WAIT_POLICY=ACTIVE to force spinning; docs/benchmarks.md)")
    if log is not None:
        log(reason)
    return reason
