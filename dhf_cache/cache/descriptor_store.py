"""Descriptor maps of one checkpoint, stored back into the cache and reused by later evals.

    <cache>/descriptors/<checkpoint fingerprint[:32]>/maps   (N, P, S, S) float16, chunk = 1 image
    <cache>/descriptors/<checkpoint fingerprint[:32]>/done   (N,) bool, set after the map is written

The key is the checkpoint's fingerprint (its weights and the features it reads), so another
checkpoint never reads these maps, and eval cost grows with the number of images, not pairs.
When the cache cannot be written (read-only storage), descriptors live in memory for one run.

A set counts only once it is complete: `maps` and the set's attributes are created first and
`done` last, so a run killed while creating a set leaves one without `done`, which holds no
descriptor that counts and is recreated whole by the next eval. `list_descriptor_sets` and
`remove_descriptor_sets` are what `dhf-cache info` and `dhf-cache prune` show and delete.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.errors import CacheError
from dhf_cache.cache.storage import coordinator_lock, run_bounded, storage_exceptions, stored_bytes

GROUP = "descriptors"
KEY_LENGTH = 32  # characters of the checkpoint fingerprint that name its set


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
        group = self.cache.group.require_group(GROUP).require_group(self.key[:KEY_LENGTH])
        if not _complete(group):
            # Serialised with other processes creating it (local caches): the check is repeated
            # under the lock, so a set another eval has just completed is never recreated.
            with coordinator_lock(self.cache.url):
                if not _complete(group):
                    self._create(group, n, meta)
        maps, done = group["maps"], group["done"]
        if tuple(maps.shape[1:]) != self.shape:
            raise ValueError(f"stored descriptors have shape {maps.shape[1:]}, expected {self.shape}")
        # The cache gained images since: grow along N, `maps` before `done`, so that a run killed
        # in between leaves no done flag beyond the maps (the next run grows `done` alone).
        if maps.shape[0] < n:
            maps.resize((n, *self.shape))
        if done.shape[0] < n:
            done.resize((n,))
        return maps, done

    def _create(self, group, n: int, meta: dict) -> None:
        """(Re)create the set: whatever a killed creation left is replaced; `done` comes last."""
        import zarr.codecs as zc

        p, s1, s2 = self.shape
        compressors = [zc.ZstdCodec(level=3), zc.Crc32cCodec()]
        if "done" in group:  # a set with `done` but no `maps` (removed by hand): flags first
            del group["done"]
        group.create_array("maps", shape=(n, p, s1, s2), chunks=(1, p, s1, s2), dtype="float16",
                           compressors=compressors, fill_value=0, config={"write_empty_chunks": True},
                           overwrite=True)
        group.attrs.update({"checkpoint_fingerprint": self.key, **meta})
        group.create_array("done", shape=(n,), chunks=(1,), dtype=bool, fill_value=False, overwrite=True)

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
        array = self._memory[index] if not self.persistent else self._read_stored(index)
        # fp16 -> fp32 in torch: same values, about twice as fast as numpy's conversion here
        return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)

    def _read_stored(self, index: int) -> np.ndarray:
        """A stored map, with a check that its chunk exists: zarr answers a missing chunk with
        its fill value (zeros), which must never score as a descriptor."""
        import asyncio

        array = self._maps.async_array
        key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))

        async def both():
            return await asyncio.gather((array.store_path / key).exists(), array.getitem(index))

        ids = self.cache.image_ids
        where = (f"{self.cache.url}: descriptors/{self.key[:KEY_LENGTH]} of image {ids[index]!r} (index {index})")
        remedy = (f"remove the set (`dhf-cache prune {self.cache.url} --descriptors {self.key[:KEY_LENGTH]}`) "
                  "and rerun eval to compute it again")
        try:
            exists, value = run_bounded(both(), self.cache.timeout, f"reading {where}")
        except storage_exceptions():
            raise
        except Exception as exc:  # noqa: BLE001 - checksum, decompression, size: a damaged chunk
            raise CacheError(f"{where}: chunk damaged ({type(exc).__name__}); {remedy}") from None
        if not exists:
            raise CacheError(f"{where}: chunk missing; {remedy}")
        return value


def _complete(group) -> bool:
    """A set is usable once both arrays exist (`done` is created last)."""
    return "maps" in group and "done" in group


def holds_complete_set(cache: FeatureCache, key: str) -> bool:
    """Whether the cache holds a complete set for `key` (a checkpoint fingerprint): opening it
    with DescriptorStore then creates nothing (read-only readers such as the viewer ask first)."""
    if GROUP not in cache.group or key[:KEY_LENGTH] not in cache.group[GROUP]:
        return False
    return _complete(cache.group[GROUP][key[:KEY_LENGTH]])


# ------------------------------------------------------------------- listing and pruning


@dataclass(frozen=True)
class DescriptorSet:
    """One stored set: `complete` is False for a set cut short while being created."""

    key: str
    checkpoint_fingerprint: str | None
    checkpoint: str | None  # the run folder the set was computed from, as eval was given it
    images_done: int
    n_images: int
    bytes: int
    complete: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prefix(cache: FeatureCache, *parts: str) -> str:
    return "/".join(p for p in (cache.group.path, *parts) if p)


def list_descriptor_sets(cache: FeatureCache) -> list[DescriptorSet]:
    """Every descriptor set of the cache, by key, with its images done and bytes stored."""
    if GROUP not in cache.group:
        return []
    root = cache.group[GROUP]
    sets = []
    for key in sorted(root.group_keys()):
        group = root[key]
        attrs = group.attrs.asdict()
        complete = _complete(group)
        done = np.asarray(group["done"][:], dtype=bool) if complete else np.zeros(0, dtype=bool)
        fingerprint = attrs.get("checkpoint_fingerprint")
        checkpoint = attrs.get("checkpoint")
        sets.append(DescriptorSet(
            key=key,
            checkpoint_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
            checkpoint=checkpoint if isinstance(checkpoint, str) else None,
            images_done=int(done.sum()),
            n_images=int(group["maps"].shape[0]) if "maps" in group else 0,
            bytes=stored_bytes(cache.group.store, _prefix(cache, GROUP, key), timeout=cache.timeout),
            complete=complete,
        ))
    return sets


def find_descriptor_set(sets: list[DescriptorSet], name: str, url: str) -> DescriptorSet:
    """The set named by its key, the checkpoint fingerprint, or a unique prefix of the key."""
    name = name.strip().lower()
    matches = [s for s in sets if name and (s.key == name[:KEY_LENGTH] if len(name) >= KEY_LENGTH
                                            else s.key.startswith(name))]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(s.key for s in sets) or "none"
    if not matches:
        raise CacheError(f"{url}: no descriptor set {name!r} (sets: {known}); `dhf-cache info {url}` lists them")
    raise CacheError(f"{url}: {name!r} names {len(matches)} descriptor sets ({known}); give more of the key")


def remove_descriptor_sets(cache: FeatureCache, sets: list[DescriptorSet]) -> None:
    """Delete these sets (the cache must be open for writing). An eval of the same checkpoint
    computes its descriptors again; the features are untouched."""
    if not sets:
        return
    root = cache.group[GROUP]
    for item in sets:
        del root[item.key]
