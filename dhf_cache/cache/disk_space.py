"""Will a local build fit on its disk? Checked before the first image is computed.

A build that fills its disk stops with ENOSPC after hours of GPU time (finished images are kept,
but the disk is full for everyone sharing it). The estimate is an upper bound from the cache's
layer table: native fp16 bytes per image (METHOD.md: 156,794,880 for SD 1.5 at 512 px, 11 steps),
halved for `quant8`, plus the other per-image arrays and one disk block per chunk file; zstd and
bit-rounding store less, by an amount only the data decide (random SD 1.5-shaped maps: 1.09x
with zstd, docs/benchmarks.md).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from dhf_cache.errors import StorageError
from dhf_cache.cache.storage import is_local, local_path

# stored bytes / native fp16 bytes, at most (quant8: one byte per value plus a few per map)
STORED_FRACTION = {"quant8": 0.51}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def bytes_per_image(cache) -> int:
    """Upper bound of the bytes one image adds to `cache` (features + latent)."""
    fraction = STORED_FRACTION.get(cache.spec.storage.codec.name, 1.0)
    return int(cache.raw_bytes_per_image * fraction) + cache.extra_bytes_per_image


def disk_bytes_per_image(cache, block: int) -> int:
    """Upper bound of the disk one image takes: its bytes, plus at most one partly used block per
    chunk file (for the demo's ~5-20 KB chunks that is most of it: 23 MB on disk for 9.6 MB)."""
    return bytes_per_image(cache) + cache.files_per_image * block


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(cache, n_images: int, log: Callable[[str], None]) -> None:
    """Log the estimate against the free space of a local cache's disk; refuse when it cannot fit.
    Object stores have no free space to ask about: nothing is checked there."""
    if n_images <= 0 or not is_local(cache.url):
        return
    path = _existing(local_path(cache.url))
    try:
        stats = os.statvfs(path)
        free, block = stats.f_bavail * stats.f_frsize, stats.f_frsize
    except AttributeError:  # no statvfs (Windows)
        free, block = shutil.disk_usage(path).free, 4096
    except OSError as exc:  # a file system that cannot say: build anyway
        per_image = bytes_per_image(cache)
        log(f"disk: up to {human_bytes(per_image * n_images)} for {n_images} image(s); free space at {path} "
            f"unknown ({exc})")
        return
    per_image = disk_bytes_per_image(cache, block)
    need = per_image * n_images
    log(f"disk: up to {human_bytes(need)} for {n_images} image(s) ({human_bytes(per_image)} each), "
        f"{human_bytes(free)} free at {path}")
    if need > free:
        fits = free // per_image
        raise StorageError(
            f"{cache.url}: {n_images} image(s) need up to {human_bytes(need)} ({human_bytes(per_image)} each, "
            f"{cache.spec.storage.codec.name}) but only {human_bytes(free)} is free at {path}. Free space, point "
            f"--cache at a larger disk, build in parts (--limit {fits} fits now; reruns continue), or store "
            "less (--codec quant8 is ~2x smaller; --layers/--save-steps select less)."
        )
