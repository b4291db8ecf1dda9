"""`pairs:FILE.json`: users' own keypoint pairs (format in docs/pairs-format.md).

    {"pairs": [{"src": "imgs/a.jpg", "trg": "imgs/b.jpg",
                "src_kps": [[x, y], ...], "trg_kps": [[x, y], ...],
                "name": "a-b", "category": "mug", "split": "test",
                "src_bbox": [x1, y1, x2, y2], "trg_bbox": [x1, y1, x2, y2]}, ...]}

Image paths are relative to the JSON file's folder and are the image ids (as `folder:`). Only
`src`, `trg`, `src_kps` and `trg_kps` are required; a missing box is the whole image, a missing
split is "test", a missing name is "<index>-<src>-<trg>", a missing category is "all".

The whole file is checked when it is first read: a malformed field is one DatasetError naming
the file, the pair and the field. A bad image (unsafe path, missing, unreadable, not a regular
file) is never fatal: its pairs carry `error` and the other pairs are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dhf_cache.datasets.annotations import bounding_box, keypoint_pairs, read_annotation
from dhf_cache.datasets.base import Dataset, ImageRecord, PairRecord, safe_join
from dhf_cache.errors import DatasetError, ImageError
from dhf_cache.datasets.images import image_size


@dataclass(frozen=True)
class _Entry:
    """One entry of the file, checked; boxes are None where the file leaves them out."""

    name: str
    category: str
    split: str
    src: str
    trg: str
    src_kps: np.ndarray
    trg_kps: np.ndarray
    dropped_kps: int
    src_bbox: tuple[float, float, float, float] | None
    trg_bbox: tuple[float, float, float, float] | None


class PairsFileDataset(Dataset):
    def __init__(self, path: Path, spec: str):
        if not path.is_file():  # is_file() is a stat: a FIFO here is refused, not opened
            raise DatasetError(f"--dataset {spec}: {path} is not a file")
        self.path = path
        self.root = path.parent
        self.spec = spec
        self._sizes: dict[str, tuple[tuple[int, int], str | None]] = {}

    @cached_property
    def _entries(self) -> list[_Entry]:
        try:
            data = read_annotation(self.path)
        except FileNotFoundError:
            raise DatasetError(f"--dataset {self.spec}: {self.path} is not a file") from None
        entries = data.get("pairs") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise DatasetError(f"{self.path}: expected an object with a non-empty \"pairs\" list (docs/pairs-format.md)")
        out: list[_Entry] = []
        names: dict[str, int] = {}
        for i, entry in enumerate(entries):
            entry = self._entry(i, entry)
            if entry.name in names:
                raise DatasetError(f"{self.path}: pairs {names[entry.name]} and {i} are both named {entry.name!r}; "
                                   "pair names must be unique")
            names[entry.name] = i
            out.append(entry)
        return out

    def _entry(self, i: int, entry) -> _Entry:
        where = f"{self.path}: pair {i}"
        missing = [k for k in ("src", "trg", "src_kps", "trg_kps") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise DatasetError(f"{where} lacks {', '.join(missing)}")
        for key in ("src", "trg"):
            if not isinstance(entry[key], str) or not entry[key]:
                raise DatasetError(f"{where}: {key} must be an image path (a non-empty string), got {entry[key]!r:.60}")
        src, trg = entry["src"], entry["trg"]
        src_kps, trg_kps, dropped = keypoint_pairs(entry["src_kps"], entry["trg_kps"], where)
        boxes = [None if entry.get(k) is None else bounding_box(entry[k], where, k) for k in ("src_bbox", "trg_bbox")]
        return _Entry(
            name=str(entry.get("name") or f"{i}-{src}-{trg}"),
            category=str(entry.get("category", "all")),
            split=str(entry.get("split", "test")),
            src=src, trg=trg, src_kps=src_kps, trg_kps=trg_kps, dropped_kps=dropped,
            src_bbox=boxes[0], trg_bbox=boxes[1],
        )

    @property
    def splits(self) -> list[str]:
        return sorted({e.split for e in self._entries})

    def _record(self, image_id: str) -> ImageRecord:
        try:
            return ImageRecord(image_id, safe_join(self.root, *image_id.split("/")))
        except DatasetError as exc:
            return ImageRecord(image_id, None, f"pairs file names an unsafe path: {exc}")

    def _in_split(self, split: str | None) -> list[_Entry]:
        if split is not None and split not in self.splits:
            raise DatasetError(f"--split {split}: {self.spec} has no such split; it has {', '.join(self.splits)}")
        return [e for e in self._entries if split is None or e.split == split]

    def images(self, split: str | None = None) -> list[ImageRecord]:
        ids = sorted({i for e in self._in_split(split) for i in (e.src, e.trg)})
        return [self._record(i) for i in ids]

    def _size(self, image_id: str) -> tuple[tuple[int, int], str | None]:
        """((W, H), None) from the image's header, or ((0, 0), why the image cannot be used)."""
        if image_id not in self._sizes:
            record = self._record(image_id)
            if record.path is None:
                self._sizes[image_id] = (0, 0), f"{image_id}: {record.error}"
            else:
                try:
                    self._sizes[image_id] = image_size(record.path), None
                except ImageError as exc:
                    self._sizes[image_id] = (0, 0), f"{image_id}: {exc}"
        return self._sizes[image_id]

    def pairs(self, split: str) -> list[PairRecord]:
        out = []
        for e in self._in_split(split):
            (src_size, src_error), (trg_size, trg_error) = self._size(e.src), self._size(e.trg)
            errors = [err for err in (src_error, trg_error) if err]
            out.append(PairRecord(
                name=e.name, category=e.category, src=e.src, trg=e.trg,
                src_kps=e.src_kps.copy(), trg_kps=e.trg_kps.copy(),  # callers may change theirs
                src_bbox=e.src_bbox or (0.0, 0.0, float(src_size[0]), float(src_size[1])),
                trg_bbox=e.trg_bbox or (0.0, 0.0, float(trg_size[0]), float(trg_size[1])),
                src_size=src_size, trg_size=trg_size,
                error="; ".join(errors) or None, dropped_kps=e.dropped_kps,
            ))
        return out
