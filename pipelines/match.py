"""`dhf-cache match`: correspondences between any two images, features extracted on the fly.

Cheap checks first (both images readable, points inside A, the checkpoint loads), then the
backbone is loaded and checked against the checkpoint's feature space, both images are
inverted with the checkpoint's build spec, and the points are matched as eval matches them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dhf_cache.api import Hyperfeatures, check_points, grid_points
from dhf_cache.config import EVAL_LOAD_SIZE
from dhf_cache.errors import UsageError
from dhf_cache.datasets.images import load_image
from dhf_cache.correspondence.matching import parse_refine
from dhf_cache.reports.plots import draw_correspondences


@dataclass(frozen=True)
class MatchRequest:
    image_a: Path
    image_b: Path
    checkpoint: Path
    out: Path
    model: str | None = None
    points: tuple[tuple[float, float], ...] | None = None  # [x, y] in A's pixels; None: a grid
    grid: int = 5
    load_size: int = EVAL_LOAD_SIZE
    refine: str = "none"
    device: str = "auto"


@dataclass
class MatchResult:
    points_a: np.ndarray  # (K, 2) [x, y] in A's pixels
    points_b: np.ndarray  # (K, 2) [x, y] in B's pixels
    size_a: tuple[int, int]
    size_b: tuple[int, int]
    out: Path
    checkpoint: Path
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "points_a": self.points_a.tolist(), "points_b": self.points_b.tolist(),
            "size_a": list(self.size_a), "size_b": list(self.size_b), "out": str(self.out),
            "checkpoint": str(self.checkpoint), "seconds": round(self.seconds, 2), "notes": self.notes,
        }


def run_match(request: MatchRequest, log: Callable[[str], None] = print) -> MatchResult:
    started = time.perf_counter()
    if request.load_size < 1:
        raise UsageError(f"--load-size {request.load_size}: must be a positive number of pixels, e.g. 224")
    parse_refine(request.refine)  # a typo fails now, not after the backbone has loaded
    image_a, image_b = load_image(request.image_a), load_image(request.image_b)
    if request.points is not None:
        points = check_points(request.points, image_a.size, f"A ({request.image_a})")
    else:
        points = grid_points(image_a.size, request.grid)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        log(message)

    hf = Hyperfeatures.from_checkpoint(request.checkpoint, device=request.device, model=request.model, log=note)
    log(f"extracting features of both images with the checkpoint's backbone on {hf.device}")
    points_a, points_b = hf.match(image_a, image_b, points, load_size=request.load_size, refine=request.refine)
    draw_correspondences(image_a, image_b, points_a, points_b, correct=None, path=request.out)
    return MatchResult(points_a, points_b, image_a.size, image_b.size, Path(request.out), hf.checkpoint.path,
                       time.perf_counter() - started, notes)
