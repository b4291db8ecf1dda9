"""`folder:PATH`: every image file below PATH; ids are POSIX paths relative to PATH."""

from __future__ import annotations

import os
from pathlib import Path

from dhf_cache.datasets.base import Dataset, ImageRecord
from dhf_cache.errors import DatasetError, UsageError
from dhf_cache.datasets.images import IMAGE_EXTENSIONS


class FolderDataset(Dataset):
    def __init__(self, root: Path, spec: str):
        if not root.is_dir():
            raise DatasetError(f"--dataset {spec}: {root} is not a folder")
        self.root = root
        self.spec = spec

    def images(self, split: str | None = None) -> list[ImageRecord]:
        if split is not None:
            raise UsageError(f"--split {split}: folder datasets have no splits; leave --split out")
        files = sorted(p for p in self._files() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DatasetError(
                f"--dataset {self.spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) below {self.root}"
            )
        return [ImageRecord(p.relative_to(self.root).as_posix(), p) for p in files]

    def _files(self) -> list[Path]:
        """Every non-folder below root. Symlinked subfolders are followed (the folder is the user's
        own: a year of photos may live on another disk), each real folder once, so a link back up
        the tree cannot loop. Nothing is opened: a FIFO is listed and `load_image` refuses it."""
        seen: set[tuple[int, int]] = set()
        out = []
        for folder, subfolders, names in os.walk(self.root, followlinks=True):
            try:
                st = os.stat(folder)
            except OSError:  # gone or unreadable since it was listed: skipped, as os.walk skips
                subfolders.clear()
                continue
            if (st.st_dev, st.st_ino) in seen:
                subfolders.clear()
                continue
            seen.add((st.st_dev, st.st_ino))
            out += [Path(folder, name) for name in names]
        return out
