"""`spairu:PATH`: SPair-U (Mariotti et al., "Jamais Vu", NeurIPS 2025), SPair-71k's test pairs
relabelled with keypoints no training set has, read where its public code reads it
(VICO-UoE/JamaisVu, utils/utils_dataset.py, `load_spair_data(unseen_kps=True)`; docs/datasets.md).

    JPEGImages/<cat>/<img>.jpg                     SPair-71k's images
    ExtraPairAnnotation/<split>/<pair>.json        SPair-71k's pair fields (src_imname, trg_imname,
                                                   src_imsize, trg_imsize, src_bndbox, trg_bndbox, category, ...)
    ExtraImageAnnotation/<cat>/<img>.json          "kps": {"0": [x, y] or null, ...}: the new keypoints

PATH is the SPair-71k root into which SPair-U.zip's two Extra* folders were put (JamaisVu reads
`data/SPair-71k/Extra*`). As JamaisVu does, keypoints come from the two images' ExtraImageAnnotation
files, matched by key, kept when not null in both (key order); boxes and sizes from the pair file.
Ids `<cat>/<img>.jpg`, the same as `spair:`'s, so a cache built for SPair-71k serves SPair-U.
Threshold: the target box (JamaisVu, as GeoAware-SC: max side of trg_bndbox). Pairs left
without usable keypoints are skipped and counted in `skipped`; pair files are listed in name
order (JamaisVu sorts them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dhf_cache.datasets.annotations import bounding_box, image_size_field, read_annotation
from dhf_cache.datasets.base import Dataset, ImageRecord, PairRecord, safe_join
from dhf_cache.datasets.benchmark_common import SkipCounts, select_correspondences
from dhf_cache.datasets.spair import difficulty_flags
from dhf_cache.errors import DatasetError

SPLITS = ("trn", "val", "test")
PAIRS, IMAGES = "ExtraPairAnnotation", "ExtraImageAnnotation"


class SPairUDataset(SkipCounts, Dataset):
    default_threshold = "bbox"

    def __init__(self, root: Path, spec: str):
        if not root.is_dir():
            raise DatasetError(f"--dataset {spec}: {root} is not a folder")
        if not (root / PAIRS).is_dir():
            raise DatasetError(f"--dataset {spec}: no SPair-U layout here: expected {root / PAIRS}/ (put SPair-U.zip's "
                               f"{PAIRS}/ and {IMAGES}/ into the SPair-71k root, where JamaisVu reads them)")
        self.root, self.spec = root, spec
        self.listed: dict[str, list[tuple[Path, dict]]] = {}
        self.keypoints: dict[tuple[str, str], dict[int, list]] = {}

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if (self.root / PAIRS / s).is_dir()]

    def _pairs_listed(self, split: str) -> list[tuple[Path, dict]]:
        if split not in self.splits:
            raise DatasetError(f"--split {split}: {self.spec} has no such split; it has {', '.join(self.splits) or 'none'}")
        if split not in self.listed:
            out = []
            for path in sorted((self.root / PAIRS / split).glob("*.json")):
                try:
                    data = read_annotation(path)
                except FileNotFoundError:
                    raise DatasetError(f"{path}: a broken link; fix it or remove it") from None
                for key in ("src_imname", "trg_imname", "category"):
                    if not isinstance(data, dict) or not isinstance(data.get(key), str) or not data[key]:
                        raise DatasetError(f"{path}: not a SPair-U pair annotation ({key} must be a non-empty string)")
                out.append((path, data))
            self.listed[split] = out
        return self.listed[split]

    def _record(self, category: str, imname: str) -> ImageRecord:
        image_id = f"{category}/{imname}"
        try:
            return ImageRecord(image_id, safe_join(self.root, "JPEGImages", category, imname))
        except DatasetError as exc:
            return ImageRecord(image_id, None, f"annotation names an unsafe path: {exc}")

    def _kps(self, category: str, imname: str, listed: Path) -> dict[int, list]:
        """{keypoint number: [x, y] or None} of one image's ExtraImageAnnotation file, read once."""
        key = (category, imname)
        if key not in self.keypoints:
            try:
                path = safe_join(self.root, IMAGES, category, Path(imname).stem + ".json")
            except DatasetError as exc:
                raise DatasetError(f"{listed}: {exc}") from None
            try:
                data = read_annotation(path)
            except FileNotFoundError:
                raise DatasetError(f"{path}: missing; {listed} names its image") from None
            kps = data.get("kps") if isinstance(data, dict) else None
            if not isinstance(kps, dict) or not all(isinstance(k, str) and k.isdigit() for k in kps):
                raise DatasetError(f"{path}: kps must be an object {{\"0\": [x, y] or null, ...}}")
            for k, v in kps.items():
                if v is not None and not (isinstance(v, list) and len(v) == 2 and all(
                        isinstance(c, (int, float)) and not isinstance(c, bool) for c in v)):
                    raise DatasetError(f"{path}: kps[{k!r}] must be [x, y] or null, got {str(v)[:40]}")
            self.keypoints[key] = {int(k): v for k, v in kps.items()}
        return self.keypoints[key]

    def images(self, split: str | None = None) -> list[ImageRecord]:
        records = {}
        for s in [split] if split else self.splits:
            for _, pair in self._pairs_listed(s):
                for imname in (pair["src_imname"], pair["trg_imname"]):
                    rec = self._record(pair["category"], imname)
                    records[rec.id] = rec
        return [records[k] for k in sorted(records)]

    def pairs(self, split: str) -> list[PairRecord]:
        out, reasons = [], []
        seen: dict[str, Path] = {}
        for path, pair in self._pairs_listed(split):
            cat = pair["category"]
            name = pair.get("filename") if isinstance(pair.get("filename"), str) and pair.get("filename") else path.stem
            if name in seen:
                raise DatasetError(f"{path}: filename {name!r} is also the name of {seen[name]}; pair names must be "
                                   "unique in a split")
            seen[name] = path
            src_kps, trg_kps = self._kps(cat, pair["src_imname"], path), self._kps(cat, pair["trg_imname"], path)
            keys = sorted(set(src_kps) | set(trg_kps))
            def table(kps: dict[int, list]) -> tuple[np.ndarray, np.ndarray]:
                rows = [kps.get(k) for k in keys]
                xy = np.array([r if r is not None else (np.nan, np.nan) for r in rows], dtype=np.float64).reshape(-1, 2)
                return xy, np.array([r is not None for r in rows], dtype=bool)
            (src_xy, src_vis), (trg_xy, trg_vis) = table(src_kps), table(trg_kps)
            where = str(path)
            src_size = image_size_field(pair.get("src_imsize"), where, "src_imsize")
            trg_size = image_size_field(pair.get("trg_imsize"), where, "trg_imsize")
            src, trg, dropped, reason = select_correspondences(src_xy, trg_xy, src_vis, trg_vis, src_size, trg_size)
            if reason:
                reasons.append(reason)
                continue
            records = self._record(cat, pair["src_imname"]), self._record(cat, pair["trg_imname"])
            errors = [f"{r.id}: {r.error}" for r in records if r.error]
            out.append(PairRecord(
                name=name, category=cat, src=records[0].id, trg=records[1].id, src_kps=src, trg_kps=trg,
                src_bbox=bounding_box(pair.get("src_bndbox"), where, "src_bndbox"),
                trg_bbox=bounding_box(pair.get("trg_bndbox"), where, "trg_bndbox"),
                src_size=src_size, trg_size=trg_size, error="; ".join(errors) or None, dropped_kps=dropped,
                flags=difficulty_flags(pair),
            ))
        self.record_skips(split, reasons)
        return out
