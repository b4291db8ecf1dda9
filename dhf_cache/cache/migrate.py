"""`dhf-cache migrate`: a format-1 cache upgraded in place to format 2, no chunk rewritten.

A format-1 cache is one SD source whose arrays and attributes sit at the root. Format 2 keeps
each source in `sources/<name>/`, so the upgrade moves the root's arrays into `sources/<name>/`
(a rename of each array's folder: chunk files keep their bytes and inodes) and rewrites the two
small `zarr.json` files. Every step can be killed and the same command, rerun, finishes it:

1. the root gets a `dhf_cache_migrating` attribute (readers refuse the cache until step 4);
2. `sources/<name>/zarr.json` is written with the source's attributes (format_version 2);
3. each array folder of the root is renamed into `sources/<name>/` (skipped when already moved);
4. the root's attributes become format 2's, and the marker goes.

Only local caches move this way: an object store has no rename, and copying every chunk is what
the upgrade promises not to do. A format-1 cache on an object store is read as it is (one
source); build a second source into a new format-2 cache instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dhf_cache.cache.feature_cache import MIGRATING, SOURCES, FeatureCache, open_root
from dhf_cache.config import source_kind
from dhf_cache.errors import CacheError, UsageError
from dhf_cache.cache.storage import coordinator_lock, open_store


def migrate(url: str, log=print) -> str:
    """Upgrade the local format-1 cache at `url` to format 2; returns what was done, in words."""
    store = open_store(url, None, read_only=False, create=False)
    root_dir = getattr(store, "root", None)
    if not isinstance(root_dir, Path):
        raise UsageError(f"{url}: migrate moves folders and works on local caches only; a format-1 cache on an "
                         "object store is read as it is (one source)")
    with coordinator_lock(url):
        meta_file = root_dir / "zarr.json"
        try:
            root_meta = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise CacheError(f"{url}: no cache here") from None
        except (OSError, ValueError) as exc:
            raise CacheError(f"{url}: unreadable zarr.json ({exc})") from None
        attrs = root_meta.get("attributes") or {}
        meta = attrs.get("dhf_cache")
        if not isinstance(meta, dict):
            raise CacheError(f"{url}: a Zarr group, but not a dhf-cache cache (no 'dhf_cache' attribute)")
        if meta.get("format_version") != 1:
            if MIGRATING not in attrs:
                return f"{url} is already format {meta.get('format_version')}: nothing to do"
        if MIGRATING in attrs:
            source_meta = attrs[MIGRATING]["source_meta"]
            name = attrs[MIGRATING]["name"]
        else:
            FeatureCache.open(url)  # the whole format-1 contract checked before anything moves
            from dhf_cache.config import BuildSpec

            name = source_kind(BuildSpec.model_validate(meta["spec"]))
            source_meta = {**meta, "format_version": 2, "source": name}
            _write_attrs(meta_file, root_meta, {**attrs, MIGRATING: {"name": name, "source_meta": source_meta}})
        target = root_dir / SOURCES / name
        target.mkdir(parents=True, exist_ok=True)
        _write_group(root_dir / SOURCES / "zarr.json", {})
        _write_group(target / "zarr.json", {"dhf_cache": source_meta})
        moved = 0
        for child in sorted(root_dir.iterdir()):
            if child.name in (SOURCES, "zarr.json") or not child.is_dir():
                continue
            os.replace(child, target / child.name)  # a rename: the chunk files are the same files
            moved += 1
        root_attrs = {k: v for k, v in attrs.items() if k not in ("dhf_cache", MIGRATING)}
        root_attrs["dhf_cache"] = {"format_version": 2, "provenance": {**meta.get("provenance", {}),
                                                                        "migrated_from_format": 1}}
        _write_attrs(meta_file, root_meta, root_attrs)
    open_root(url)  # readable again
    FeatureCache.open(url, source=name)
    return f"{url}: format 1 -> 2, source {name} now in {SOURCES}/{name} ({moved} array folders moved, no chunk rewritten)"


def _write_attrs(path: Path, meta: dict, attrs: dict) -> None:
    _atomic_json(path, {**meta, "attributes": attrs})


def _write_group(path: Path, attrs: dict) -> None:
    _atomic_json(path, {"zarr_format": 3, "node_type": "group", "attributes": attrs})


def _atomic_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".migrate.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
