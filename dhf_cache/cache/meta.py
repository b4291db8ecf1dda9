"""A cache's metadata checked against the contract (docs/cache-format.md) before it is used.

Every reader trusts what it opens: a root attribute of the wrong type, a spec edited by hand under
its old fingerprint, a feature array whose dtype or shape disagrees with the layer table, or a
`done` array of 10^9 entries must end in one line naming the cache and the field, not in a
traceback, a silently mixed cache or a process that allocates forever. These checks read
metadata only (no chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dhf_cache.errors import CacheError
from dhf_cache.cache.fingerprint import sha256_of

# More images than any correspondence data set holds (SPair-71k: 1,800; ImageNet: 1.3 M), and
# at SD 1.5's 157 MB per image already ~1.5 PB: a larger N is a damaged or hostile array, and
# reading its flags or ids would allocate without bound.
MAX_IMAGES = 10_000_000
# Any one map dimension beyond this is not a feature map of a vision backbone.
MAX_MAP_SIDE = 16_384
MAX_CHANNELS = 65_536
FINGERPRINT_PARTS = ("feature_space", "preprocessing", "spec")
REMEDY = "the cache's metadata is damaged or was edited: rebuild into a new --cache (or restore zarr.json from a copy)"


def _fail(url: str, what: str) -> CacheError:
    return CacheError(f"{url}: {what}; {REMEDY}")


def check_root_meta(meta: Any, url: str) -> None:
    """Types and values of the `dhf_cache` root attribute, and its fingerprints recomputed from
    the stored spec. The spec itself is validated by BuildSpec afterwards."""
    if not isinstance(meta, dict):
        raise CacheError(f"{url}: a Zarr group, but not a dhf-cache cache (no 'dhf_cache' attribute)")
    for key, kind in (("spec", dict), ("fingerprint", dict), ("layers", list), ("timesteps", list),
                      ("save_steps", list)):
        if key not in meta:
            raise _fail(url, f"root attribute dhf_cache.{key} is missing")
        if not isinstance(meta[key], kind):
            raise _fail(url, f"root attribute dhf_cache.{key} is a {type(meta[key]).__name__}, not a {kind.__name__}")
    fingerprint = meta["fingerprint"]
    for part in FINGERPRINT_PARTS:
        if not isinstance(fingerprint.get(part), str):
            raise _fail(url, f"dhf_cache.cache.fingerprint.{part} is missing or not a string")
    spec = meta["spec"]
    for part in ("feature_space", "preprocessing"):
        if not isinstance(spec.get(part), dict):
            raise _fail(url, f"dhf_cache.spec.{part} is missing or not an object")
    # Recomputed from the stored JSON as it is (not from a re-validated model), so a field a later
    # version adds with a default does not change an existing cache's fingerprint.
    recomputed = {"feature_space": sha256_of(spec["feature_space"]), "preprocessing": sha256_of(spec["preprocessing"]),
                  "spec": sha256_of(spec)}
    changed = [part for part in FINGERPRINT_PARTS if recomputed[part] != fingerprint[part]]
    if changed:
        raise CacheError(
            f"{url}: the stored spec does not match its fingerprint ({', '.join(changed)}): the spec in zarr.json "
            "was changed after the cache was built, so its features may not be what the spec says. Refusing to "
            "use it; rebuild into a new --cache"
        )
    for i, layer in enumerate(meta["layers"]):
        ok = (isinstance(layer, dict) and isinstance(layer.get("name"), str) and layer["name"]
              and all(_positive_int(layer.get(k), MAX_MAP_SIDE if k != "channels" else MAX_CHANNELS)
                      for k in ("channels", "height", "width")))
        if not ok:
            raise _fail(url, f"dhf_cache.cache.layers[{i}] is not {{name, channels, height, width}} with positive sizes: {layer!r}")
    names = [layer["name"] for layer in meta["layers"]]
    if not names or len(set(names)) != len(names):
        raise _fail(url, f"dhf_cache.cache.layers names no layer or one twice: {names}")
    if list(spec["feature_space"].get("layers", [])) != names:
        raise _fail(url, f"dhf_cache.cache.layers {names} differ from the spec's layers {spec['feature_space'].get('layers')}")
    steps = meta["timesteps"]
    if not steps or not all(isinstance(t, int) and not isinstance(t, bool) for t in steps):
        raise _fail(url, f"dhf_cache.timesteps must be a non-empty list of integers, got {steps!r}")
    if spec["feature_space"].get("kind") == "dinov2":  # no time axis: one position, no inversion steps
        if steps != [0] or meta["save_steps"]:
            raise _fail(url, f"a DINOv2 source stores one position (timesteps [0], no save_steps), got {steps} "
                             f"and {meta['save_steps']}")
        return
    if len(meta["save_steps"]) != len(steps) or list(spec["feature_space"].get("save_steps", [])) != meta["save_steps"]:
        raise _fail(url, f"dhf_cache.save_steps {meta['save_steps']} do not match the timesteps {steps} "
                         f"and the spec's save_steps {spec['feature_space'].get('save_steps')}")


def _positive_int(value: Any, bound: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= bound


@dataclass(frozen=True)
class ArrayRule:
    """What one array of the contract must look like: its dtype kind and its shape after N."""

    dtype: str  # numpy dtype string, or "str" for zarr's variable-length strings
    tail: tuple[int, ...] | None  # the shape after the image axis; None: any (checked elsewhere)


def check_array(url: str, path: str, array, rule: ArrayRule, n_images: int | None = None) -> None:
    """`array`'s dtype and shape against `rule`; its length bounded and (for per-image arrays)
    long enough for `n_images`."""
    shape = tuple(int(n) for n in array.shape)
    if not shape:
        raise _fail(url, f"array {path} has no image axis (shape {shape})")
    if rule.dtype == "str":
        ok_dtype = array.dtype.kind in ("U", "T", "O")
    else:
        ok_dtype = np.dtype(array.dtype) == np.dtype(rule.dtype)
    if not ok_dtype:
        raise _fail(url, f"array {path} has dtype {array.dtype}, expected {rule.dtype}")
    if rule.tail is not None and shape[1:] != rule.tail:
        raise _fail(url, f"array {path} has shape {shape}, expected (N, {', '.join(map(str, rule.tail))})")
    if shape[0] > MAX_IMAGES:
        raise _fail(url, f"array {path} claims {shape[0]:,} images (more than {MAX_IMAGES:,})")
    if n_images is not None and shape[0] < n_images:
        raise _fail(url, f"array {path} holds {shape[0]} entries for {n_images} images")
    chunks = getattr(array, "chunks", None)
    if chunks is not None and path != "image_ids" and int(chunks[0]) != 1:
        raise _fail(url, f"array {path} has chunks {tuple(chunks)}: the contract is one image per chunk")
