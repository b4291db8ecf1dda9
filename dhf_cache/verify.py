"""`dhf-cache verify`: read every chunk of every done image and check it.

A done image must have every per-image chunk on the store (the arrays write empty chunks too),
each chunk must decode (zstd) and pass its crc32c checksum with the array's shape, and its
features must be finite. `repair` clears the done flag of each image that fails, and records
why, so the next build recomputes exactly those. On local disk it also lists the `*.partial`
temp files a killed writer leaves behind (never visible as chunks); `repair` deletes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dhf_cache.cache import FEATURES, GENERATED, GENERATED_ARRAYS, FeatureCache
from dhf_cache.progress import progress_bar


@dataclass
class VerifyReport:
    n_images: int
    n_done: int
    n_chunks: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)  # image id -> what is wrong
    repaired: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)  # temp files of killed writers (local disk)

    @property
    def ok(self) -> bool:
        return not self.problems


def _arrays(cache: FeatureCache) -> list[tuple[str, object]]:
    paths = [f"{FEATURES}/{layer.name}" for layer in cache.layers] + ["latents", "sizes"]
    if cache.is_generated:
        paths += [f"{GENERATED}/{name}" for name in GENERATED_ARRAYS if name != "prompts"]
    return [(path, cache.group[path]) for path in paths]


def _chunk_exists(cache: FeatureCache, path: str, array, index: int) -> bool:
    from zarr.core.sync import sync

    key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
    return bool(sync(cache.group.store.exists(f"{path}/{key}")))


def _stray_partials(cache: FeatureCache) -> list[Path]:
    root = getattr(cache.group.store, "root", None)
    return sorted(Path(root).rglob("*.partial")) if isinstance(root, Path) else []


def verify_cache(cache: FeatureCache, repair: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print) -> VerifyReport:
    done = cache.done_mask()
    ids = cache.image_ids
    report = VerifyReport(len(ids), int(done.sum()))
    arrays = _arrays(cache)
    bar = progress_bar(int(done.sum()), "verify", unit="img", enabled=progress)
    for index in np.flatnonzero(done):
        image_id = ids[index]
        for path, array in arrays:
            report.n_chunks += 1
            problem = None
            if not _chunk_exists(cache, path, array, int(index)):
                problem = f"{path}: chunk missing"
            else:
                try:
                    values = array[int(index)]
                except Exception as exc:  # noqa: BLE001 - checksum, decompression or decoding errors
                    problem = f"{path}: unreadable chunk ({type(exc).__name__}: {str(exc)[:120]})"
                else:
                    if values.shape != array.shape[1:]:
                        problem = f"{path}: shape {values.shape}, expected {array.shape[1:]}"
                    elif path.startswith(FEATURES) and not np.isfinite(values).all():
                        problem = f"{path}: non-finite values"
            if problem:
                report.problems.setdefault(image_id, []).append(problem)
        bar.update(1)
    bar.close()
    strays = _stray_partials(cache)
    report.stray_files = [str(p) for p in strays]
    if repair and strays:
        for path in strays:
            path.unlink(missing_ok=True)
        log(f"removed {len(strays)} temp file(s) left by killed writers")
    if repair and report.problems:
        index_of = cache.index_of()
        for image_id, problems in report.problems.items():
            i = index_of[image_id]
            cache.record_failure(i, "verify: " + "; ".join(problems))
            cache.group["done"][i] = False
            report.repaired.append(image_id)
        log(f"cleared the done flag of {len(report.repaired)} image(s); rerun the build to recompute them")
    return report
