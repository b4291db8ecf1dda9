"""`pairs:FILE.json`: users' own keypoint pairs (format in docs/pairs-format.md).

    {"pairs": [{"src": "imgs/a.jpg", "trg": "imgs/b.jpg",
                "src_kps": [[x, y], ...], "trg_kps": [[x, y], ...],
                "name": "a-b", "category": "mug", "split": "test",
                "src_bbox": [x1, y1, x2, y2], "trg_bbox": [x1, y1, x2, y2]}, ...]}

Image paths are relative to the JSON file's folder and are the image ids (as `folder:`). Only
`src`, `trg`, `src_kps` and `trg_kps` are required; a missing box is the whole image, a missing
split is "test", a missing name is "<index>-<src>-<trg>", a missing category is "all".
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from dhf_cache.datasets.base import Dataset, ImageRecord, PairRecord, safe_join
from dhf_cache.errors import DatasetError, ImageError
from dhf_cache.images import image_size


class PairsFileDataset(Dataset):
    def __init__(self, path: Path, spec: str):
        if not path.is_file():
            raise DatasetError(f"--dataset {spec}: {path} is not a file")
        self.path = path
        self.root = path.parent
        self.spec = spec

    @cached_property
    def _entries(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{self.path}: not readable JSON ({exc})") from None
        entries = data.get("pairs") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise DatasetError(f"{self.path}: expected an object with a non-empty \"pairs\" list (docs/pairs-format.md)")
        for i, entry in enumerate(entries):
            missing = [k for k in ("src", "trg", "src_kps", "trg_kps") if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise DatasetError(f"{self.path}: pair {i} lacks {', '.join(missing)}")
            if len(entry["src_kps"]) != len(entry["trg_kps"]):
                raise DatasetError(f"{self.path}: pair {i} has {len(entry['src_kps'])} source and "
                                   f"{len(entry['trg_kps'])} target keypoints; they must correspond one to one")
        return entries

    @property
    def splits(self) -> list[str]:
        return sorted({str(e.get("split", "test")) for e in self._entries})

    def _record(self, image_id: str) -> ImageRecord:
        try:
            return ImageRecord(image_id, safe_join(self.root, *image_id.split("/")))
        except DatasetError as exc:
            return ImageRecord(image_id, None, f"pairs file names an unsafe path: {exc}")

    def _in_split(self, split: str | None) -> list[dict]:
        if split is not None and split not in self.splits:
            raise DatasetError(f"--split {split}: {self.spec} has no such split; it has {', '.join(self.splits)}")
        return [e for e in self._entries if split is None or str(e.get("split", "test")) == split]

    def images(self, split: str | None = None) -> list[ImageRecord]:
        ids = sorted({str(e[k]) for e in self._in_split(split) for k in ("src", "trg")})
        return [self._record(i) for i in ids]

    def _size(self, image_id: str) -> tuple[int, int]:
        record = self._record(image_id)
        if record.path is None:
            raise DatasetError(f"{self.path}: {record.error}")
        try:
            return image_size(record.path)
        except ImageError as exc:
            raise DatasetError(f"{self.path}: {exc}") from None

    def pairs(self, split: str) -> list[PairRecord]:
        out = []
        for i, e in enumerate(self._entries):
            if str(e.get("split", "test")) != split:
                continue
            src, trg = str(e["src"]), str(e["trg"])
            src_size, trg_size = self._size(src), self._size(trg)
            try:
                out.append(PairRecord(
                    name=str(e.get("name") or f"{i}-{src}-{trg}"),
                    category=str(e.get("category", "all")),
                    src=src, trg=trg,
                    src_kps=np.asarray(e["src_kps"], dtype=np.float64).reshape(-1, 2),
                    trg_kps=np.asarray(e["trg_kps"], dtype=np.float64).reshape(-1, 2),
                    src_bbox=tuple(float(v) for v in e.get("src_bbox", (0, 0, *src_size))),
                    trg_bbox=tuple(float(v) for v in e.get("trg_bbox", (0, 0, *trg_size))),
                    src_size=src_size, trg_size=trg_size,
                ))
            except (ValueError, TypeError) as exc:
                raise DatasetError(f"{self.path}: pair {i} has a malformed field ({exc})") from None
        if not out:
            raise DatasetError(f"--split {split}: {self.spec} has no pairs in it")
        return out
