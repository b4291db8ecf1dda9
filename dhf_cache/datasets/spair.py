"""`spair:PATH`: the official SPair-71k layout (METHOD.md).

    JPEGImages/<cat>/<img>.jpg, ImageAnnotation/<cat>/<img>.json,
    PairAnnotation/{trn,val,test}/<pair>.json, Layout/large/{trn,val,test}.txt

Image ids are `<cat>/<img>.jpg`. Names in annotations are never trusted as paths: one that
leaves the dataset folder makes that image a recorded failure, not a file read.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from dhf_cache.datasets.base import Dataset, ImageRecord, PairRecord, safe_join
from dhf_cache.errors import DatasetError

SPLITS = ("trn", "val", "test")


class SPairDataset(Dataset):
    def __init__(self, root: Path, spec: str):
        if not root.is_dir():
            raise DatasetError(f"--dataset {spec}: {root} is not a folder")
        if not (root / "PairAnnotation").is_dir():
            raise DatasetError(
                f"--dataset {spec}: {root} has no PairAnnotation/ folder; is it the SPair-71k root "
                "(the folder holding JPEGImages/, ImageAnnotation/, PairAnnotation/, Layout/)?"
            )
        self.root = root
        self.spec = spec

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if (self.root / "PairAnnotation" / s).is_dir()]

    def _pair_files(self, split: str) -> list[Path]:
        if split not in self.splits:
            raise DatasetError(
                f"--split {split}: {self.spec} has no such split; it has {', '.join(self.splits) or 'none'}"
            )
        layout = self.root / "Layout" / "large" / f"{split}.txt"
        folder = self.root / "PairAnnotation" / split
        if layout.is_file():
            names = [line.strip() for line in layout.read_text().splitlines() if line.strip()]
            try:
                return [safe_join(folder, f"{name}.json") for name in names]
            except DatasetError as exc:
                raise DatasetError(f"{layout}: {exc}; a pair name must be a file name in {folder}") from None
        return sorted(folder.glob("*.json"))

    @lru_cache(maxsize=None)
    def _raw_pairs(self, split: str) -> tuple[dict, ...]:
        out = []
        for path in self._pair_files(split):
            try:
                data = json.loads(path.read_text())
                _ = data["src_imname"], data["trg_imname"], data["category"]
            except FileNotFoundError:
                raise DatasetError(f"{path}: listed in Layout/large/{split}.txt but missing") from None
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(f"{path}: not a SPair pair annotation ({exc}); fix or remove it") from None
            data["_file"] = path.stem
            out.append(data)
        return tuple(out)

    def _record(self, category: str, imname: str) -> ImageRecord:
        image_id = f"{category}/{imname}"
        try:
            return ImageRecord(image_id, safe_join(self.root / "JPEGImages", category, imname))
        except DatasetError as exc:
            return ImageRecord(image_id, None, f"annotation names an unsafe path: {exc}")

    def images(self, split: str | None = None) -> list[ImageRecord]:
        splits = [split] if split else self.splits
        if not splits:
            raise DatasetError(f"--dataset {self.spec}: PairAnnotation/ holds none of {', '.join(SPLITS)}")
        records = {}
        for s in splits:
            for pair in self._raw_pairs(s):
                for key in ("src_imname", "trg_imname"):
                    rec = self._record(str(pair["category"]), str(pair[key]))
                    records[rec.id] = rec
        return [records[k] for k in sorted(records)]

    def pairs(self, split: str) -> list[PairRecord]:
        out = []
        for pair in self._raw_pairs(split):
            cat = str(pair["category"])
            try:
                out.append(
                    PairRecord(
                        name=str(pair.get("filename") or pair["_file"]),
                        category=cat,
                        src=f"{cat}/{pair['src_imname']}",
                        trg=f"{cat}/{pair['trg_imname']}",
                        src_kps=np.asarray(pair["src_kps"], dtype=np.float64).reshape(-1, 2),
                        trg_kps=np.asarray(pair["trg_kps"], dtype=np.float64).reshape(-1, 2),
                        src_bbox=tuple(float(v) for v in pair["src_bndbox"]),
                        trg_bbox=tuple(float(v) for v in pair["trg_bndbox"]),
                        src_size=(int(pair["src_imsize"][0]), int(pair["src_imsize"][1])),
                        trg_size=(int(pair["trg_imsize"][0]), int(pair["trg_imsize"][1])),
                    )
                )
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                raise DatasetError(f"pair {pair['_file']} ({split}): malformed field ({exc})") from None
        return out
