"""`dhf:PATH[?images=DIR]`: the reference implementation's processed pairs, the JSON files of
diffusion-hyperfeatures/diffusion_hyperfeatures' annotations/ (spair_71k_train.json,
spair_71k_val-360.json, spair_71k_test-360.json, ...), read as its train_hyperfeatures.py and
archs/correspondence_utils.py (`load_image_pair`, `compute_pck`) read them (docs/datasets.md).

    [{"source_path": "dog/2008_007494.jpg", "target_path": "dog/2009_000080.jpg",
      "source_points": [[x, y], ...], "target_points": [[x, y], ...],
      "source_bounding_box": [x1, y1, x2, y2], "target_bounding_box": [x1, y1, x2, y2],
      "category": "dog", ...optional "mirror", "viewpoint_variation", "source_pose", ...}, ...]

PATH is one such .json file (one split, named by its stem) or a folder holding annotations/*.json
(the reference's repository: one split per file; a file that is a list of prompts, like
annotations/synthetic-3.json, is not a pair list and is left out). Image paths are relative to
the image folder: `?images=DIR`, or by default the reference's own `image_path`
(configs/train.yaml: datasets/SPair-71k/JPEGImages below the repository root, i.e. below PATH
or above a file's annotations/ folder); a file elsewhere defaults to its own folder.

Points are [x, y] in original image pixels, entry k of one list matching entry k of the other (the
reference flips them to (y, x) itself). Sizes come from the image headers, as the reference opens
the images for them. A missing box is the box around that image's points. Ids are the paths as
written, so with the reference's SPair files they equal `spair:`'s ids and one cache serves both.
Pair names are `<index>-<source stem>-<target stem>:<category>`. Threshold: the target box (the
reference logs PCK with both the image and the box; box is SPair's convention). A malformed entry
is one DatasetError naming file, entry and field; a bad image sets its pairs' `error`; pairs
without usable points are skipped and counted in `skipped`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dhf_cache.datasets.annotations import bounding_box, keypoint_pairs, read_annotation
from dhf_cache.datasets.base import Dataset, ImageRecord, PairRecord, safe_join
from dhf_cache.datasets.benchmark_common import (ImageSizes, SkipCounts, keypoint_box, select_correspondences,
                                                 split_spec_options)
from dhf_cache.datasets.spair import difficulty_flags
from dhf_cache.errors import DatasetError

REFERENCE_IMAGE_PATH = ("datasets", "SPair-71k", "JPEGImages")  # configs/train.yaml's image_path


@dataclass(frozen=True)
class Entry:
    """One checked pair of a file; boxes are None where the entry leaves them out."""

    name: str
    category: str
    src: str
    trg: str
    src_kps: np.ndarray
    trg_kps: np.ndarray
    dropped: int
    src_bbox: tuple[float, float, float, float] | None
    trg_bbox: tuple[float, float, float, float] | None
    flags: dict[str, int]


class DHFPairsDataset(SkipCounts, Dataset):
    default_threshold = "bbox"

    def __init__(self, root: Path, spec: str):
        path, options = split_spec_options(root, spec, ("images",))
        if path.is_file():
            files = [path]
            repo = path.parent.parent if path.parent.name == "annotations" else None
            default_images = path.parent if repo is None else repo.joinpath(*REFERENCE_IMAGE_PATH)
        elif (path / "annotations").is_dir():
            files = sorted((path / "annotations").glob("*.json"))
            default_images = path.joinpath(*REFERENCE_IMAGE_PATH)
        else:
            raise DatasetError(f"--dataset {spec}: no reference pairs here: expected {path / 'annotations'}/*.json "
                               "(diffusion_hyperfeatures' annotations/) or a .json file")
        images = Path(options["images"]).expanduser() if "images" in options else default_images
        if not images.is_dir():
            raise DatasetError(f"--dataset {spec}: no image folder {images}; give it as dhf:PATH?images=DIR")
        self.files = {f.stem: f for f in files}
        self.image_root, self.spec = images, spec
        self.entries: dict[str, list[Entry] | None] = {}
        self.sizes = ImageSizes()

    @property
    def splits(self) -> list[str]:
        return [s for s in self.files if self._entries(s) is not None]

    def _entries(self, split: str) -> list[Entry] | None:
        """The split's checked pairs; None for a file that lists prompts, not pairs."""
        if split not in self.entries:
            path = self.files[split]
            try:
                data = read_annotation(path)
            except FileNotFoundError:
                raise DatasetError(f"{path}: a broken link; fix it or remove it") from None
            if isinstance(data, list) and data and all(isinstance(d, str) for d in data):
                self.entries[split] = None  # the reference's prompt lists (synthetic-3.json)
            elif not isinstance(data, list):
                raise DatasetError(f"{path}: expected a list of pairs with source_path, target_path, source_points, "
                                   "target_points (the reference's annotations/*.json)")
            else:
                self.entries[split] = [self._entry(path, i, e) for i, e in enumerate(data)]
        return self.entries[split]

    def _entry(self, path: Path, i: int, entry) -> Entry:
        where = f"{path}: pair {i}"
        keys = ("source_path", "target_path", "source_points", "target_points")
        missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise DatasetError(f"{where} lacks {', '.join(missing)}")
        for key in keys[:2]:
            if not isinstance(entry[key], str) or not entry[key]:
                raise DatasetError(f"{where}: {key} must be an image path (a non-empty string), got {entry[key]!r:.60}")
        src_kps, trg_kps, dropped = keypoint_pairs(entry["source_points"], entry["target_points"],
                                                   f"{where} (source_points, target_points)")
        boxes = [None if entry.get(k) is None else bounding_box(entry[k], where, k)
                 for k in ("source_bounding_box", "target_bounding_box")]
        category = entry.get("category", "all")
        if not isinstance(category, str) or not category:
            raise DatasetError(f"{where}: category must be a non-empty string, got {category!r:.40}")
        src, trg = entry["source_path"], entry["target_path"]
        return Entry(f"{i}-{Path(src).stem}-{Path(trg).stem}:{category}", category, src, trg, src_kps, trg_kps,
                     dropped, boxes[0], boxes[1], difficulty_flags(entry))

    def _split_entries(self, split: str) -> list[Entry]:
        if split not in self.splits:
            raise DatasetError(f"--split {split}: {self.spec} has no such split; it has {', '.join(self.splits) or 'none'}")
        return self._entries(split) or []

    def _record(self, image_id: str) -> ImageRecord:
        try:
            return ImageRecord(image_id, safe_join(self.image_root, *image_id.split("/")))
        except DatasetError as exc:
            return ImageRecord(image_id, None, f"pairs file names an unsafe path: {exc}")

    def images(self, split: str | None = None) -> list[ImageRecord]:
        ids = {i for s in ([split] if split else self.splits) for e in self._split_entries(s) for i in (e.src, e.trg)}
        return [self._record(i) for i in sorted(ids)]

    def pairs(self, split: str) -> list[PairRecord]:
        out, reasons = [], []
        for e in self._split_entries(split):
            (src_size, src_error), (trg_size, trg_error) = self.sizes(self._record(e.src)), self.sizes(self._record(e.trg))
            src_kps, trg_kps, _, reason = select_correspondences(e.src_kps, e.trg_kps, None, None, src_size, trg_size)
            if reason == "padded" and e.dropped:  # every point was null/NaN: not visible, rather than none listed
                reason = "invisible"
            if reason:
                reasons.append(reason)
                continue
            errors = [err for err in (src_error, trg_error) if err]
            out.append(PairRecord(
                name=e.name, category=e.category, src=e.src, trg=e.trg, src_kps=src_kps, trg_kps=trg_kps,
                src_bbox=e.src_bbox or keypoint_box(src_kps), trg_bbox=e.trg_bbox or keypoint_box(trg_kps),
                src_size=src_size, trg_size=trg_size, error="; ".join(errors) or None, dropped_kps=e.dropped,
                flags=e.flags,
            ))
        self.record_skips(split, reasons)
        return out
