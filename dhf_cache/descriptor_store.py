"""Descriptor maps of one checkpoint, stored back into the cache and reused by later evals.

    <cache>/descriptors/<checkpoint fingerprint[:32]>/maps   (N, P, S, S) float16, chunk = 1 image
    <cache>/descriptors/<checkpoint fingerprint[:32]>/done   (N,) bool, set after the map is written

The key is the checkpoint's fingerprint (its weights and the features it reads), so another
checkpoint never reads these maps, and eval cost grows with the number of images, not pairs.
When the cache cannot be written (read-only storage), descriptors live in memory for one run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dhf_cache.cache import FeatureCache

GROUP = "descriptors"


class DescriptorStore:
    def __init__(self, cache: FeatureCache, key: str, shape: tuple[int, int, int], meta: dict[str, Any]):
        self.cache = cache
        self.key = key
        self.shape = tuple(shape)
        self.persistent = True
        n = len(cache.image_ids)
        try:
            self._maps, self._done = self._open_arrays(n, meta)
        except (PermissionError, OSError, ValueError) as exc:  # read-only storage: keep them in memory
            self.persistent = False
            self.reason = f"{type(exc).__name__}: {exc}"
            self._memory: dict[int, np.ndarray] = {}

    def _open_arrays(self, n: int, meta: dict):
        import zarr.codecs as zc

        group = self.cache.group.require_group(GROUP).require_group(self.key[:32])
        if "maps" not in group:
            p, s1, s2 = self.shape
            compressors = [zc.ZstdCodec(level=3), zc.Crc32cCodec()]
            group.create_array("maps", shape=(n, p, s1, s2), chunks=(1, p, s1, s2), dtype="float16",
                               compressors=compressors, fill_value=0, config={"write_empty_chunks": True})
            group.create_array("done", shape=(n,), chunks=(1,), dtype=bool, fill_value=False)
            group.attrs.update({"checkpoint_fingerprint": self.key, **meta})
        maps, done = group["maps"], group["done"]
        if tuple(maps.shape[1:]) != self.shape:
            raise ValueError(f"stored descriptors have shape {maps.shape[1:]}, expected {self.shape}")
        if maps.shape[0] < n:  # the cache gained images since: grow along N
            maps.resize((n, *self.shape))
            done.resize((n,))
        return maps, done

    def done_mask(self) -> np.ndarray:
        if not self.persistent:
            mask = np.zeros(len(self.cache.image_ids), dtype=bool)
            mask[list(self._memory)] = True
            return mask
        return np.asarray(self._done[:], dtype=bool)

    def write(self, index: int, desc: torch.Tensor) -> None:
        array = desc.detach().to(torch.float16).cpu().numpy()
        if not self.persistent:
            self._memory[index] = array
            return
        self._maps[index] = array
        self._done[index] = True

    def read(self, index: int) -> torch.Tensor:
        array = self._memory[index] if not self.persistent else self._maps[index]
        # fp16 -> fp32 in torch: same values, about twice as fast as numpy's conversion here
        return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)
