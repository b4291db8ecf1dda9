"""Device choice for one process and for the workers of a local cluster."""

from __future__ import annotations

import pytest
import torch

from dhf_cache.device import resolve_device, spread_device
from dhf_cache.errors import UsageError
from dhf_cache.pipelines.distributed import _worker_dtype


def test_local_cluster_workers_get_one_gpu_each_round_robin():
    assert [spread_device("cuda", k, n_gpus=4) for k in range(6)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert spread_device("auto", 3, n_gpus=2) == "cuda:1"


@pytest.mark.parametrize("name, index, n_gpus", [
    ("cuda:1", 0, 4),   # an explicit GPU is the user's choice
    ("cpu", 3, 4),
    ("mps", 1, 4),
    ("cuda", 2, 1),     # one GPU: nothing to spread
    ("auto", 2, 0),     # no GPU: auto stays auto (resolves to MPS or CPU)
    ("cuda", None, 4),  # not a local-cluster worker: its cluster sets CUDA_VISIBLE_DEVICES
])
def test_devices_that_are_not_spread(name, index, n_gpus):
    assert spread_device(name, index, n_gpus=n_gpus) == name


def test_spread_counts_this_machines_gpus_by_default():
    expected = "cuda:1" if torch.cuda.is_available() and torch.cuda.device_count() > 1 else "cuda"
    assert spread_device("cuda", 1) == expected


def test_cluster_dtype_for_auto_follows_the_workers_device():
    assert _worker_dtype("cuda", local=False) == "float16"
    assert _worker_dtype("cuda:2", local=True) == "float16"
    assert _worker_dtype("cpu", local=True) == "float32"
    assert _worker_dtype("auto", local=False) == "float32"  # remote workers' device unknown: safe choice
    assert _worker_dtype("auto", local=True) == ("float16" if torch.cuda.is_available() else "float32")


def test_bad_devices_are_named():
    with pytest.raises(UsageError, match="'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:1")
