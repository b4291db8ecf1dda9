"""Many workers, one cache: dask LocalCluster, concurrent shards, a worker killed mid-build.

Every build here uses one torch thread per process and the same batch size: CPU convolutions
round differently with other thread counts or batch neighbours, and these tests require the
arrays to be bit-identical to a serial build's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr

from conftest import ROOT, cli, small_build_args, source_dir, wait_for_first_done
from dhf_cache.cache.feature_cache import FeatureCache


def _arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(source_dir(path)), mode="r")
    out = {name: arr[:] for name, arr in group.arrays()}
    out.update({f"features/{name}": arr[:] for name, arr in group["features"].arrays()})
    return out


def _assert_same(a, b):
    x, y = _arrays(a), _arrays(b)
    assert sorted(x) == sorted(y)
    for key in x:
        assert np.array_equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def serial(tmp_path_factory, mini_spair, tiny_model_dir):
    cache = tmp_path_factory.mktemp("serial") / "serial.zarr"
    result = cli(*small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--batch-size", "2", "--threads", "1"))
    assert result.returncode == 0, result.stderr
    return cache


def test_local_cluster_build_equals_a_serial_build(tmp_path, serial, mini_spair, tiny_model_dir):
    cache = tmp_path / "cluster.zarr"
    result = cli(*small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--batch-size", "2",
                                   "--scheduler", "local:2", "--json"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"n_built": 8' in result.stdout
    assert re.search(r"workers: [12] on cpu", result.stdout + result.stderr)  # where the workers ran
    _assert_same(serial, cache)


def test_two_concurrent_shards_equal_a_serial_build(tmp_path, serial, mini_spair, tiny_model_dir):
    cache = tmp_path / "shards.zarr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", "from dhf_cache.cli.main import main; main()",
                          *small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--batch-size", "2",
                                            "--threads", "1", "--shard", f"{i}/2", "--json")],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outputs]
    built = [int(o[0].split('"n_built": ')[1].split(",")[0]) for o in outputs]
    assert sorted(built) == [4, 4]  # 4 batch groups of 2, two each
    _assert_same(serial, cache)
    bad = cli(*small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--shard", "2/2"))
    assert bad.returncode == 2 and "0 <= I < N" in bad.stderr


def test_a_worker_killed_mid_build_does_not_lose_or_double_images(tmp_path, serial, mini_spair, tiny_model_dir):
    from dhf_cache.config import BuildOptions, Preprocessing
    from dhf_cache.datasets import open_dataset
    from dhf_cache.pipelines.build import BuildRequest
    from dhf_cache.pipelines.distributed import run_distributed_build, start_client

    cache = tmp_path / "killed.zarr"
    environ_before = dict(os.environ)
    client, cluster = start_client("local:2")
    with cluster, client:
        pids = list(client.run(os.getpid).values())
        request = BuildRequest(dataset=open_dataset(f"spair:{mini_spair}"), cache_url=str(cache), model=str(tiny_model_dir),
                               steps=10, save_steps=(9, 5, 0), preprocessing=Preprocessing(load_size=64, image_size=64))
        outcome = {}
        worker = threading.Thread(target=lambda: outcome.setdefault("result", run_distributed_build(
            request, BuildOptions(batch_size=2, device="cpu", progress=False, threads=1), "local:2",
            log=lambda _: None, client=client)))
        worker.start()
        wait_for_first_done(cache)
        os.kill(pids[0], signal.SIGKILL)
        worker.join(timeout=600)
        result = outcome["result"]
        assert pids[0] not in client.run(os.getpid).values()  # the worker really died (and was replaced)
        worker_threads = set(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values())
    assert worker_threads == {"1"}  # the workers' own environment
    # dask's nanny would write OMP_NUM_THREADS=1 etc. into this process at each (re)spawn, and
    # every later subprocess of the caller would run on one thread
    threads_vars = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    assert {k: os.environ.get(k) for k in threads_vars} == {k: environ_before.get(k) for k in threads_vars}
    assert result.n_images == 8 and result.n_built == 8 and not result.failures  # each image counted once
    c = FeatureCache.open(str(cache))
    assert c.done_mask().all() and len(c.image_ids) == 8
    _assert_same(serial, cache)
