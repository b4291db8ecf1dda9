"""Annotation files and values checked field by field: each problem is one DatasetError naming
the file and the field, found when the annotations are read (not after the matching)."""

from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from dhf_cache.errors import DatasetError
from dhf_cache.datasets.files import NotRegularFileError, open_regular



def read_annotation(path: Path) -> Any:
    """The JSON value of an annotation file, or DatasetError naming it.

    Refused: anything but a regular file (never opened), text that is not UTF-8 (a leading BOM
    is allowed), text that is not JSON. FileNotFoundError is left to the caller, which knows
    why the file was expected. JSON's NaN and Infinity are accepted (see `keypoint_pairs`).
    """
    text = read_text(path)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); fix or replace the file") from None


def read_text(path: Path) -> str:
    """The UTF-8 text of an annotation or list file, as `read_annotation` reads it."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except (NotRegularFileError, IsADirectoryError) as exc:
        raise DatasetError(f"{path}: {exc}; it must be a regular annotation file") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                           "save it as UTF-8") from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coordinate(value: Any) -> float | None:
    """A JSON number as float (null, which JSON writers emit for NaN, as NaN); None if not a number."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    return float(value)


def _points(value: Any, where: str, name: str) -> np.ndarray:
    """(K, 2) float64 from a list of [x, y] numbers (null as NaN), else DatasetError naming the entry."""
    if isinstance(value, (list, tuple)):
        try:
            fast = np.asarray(value)  # lists of plain numbers: the common case, in C
        except ValueError:  # ragged
            fast = None
        if fast is not None and fast.dtype.kind in "iuf" and (fast.shape == (0,) or fast.shape[1:] == (2,)):
            return fast.astype(np.float64).reshape(-1, 2)
    else:
        raise DatasetError(f"{where}: {name} must be a list of [x, y] keypoints, got {_show(value)}")
    out = []
    for k, point in enumerate(value):
        xy = [_coordinate(v) for v in point] if isinstance(point, (list, tuple)) else []
        if len(xy) != 2 or None in xy:
            raise DatasetError(f"{where}: {name}[{k}] must be an [x, y] pair of numbers, got {_show(point)}")
        out.append(xy)
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def keypoint_pairs(src: Any, trg: Any, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(src_kps, trg_kps, dropped): both (K, 2) float64, entry k of one matching entry k of the other.

    A correspondence with a coordinate that is not finite (NaN, inf, or null) on either side is
    dropped from both and counted in `dropped`, so every kept coordinate is finite. Anything but
    two equally long lists of [x, y] numbers raises DatasetError prefixed with `where`.
    """
    src_kps, trg_kps = _points(src, where, "src_kps"), _points(trg, where, "trg_kps")
    if len(src_kps) != len(trg_kps):
        raise DatasetError(f"{where}: src_kps has {len(src_kps)} keypoints and trg_kps {len(trg_kps)}; entry k "
                           "of one must correspond to entry k of the other")
    keep = np.isfinite(src_kps).all(axis=1) & np.isfinite(trg_kps).all(axis=1)
    return src_kps[keep], trg_kps[keep], int((~keep).sum())


def bounding_box(value: Any, where: str, name: str) -> tuple[float, float, float, float]:
    """[x1, y1, x2, y2] as 4 floats; anything but 4 finite numbers raises DatasetError."""
    box = [_coordinate(v) for v in value] if isinstance(value, (list, tuple)) else []
    if len(box) != 4 or any(v is None or not math.isfinite(v) for v in box):
        raise DatasetError(f"{where}: {name} must be 4 finite numbers [x1, y1, x2, y2], got {_show(value)}")
    return (box[0], box[1], box[2], box[3])


def image_size_field(value: Any, where: str, name: str) -> tuple[int, int]:
    """(W, H) from [W, H] or SPair's [W, H, channels]: positive whole numbers, else DatasetError."""
    size = [_coordinate(v) for v in value[:2]] if isinstance(value, (list, tuple)) and len(value) in (2, 3) else []
    if len(size) != 2 or any(v is None or not math.isfinite(v) or v < 1 or v != int(v) for v in size):
        raise DatasetError(f"{where}: {name} must be [width, height] (or [width, height, channels]) of "
                           f"positive whole numbers, got {_show(value)}")
    return (int(size[0]), int(size[1]))
