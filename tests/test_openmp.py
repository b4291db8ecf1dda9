"""How OpenMP threads wait: chosen from the CPU's load before torch loads; the user's setting wins."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dhf_cache.openmp import BUSY_CORES, busy_cores, settle_wait_policy

STAT = """cpu  10 0 10 100 0 0 0 0 0 0
cpu0 {u0} 0 5 {i0} 2 0 0 {s0} 0 0
cpu1 {u1} 0 5 {i1} 0 0 0 0 0 0
intr 1 2 3
"""


def _burner():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_busy_cores_counts_a_busy_process_on_our_cpus():
    burner = _burner()
    try:
        time.sleep(0.3)  # the burner is running, not starting
        load = busy_cores(window=0.3)
    finally:
        burner.kill()
        burner.wait()
    assert load is not None and load >= 0.8


def test_busy_cores_reads_idle_iowait_and_steal(tmp_path, monkeypatch):
    """Per-CPU ticks: idle + iowait are idle; steal (a VM's CPU given to others) is busy.
    Only CPUs this process may run on are counted."""
    stat = tmp_path / "stat"
    samples = iter([dict(u0=100, i0=100, s0=0, u1=100, i1=100), dict(u0=100, i0=150, s0=50, u1=200, i1=100)])

    def fake_sleep(_):
        stat.write_text(STAT.format(**next(samples)))

    fake_sleep(None)
    monkeypatch.setattr("dhf_cache.openmp.time.sleep", fake_sleep)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    # cpu0: 100 ticks, 50 idle, 50 stolen -> 0.5 busy; cpu1: 100 ticks all user -> 1.0 busy
    assert busy_cores(stat_path=str(stat)) == pytest.approx(1.5)
    samples = iter([dict(u0=100, i0=100, s0=0, u1=100, i1=100), dict(u0=100, i0=200, s0=0, u1=200, i1=100)])
    fake_sleep(None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # cpu1's load is not ours
    assert busy_cores(stat_path=str(stat)) == pytest.approx(0.0)
    assert busy_cores(stat_path=str(tmp_path / "missing")) is None


@pytest.mark.parametrize("load, policy", [(0.0, None), (BUSY_CORES - 0.01, None), (BUSY_CORES, "PASSIVE"), (1.7, "PASSIVE"),
                                          (None, None)])
def test_passive_waits_only_on_a_busy_cpu(load, policy):
    env, lines = {}, []
    reason = settle_wait_policy(lines.append, env, measure=lambda: load, modules={})
    assert env.get("OMP_WAIT_POLICY") == policy
    assert bool(lines) == (policy is not None)  # silent unless it changes something
    if policy:
        assert "CPU busy" in lines[0] and "OMP_WAIT_POLICY=ACTIVE" in lines[0] and lines[0] == reason


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": "1000"}])
def test_the_users_setting_wins(user):
    env, lines = dict(user), []
    measured = []
    reason = settle_wait_policy(lines.append, env, measure=lambda: measured.append(1) or 2.0, modules={})
    assert env == user and not lines and not measured and "set by the user" in reason


def test_too_late_once_torch_is_loaded():
    env = {}
    reason = settle_wait_policy(None, env, measure=lambda: 2.0, modules={"torch": object()})
    assert env == {} and "already loaded" in reason


def test_cli_compute_commands_choose_before_torch_loads(tmp_path):
    """A real `dhf-cache eval` beside a busy process says it waits passively (before failing on
    the missing cache); with the user's OMP_WAIT_POLICY it stays silent."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    args = [sys.executable, "-m", "dhf_cache.cli.main", "eval", "--cache", str(tmp_path / "none.zarr"),
            "--dataset", f"spair:{tmp_path}", "--out", str(tmp_path / "ev"), "--raw", "best"]
    burner = _burner()
    try:
        time.sleep(0.3)
        busy = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        user = subprocess.run(args, env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True, timeout=120)
    finally:
        burner.kill()
        burner.wait()
    assert busy.returncode != 0 and user.returncode != 0  # no cache there
    assert "CPU busy" in busy.stderr and "wait passively" in busy.stderr, busy.stderr
    assert "CPU busy" not in user.stderr
