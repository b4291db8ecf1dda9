"""The feature cache: a Zarr v3 group that other stages, machines and versions can trust.

Layout of format 2 (docs/cache-format.md): the root group holds one group per feature source,

    <root>/zarr.json            attributes: {"dhf_cache": {"format_version": 2, "provenance"}}
    sources/<name>/zarr.json    attributes: the source's format version, spec, fingerprint,
                                layer table, timesteps, save steps, provenance
    sources/<name>/...          the source's arrays, below

and a format-1 cache is the same arrays and attributes at the root: it reads as one source.
`FeatureCache` is a handle on one source; each source has its own image list and done flags.

    features/<layer>            (N, T, C, H, W) float16, chunk = one image, zstd + crc32c
    latents                     (N, 4, h, w) float32, the sampled initial latent of each image
    image_ids                   (N,) strings
    done                        (N,) bool, chunk 1: set last, after all of an image is written
    sizes                       (N, 2) int32 [width, height] of the image as used (EXIF applied)
    errors                      (N,) strings, chunk 1: why an image could not be built ('' = none)

Only the coordinator (`FeatureCache.prepare`) creates arrays or writes metadata; workers only
write the chunks of their own images (`write_image`, `record_failure`).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from dhf_cache import __version__
from dhf_cache.cache.meta import ArrayRule, check_array, check_root_meta
from dhf_cache.config import FORMAT_VERSION, BuildSpec, source_kind
from dhf_cache.cache.direct_chunks import ChunkProblem, DirectArray, direct_array, read_chunk, write_chunk
from dhf_cache.cache.disk_space import bytes_per_image
from dhf_cache.errors import CacheError, SpecMismatchError, UsageError, first_line, invalid_values
from dhf_cache.cache.layers import LayerInfo
from dhf_cache.cache import quant8  # noqa: F401  (registers the quant8 codec, so quant8 caches open)
from dhf_cache.cache.fingerprint import spec_differences, spec_fingerprints
from dhf_cache.cache.storage import (coordinator_lock, open_store, run_bounded, storage_exceptions, store_timeout,
                               stored_bytes)

if TYPE_CHECKING:  # stages two and three import the cache without stage one's modules
    from dhf_cache.sources.sd.extract import ExtractedImage

# zarr flags numcodecs' BitRound (the `bitround` codec) as outside the v3 spec each time a
# bitround array is created or opened; the choice is deliberate and documented (cache-format.md).
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning)

FEATURES = "features"
GENERATED = "generated"
PER_IMAGE_ARRAYS = ("latents", "done", "sizes", "errors")
GENERATED_ARRAYS = ("images", "prompts", "seeds")
IDS_CHUNK = 4096
SOURCES = "sources"  # format 2: sources/<name> holds one source's arrays and attributes
MIGRATING = "dhf_cache_migrating"  # root attribute while `dhf-cache migrate` moves a format-1 cache
SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
CREATING = "dhf_cache_creating"  # root attribute while the coordinator creates the arrays
DAMAGED_REMEDY = "run `dhf-cache verify --repair {url}`, then rerun the build to recompute it"
# Feature reads and writes of local default-codec caches bypass zarr's chunk path
# (direct_chunks.py); DHF_CACHE_DIRECT_READS=0 / DHF_CACHE_DIRECT_WRITES=0 send every chunk
# through zarr (benchmarks compare the two).
DIRECT_READS = os.environ.get("DHF_CACHE_DIRECT_READS", "1") != "0"
DIRECT_WRITES = os.environ.get("DHF_CACHE_DIRECT_WRITES", "1") != "0"
_WRITE_POOL: ThreadPoolExecutor | None = None


def _write_pool() -> ThreadPoolExecutor:
    """Threads that compress and write feature chunks (shared; zstd releases the GIL)."""
    global _WRITE_POOL
    if _WRITE_POOL is None:
        from dhf_cache.cache.feature_loader import usable_cores

        _WRITE_POOL = ThreadPoolExecutor(max(2, min(12, usable_cores())), thread_name_prefix="dhf-cache-write")
    return _WRITE_POOL


def _forget_write_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool there when needed."""
    global _WRITE_POOL
    _WRITE_POOL = None


os.register_at_fork(after_in_child=_forget_write_pool)


def _compressors(spec: BuildSpec):
    import zarr.codecs as zc

    codec = spec.storage.codec
    return [zc.ZstdCodec(level=codec.level), zc.Crc32cCodec()]


def _feature_filters(spec: BuildSpec) -> list:
    """Lossy pre-compression filters of feature arrays (recorded in each array's metadata)."""
    codec = spec.storage.codec
    if codec.name != "bitround":
        return []
    from zarr.codecs.numcodecs import BitRound

    return [BitRound(keepbits=codec.keepbits)]


def _feature_serializer(spec: BuildSpec):
    """The array-to-bytes codec of feature arrays: zarr's default, or 8-bit per-map codes."""
    if spec.storage.codec.name != "quant8":
        return "auto"
    from dhf_cache.cache.quant8 import Quant8Codec

    return Quant8Codec()


def _run_concurrently(coroutines: list, raise_first: bool = True, timeout: float | None = None) -> list:
    """Run zarr array coroutines together in one call into zarr's event loop; wait for all of
    them, then raise the first failure (none is left unretrieved), else return their results.
    With raise_first=False, failures are returned in place of results. `timeout` bounds the
    whole call (remote stores; StorageError, every coroutine cancelled)."""
    import asyncio

    async def run_all():
        return await asyncio.gather(*coroutines, return_exceptions=True)

    outcomes = run_bounded(run_all(), timeout, f"{len(coroutines)} concurrent array operations")
    for outcome in outcomes:
        if raise_first and isinstance(outcome, BaseException):
            raise outcome
    return outcomes


class FeatureCache:
    """A handle on an existing cache. Open with `FeatureCache.open` or `FeatureCache.prepare`."""

    def __init__(self, group, url: str, name: str | None = None):
        """`group` is the source's group: the root of a format-1 cache, sources/<name> in format 2;
        `url` is always the cache's root (what users type); `name` the source's name."""
        attrs = group.attrs.asdict()
        meta = attrs.get("dhf_cache")
        if not isinstance(meta, dict):
            raise CacheError(f"{url}: a Zarr group, but not a dhf-cache cache (no 'dhf_cache' attribute)")
        _check_version(meta, url)
        check_root_meta(meta, url)  # types, sizes and fingerprints recomputed from the stored spec
        self.group = group
        self.url = url
        self.meta = meta
        try:
            self.spec = BuildSpec.model_validate(meta["spec"])
        except ValueError as exc:
            raise CacheError(f"{url}: the stored spec is not valid ({invalid_values(exc)}); the cache's metadata is "
                             "damaged: rebuild into a new --cache") from None
        self.fingerprint: dict[str, str] = meta["fingerprint"]
        self.layers = [LayerInfo(**d) for d in meta["layers"]]
        self.timesteps: list[int] = list(meta["timesteps"])
        self._ids: list[str] | None = None
        self._arrays: dict[str, Any] = {}
        self._direct: dict[str, DirectArray | None] = {}
        self.timeout = store_timeout(url)  # one remote operation's bound (None: local disk)
        self.name = name or source_kind(self.spec)
        self.format_version: int = meta["format_version"]
        self._check_arrays()

    def _check_arrays(self) -> None:
        """Every array of the contract present, with the dtype and shape the attributes promise
        and a plausible length: checked once at open from metadata fetched in one concurrent
        call, so no command reads, allocates or trusts an array that breaks the contract."""
        try:  # the contract's arrays only: a damaged descriptor set (`dhf-cache prune`) must not close the cache
            members = dict(self.group.members())
            for sub in (FEATURES, GENERATED):
                if sub in members and not hasattr(members[sub], "dtype"):
                    members.update({f"{sub}/{name}": node for name, node in members[sub].members()})
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"{self.url}: unreadable array metadata ({first_line(exc)}); the cache's metadata is "
                             "damaged: rebuild into a new --cache") from None
        paths = ["image_ids"] + [p for p in self._contract_paths() if p != "image_ids"]
        for path in paths:
            if path not in members or not hasattr(members[path], "dtype"):
                raise CacheError(f"{self.url}: array {path} is missing; the cache is damaged: rebuild into a new --cache")
            # per-image arrays grow before image_ids (add_images), so never shorter than it; the
            # ids' shape is metadata, so a damaged ids chunk still opens (for `verify --repair`)
            n = None if path == "image_ids" else int(self._arrays["image_ids"].shape[0])
            check_array(self.url, path, members[path], self._rule(path), n)
            self._arrays[path] = members[path]

    def _contract_paths(self) -> list[str]:
        paths = [f"{FEATURES}/{l.name}" for l in self.layers] + ["image_ids", *self.per_image_names]
        if self.is_generated:
            paths += [f"{GENERATED}/{n}" for n in GENERATED_ARRAYS]
        return paths

    # ---------------------------------------------------------------- opening and creating
    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r",
             source: str | None = None, prefer: str | None = None) -> FeatureCache:
        """One source of the cache at `url`: the one named, or the cache's only source, or
        `prefer` when the cache holds it (a cache with several asks for a name, listing them)."""
        root = open_root(url, storage_options, mode)
        names = source_names(root, url)
        if source is None and prefer in names:
            source = prefer
        if source is None:
            if len(names) != 1:
                raise UsageError(f"{url} holds {len(names)} feature sources ({', '.join(names) or 'none yet'}); "
                                 "name one with --source" if names else
                                 f"{url} holds no feature source yet; build one with `dhf-cache build --cache {url}`")
            source = names[0]
        return open_source(root, url, source, names)

    @classmethod
    def open_all(cls, url: str, storage_options: dict | None = None, mode: str = "r") -> dict[str, FeatureCache]:
        """Every source of the cache, by name, in the order they were added (format 1: one)."""
        root = open_root(url, storage_options, mode)
        names = source_names(root, url)
        return {name: open_source(root, url, name, names) for name in names}

    @classmethod
    def prepare(
        cls,
        url: str,
        spec: BuildSpec,
        layers: Sequence[LayerInfo],
        timesteps: Sequence[int],
        image_ids: Sequence[str],
        latent_shape: Sequence[int] | None,
        provenance: dict | None = None,
        storage_options: dict | None = None,
        source: str | None = None,
    ) -> FeatureCache:
        """Create the cache, or check an existing one has this spec; then add unseen image ids.

        Refuses (SpecMismatchError) when the existing source was built with another spec. A new
        cache is created in format 2 with this one source (named `source`, default the spec's
        kind: sd, sdxl, dinov2); a source added to a cache that holds others must cover exactly
        their images. A format-1 cache keeps its format while it is built with its own source.
        """
        name = source or source_kind(spec)
        if not SOURCE_NAME.match(name):
            raise UsageError(f"--source {name!r}: a source name is lower-case letters, digits, '-' and '_'")
        with coordinator_lock(url):
            store = open_store(url, storage_options)
            try:
                root = _open_group(store, "r+", url)
            except FileNotFoundError:
                root = None
            attrs = root.attrs.asdict() if root is not None else {}
            if root is not None and "dhf_cache" not in attrs and _unfinished_creation(root):
                root = _open_group(store, "w", url)  # holds no image yet: start over
            elif root is not None and "dhf_cache" not in attrs and (attrs or list(root.keys())):
                raise CacheError(f"{url}: a Zarr group, but not a dhf-cache cache (no 'dhf_cache' attribute); "
                                 "choose another --cache")
            if root is None or not root.attrs.asdict() and not list(root.keys()):
                root = _open_group(store, "w" if root is not None else "w-", url)
                root.attrs.put({"dhf_cache": {"format_version": FORMAT_VERSION, "provenance": {
                    "created_by": f"dhf-cache {__version__}", "created_at": _now()}}})
            names = source_names(root, url)
            if root.attrs.asdict()["dhf_cache"].get("format_version") == 1 and name != names[0]:
                raise UsageError(f"{url} is a format-1 cache, which holds one source ({names[0]}); run "
                                 f"`dhf-cache migrate {url}` to upgrade it in place, then add --source {name}")
            if name in names:
                cache = open_source(root, url, name, names)
                cache.check_spec(spec, layers)
            else:
                if names:  # every source covers the same images, so the first one stands for all
                    _check_same_images(url, open_source(root, url, names[0], names), name, image_ids)
                group = root.require_group(SOURCES).require_group(name)
                if "dhf_cache" not in group.attrs.asdict():  # new, or a creation killed half-way
                    for child in list(group.keys()):
                        del group[child]
                cache = cls._create(group, url, spec, layers, timesteps, tuple(latent_shape or ()), provenance or {}, name)
            cache.add_images(image_ids)
        return cache

    @classmethod
    def _create(cls, group, url, spec, layers, timesteps, latent_shape, provenance, name) -> FeatureCache:
        """Create every array, then the `dhf_cache` attribute last. A marker attribute written
        first lets a rerun tell a creation that was killed half-way (recreated: it holds no
        image) from a foreign Zarr group (refused)."""
        group.attrs.put({CREATING: {"created_by": f"dhf-cache {__version__}"}})
        meta = {
            "format_version": FORMAT_VERSION,
            "source": name,
            "spec": spec.model_dump(mode="json"),
            "fingerprint": spec_fingerprints(spec),
            "layers": [layer.as_dict() for layer in layers],
            "timesteps": [int(t) for t in timesteps],
            "save_steps": list(getattr(spec.feature_space, "save_steps", ())),
            "provenance": {
                "created_by": f"dhf-cache {__version__}",
                "created_at": _now(),
                **provenance,
            },
        }
        compressors = _compressors(spec)
        n_steps = len(timesteps)
        features = group.create_group(FEATURES)
        full = {"write_empty_chunks": True}
        for layer in layers:
            shape = (n_steps, layer.channels, layer.height, layer.width)
            features.create_array(
                layer.name, shape=(0, *shape), chunks=(1, *shape), dtype="float16",
                filters=_feature_filters(spec), serializer=_feature_serializer(spec), compressors=compressors,
                fill_value=0, config=full,
            )
        if latent_shape:  # sources that start from a latent (SD, SDXL); DINOv2 reads pixels
            group.create_array(
                "latents", shape=(0, *latent_shape), chunks=(1, *latent_shape), dtype="float32",
                compressors=compressors, fill_value=0, config=full,
            )
        group.create_array("image_ids", shape=(0,), chunks=(IDS_CHUNK,), dtype=str)
        group.create_array("done", shape=(0,), chunks=(1,), dtype=bool, fill_value=False)
        group.create_array("sizes", shape=(0, 2), chunks=(1, 2), dtype="int32", fill_value=0)
        group.create_array("errors", shape=(0,), chunks=(1,), dtype=str)
        if getattr(spec.feature_space, "source", None) == "generation":  # the generated images, their prompts and seeds
            side = spec.preprocessing.image_size
            gen = group.create_group(GENERATED)
            gen.create_array("images", shape=(0, side, side, 3), chunks=(1, side, side, 3), dtype="uint8",
                             compressors=compressors, fill_value=0, config=full)
            gen.create_array("prompts", shape=(0,), chunks=(1,), dtype=str)
            gen.create_array("seeds", shape=(0,), chunks=(1,), dtype="int64", fill_value=0)
        group.attrs.put({"dhf_cache": meta})  # written last, replacing the marker: now it is a cache
        return cls(group, url, name)

    def check_spec(self, spec: BuildSpec, layers: Sequence[LayerInfo] | None = None) -> None:
        differences = spec_differences(self.spec, spec)
        if layers is not None and [l.as_dict() for l in layers] != [l.as_dict() for l in self.layers]:
            differences.append(
                f"layer table: cache has {[l.as_dict() for l in self.layers]}, "
                f"this model gives {[l.as_dict() for l in layers]}"
            )
        if differences:
            raise SpecMismatchError(
                f"{self.url} was built with a different spec; refusing to mix features. Differences:\n  "
                + "\n  ".join(differences)
                + "\nBuild into a new --cache, or use the cache's settings (`dhf-cache info "
                + f"{self.url}`).",
                differences,
            )

    def add_images(self, image_ids: Iterable[str]) -> list[str]:
        """Append ids the cache does not hold yet (coordinator only); returns the new ids."""
        known = set(self.image_ids)
        new = list(dict.fromkeys(i for i in image_ids if i not in known))
        if not new:
            return []
        if any(not isinstance(i, str) or not i for i in new):
            raise UsageError("image ids must be non-empty strings")
        n_old = len(self.image_ids)
        n = n_old + len(new)
        # Per-image arrays first, ids last: until an id is written its entry is '' and does not
        # count (image_ids stops at the first ''), so a kill anywhere here leaves no phantom image;
        # the rerun adds the same ids again over whatever a killed run resized.
        for arr in self._per_image_arrays():
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
        ids = self._array("image_ids")
        ids.resize((n,))
        ids[n_old:] = np.array(new)
        self._ids = None
        return new

    # ---------------------------------------------------------------- arrays
    def _array(self, path: str):
        """An array of the cache; those of the contract were checked at open (_check_arrays)."""
        if path not in self._arrays:
            self._arrays[path] = self.group[path]
        return self._arrays[path]

    def _rule(self, path: str) -> ArrayRule:
        if path.startswith(f"{FEATURES}/"):
            layer = next(l for l in self.layers if path == f"{FEATURES}/{l.name}")
            return ArrayRule("float16", (len(self.timesteps), layer.channels, layer.height, layer.width))
        side = self.spec.preprocessing.image_size
        return {
            "latents": ArrayRule("float32", None),
            "image_ids": ArrayRule("str", ()),
            "done": ArrayRule("bool", ()),
            "sizes": ArrayRule("int32", (2,)),
            "errors": ArrayRule("str", ()),
            f"{GENERATED}/images": ArrayRule("uint8", (side, side, 3)),
            f"{GENERATED}/prompts": ArrayRule("str", ()),
            f"{GENERATED}/seeds": ArrayRule("int64", ()),
        }[path]

    def path_of(self, path: str) -> str:
        """`path` inside this source's group as a key of the store (format 2: sources/<name>/path)."""
        return "/".join(p for p in (self.group.path, path) if p)

    def feature_array(self, layer: str):
        return self._array(f"{FEATURES}/{layer}")

    @property
    def has_latents(self) -> bool:
        """Sources that start from a VAE latent store it (SD, SDXL); DINOv2 reads pixels."""
        return source_kind(self.spec) != "dinov2"

    @property
    def per_image_names(self) -> tuple[str, ...]:
        return PER_IMAGE_ARRAYS if self.has_latents else tuple(n for n in PER_IMAGE_ARRAYS if n != "latents")

    @property
    def is_generated(self) -> bool:
        return getattr(self.spec.feature_space, "source", None) == "generation"

    def _per_image_arrays(self):
        arrays = [self.feature_array(l.name) for l in self.layers] + [self._array(n) for n in self.per_image_names]
        if self.is_generated:
            arrays += [self._array(f"{GENERATED}/{n}") for n in GENERATED_ARRAYS]
        return arrays

    @property
    def image_ids(self) -> list[str]:
        """The cache's images in index order. The list ends before the first '' entry: ids the
        coordinator had not written when it was killed (add_images) are not images."""
        if self._ids is None:
            arr = self._array("image_ids")
            ids = [str(x) for x in self._read(arr, "image_ids")] if arr.shape[0] else []
            end = ids.index("") if "" in ids else len(ids)
            if any(ids[end:]):
                raise CacheError(f"{self.url}: image_ids has an empty entry at {end} before further ids; the cache's id "
                                 "list is damaged: rebuild into a new --cache")
            self._ids = ids[:end]
        return self._ids

    def index_of(self) -> dict[str, int]:
        index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        if len(index) != len(self.image_ids):
            twice = sorted({i for i in self.image_ids if self.image_ids.count(i) > 1})[:5]
            raise CacheError(f"{self.url}: image_ids lists {', '.join(twice)} more than once; the cache's id list is "
                             "damaged (`dhf-cache verify` lists them): rebuild into a new --cache")
        return index

    def done_mask(self) -> np.ndarray:
        n = len(self.image_ids)
        arr = self._array("done")
        return np.asarray(self._read(arr, "done", n), dtype=bool) if n else np.zeros(0, dtype=bool)

    def sizes(self) -> np.ndarray:
        n = len(self.image_ids)
        arr = self._array("sizes")
        return np.asarray(self._read(arr, "sizes", n)) if n else np.zeros((0, 2), dtype=np.int32)

    def errors(self) -> list[str]:
        n = len(self.image_ids)
        arr = self._array("errors")
        return [str(x) for x in self._read(arr, "errors", n)] if n else []

    def _read(self, array, path: str, n: int | None = None):
        """array[:n] (all when n is None), a damaged chunk turned into one line naming the array."""
        try:
            return array[: array.shape[0] if n is None else n]
        except (ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise CacheError(f"{self.url}: array {path} has a damaged chunk ({first_line(exc)}); run "
                             f"`dhf-cache verify --repair {self.url}`") from None

    def failures(self) -> list[dict[str, str]]:
        """Images whose last build attempt failed and that are not done."""
        done = self.done_mask()
        return [
            {"id": image_id, "error": err}
            for image_id, err, ok in zip(self.image_ids, self.errors(), done)
            if err and not ok
        ]

    # ---------------------------------------------------------------- per-image writes (workers)
    def write_image(self, index: int, image: "ExtractedImage", size: tuple[int, int],
                    clear_failure: bool = True) -> None:
        """Write every array of one image concurrently, then its `done` flag (so a crash never
        half-counts it). `clear_failure=False` skips rewriting an `errors` entry known empty."""
        direct, writes = [], []
        use_direct = DIRECT_WRITES and not self.group.store.read_only  # read-only: zarr raises
        for layer in self.layers:  # local default-codec chunks straight to their files, in parallel
            target = self._direct_array(layer.name, use_direct)
            if target is not None:
                direct.append(_write_pool().submit(write_chunk, target, index, image.features[layer.name]))
            else:
                writes.append((self.feature_array(layer.name), image.features[layer.name]))
        if self.has_latents:
            writes.append((self._array("latents"), image.latent))
        writes.append((self._array("sizes"), np.asarray(size, dtype=np.int32)))
        if clear_failure:
            writes.append((self._array("errors"), np.asarray("", dtype=object)))
        if image.image is not None:  # generation: the image, its prompt and seed
            writes += [(self._array(f"{GENERATED}/images"), image.image),
                       (self._array(f"{GENERATED}/prompts"), np.asarray(image.prompt, dtype=object)),
                       (self._array(f"{GENERATED}/seeds"), np.asarray(image.seed, dtype=np.int64))]
        try:
            _run_concurrently([arr.async_array.setitem(index, value) for arr, value in writes], timeout=self.timeout)
        finally:
            errors = [f.exception() for f in direct]  # waits for every chunk, failed or not
        for error in errors:
            if error is not None:
                raise error
        self._array("done")[index] = True

    def record_failure(self, index: int, message: str) -> None:
        self._array("errors")[index] = message

    # ---------------------------------------------------------------- reads
    def read_features(
        self, index: int, layers: Sequence[str] | None = None, positions: Sequence[int] | None = None,
        check_finite: bool = False,
    ) -> dict[str, np.ndarray]:
        """One image's stored maps: layer -> (T, C, H, W) float16 (optionally a subset of T).

        A missing or damaged chunk (and, with `check_finite`, a NaN or inf in the maps read) raises
        CacheError naming the cache, image and layer, whichever read path (direct or zarr) served it.

        All layers' chunks are fetched and decoded concurrently in one call into zarr's event
        loop: one round trip per image instead of one per layer (latency on object stores,
        per-call overhead on small chunks)."""
        names = list(layers or [l.name for l in self.layers])
        found = {}
        for name in names:  # local default-codec chunks straight from their files (direct_chunks.py)
            target = self._direct_array(name, DIRECT_READS)
            if target is not None:
                try:
                    found[name] = read_chunk(target, index)
                except ChunkProblem as exc:
                    raise self._damaged(index, name, str(exc)) from None
        rest = [name for name in names if name not in found]
        if rest:
            found.update(self._read_through_zarr(index, rest))
        chunks = [found[name] for name in names]
        if positions is not None:
            chunks = [np.ascontiguousarray(c[list(positions)]) for c in chunks]
        if check_finite:
            for name, chunk in zip(names, chunks):
                if not np.isfinite(chunk).all():
                    raise self._damaged(index, name, "non-finite values (NaN or inf) in the stored maps")
        return dict(zip(names, chunks))

    def _read_through_zarr(self, index: int, names: list[str]) -> dict[str, np.ndarray]:
        """Chunks of other codecs and stores, each with a check that its chunk exists: zarr
        answers a missing chunk with the fill value (zeros), which must never pass for features."""
        coroutines = []
        for name in names:
            array = self.feature_array(name).async_array
            key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
            coroutines += [(array.store_path / key).exists(), array.getitem(index)]
        outcomes = _run_concurrently(coroutines, raise_first=False, timeout=self.timeout)
        found = {}
        for k, name in enumerate(names):
            exists, value = outcomes[2 * k], outcomes[2 * k + 1]
            if isinstance(exists, BaseException) or isinstance(value, BaseException):
                failure = exists if isinstance(exists, BaseException) else value
                if isinstance(failure, storage_exceptions()):
                    raise failure  # the store failed, not the chunk: reported as a storage failure
                raise self._damaged(index, name, f"chunk damaged ({type(failure).__name__}: {first_line(failure)})")
            if not exists:
                raise self._damaged(index, name, "chunk missing")
            found[name] = value
        return found

    def _damaged(self, index: int, layer: str, what: str) -> CacheError:
        ids = self.image_ids
        image = ids[index] if 0 <= index < len(ids) else f"#{index}"
        return CacheError(f"{self.url}: image {image!r} (index {index}), layer {layer}: {what}. The cache is damaged: "
                          + DAMAGED_REMEDY.format(url=self.url))

    def _direct_array(self, layer: str, enabled: bool) -> DirectArray | None:
        if not enabled:
            return None
        if layer not in self._direct:
            self._direct[layer] = direct_array(self.feature_array(layer))
        return self._direct[layer]

    def read_latent(self, index: int) -> np.ndarray:
        return self._array("latents")[index]

    def generated_image(self, index: int) -> tuple[np.ndarray, str, int]:
        """(image (H, W, 3) uint8, prompt, seed) of a generated image."""
        if not self.is_generated:
            raise CacheError(f"{self.url} holds features of real images; it stores no images")
        return (self._array(f"{GENERATED}/images")[index], str(self._array(f"{GENERATED}/prompts")[index]),
                int(self._array(f"{GENERATED}/seeds")[index]))

    # ---------------------------------------------------------------- summary
    @property
    def raw_bytes_per_image(self) -> int:
        """Native fp16 bytes of one image's stored maps (every layer x timestep)."""
        return sum(len(self.timesteps) * l.channels * l.height * l.width * 2 for l in self.layers)

    @property
    def extra_bytes_per_image(self) -> int:
        """Bytes of one image's entries beside its features (latent, done flag, size; a generated
        image and seed), fixed-size arrays only: strings (errors, prompts) are small and variable."""
        return sum(int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
                   for arr in self._per_image_arrays()[len(self.layers):] if arr.dtype.kind in "biuf")

    @property
    def files_per_image(self) -> int:
        """Chunk files one image adds (one per per-image array): each rounds up to a disk block."""
        return len(self._per_image_arrays())

    def info(self) -> dict[str, Any]:
        done = self.done_mask()
        n_done = int(done.sum())
        raw_per_image = self.raw_bytes_per_image
        store = self.group.store
        total = stored_bytes(store, self.group.path, timeout=self.timeout)
        feature_bytes = stored_bytes(store, self.path_of(FEATURES), timeout=self.timeout)
        return {
            "url": self.url,
            "source": self.name,
            "format_version": self.meta["format_version"],
            "fingerprint": self.fingerprint,
            "spec": self.meta["spec"],
            "provenance": self.meta.get("provenance", {}),
            "layers": [l.as_dict() for l in self.layers],
            "timesteps": self.timesteps,
            "save_steps": self.meta["save_steps"],
            "n_images": len(self.image_ids),
            "n_done": n_done,
            "failures": self.failures(),
            "bytes": total,
            "feature_bytes": feature_bytes,
            "feature_bytes_per_image_native_fp16": raw_per_image,
            "compression_ratio": (raw_per_image * n_done / feature_bytes) if n_done and feature_bytes else None,
            # the images not done yet, at the average of those done (else disk_space's upper bound)
            "bytes_to_finish_estimate": int((len(self.image_ids) - n_done)
                                            * (total / n_done if n_done else bytes_per_image(self))),
        }


def _open_group(store, mode: str, url: str):
    """zarr.open_group, bounded on remote stores (zarr's synchronous API waits without limit
    there) and for Zarr v3 only (no probing for v2 metadata: one request instead of several)."""
    import zarr
    from zarr.api.asynchronous import open_group

    return zarr.Group(run_bounded(open_group(store=store, mode=mode, zarr_format=3), store_timeout(url), f"opening {url}"))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_version(meta: dict, url: str) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CacheError(f"{url}: cache format version {version!r} is not one this dhf-cache understands "
                         f"(1..{FORMAT_VERSION}); upgrade dhf-cache")


def open_root(url: str, storage_options: dict | None = None, mode: str = "r"):
    """The cache's root group, checked to be a dhf-cache cache of a known format."""
    store = open_store(url, storage_options, read_only=(mode == "r"), create=False)
    try:
        root = _open_group(store, "r" if mode == "r" else "r+", url)
    except FileNotFoundError:
        raise CacheError(f"{url}: no cache here; build one with `dhf-cache build --cache {url}`") from None
    attrs = root.attrs.asdict()
    if MIGRATING in attrs:
        raise CacheError(f"{url}: a `dhf-cache migrate` was interrupted; rerun `dhf-cache migrate {url}` to finish it")
    meta = attrs.get("dhf_cache")
    if not isinstance(meta, dict):
        raise CacheError(f"{url}: a Zarr group, but not a dhf-cache cache (no 'dhf_cache' attribute)")
    _check_version(meta, url)
    return root


def source_names(root, url: str) -> list[str]:
    """The sources of a cache, oldest first: a format-1 cache's one source (named after its kind),
    or every complete group under sources/ of a format-2 cache (a group whose creation was killed
    has no `dhf_cache` attribute and is not a source)."""
    meta = root.attrs.asdict()["dhf_cache"]
    if meta["format_version"] == 1:
        try:
            return [source_kind(BuildSpec.model_validate(meta["spec"]))]
        except (ValueError, KeyError, TypeError):
            return ["sd"]  # the metadata check at open names what is wrong
    if SOURCES not in root:
        return []
    found = []
    try:
        for name, node in root[SOURCES].members():
            meta = node.attrs.asdict().get("dhf_cache")
            if isinstance(meta, dict) and not hasattr(node, "dtype"):
                provenance = meta.get("provenance")
                found.append((str(provenance.get("created_at", "") if isinstance(provenance, dict) else ""), name))
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"{url}: unreadable {SOURCES}/ metadata ({first_line(exc)}); the cache's metadata is "
                         "damaged") from None
    return [name for _, name in sorted(found)]


def open_source(root, url: str, name: str, names: Sequence[str] | None = None) -> FeatureCache:
    names = list(names) if names is not None else source_names(root, url)
    if name not in names:
        raise UsageError(f"--source {name}: {url} holds no such source; it holds {', '.join(names) or 'none'}")
    if root.attrs.asdict()["dhf_cache"]["format_version"] == 1:
        return FeatureCache(root, url, name)
    return FeatureCache(root[SOURCES][name], url, name)


def _check_same_images(url: str, cache: FeatureCache, name: str, image_ids: Sequence[str]) -> None:
    """A source added to a cache covers exactly the images of the source `cache` it already
    holds, so maps of every source exist for every image (training and eval pair them by id)."""
    first = cache.name
    held, wanted = set(cache.image_ids), set(image_ids)
    if held == wanted:
        return
    extra, missing = sorted(wanted - held), sorted(held - wanted)
    parts = []
    if extra:
        parts.append(f"{len(extra)} images not in source {first} ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})")
    if missing:
        parts.append(f"{len(missing)} of its images missing ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    raise UsageError(f"{url}: source {name} would cover other images than the cache's: {'; '.join(parts)}. Build it "
                     f"with the data set (and --limit) that built {first}, or into a new --cache")


def _unfinished_creation(group) -> bool:
    """True for a group whose creation by `_create` was killed before it finished (its marker
    attribute without the `dhf_cache` one): it holds no image, so recreating it loses nothing."""
    return CREATING in group.attrs.asdict()

