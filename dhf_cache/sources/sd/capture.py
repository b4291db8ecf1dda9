"""Which feature maps are captured, and capturing them with forward hooks.

A layer is named by its resnet block (`up_blocks.1.resnets.2`); what is captured is that
block's residual branch, the output of its `conv2` (before the shortcut is added and before
`output_scale_factor`), which a forward hook on `conv2` yields as is: no patched forwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from dhf_cache.errors import UsageError

LAYER_SETS = {
    "up": ("up_blocks.",),
    "down": ("down_blocks.",),
    "mid": ("mid_block.",),
    "all": ("down_blocks.", "mid_block.", "up_blocks."),
}


def resnet_names(unet: nn.Module) -> list[str]:
    """Names of all resnet blocks (modules with a `conv2` inside a `resnets` list), in order."""
    return [
        name
        for name, module in unet.named_modules()
        if name.split(".")[-2:-1] == ["resnets"] and isinstance(getattr(module, "conv2", None), nn.Conv2d)
    ]


def resolve_layers(unet: nn.Module, selection: str | Sequence[str]) -> tuple[str, ...]:
    """`up`/`down`/`mid`/`all`, or explicit module names (comma-separated or a list)."""
    names = [selection] if isinstance(selection, str) else list(selection)
    names = [part.strip() for item in names for part in item.split(",") if part.strip()]
    if not names:
        raise UsageError("--layers is empty; use up, down, mid, all or module names")
    resnets = resnet_names(unet)
    if len(names) == 1 and names[0] in LAYER_SETS:
        chosen = []
        for prefix in LAYER_SETS[names[0]]:  # forward order: down, mid, up
            chosen += [n for n in resnets if n.startswith(prefix)]
        if not chosen:
            raise UsageError(f"--layers {names[0]}: this UNet has no such resnets")
        return tuple(chosen)
    modules = dict(unet.named_modules())
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        raise UsageError(
            f"--layers: unknown module(s) {unknown}. Use up, down, mid, all, or names such as: "
            + ", ".join(resnets)
        )
    if len(set(names)) != len(names):
        raise UsageError(f"--layers names a module twice: {names}")
    return tuple(names)


def capture_point(unet: nn.Module, layer: str) -> nn.Module:
    """The module whose output is stored for `layer`: a resnet's conv2, else the module itself."""
    module = unet.get_submodule(layer)
    conv2 = getattr(module, "conv2", None)
    return conv2 if isinstance(conv2, nn.Conv2d) else module


class FeatureCapture:
    """Forward hooks that keep the named layers' outputs of the last forward while enabled.

    Disabled hooks cost one attribute check, so calls whose features are not saved run at bare
    speed. `every_call` keeps the outputs of every call instead (a compiled UNet: torch.compile
    guards on the Python state a hook reads, so toggling `enabled` would compile the UNet twice;
    with `every_call` first in the test, `enabled` is never read); `after_call` drops what an
    unsaved call captured.
    """

    def __init__(self, unet: nn.Module, layers: Iterable[str]):
        self.layers = tuple(layers)
        self.enabled = False
        self.every_call = False
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [
            capture_point(unet, name).register_forward_hook(self._hook_for(name)) for name in self.layers
        ]

    def _hook_for(self, name: str):
        def hook(_module, _inputs, output):
            if self.every_call or self.enabled:
                if not isinstance(output, torch.Tensor) or output.ndim != 4:
                    raise UsageError(f"layer {name} does not output a (B, C, H, W) tensor; pick a resnet block")
                self.outputs[name] = output

        return hook

    def after_call(self, saved: bool) -> dict[str, torch.Tensor] | None:
        """The outputs of the call just made when it is `saved`, else None. Under `every_call`
        an unsaved call's outputs are dropped here, so every call starts from an empty dict (a
        compiled graph also guards on whether the dict it fills is empty)."""
        if saved:
            return self.take()
        if self.every_call:
            self.outputs = {}
        return None

    def take(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.layers if n not in self.outputs]
        if missing:
            raise RuntimeError(f"layers not reached by the forward pass: {missing}")
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
