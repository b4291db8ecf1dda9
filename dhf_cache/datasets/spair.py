"""`spair:PATH`: the official SPair-71k layout (METHOD.md).

    JPEGImages/<cat>/<img>.jpg, ImageAnnotation/<cat>/<img>.json,
    PairAnnotation/{trn,val,test}/<pair>.json, Layout/large/{trn,val,test}.txt

Image ids are `<cat>/<img>.jpg`. Names in annotations are never trusted as paths: one that
leaves the dataset folder makes that image a recorded failure (and its pairs' `error`), not a
file read. A malformed annotation is one DatasetError naming its file and field; `images()`
checks only what it needs (the image names), `pairs()` every field it returns.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from dhf_cache.datasets.annotations import bounding_box, image_size_field, keypoint_pairs, read_annotation, read_text
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

    def _pair_files(self, split: str) -> list[tuple[Path, str]]:
        """(annotation file, where it was listed) of each pair of the split, in Layout order."""
        if split not in self.splits:
            raise DatasetError(
                f"--split {split}: {self.spec} has no such split; it has {', '.join(self.splits) or 'none'}"
            )
        layout = self.root / "Layout" / "large" / f"{split}.txt"
        folder = self.root / "PairAnnotation" / split
        if layout.exists() or layout.is_symlink():  # a FIFO or a broken link here is refused, not skipped
            try:
                lines = read_text(layout).splitlines()
            except FileNotFoundError:
                raise DatasetError(f"{layout}: a broken link; fix it or remove it to use every pair file") from None
            out = []
            for number, line in enumerate(lines, 1):
                if name := line.strip():
                    try:
                        out.append((safe_join(folder, f"{name}.json"), f"{layout}:{number}"))
                    except DatasetError as exc:
                        raise DatasetError(f"{layout}: {exc}; a pair name must be a file name in {folder}") from None
            return out
        return [(path, str(folder)) for path in sorted(folder.glob("*.json"))]

    @lru_cache(maxsize=None)
    def _raw_pairs(self, split: str) -> tuple[dict, ...]:
        out = []
        for path, listed in self._pair_files(split):
            try:
                data = read_annotation(path)
            except FileNotFoundError:
                raise DatasetError(f"{path}: listed in {listed} but missing") from None
            if not isinstance(data, dict):
                raise DatasetError(f"{path}: not a SPair pair annotation (a JSON object); fix or remove it")
            for key in ("src_imname", "trg_imname", "category"):
                if not isinstance(data.get(key), str):
                    raise DatasetError(f"{path}: not a SPair pair annotation ({key} must be a string, got "
                                       f"{data.get(key)!r:.40}); fix or remove it")
            data["_file"], data["_path"], data["_listed"] = path.stem, path, listed
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
                    rec = self._record(pair["category"], pair[key])
                    records[rec.id] = rec
        return [records[k] for k in sorted(records)]

    def pairs(self, split: str) -> list[PairRecord]:
        """Every pair of the split, each field checked as its annotation is read.

        Sizes come from the annotations, so only an unsafe image name sets a pair's `error`: a
        missing or unreadable image shows up as not built in the cache (the cache may well hold
        it although this copy of the data set lacks JPEGImages/)."""
        out = []
        seen: dict[str, dict] = {}
        for pair in self._raw_pairs(split):
            path, cat = pair["_path"], pair["category"]
            name = pair.get("filename") or pair["_file"]
            if not isinstance(name, str):
                raise DatasetError(f"{path}: filename must be a string, got {name!r:.40}")
            if name in seen:
                first = seen[name]
                if first["_path"] == path:
                    raise DatasetError(f"{pair['_listed']}: pair {name!r} is listed twice (first at "
                                       f"{first['_listed']}); remove one line")
                raise DatasetError(f"{path}: filename {name!r} is also the name of {first['_path']}; pair "
                                   "names must be unique in a split")
            seen[name] = pair
            try:
                src_kps, trg_kps, dropped = keypoint_pairs(pair.get("src_kps"), pair.get("trg_kps"), str(path))
                src_bbox = bounding_box(pair.get("src_bndbox"), str(path), "src_bndbox")
                trg_bbox = bounding_box(pair.get("trg_bndbox"), str(path), "trg_bndbox")
                src_size = image_size_field(pair.get("src_imsize"), str(path), "src_imsize")
                trg_size = image_size_field(pair.get("trg_imsize"), str(path), "trg_imsize")
            except DatasetError as exc:
                raise DatasetError(f"pair {name} ({split}): {exc}") from None
            records = (self._record(cat, pair["src_imname"]), self._record(cat, pair["trg_imname"]))
            errors = [f"{r.id}: {r.error}" for r in records if r.error]
            out.append(PairRecord(
                name=name, category=cat, src=records[0].id, trg=records[1].id,
                src_kps=src_kps, trg_kps=trg_kps, src_bbox=src_bbox, trg_bbox=trg_bbox,
                src_size=src_size, trg_size=trg_size,
                error="; ".join(errors) or None, dropped_kps=dropped, flags=difficulty_flags(pair),
            ))
        return out


# SPair-71k's per-pair difficulty annotations (its paper, section 3): viewpoint and scale variation
# 0-2 (easy, medium, hard), truncation and occlusion 0-3 (none, source, target, both)
DIFFICULTY_FLAGS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")


def difficulty_flags(pair: dict) -> dict[str, int]:
    """The pair's difficulty flags that are present as small non-negative ints (others are left out)."""
    return {key: int(pair[key]) for key in DIFFICULTY_FLAGS
            if isinstance(pair.get(key), int) and not isinstance(pair.get(key), bool) and 0 <= pair[key] <= 9}
