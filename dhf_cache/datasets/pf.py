"""`pfpascal:PATH` and `pfwillow:PATH`: PF-PASCAL and PF-WILLOW as the public evaluation code reads them
(docs/datasets.md cites the files).

PF-PASCAL, two layouts of the same folder (PF-dataset-PASCAL.zip's JPEGImages/ and Annotations/):

    HPF / DHPF / CATs:      {trn,val,test}_pairs.csv              source_image,target_image,class[,flip]
    NCNet / GeoAware-SC:    {train,val,test}_pairs_pf_pascal.csv  source_image,target_image,class,XA,YA,XB,YB
    JPEGImages/<name>.jpg   Annotations/<class>/<name>.mat  (kps: K x 2, NaN = not visible; bbox: x1 y1 x2 y2)

`class` is 1-based in the 20 PASCAL classes; image paths in the CSVs are used by their last
component, as HPF does (they read `PF-dataset-PASCAL/JPEGImages/<name>.jpg`). The HPF layout takes
keypoints from the .mat files, rows matched by index, a row kept when finite in both (HPF's
rule). The NCNet layout takes them from XA;YA;XB;YB, ';'-separated x and y lists, for val and
test, and from the .mat files for train (its CSV has none), as GeoAware-SC does. Boxes always
come from the .mat files. A folder with HPF's files is read as HPF's. Splits: trn, val, test
(GeoAware's `train` file is `trn`). Ids `<class>/<name>.jpg`; threshold: the target image (HPF's
`img` for PF-PASCAL).

PF-WILLOW (PF-dataset.zip), one test split:

    test_pairs.csv (HPF, DHPF) or test_pairs_pf.csv (CNNGeometric, DistillDIFT)
        imageA,imageB,XA1..XA10,YA1..YA10,XB1..XB10,YB1..YB10
    <class>/<name>.png      e.g. car(G)/car_0001.png; the CSV says PF-dataset/car(G)/car_0001.png

The first component of a CSV path is dropped, as both codes do. Ten keypoints per image, all
visible; no boxes, so each box is the box around that image's keypoints, and the threshold is
that of the target's (HPF's `bbox` for PF-WILLOW is exactly this box: `kps`).

Coordinates are used as the files give them (MATLAB annotations, so likely 1-based; no public
code shifts them, so neither does this). Sizes come from the image headers. A pair left without
usable keypoints is skipped and counted in `skipped` (benchmark_common.py); a malformed row or
annotation is one DatasetError naming the file (and line); a missing image sets its pairs' `error`.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dhf_cache.datasets.annotations import bounding_box, read_text
from dhf_cache.datasets.base import Dataset, ImageRecord, PairRecord, safe_join
from dhf_cache.datasets.benchmark_common import ImageSizes, SkipCounts, keypoint_box, select_correspondences
from dhf_cache.datasets.files import NotRegularFileError, open_regular
from dhf_cache.errors import DatasetError

SPLITS = ("trn", "val", "test")
PASCAL_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                  "tvmonitor")
HPF_PAIR_FILES = {"trn": "trn_pairs.csv", "val": "val_pairs.csv", "test": "test_pairs.csv"}
NCNET_PAIR_FILES = {"trn": "train_pairs_pf_pascal.csv", "val": "val_pairs_pf_pascal.csv",
                    "test": "test_pairs_pf_pascal.csv"}
WILLOW_PAIR_FILES = ("test_pairs.csv", "test_pairs_pf.csv")
WILLOW_POINTS = 10


def csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty row after the header, as pandas.read_csv reads them."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (a broken link?); it lists the benchmark's pairs") from None
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as exc:
        raise DatasetError(f"{path}: not a readable CSV file ({exc})") from None
    return [(number, row) for number, row in enumerate(rows[1:], 2) if any(field.strip() for field in row)]


def number(text: str, where: str) -> float:
    """A CSV cell as float; an empty cell or 'nan' is NaN (dropped later), anything else not a number raises."""
    text = text.strip()
    if not text or text.lower() == "nan":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{where}: {text[:40]!r} is not a number") from None


def coordinate_list(text: str, where: str) -> np.ndarray:
    """NCNet's ';'-separated coordinate list ("12.5;40;7") as floats."""
    parts = [p for p in text.split(";") if p.strip()]
    return np.array([number(p, where) for p in parts], dtype=np.float64)


def read_pascal_mat(path: Path, listed: str) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """(kps (K, 2) with NaN rows for keypoints not visible, bbox) of a PF-PASCAL annotation file."""
    import scipy.io  # a dependency of scikit-image; only PF-PASCAL needs it

    try:
        with open_regular(path) as f:
            data = scipy.io.loadmat(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing; it is the PF-PASCAL annotation of an image listed at {listed}") from None
    except (NotRegularFileError, IsADirectoryError) as exc:
        raise DatasetError(f"{path}: {exc}; it must be a regular .mat annotation file") from None
    except Exception as exc:  # scipy raises many kinds (ValueError, MatReadError, TypeError...) for a bad file
        raise DatasetError(f"{path}: not a readable MATLAB annotation file ({type(exc).__name__}: {exc})") from None
    kps, box = data.get("kps"), data.get("bbox")
    numeric = lambda a: isinstance(a, np.ndarray) and a.dtype.kind in "iuf"  # noqa: E731
    if not numeric(kps) or not (kps.ndim == 2 and kps.shape[1] == 2 or kps.size == 0):
        raise DatasetError(f"{path}: kps must be a K x 2 numeric array (NaN rows for keypoints not visible), got "
                           f"{getattr(kps, 'shape', type(kps).__name__)}")
    if not numeric(box) or box.size != 4:
        raise DatasetError(f"{path}: bbox must be 4 numbers [x1, y1, x2, y2], got {getattr(box, 'shape', box)}")
    return kps.astype(np.float64).reshape(-1, 2), bounding_box(box.ravel().tolist(), str(path), "bbox")


@dataclass(frozen=True)
class Row:
    """One checked row of a pair list: where it is, its two images, its class and its keypoints
    when the CSV holds them (None: they are in the .mat files)."""

    where: str
    category: str
    src: str  # image file name
    trg: str
    kps: tuple[np.ndarray, np.ndarray] | None


class PFPascalDataset(SkipCounts, Dataset):
    default_threshold = "img"

    def __init__(self, root: Path, spec: str):
        if not root.is_dir():
            raise DatasetError(f"--dataset {spec}: {root} is not a folder")
        self.root, self.spec = root, spec
        hpf = {s: root / f for s, f in HPF_PAIR_FILES.items() if (root / f).exists()}
        ncnet = {s: root / f for s, f in NCNET_PAIR_FILES.items() if (root / f).exists()}
        if not hpf and not ncnet:
            raise DatasetError(f"--dataset {spec}: no PF-PASCAL layout here: expected {root / 'test_pairs.csv'} "
                               f"(HPF/DHPF/CATs) or {root / 'test_pairs_pf_pascal.csv'} (NCNet/GeoAware-SC)")
        self.layout = "hpf" if hpf else "ncnet"
        self.pair_files = hpf or ncnet
        self.rows: dict[str, list[Row]] = {}
        self.annotations: dict[Path, tuple[np.ndarray, tuple[float, float, float, float]]] = {}
        self.sizes = ImageSizes()

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.pair_files]

    def _rows(self, split: str) -> list[Row]:
        if split not in self.splits:
            raise DatasetError(f"--split {split}: {self.spec} has no such split; it has {', '.join(self.splits)}")
        if split not in self.rows:
            self.rows[split] = self._read_rows(split, self.pair_files[split])
        return self.rows[split]

    def _read_rows(self, split: str, path: Path) -> list[Row]:
        # GeoAware-SC reads NCNet's val/test keypoints from the CSV, its train keypoints from the .mat files
        in_csv = self.layout == "ncnet" and split != "trn"
        out = []
        for line, fields in csv_rows(path):
            where = f"{path}:{line}"
            if len(fields) < (7 if in_csv else 3):
                want = "source_image,target_image,class,XA,YA,XB,YB" if in_csv else "source_image,target_image,class"
                raise DatasetError(f"{where}: expected the columns {want}, got {len(fields)} fields")
            cls = fields[2].strip()
            if not cls.isdigit() or not 1 <= int(cls) <= len(PASCAL_CLASSES):
                raise DatasetError(f"{where}: class must be a PASCAL class number 1-20, got {cls[:20]!r}")
            names = [fields[i].strip().rsplit("/", 1)[-1] for i in (0, 1)]  # HPF: os.path.basename
            for name in names:
                try:
                    safe_join(self.root, "JPEGImages", name)
                except DatasetError as exc:
                    raise DatasetError(f"{where}: {exc}") from None
            kps = None
            if in_csv:
                xa, ya, xb, yb = (coordinate_list(fields[i], where) for i in range(3, 7))
                if not len(xa) == len(ya) == len(xb) == len(yb):
                    raise DatasetError(f"{where}: XA, YA, XB, YB must list as many coordinates each, got "
                                       f"{len(xa)}, {len(ya)}, {len(xb)}, {len(yb)}")
                kps = (np.stack([xa, ya], axis=1), np.stack([xb, yb], axis=1))
            out.append(Row(where, PASCAL_CLASSES[int(cls) - 1], names[0], names[1], kps))
        return out

    def _record(self, category: str, name: str) -> ImageRecord:
        return ImageRecord(f"{category}/{name}", safe_join(self.root, "JPEGImages", name))

    def _annotation(self, category: str, name: str, listed: str) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """The image's .mat annotation, read once however many pairs use it."""
        path = safe_join(self.root, "Annotations", category, os.path.splitext(name)[0] + ".mat")
        if path not in self.annotations:
            self.annotations[path] = read_pascal_mat(path, listed)
        return self.annotations[path]

    def images(self, split: str | None = None) -> list[ImageRecord]:
        records = {}
        for s in [split] if split else self.splits:
            for row in self._rows(s):
                for name in (row.src, row.trg):
                    rec = self._record(row.category, name)
                    records[rec.id] = rec
        return [records[k] for k in sorted(records)]

    def pairs(self, split: str) -> list[PairRecord]:
        out, reasons = [], []
        for index, row in enumerate(self._rows(split)):
            src_mat, src_box = self._annotation(row.category, row.src, row.where)
            trg_mat, trg_box = self._annotation(row.category, row.trg, row.where)
            if row.kps is None:
                n = min(len(src_mat), len(trg_mat))  # HPF zips the two lists
                src, trg = src_mat[:n], trg_mat[:n]
                visible = (np.isfinite(src).all(axis=1), np.isfinite(trg).all(axis=1))  # NaN: not visible
            else:
                (src, trg), visible = row.kps, (None, None)
            src_rec, trg_rec = self._record(row.category, row.src), self._record(row.category, row.trg)
            (src_size, src_error), (trg_size, trg_error) = self.sizes(src_rec), self.sizes(trg_rec)
            src_kps, trg_kps, dropped, reason = select_correspondences(src, trg, *visible, src_size, trg_size)
            if reason:
                reasons.append(reason)
                continue
            errors = [e for e in (src_error, trg_error) if e]
            out.append(PairRecord(
                name=f"{index}-{Path(row.src).stem}-{Path(row.trg).stem}:{row.category}", category=row.category,
                src=src_rec.id, trg=trg_rec.id, src_kps=src_kps, trg_kps=trg_kps, src_bbox=src_box, trg_bbox=trg_box,
                src_size=src_size, trg_size=trg_size, error="; ".join(errors) or None, dropped_kps=dropped,
            ))
        self.record_skips(split, reasons)
        return out


class PFWillowDataset(SkipCounts, Dataset):
    default_threshold = "kps"

    def __init__(self, root: Path, spec: str):
        if not root.is_dir():
            raise DatasetError(f"--dataset {spec}: {root} is not a folder")
        found = [root / f for f in WILLOW_PAIR_FILES if (root / f).exists()]
        if not found:
            raise DatasetError(f"--dataset {spec}: no PF-WILLOW layout here: expected {root / 'test_pairs.csv'} "
                               f"(HPF/DHPF) or {root / 'test_pairs_pf.csv'} (CNNGeometric)")
        self.root, self.spec, self.pair_file = root, spec, found[0]
        self.sizes = ImageSizes()

    @property
    def splits(self) -> list[str]:
        return ["test"]

    def _image(self, text: str, where: str) -> ImageRecord:
        parts = [p for p in text.strip().split("/") if p][1:]  # drop "PF-dataset", as HPF and DistillDIFT do
        if len(parts) < 2:
            raise DatasetError(f"{where}: image path {text[:60]!r} must be PF-dataset/<class>/<file>")
        image_id = "/".join(parts)
        try:
            return ImageRecord(image_id, safe_join(self.root, *parts))
        except DatasetError as exc:
            raise DatasetError(f"{where}: {exc}") from None

    @cached_property
    def _rows(self) -> list[tuple[str, ImageRecord, ImageRecord, np.ndarray, np.ndarray]]:
        out = []
        for line, fields in csv_rows(self.pair_file):
            where = f"{self.pair_file}:{line}"
            if len(fields) != 2 + 4 * WILLOW_POINTS:
                raise DatasetError(f"{where}: expected 42 columns (imageA, imageB, XA1..XA10, YA1..YA10, "
                                   f"XB1..XB10, YB1..YB10), got {len(fields)}")
            values = np.array([number(v, where) for v in fields[2:]]).reshape(4, WILLOW_POINTS)
            src, trg = self._image(fields[0], where), self._image(fields[1], where)
            out.append((where, src, trg, values[:2].T, values[2:].T))  # x row, y row -> (10, 2)
        return out

    def images(self, split: str | None = None) -> list[ImageRecord]:
        self._check_split(split)
        records = {rec.id: rec for _, src, trg, _, _ in self._rows for rec in (src, trg)}
        return [records[k] for k in sorted(records)]

    def _check_split(self, split: str | None) -> None:
        if split not in (None, "test"):
            raise DatasetError(f"--split {split}: {self.spec} has no such split; PF-WILLOW has only test")

    def pairs(self, split: str) -> list[PairRecord]:
        self._check_split(split)
        out, reasons = [], []
        for index, (where, src_rec, trg_rec, src, trg) in enumerate(self._rows):
            (src_size, src_error), (trg_size, trg_error) = self.sizes(src_rec), self.sizes(trg_rec)
            src_kps, trg_kps, dropped, reason = select_correspondences(src, trg, None, None, src_size, trg_size)
            if reason:
                reasons.append(reason)
                continue
            category = src_rec.id.split("/")[0]
            errors = [e for e in (src_error, trg_error) if e]
            out.append(PairRecord(
                name=f"{index}-{Path(src_rec.id).stem}-{Path(trg_rec.id).stem}:{category}", category=category,
                src=src_rec.id, trg=trg_rec.id, src_kps=src_kps, trg_kps=trg_kps,
                src_bbox=keypoint_box(src_kps), trg_bbox=keypoint_box(trg_kps),
                src_size=src_size, trg_size=trg_size, error="; ".join(errors) or None, dropped_kps=dropped,
            ))
        self.record_skips(split, reasons)
        return out
