"""`cub:PATH[?pairs=N&seed=S]`: CUB-200-2011 (the CUB_200_2011/ folder of CUB_200_2011.tgz), with
same-class pairs as the diffusion-feature correspondence code forms them (docs/datasets.md).

    images.txt                 <image id> <class folder>/<file>.jpg
    image_class_labels.txt     <image id> <class id>
    train_test_split.txt       <image id> <1: training image, 0: test image>
    bounding_boxes.txt         <image id> <x> <y> <width> <height>
    parts/part_locs.txt        <image id> <part id 1-15> <x> <y> <visible 0/1>
    classes.txt                <class id> <class folder name>
    images/<class folder>/<file>.jpg

Pairs, as ubc-vision/LDM_correspondences (eval/cub2011.py) and DistillDIFT (datasets/dataset.py)
form them: for each class in class-id order, every unordered pair of the split's images of that
class in images.txt order (itertools.combinations: source first); the 15 parts matched by part id,
kept when visible in both; threshold: the target's box (their `max(width, height)` of
bounding_boxes.txt). Splits: trn (train_test_split 1) and test (0).

Seeded sampling (`?pairs=N&seed=S`, seed 0 by default): of each class's pairs that have a usable
keypoint, the N whose sha256 of "S/<class id>/<source image id>/<target image id>" is smallest,
kept in combination order. This is this package's own rule (the public codes above use every
pair, or sample on preprocessed crops this layout does not have): deterministic for a spec
whatever the Python or numpy version, and a class's pairs do not depend on the other classes.
Without `pairs`, every pair is used.

Coordinates are used as part_locs.txt gives them; sizes come from the image headers. Ids are the
images.txt paths, `<class folder>/<file>.jpg`; categories the class folder names. Pairs without a
part visible in both are skipped and counted in `skipped`.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dhf_cache.datasets.annotations import read_text
from dhf_cache.datasets.base import Dataset, ImageRecord, PairRecord, safe_join
from dhf_cache.datasets.benchmark_common import (ImageSizes, SkipCounts, box_from_xywh, select_correspondences,
                                                 split_spec_options, whole_number_option)
from dhf_cache.errors import DatasetError

SPLITS = ("trn", "test")
FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
         "parts/part_locs.txt", "classes.txt")


@dataclass(frozen=True)
class Tables:
    """The layout's text files, checked: each keyed by CUB's numeric image id (a string)."""

    names: dict[str, str]  # images.txt order
    class_of: dict[str, str]
    training: dict[str, bool]
    boxes: dict[str, tuple[float, float, float, float]]
    parts: dict[str, tuple[np.ndarray, np.ndarray]]  # (15, 2) [x, y] by part id, (15,) visible
    classes: dict[str, str]  # class id -> class folder name
    n_parts: int


def table(path: Path, columns: int, name_last: bool = False) -> list[tuple[str, list[str]]]:
    """(where, fields) of each non-empty line of a whitespace-separated file with `columns` fields;
    with `name_last`, the last field is the rest of the line (a name)."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (a broken link?); it is part of the CUB-200-2011 layout") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if name_last and len(fields) > columns:
            fields = [*fields[:columns - 1], line.split(None, columns - 1)[-1].strip()]
        if len(fields) != columns:
            raise DatasetError(f"{path}:{number}: expected {columns} fields, got {len(fields)}")
        out.append((f"{path}:{number}", fields))
    return out


def numbers(fields: list[str], where: str) -> list[float]:
    try:
        return [float(v) for v in fields]
    except ValueError:
        raise DatasetError(f"{where}: expected numbers, got {' '.join(fields)[:60]!r}") from None


class CUBDataset(SkipCounts, Dataset):
    default_threshold = "bbox"

    def __init__(self, root: Path, spec: str):
        root, options = split_spec_options(root, spec, ("pairs", "seed"))
        self.pairs_per_class = whole_number_option(options, "pairs", None, 1, spec)
        self.seed = whole_number_option(options, "seed", 0, 0, spec)
        if not root.is_dir():
            raise DatasetError(f"--dataset {spec}: {root} is not a folder")
        for name in FILES:
            if not (root / name).exists():
                raise DatasetError(f"--dataset {spec}: no CUB-200-2011 layout here: expected {root / name} "
                                   "(the CUB_200_2011/ folder of CUB_200_2011.tgz)")
        self.root, self.spec = root, spec
        self.sizes = ImageSizes()

    @property
    def splits(self) -> list[str]:
        return list(SPLITS)

    @cached_property
    def _tables(self) -> Tables:
        files = {name: self.root / name for name in FILES}
        names = {f[0]: f[1] for _, f in table(files["images.txt"], 2, name_last=True)}
        classes = {f[0]: f[1] for _, f in table(files["classes.txt"], 2, name_last=True)}
        class_of, training, boxes = {}, {}, {}
        for where, (image, cls) in table(files["image_class_labels.txt"], 2):
            if cls not in classes:
                raise DatasetError(f"{where}: class {cls!r} is not in classes.txt")
            class_of[image] = cls
        for where, (image, flag) in table(files["train_test_split.txt"], 2):
            if flag not in ("0", "1"):
                raise DatasetError(f"{where}: is_training_image must be 0 or 1, got {flag[:20]!r}")
            training[image] = flag == "1"
        for where, fields in table(files["bounding_boxes.txt"], 5):
            boxes[fields[0]] = box_from_xywh(numbers(fields[1:], where), where, "box")
        locs: dict[str, dict[int, tuple[float, float, bool]]] = {}
        for where, fields in table(files["parts/part_locs.txt"], 5):
            part, x, y, visible = numbers(fields[1:], where)
            if part != int(part) or part < 1 or visible not in (0, 1):
                raise DatasetError(f"{where}: expected <image id> <part id> <x> <y> <visible 0/1>")
            locs.setdefault(fields[0], {})[int(part)] = (x, y, visible == 1)
        n_parts = max((max(p) for p in locs.values()), default=0)
        parts = {}
        for image, by_part in locs.items():
            rows = [by_part.get(k, (np.nan, np.nan, False)) for k in range(1, n_parts + 1)]  # a missing part: invisible
            parts[image] = (np.array([r[:2] for r in rows], dtype=np.float64).reshape(-1, 2),
                            np.array([r[2] for r in rows], dtype=bool))
        for image in names:
            for what, found in (("image_class_labels.txt", class_of), ("train_test_split.txt", training),
                                ("bounding_boxes.txt", boxes)):
                if image not in found:
                    raise DatasetError(f"{files[what]}: image {image} of images.txt is missing; the files must "
                                       "list the same images")
        return Tables(names, class_of, training, boxes, parts, classes, n_parts)

    def _members(self, split: str) -> list[str]:
        """The split's image ids in images.txt order."""
        if split not in SPLITS:
            raise DatasetError(f"--split {split}: {self.spec} has no such split; it has {', '.join(SPLITS)}")
        t = self._tables
        return [i for i in t.names if t.training[i] == (split == "trn")]

    def _record(self, image: str) -> ImageRecord:
        name = self._tables.names[image]
        try:
            return ImageRecord(name, safe_join(self.root, "images", *name.split("/")))
        except DatasetError as exc:
            return ImageRecord(name, None, f"images.txt names an unsafe path: {exc}")

    def images(self, split: str | None = None) -> list[ImageRecord]:
        ids = [i for s in ([split] if split else SPLITS) for i in self._members(s)]
        records = {rec.id: rec for rec in map(self._record, ids)}
        return [records[k] for k in sorted(records)]

    def _sample(self, class_id: str, candidates: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The pairs kept of one class's usable pairs: all, or the seeded N (module docstring)."""
        if self.pairs_per_class is None or len(candidates) <= self.pairs_per_class:
            return candidates
        def key(pair: tuple[str, str]) -> bytes:
            return hashlib.sha256(f"{self.seed}/{class_id}/{pair[0]}/{pair[1]}".encode()).digest()
        chosen = set(sorted(candidates, key=key)[:self.pairs_per_class])
        return [p for p in candidates if p in chosen]

    def pairs(self, split: str) -> list[PairRecord]:
        t = self._tables
        by_class: dict[str, list[str]] = {}
        for image in self._members(split):
            by_class.setdefault(t.class_of[image], []).append(image)
        out, reasons = [], []
        for class_id in sorted(by_class, key=int):
            usable = {}
            for src, trg in itertools.combinations(by_class[class_id], 2):
                records = self._record(src), self._record(trg)
                (src_size, src_error), (trg_size, trg_error) = self.sizes(records[0]), self.sizes(records[1])
                (src_xy, src_vis), (trg_xy, trg_vis) = self._parts(src), self._parts(trg)
                src_kps, trg_kps, dropped, reason = select_correspondences(
                    src_xy, trg_xy, src_vis, trg_vis, src_size, trg_size)
                if reason:
                    reasons.append(reason)
                    continue
                errors = [e for e in (src_error, trg_error) if e]
                usable[(src, trg)] = PairRecord(
                    name=f"{src}-{trg}:{t.classes[class_id]}", category=t.classes[class_id],
                    src=records[0].id, trg=records[1].id, src_kps=src_kps, trg_kps=trg_kps,
                    src_bbox=t.boxes[src], trg_bbox=t.boxes[trg], src_size=src_size, trg_size=trg_size,
                    error="; ".join(errors) or None, dropped_kps=dropped,
                )
            out += [usable[p] for p in self._sample(class_id, list(usable))]
        self.record_skips(split, reasons)
        return out

    def _parts(self, image: str) -> tuple[np.ndarray, np.ndarray]:
        """(15, 2) coordinates and (15,) visibility; an image part_locs.txt leaves out has none visible."""
        found = self._tables.parts.get(image)
        n = self._tables.n_parts
        return found if found is not None else (np.full((n, 2), np.nan), np.zeros(n, dtype=bool))
