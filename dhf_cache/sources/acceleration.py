"""Speed levers on a backbone's network: memory format, attention kernel and torch.compile.

None of them changes what is computed, only how: stored values stay within fp16 rounding of
the plain build (tests/test_acceleration.py on the CPU, tests/test_cuda.py on a GPU). So they
are build options (`BuildOptions`), not part of a cache's spec: caches built with and without
them are the same cache, and a build may be resumed with other levers.

Forward hooks on submodules keep firing under every lever (torch.compile traces them and
replays their side effects), so feature capture needs no other path. They must be registered
before the module is compiled and stay: torch.compile does not guard on module hooks by
default, so a hook added or removed later would go unnoticed by the compiled graph.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dhf_cache.errors import UsageError

# The names (config.BuildOptions validates them): torch's scaled-dot-product attention kernels,
# which diffusers' and transformers' attention call (auto lets torch pick per call: flash, then
# memory-efficient, then math), and torch.compile's modes (reduce-overhead adds CUDA graphs, one
# launch for the whole UNet call). Kernels torch has on the CPU; the others exist on CUDA only:
CPU_ATTENTION = ("auto", "flash", "math")


def check_levers(device: torch.device, attention: str = "auto", compile: str = "off") -> None:
    """One line for a lever the device cannot use, before the model loads."""
    if device.type != "cuda" and attention not in CPU_ATTENTION:
        raise UsageError(f"--attention {attention}: a CUDA kernel; on {device.type} use auto, flash or math")
    if device.type != "cuda" and compile == "reduce-overhead":
        raise UsageError("--compile reduce-overhead: CUDA graphs need a CUDA device; use --compile default here")


def sdpa_backends(attention: str) -> list | None:
    """The torch SDPBackend list for `attention` (None: torch's own choice)."""
    if attention == "auto":
        return None
    from torch.nn.attention import SDPBackend

    return [{"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[attention]]


def accelerate(module: nn.Module, channels_last: bool = False, attention: str = "auto", compile: str = "off",
               backend: str = "inductor") -> bool:
    """Apply the levers to `module` in place (its `forward` is replaced); True when compiled.

    A compiled module keeps one graph per input shape (`dynamic=False`): callers keep the batch
    shape fixed (build pads a short last batch) and avoid toggling Python state it reads, since
    each new shape or value is a new compilation. `backend` is torch.compile's (tests trace with
    "eager" on the CPU, where inductor's compile of even the tiny UNet takes minutes)."""
    forward = module.forward
    backends = sdpa_backends(attention)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if backends is not None or channels_last:
        forward = _with_levers(forward, backends, channels_last)
    if compile != "off":
        forward = torch.compile(forward, mode=None if compile == "default" else compile, backend=backend, dynamic=False)
    module.forward = forward
    return compile != "off"


def _with_levers(forward, backends: list | None, channels_last: bool):
    from torch.nn.attention import sdpa_kernel

    @functools.wraps(forward)
    def call(*args, **kwargs):
        if channels_last and args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        if backends is None:
            return forward(*args, **kwargs)
        with sdpa_kernel(backends):
            return forward(*args, **kwargs)

    return call


def pad_batch(pixels: torch.Tensor, ids: list[str], size: int) -> tuple[torch.Tensor, list[str]]:
    """A short batch padded to `size` rows by repeating its last image (a compiled network keeps
    one shape; images in a batch never mix, so the padding rows change no other row's values)."""
    extra = size - len(ids)
    if extra <= 0:
        return pixels, ids
    return torch.cat([pixels, pixels[-1:].expand(extra, *pixels.shape[1:])]), ids + [ids[-1]] * extra
