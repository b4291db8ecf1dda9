"""`ap10k:PATH`: AP-10K as GeoAware-SC prepares it (its prepare_ap10k.ipynb) and reads it
(utils/utils_dataset.py, `load_ap10k_data`; docs/datasets.md).

    ImageAnnotation/<family>/<species>/<id>.json   one animal: COCO annotation + image fields
        keypoints [x1, y1, v1, ..., x17, y17, v17] (v = 0: not labelled), bbox [x, y, w, h], width, height
    JPEGImages/<family>/<species>/<id>.jpg
    PairAnnotation/<split>/<src id>-<trg id>:<category>.json   {"src_json_path": ..., "trg_json_path": ...}

Splits are the folders GeoAware-SC writes: trn, val, test (intra-species: category = species),
val_cross_species, test_cross_species (category = family), val_cross_family, test_cross_family
(category "all"). The setting is also in each pair's flags: `setting` 0 intra-species,
1 cross-species, 2 cross-family.

The json paths are repository-relative (`data/ap-10k/ImageAnnotation/...`): only what follows
their last `ImageAnnotation` component is used, joined below this folder (never trusted as a
path), and the image is the same path below JPEGImages/ with `.jpg`. Keypoints are the 17 shared
AP-10K points matched by index, kept when labelled (v > 0) in both images; GeoAware-SC divides v
by 2 and keeps v > 0, which is the same set for AP-10K's v in {0, 2}. Boxes are [x, y, w, h] ->
(x, y, x + w, y + h); sizes come from width/height. Ids `<family>/<species>/<id>.jpg`; threshold:
the target box (GeoAware-SC: max(w, h) of the target's bbox). Pairs left without usable
keypoints are skipped and counted in `skipped`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dhf_cache.datasets.annotations import image_size_field, read_annotation
from dhf_cache.datasets.base import Dataset, ImageRecord, PairRecord, safe_join
from dhf_cache.datasets.benchmark_common import SkipCounts, box_from_xywh, select_correspondences
from dhf_cache.errors import DatasetError

# GeoAware-SC's PairAnnotation folders, in the order they are listed
SPLITS = ("trn", "val", "test", "val_cross_species", "test_cross_species", "val_cross_family", "test_cross_family")
SETTINGS = {"cross_species": 1, "cross_family": 2}  # anything else: intra-species (0)


class AP10KDataset(SkipCounts, Dataset):
    default_threshold = "bbox"

    def __init__(self, root: Path, spec: str):
        if not root.is_dir():
            raise DatasetError(f"--dataset {spec}: {root} is not a folder")
        if not (root / "PairAnnotation").is_dir():
            raise DatasetError(f"--dataset {spec}: no AP-10K layout here: expected {root / 'PairAnnotation'}/ "
                               "(GeoAware-SC's prepare_ap10k.ipynb writes it, with ImageAnnotation/ and JPEGImages/)")
        self.root, self.spec = root, spec
        self.pair_lists: dict[str, list[tuple[Path, str, list[str], list[str]]]] = {}
        self.animals: dict[tuple[str, ...], tuple[np.ndarray, tuple, tuple[int, int]]] = {}

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if (self.root / "PairAnnotation" / s).is_dir()]

    def _relative(self, value, path: Path, key: str) -> list[str]:
        """The parts of an annotation path after its last ImageAnnotation component."""
        parts = value.replace("\\", "/").split("/") if isinstance(value, str) else []
        if "ImageAnnotation" not in parts or parts[-1:] == ["ImageAnnotation"]:
            raise DatasetError(f"{path}: {key} must be a path .../ImageAnnotation/<family>/<species>/<id>.json, got "
                               f"{str(value)[:80]!r}")
        rest = parts[len(parts) - parts[::-1].index("ImageAnnotation"):]
        try:
            safe_join(self.root, "ImageAnnotation", *rest)
        except DatasetError as exc:
            raise DatasetError(f"{path}: {key}: {exc}") from None
        return rest

    def _pairs_listed(self, split: str) -> list[tuple[Path, str, list[str], list[str]]]:
        """(pair file, category, source and target annotation path parts) of each pair, by file name."""
        if split not in self.splits:
            raise DatasetError(f"--split {split}: {self.spec} has no such split; it has {', '.join(self.splits)}")
        if split not in self.pair_lists:
            out = []
            for path in sorted((self.root / "PairAnnotation" / split).glob("*.json")):
                try:
                    data = read_annotation(path)
                except FileNotFoundError:
                    raise DatasetError(f"{path}: a broken link; fix it or remove it") from None
                if not isinstance(data, dict):
                    raise DatasetError(f"{path}: not an AP-10K pair annotation (a JSON object with src_json_path, "
                                       "trg_json_path)")
                category = path.stem.rpartition(":")[2] if ":" in path.stem else "all"
                out.append((path, category, self._relative(data.get("src_json_path"), path, "src_json_path"),
                            self._relative(data.get("trg_json_path"), path, "trg_json_path")))
            self.pair_lists[split] = out
        return self.pair_lists[split]

    def _record(self, parts: list[str]) -> ImageRecord:
        image_parts = [*parts[:-1], Path(parts[-1]).stem + ".jpg"]
        return ImageRecord("/".join(image_parts), safe_join(self.root, "JPEGImages", *image_parts))

    def _animal(self, parts: list[str]) -> tuple[np.ndarray, tuple[float, float, float, float], tuple[int, int]]:
        """(keypoints (17, 3) [x, y, v], box, (W, H)) of one image annotation, read once."""
        key = tuple(parts)
        if key not in self.animals:
            path = safe_join(self.root, "ImageAnnotation", *parts)
            try:
                data = read_annotation(path)
            except FileNotFoundError:
                raise DatasetError(f"{path}: missing; a pair annotation names it") from None
            if not isinstance(data, dict):
                raise DatasetError(f"{path}: not an AP-10K image annotation (a JSON object)")
            flat = data.get("keypoints")
            values = [v for v in flat if isinstance(v, (int, float)) and not isinstance(v, bool)] \
                if isinstance(flat, list) else []
            if not values or len(values) != len(flat) or len(values) % 3:
                raise DatasetError(f"{path}: keypoints must be a list of numbers [x, y, v] * K, got {str(flat)[:60]}")
            kps = np.asarray(values, dtype=np.float64).reshape(-1, 3)
            size = image_size_field([data.get("width"), data.get("height")], str(path), "[width, height]")
            self.animals[key] = (kps, box_from_xywh(data.get("bbox"), str(path), "bbox"), size)
        return self.animals[key]

    def images(self, split: str | None = None) -> list[ImageRecord]:
        records = {}
        for s in [split] if split else self.splits:
            for _, _, src, trg in self._pairs_listed(s):
                for parts in (src, trg):
                    rec = self._record(parts)
                    records[rec.id] = rec
        return [records[k] for k in sorted(records)]

    def pairs(self, split: str) -> list[PairRecord]:
        setting = next((v for k, v in SETTINGS.items() if split.endswith(k)), 0)
        out, reasons = [], []
        for path, category, src_parts, trg_parts in self._pairs_listed(split):
            (src, src_box, src_size), (trg, trg_box, trg_size) = self._animal(src_parts), self._animal(trg_parts)
            if len(src) != len(trg):
                raise DatasetError(f"{path}: its images have {len(src)} and {len(trg)} keypoints; AP-10K's are the "
                                   "same 17 in every image")
            src_kps, trg_kps, dropped, reason = select_correspondences(
                src[:, :2], trg[:, :2], src[:, 2] > 0, trg[:, 2] > 0, src_size, trg_size)
            if reason:
                reasons.append(reason)
                continue
            out.append(PairRecord(
                name=path.stem, category=category, src=self._record(src_parts).id, trg=self._record(trg_parts).id,
                src_kps=src_kps, trg_kps=trg_kps, src_bbox=src_box, trg_bbox=trg_box, src_size=src_size,
                trg_size=trg_size, dropped_kps=dropped, flags={"setting": setting},
            ))
        self.record_skips(split, reasons)
        return out
