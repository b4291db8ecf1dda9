"""Dataset records, the `KIND:PATH` dataset specs used on the command line, and untrusted
annotation text turned into paths (`safe_join`). Annotation values: annotations.py; opening
only regular files: dhf_cache/datasets/files.py."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dhf_cache.errors import DatasetError


@dataclass(frozen=True)
class ImageRecord:
    """One image to build. `error` is set when the dataset itself makes it unusable."""

    id: str
    path: Path | None
    error: str | None = None
    prompt: str | None = None  # set for images generated from a prompt instead of read from a file
    seed_key: str | None = None  # what the generation seed derives from: (prompt, variant)


@dataclass(frozen=True)
class PairRecord:
    """A keypoint pair; coordinates are [x, y] in original image pixels.

    A data set never raises for a whole file because one image is bad: that pair gets `error`.
    """

    name: str
    category: str
    src: str  # image id
    trg: str
    src_kps: np.ndarray = field(repr=False)  # (K, 2) float
    trg_kps: np.ndarray = field(repr=False)
    src_bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    trg_bbox: tuple[float, float, float, float]
    src_size: tuple[int, int]  # W, H; (0, 0) when unknown because the image is unusable (`error`)
    trg_size: tuple[int, int]
    # Why one of the pair's images cannot be used (unsafe path, missing, unreadable, not a
    # regular file); None when both can. The pair keeps its name, ids and keypoints.
    error: str | None = None
    # Correspondences dropped because a coordinate was not finite; the kept ones are all finite.
    dropped_kps: int = 0
    # Benchmark-specific labels for breakdowns (SPair-71k's difficulty flags: viewpoint_variation,
    # scale_variation, truncation, occlusion, each a small int); empty when the data set has none.
    flags: dict[str, int] = field(default_factory=dict, compare=False)


class Dataset(ABC):
    spec: str
    # The threshold base its benchmark reports PCK with (docs/evaluation.md): "bbox" (max side of
    # the target's box), "img" (of the target image) or "kps" (of the box around the target keypoints)
    default_threshold: str = "bbox"

    @property
    def splits(self) -> list[str]:
        return []

    @abstractmethod
    def images(self, split: str | None = None) -> list[ImageRecord]:
        """Images to build, sorted by id, without duplicates."""

    def skipped_pairs(self, split: str) -> dict[str, int]:
        """Pairs of `split` the loader left out for lack of usable keypoints, {reason: count}
        (benchmark loaders, benchmark_common.SkipCounts); none here."""
        return {}

    def pairs(self, split: str) -> list[PairRecord]:
        raise DatasetError(f"{self.spec}: this dataset has no keypoint pairs; use spair:PATH or pairs:FILE.json")


def safe_join(root: Path, *parts: str) -> Path:
    """root/parts, refusing parts that are empty, absolute or hold a NUL, and `..` that leaves root.

    The parts come from annotation text, which must never name a file outside the data set.
    The folders below root are the user's own: root may itself be a symlink, and symlinks below
    it are followed wherever they point (JPEGImages/ on another disk, a data set made of links),
    so a path is judged on its text, not on where it resolves. `..` may not climb above root,
    nor pass through a symlink: the OS takes that `..` in the link's target, outside root.
    """
    for part in parts:
        if not part or "\x00" in part or Path(part).is_absolute() or part.startswith(("/", "\\")):
            raise DatasetError(f"path component {part!r} is empty, absolute or holds a NUL character")
    relative = Path(*parts)
    normal = os.path.normpath(relative)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise DatasetError(f"{'/'.join(parts)!r} leaves the dataset folder {root}")
    candidate = root.joinpath(*parts)
    if os.pardir in relative.parts:
        try:
            through_link = candidate.resolve() != root.joinpath(normal).resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
            through_link = True
        if through_link:
            raise DatasetError(f"{'/'.join(parts)!r} leaves the dataset folder {root}: its '..' passes "
                               "through a symbolic link")
    return candidate


def open_dataset(spec: str) -> Dataset:
    """`spair:PATH` (SPair-71k layout), `folder:PATH` (every image below PATH) or
    `pairs:FILE.json` (users' own keypoint pairs); the public benchmarks in the layouts their
    evaluation code reads (docs/datasets.md): `pfpascal:PATH`, `pfwillow:PATH`, `ap10k:PATH`,
    `cub:PATH[?pairs=N&seed=S]`, `spairu:PATH` (SPair-U) and `dhf:PATH[?images=DIR]` (the
    reference implementation's processed pairs JSON)."""
    from dhf_cache.datasets.ap10k import AP10KDataset
    from dhf_cache.datasets.cub import CUBDataset
    from dhf_cache.datasets.dhf_pairs import DHFPairsDataset
    from dhf_cache.datasets.folder import FolderDataset
    from dhf_cache.datasets.pairs import PairsFileDataset
    from dhf_cache.datasets.pf import PFPascalDataset, PFWillowDataset
    from dhf_cache.datasets.spair import SPairDataset
    from dhf_cache.datasets.spair_u import SPairUDataset

    kinds = {"spair": SPairDataset, "folder": FolderDataset, "pairs": PairsFileDataset,
             "pfpascal": PFPascalDataset, "pfwillow": PFWillowDataset, "ap10k": AP10KDataset, "cub": CUBDataset,
             "spairu": SPairUDataset, "dhf": DHFPairsDataset}
    kind, sep, path = spec.partition(":")
    if not sep or kind not in kinds or not path:
        raise DatasetError(
            f"--dataset {spec!r}: expected KIND:PATH with KIND one of {', '.join(sorted(kinds))}, "
            "e.g. spair:/data/SPair-71k, folder:./photos, pairs:./my-pairs.json or pfpascal:/data/PF-PASCAL "
            "(docs/datasets.md)"
        )
    return kinds[kind](Path(path).expanduser(), spec)
