"""`folder:PATH`: every image file below PATH; ids are POSIX paths relative to PATH."""

from __future__ import annotations

from pathlib import Path

from dhf_cache.datasets.base import Dataset, ImageRecord
from dhf_cache.errors import DatasetError, UsageError
from dhf_cache.images import IMAGE_EXTENSIONS


class FolderDataset(Dataset):
    def __init__(self, root: Path, spec: str):
        if not root.is_dir():
            raise DatasetError(f"--dataset {spec}: {root} is not a folder")
        self.root = root
        self.spec = spec

    def images(self, split: str | None = None) -> list[ImageRecord]:
        if split is not None:
            raise UsageError(f"--split {split}: folder datasets have no splits; leave --split out")
        files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
        )
        if not files:
            raise DatasetError(
                f"--dataset {self.spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) below {self.root}"
            )
        return [ImageRecord(p.relative_to(self.root).as_posix(), p) for p in files]
