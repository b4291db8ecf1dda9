"""What every source family shares when loading a model: the offline-first hub lookup, the
weight identity, dtype names and quiet model libraries.

A hub id is looked up in the local Hugging Face cache first and downloaded only when that misses
and offline mode is off; a model that cannot be found raises `ModelNotFoundError` in one line
saying what was tried and how to fix it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from dhf_cache.errors import ModelNotFoundError, first_line

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weights_sha256(module: nn.Module, extra: str = "") -> str:
    """sha256 over (name, shape, fp16 bytes) of every tensor in the state dict, in name order.

    Rounding to fp16 makes the fp32 and fp16 files of one checkpoint hash the same.
    """
    digest = hashlib.sha256(extra.encode())
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached (its host name does not resolve: no network), else None.
    Without this a download attempt retries with back-off for ~25 s and prints every retry."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    outcome: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    # a daemon thread: a resolver that hangs must not hold up the answer or the process's exit
    thread = threading.Thread(target=resolve, daemon=True, name="dhf-cache-hub-check")
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{host} did not resolve within {timeout:.0f} s (no network here?)"
    if outcome[0] is not None:
        exc = outcome[0]
        return f"{host} cannot be resolved ({getattr(exc, 'strerror', None) or exc}; no network here?)"
    return None


def quiet_libraries() -> None:
    """Keep diffusers/transformers info logs and loading bars out of our progress output."""
    import diffusers
    import transformers

    # huggingface_hub warns that diffusers passes a deprecated argument; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_hub_id(model: str, load: Callable[[bool], T], download: str,
                errors: tuple[type[BaseException], ...] = (OSError, ValueError),
                why: Callable[[BaseException], str] | None = None) -> T:
    """`load(local_files_only)` of a hub id, for every source family: the local Hugging Face
    cache first, then the Hub unless HF_HUB_OFFLINE is set or it cannot be reached. Nothing
    found: ModelNotFoundError listing what was tried and the `hf download` command to run."""
    why = why or first_line
    tried = [f"local directory {Path(model).expanduser().resolve()} (does not exist)"]
    try:
        return load(True)
    except errors as exc:
        tried.append(f"the Hugging Face cache ({_hf_cache_dir()}): {why(exc)}")
    if hub_offline():
        tried.append("download: skipped, HF_HUB_OFFLINE is set")
    elif unreachable := hub_unreachable():
        tried.append(f"download: skipped, {unreachable}")
    else:
        try:
            return load(False)
        except errors as exc:
            tried.append(f"download from the Hugging Face Hub: {why(exc)}")
    raise ModelNotFoundError(  # one line, whatever the family
        f"--model {model}: model not found (tried: " + "; ".join(tried) + f"). Fix: on a machine with internet run "
        f"`{download}` (and copy the cache here), or pass a local model folder with --model DIR."
    )


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub always ships with diffusers
        return "~/.cache/huggingface/hub"


def local_snapshot(model: str) -> Path | None:
    """The folder of `model` (a hub id) in the local Hugging Face cache, if it holds one."""
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json"]))
    except Exception:  # noqa: BLE001 - any miss (not cached, offline, malformed) means "not known here"
        return None
