"""Device choice: `auto` means CUDA when present, else Apple MPS, else CPU. Nothing assumes CUDA."""

from __future__ import annotations

import torch

from dhf_cache.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def spread_device(name: str, worker_index: int | None, n_gpus: int | None = None) -> str:
    """The device of worker `worker_index` of a local cluster: `cuda` or `auto` on a machine with
    several GPUs means one GPU per worker, round robin (worker k on cuda:k mod n), instead of
    every worker on GPU 0. An explicit index (`cuda:1`), `cpu`, `mps`, one GPU, or no index
    (a worker of someone else's cluster, which sets CUDA_VISIBLE_DEVICES itself) stay as given."""
    if worker_index is None or name not in ("cuda", "auto"):
        return name
    if n_gpus is None:
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus < 2:
        return name
    return f"cuda:{worker_index % n_gpus}"
