"""An evaluation folder as the viewer browses it: its pairs, predictions and errors.

`dhf-cache eval` writes metrics.json (the options, the data set, the checkpoint's fingerprint)
and predictions.jsonl (one record per scored pair: pair, category, src_kps, trg_kps, pred_kps,
trg_bndbox, trg_imsize). The records do not name the images, so each is joined by its pair name
with the data set's own records (`PairRecord`: the image ids, the source size, the difficulty
flags), from --dataset when given, else from the data set metrics.json names.

Errors are as eval's PCK counts them: distance in original target pixels over the threshold
length L (max side of the target's box), so a keypoint is correct at alpha when err <= alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dhf_cache.config import EVAL_LOAD_SIZE, PCK_ALPHAS
from dhf_cache.correspondence.pck import bbox_length
from dhf_cache.datasets import Dataset, PairRecord, open_dataset
from dhf_cache.reports.eval_folder import read_json_file, read_predictions
from dhf_cache.errors import DhfCacheError, EvaluationError, first_line

@dataclass
class EvalPair:
    """One scored pair: the prediction record and, when the data set has it, its `PairRecord`."""

    name: str
    category: str
    src_kps: np.ndarray  # (K, 2) ground truth on the source, original pixels
    trg_kps: np.ndarray  # (K, 2) ground truth on the target
    pred_kps: np.ndarray  # (K, 2) predictions on the target (NaN: no prediction)
    trg_bbox: tuple[float, float, float, float]
    trg_size: tuple[int, int]
    record: PairRecord | None = None
    problem: str | None = None  # why the pair's images cannot be shown

    @property
    def length(self) -> float | None:
        return bbox_length(self.trg_bbox)

    def distances(self) -> np.ndarray:
        return np.linalg.norm(self.pred_kps - self.trg_kps, axis=1)

    def errors(self) -> list[float | None]:
        """Each keypoint's error over L (None: no prediction, or no usable box)."""
        length = self.length
        return [None if length is None or not math.isfinite(d) else round(float(d) / length, 5)
                for d in self.distances()]

    def row(self, index: int) -> dict[str, Any]:
        """What the pair list shows and sorts by."""
        record = self.record
        return {"i": index, "name": self.name, "category": self.category, "n": int(len(self.trg_kps)),
                "err": self.errors(), "src": record.src if record else None, "trg": record.trg if record else None,
                "flags": dict(record.flags) if record else {}, "problem": self.problem}

    def detail(self, index: int) -> dict[str, Any]:
        """What the pair view draws (coordinates in original pixels of each image)."""
        record = self.record
        return {**self.row(index),
                "src_size": list(record.src_size) if record else None, "trg_size": list(self.trg_size),
                "src_kps": _points(self.src_kps), "trg_kps": _points(self.trg_kps), "pred_kps": _points(self.pred_kps),
                "trg_bbox": list(self.trg_bbox), "length": self.length,
                "dist": [None if not math.isfinite(d) else round(float(d), 3) for d in self.distances()]}


def _points(points: np.ndarray) -> list[list[float | None]]:
    return [[None if not math.isfinite(v) else float(v) for v in p] for p in points]


@dataclass
class Evaluation:
    """An evaluation folder: its metrics and its pairs, in predictions.jsonl's order."""

    label: str
    path: Path
    metrics: dict[str, Any]
    dataset: str
    pairs: list[EvalPair] = field(default_factory=list)

    @property
    def options(self) -> dict[str, Any]:
        options = self.metrics.get("options")
        return options if isinstance(options, dict) else {}

    @property
    def split(self) -> str:
        return str(self.options.get("split", "test"))

    @property
    def load_size(self) -> int:
        value = self.options.get("load_size")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else EVAL_LOAD_SIZE

    @property
    def alphas(self) -> list[float]:
        alphas = self.options.get("alphas")
        if isinstance(alphas, list) and alphas and all(isinstance(a, (int, float)) for a in alphas):
            return [float(a) for a in alphas]
        return list(PCK_ALPHAS)

    @property
    def descriptor(self) -> str:
        """What eval scored, as metrics.json says it ("checkpoint RUN", "raw LAYER@T", ...)."""
        return str(self.options.get("descriptor", ""))

    @property
    def checkpoint_fingerprint(self) -> str | None:
        fingerprints = self.metrics.get("fingerprints")
        value = fingerprints.get("checkpoint") if isinstance(fingerprints, dict) else None
        return value if isinstance(value, str) else None

    def summary(self, index: int) -> dict[str, Any]:
        pck = self.metrics.get("pck") if isinstance(self.metrics.get("pck"), dict) else {}
        categories = sorted({p.category for p in self.pairs})
        flags = sorted({key for p in self.pairs if p.record for key in p.record.flags})
        return {"index": index, "label": self.label, "path": str(self.path), "dataset": self.dataset,
                "split": self.split, "load_size": self.load_size, "alphas": self.alphas,
                "descriptor": self.descriptor, "n_pairs": len(self.pairs), "categories": categories, "flags": flags,
                "pck": pck, "unmatched": sum(p.record is None for p in self.pairs)}


def open_evaluation(path: Path, dataset_spec: str | None, datasets: dict[str, Dataset] | None = None) -> Evaluation:
    """The evaluation in folder `path`, its pairs joined with the data set's records.

    `dataset_spec` (--dataset) wins over the data set metrics.json names: the folder may have
    moved since eval ran (metrics.json records the spec as eval was given it). `datasets` keeps
    the data sets opened so far by spec (several evaluations of one data set open it once)."""
    metrics = read_json_file(path / "metrics.json", "JSON", f"--eval {path}")
    if not isinstance(metrics, dict):
        raise EvaluationError(f"--eval {path}: metrics.json is not a JSON object; rerun `dhf-cache eval`")
    spec = dataset_spec or metrics.get("dataset")
    if not isinstance(spec, str) or not spec:
        raise EvaluationError(f"--eval {path}: metrics.json names no data set; pass --dataset")
    evaluation = Evaluation(label=path.name or str(path), path=path, metrics=metrics, dataset=spec)
    records = read_predictions(path / "predictions.jsonl", f"--eval {path}")
    try:
        datasets = {} if datasets is None else datasets
        if spec not in datasets:
            datasets[spec] = open_dataset(spec)
        by_name = {pair.name: pair for pair in datasets[spec].pairs(evaluation.split)}
    except DhfCacheError as exc:
        raise EvaluationError(f"--eval {path}: its data set {spec} cannot be read ({first_line(exc)}); pass "
                              "--dataset with where the data set is now") from None
    for record in records:
        src_kps, trg_kps, pred_kps = record["_arrays"]
        found = by_name.get(str(record["pair"]))
        problem = None
        if found is None:
            problem = f"pair {record['pair']!r} is not in split {evaluation.split} of {spec}"
        elif found.error:
            problem = found.error
        evaluation.pairs.append(EvalPair(
            name=str(record["pair"]), category=str(record.get("category", "")), src_kps=src_kps, trg_kps=trg_kps,
            pred_kps=pred_kps, trg_bbox=record["_box"], trg_size=record["_size"], record=found, problem=problem))
    return evaluation
