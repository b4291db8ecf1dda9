"""Keypoint arrays: the one normaliser every module uses for (K, 2) [x, y] points."""

from __future__ import annotations

import numpy as np


def as_points(points, what: str = "keypoints") -> np.ndarray:
    """(K, 2) float64 [x, y] from a list, array or tensor; an empty input gives (0, 2)."""
    if hasattr(points, "detach"):  # a torch tensor, without importing torch here
        points = points.detach().cpu().numpy()
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what} must have shape (K, 2) [x, y], got {arr.shape}")
    return arr
