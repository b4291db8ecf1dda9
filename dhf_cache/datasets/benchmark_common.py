"""What the public-benchmark loaders (pf.py, ap10k.py, cub.py, dhf_pairs.py, spair_u.py) share.

- `split_spec_options`: the `?key=value&...` options some specs take (`cub:PATH?pairs=20&seed=0`).
- `select_correspondences`: the one rule every loader applies to a pair's keypoints. A
  correspondence is kept when its keypoint is marked visible in both images, is not padding and
  has finite coordinates; a pair left with none is skipped and counted under one reason.
- `ImageSizes`: (W, H) from image headers, once per image, for benchmarks whose annotations
  do not give sizes; an unusable image gives (0, 0) and the reason, which its pairs carry.
- `keypoint_box`: the box around keypoints, for benchmarks without boxes.
- `SkipCounts`: the `skipped` counts every loader keeps.

Skip reasons (the keys of a loader's `skipped` counts):

    padded        the pair lists no keypoint but padding: (-1, -1), the filler the HPF/NCNet
                  family of code pads keypoint lists with, or no keypoint at all
    invisible     no keypoint is marked visible (and finite) in both images
    out_of_image  every keypoint visible in both lies outside the source or the target image
                  (judged only when both sizes are known)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dhf_cache.datasets.base import ImageRecord
from dhf_cache.datasets.images import image_size
from dhf_cache.errors import DatasetError, ImageError

SKIP_REASONS = ("padded", "invisible", "out_of_image")
PADDING = -1.0


def split_spec_options(root: Path, spec: str, allowed: tuple[str, ...]) -> tuple[Path, dict[str, str]]:
    """(PATH, {key: value}) from the PATH of a `KIND:PATH?key=value&key=value` spec.

    A path that exists as written is taken whole (a folder may have '?' in its name). Keys
    outside `allowed`, a repeated key and an item without '=' are refused in one line.
    """
    text = str(root)
    if root.exists() or "?" not in text:
        return root, {}
    path, _, query = text.rpartition("?")
    options: dict[str, str] = {}
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if not eq or not key or key in options or key not in allowed:
            known = ", ".join(f"{k}=..." for k in allowed) or "none"
            raise DatasetError(f"--dataset {spec}: option {item!r} is not one of this kind's options ({known}); "
                               "write KIND:PATH?key=value&key=value")
        options[key] = value
    return Path(path), options


def whole_number_option(options: dict[str, str], key: str, default: int | None, minimum: int, spec: str) -> int | None:
    """options[key] as a whole number >= minimum (default when absent), else DatasetError."""
    if key not in options:
        return default
    value = options[key]
    if not (value.isascii() and value.isdigit()) or int(value) < minimum:
        raise DatasetError(f"--dataset {spec}: {key}={value!r} must be a whole number >= {minimum}")
    return int(value)


def select_correspondences(
    src: np.ndarray, trg: np.ndarray,
    src_visible: np.ndarray | None = None, trg_visible: np.ndarray | None = None,
    src_size: tuple[int, int] = (0, 0), trg_size: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray, int, str | None]:
    """(src_kps, trg_kps, dropped, skip_reason) of one pair; entry k of src matches entry k of trg.

    `src_visible`/`trg_visible` are the benchmark's own visibility marks (None: all visible).
    `dropped` counts correspondences marked visible in both whose coordinates are not finite
    (PairRecord.dropped_kps); where a benchmark marks invisibility with NaN, its caller passes
    that as visibility, so it is not counted. `skip_reason` is None when the pair is usable.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    trg = np.asarray(trg, dtype=np.float64).reshape(-1, 2)
    n = len(src)
    src_visible = np.ones(n, dtype=bool) if src_visible is None else np.asarray(src_visible, dtype=bool)
    trg_visible = np.ones(n, dtype=bool) if trg_visible is None else np.asarray(trg_visible, dtype=bool)
    padded = (src == PADDING).all(axis=1) | (trg == PADDING).all(axis=1)
    finite = np.isfinite(src).all(axis=1) & np.isfinite(trg).all(axis=1)
    visible = src_visible & trg_visible & ~padded
    keep = visible & finite
    dropped = int((visible & ~finite).sum())
    empty = np.zeros((0, 2))
    if not keep.any():
        return empty, empty, dropped, "padded" if padded.all() else "invisible"
    src, trg = src[keep], trg[keep]
    if min(src_size) > 0 and min(trg_size) > 0 and not (inside(src, src_size) & inside(trg, trg_size)).any():
        return empty, empty, dropped, "out_of_image"
    return src, trg, dropped, None


def inside(kps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Which [x, y] lie in the image of size (W, H), edges included (1-based annotations reach W)."""
    return (kps[:, 0] >= 0) & (kps[:, 0] <= size[0]) & (kps[:, 1] >= 0) & (kps[:, 1] <= size[1])


def keypoint_box(kps: np.ndarray) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of the box around keypoints (K >= 1, finite)."""
    return (float(kps[:, 0].min()), float(kps[:, 1].min()), float(kps[:, 0].max()), float(kps[:, 1].max()))


def box_from_xywh(value, where: str, name: str) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) from a COCO/CUB-style [x, y, width, height] of finite numbers, width and height >= 0."""
    box = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
           for v in value] if isinstance(value, (list, tuple)) else []
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] < 0 or box[3] < 0:
        raise DatasetError(f"{where}: {name} must be [x, y, width, height] of finite numbers, width and height "
                           f">= 0, got {str(value)[:60]}")
    return (box[0], box[1], box[0] + box[2], box[1] + box[3])


class ImageSizes:
    """(W, H) of each image from its header (EXIF orientation applied), read once per image id."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, int], str | None]] = {}

    def __call__(self, record: ImageRecord) -> tuple[tuple[int, int], str | None]:
        """((W, H), None), or ((0, 0), "<id>: why") when the image cannot be used."""
        if record.id not in self._known:
            if record.path is None:
                self._known[record.id] = (0, 0), f"{record.id}: {record.error}"
            else:
                try:
                    self._known[record.id] = image_size(record.path), None
                except ImageError as exc:
                    self._known[record.id] = (0, 0), f"{record.id}: {exc}"
        return self._known[record.id]


class SkipCounts:
    """`skipped`: the pairs a loader left out for lack of usable keypoints, {reason: count},
    summed over the splits whose pairs were listed (each split counted once, however often listed)."""

    def record_skips(self, split: str, reasons: list[str]) -> None:
        # kept in the instance's dict on first use, so loaders need no __init__ chain for it
        by_split = self.__dict__.setdefault("skipped_by_split", {})
        by_split[split] = {r: reasons.count(r) for r in SKIP_REASONS if r in reasons}

    def skipped_pairs(self, split: str) -> dict[str, int]:
        return dict(self.__dict__.get("skipped_by_split", {}).get(split, {}))

    @property
    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for counts in self.__dict__.get("skipped_by_split", {}).values():
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return {r: total[r] for r in SKIP_REASONS if r in total}
