"""Dataset records and the `KIND:PATH` dataset specs used on the command line."""

from __future__ import annotations

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
    """A keypoint pair; coordinates are [x, y] in original image pixels."""

    name: str
    category: str
    src: str  # image id
    trg: str
    src_kps: np.ndarray = field(repr=False)  # (K, 2) float
    trg_kps: np.ndarray = field(repr=False)
    src_bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    trg_bbox: tuple[float, float, float, float]
    src_size: tuple[int, int]  # W, H
    trg_size: tuple[int, int]


class Dataset(ABC):
    spec: str

    @property
    def splits(self) -> list[str]:
        return []

    @abstractmethod
    def images(self, split: str | None = None) -> list[ImageRecord]:
        """Images to build, sorted by id, without duplicates."""

    def pairs(self, split: str) -> list[PairRecord]:
        raise DatasetError(f"{self.spec}: this dataset has no keypoint pairs; use spair:PATH or pairs:FILE.json")


def safe_join(root: Path, *parts: str) -> Path:
    """root/parts, refusing absolute parts and anything that resolves outside root."""
    for part in parts:
        if not part or Path(part).is_absolute() or part.startswith(("/", "\\")):
            raise DatasetError(f"path component {part!r} is empty or absolute")
    candidate = root.joinpath(*parts)
    resolved, base = candidate.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise DatasetError(f"{'/'.join(parts)!r} leaves the dataset folder {root}")
    return candidate


def open_dataset(spec: str) -> Dataset:
    """`spair:PATH` (SPair-71k layout), `folder:PATH` (every image below PATH) or
    `pairs:FILE.json` (users' own keypoint pairs)."""
    from dhf_cache.datasets.folder import FolderDataset
    from dhf_cache.datasets.pairs import PairsFileDataset
    from dhf_cache.datasets.spair import SPairDataset

    kinds = {"spair": SPairDataset, "folder": FolderDataset, "pairs": PairsFileDataset}
    kind, sep, path = spec.partition(":")
    if not sep or kind not in kinds or not path:
        raise DatasetError(
            f"--dataset {spec!r}: expected KIND:PATH with KIND one of {', '.join(sorted(kinds))}, "
            "e.g. spair:/data/SPair-71k, folder:./photos or pairs:./my-pairs.json"
        )
    return kinds[kind](Path(path).expanduser(), spec)
