"""`dhf-cache verify`: read every chunk of every done image and check it.

A done image must have every per-image chunk on the store (the arrays write empty chunks too),
each chunk must decode (zstd) and pass its crc32c checksum with the array's shape, and its
features must be finite. `repair` clears the done flag of each image that fails, and records
why, so the next build recomputes exactly those. On local disk it also lists the `*.partial`
temp files a killed writer leaves behind (never visible as chunks); `repair` deletes them.

The cache's own lists are checked first, chunk by chunk, because every other command refuses a
cache whose `image_ids` or `done` cannot be read: an unreadable `done` flag is repaired as "not
done"; an unreadable chunk of ids (4096 ids) or an id listed twice cannot be recovered from the
cache itself, so `repair` gives those entries placeholder ids (`<lost-id:I>`,
`<duplicate:I:ID>`) marked not done: the rest of the cache stays usable and the next build adds
the real images again under new indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dhf_cache.cache.feature_cache import FEATURES, GENERATED, GENERATED_ARRAYS, FeatureCache
from dhf_cache.progress import progress_bar
from dhf_cache.cache.storage import run_bounded


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
    paths = [f"{FEATURES}/{layer.name}" for layer in cache.layers] + (["latents"] if cache.has_latents else []) + ["sizes"]
    if cache.is_generated:
        paths += [f"{GENERATED}/{name}" for name in GENERATED_ARRAYS if name != "prompts"]
    return [(path, cache.group[path]) for path in paths]


def _chunk_exists(cache: FeatureCache, path: str, array, index: int) -> bool:
    key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
    full = cache.path_of(f"{path}/{key}")
    return bool(run_bounded(cache.group.store.exists(full), cache.timeout, f"looking up {full}"))


def _stray_partials(cache: FeatureCache) -> list[Path]:
    root = getattr(cache.group.store, "root", None)
    return sorted((Path(root) / cache.group.path).rglob("*.partial")) if isinstance(root, Path) else []


CACHE_LISTS = "(image_ids, done)"  # the report's key for problems of the cache's own lists


def _readable_ids(cache: FeatureCache) -> tuple[list[str | None], list[str]]:
    """The ids chunk by chunk (None for each entry of an unreadable chunk), ending, as
    `FeatureCache.image_ids` does, before the first '' (entries a killed coordinator left)."""
    array = cache.group["image_ids"]
    step = int(array.chunks[0])
    ids: list[str | None] = []
    problems = []
    for start in range(0, int(array.shape[0]), step):
        stop = min(start + step, int(array.shape[0]))
        try:
            ids += [str(x) for x in array[start:stop]]
        except Exception as exc:  # noqa: BLE001 - a damaged chunk: decoding, checksum, size
            ids += [None] * (stop - start)
            problems.append(f"image_ids entries {start}-{stop - 1}: unreadable chunk ({type(exc).__name__})")
    end = ids.index("") if "" in ids else len(ids)
    return ids[:end], problems


def _readable_done(cache: FeatureCache, n: int) -> tuple[np.ndarray, list[int]]:
    """The done flags of the first n entries, and the indices whose flag chunk is unreadable
    (counted as not done)."""
    array = cache.group["done"]
    try:
        return np.asarray(array[:n], dtype=bool), []
    except Exception:  # noqa: BLE001 - find the damaged chunks one by one
        flags, bad = np.zeros(n, dtype=bool), []
        for i in range(n):
            try:
                flags[i] = bool(array[i])
            except Exception:  # noqa: BLE001
                bad.append(i)
        return flags, bad


def _check_lists(cache: FeatureCache, report: VerifyReport, repair: bool, log) -> tuple[list[str], np.ndarray]:
    """The cache's ids and done flags, their problems reported (and with `repair` mended)."""
    ids, problems = _readable_ids(cache)
    done, bad_done = _readable_done(cache, len(ids))
    problems += [f"done flag of entry {i}: unreadable chunk" for i in bad_done]
    seen: dict[str, int] = {}
    duplicates = []
    for i, image_id in enumerate(ids):
        if image_id is not None and image_id in seen:
            duplicates.append(i)
            problems.append(f"id {image_id!r} listed at entries {seen[image_id]} and {i}")
        elif image_id is not None:
            seen[image_id] = i
    if problems:
        report.problems[CACHE_LISTS] = problems
    lost = [i for i, image_id in enumerate(ids) if image_id is None]
    fixed = {i: f"<lost-id:{i}>" for i in lost} | {i: f"<duplicate:{i}:{ids[i]}>" for i in duplicates}
    if repair and (fixed or bad_done):
        for i in sorted(set(fixed) | set(bad_done)):
            cache.group["done"][i] = False
            done[i] = False
        if fixed:
            array = cache.group["image_ids"]
            step = int(array.chunks[0])
            for start in sorted({i - i % step for i in fixed}):
                stop = min(start + step, len(ids))
                array[start:stop] = np.array([fixed.get(i, ids[i] or "") for i in range(start, stop)])
        log(f"repaired the cache's lists: {len(lost)} lost id(s) and {len(duplicates)} duplicate(s) now placeholders, "
            f"{len(bad_done)} unreadable done flag(s) cleared; rerun the build to add those images again")
        report.repaired.append(CACHE_LISTS)
    return [fixed.get(i, image_id) for i, image_id in enumerate(ids)], done


def verify_cache(cache: FeatureCache, repair: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print) -> VerifyReport:
    report = VerifyReport(0, 0)
    ids, done = _check_lists(cache, report, repair, log)
    report.n_images, report.n_done = len(ids), int(done.sum())
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
    images = {image_id: problems for image_id, problems in report.problems.items() if image_id != CACHE_LISTS}
    if repair and images:
        index_of = {image_id: i for i, image_id in enumerate(ids)}
        for image_id, problems in images.items():
            i = index_of[image_id]
            cache.record_failure(i, "verify: " + "; ".join(problems))
            cache.group["done"][i] = False
            report.repaired.append(image_id)
        log(f"cleared the done flag of {len(images)} image(s); rerun the build to recompute them")
    return report
