"""What `dhf-cache eval` wrote, read back: metrics.json and predictions.jsonl of an evaluation
folder, each file opened only when it is a regular file and every record checked, for the
commands that read evaluations (`compare`, the viewer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dhf_cache.datasets.files import open_regular
from dhf_cache.errors import EvaluationError, first_line

# what every record of predictions.jsonl holds (pipelines/evaluate.py writes also its flags)
RECORD_FIELDS = ("pair", "category", "src_kps", "trg_kps", "pred_kps", "trg_bndbox", "trg_imsize")


def read_json_file(path: Path, what: str, label: str, error: type[Exception] = EvaluationError) -> Any:
    """A JSON file of an evaluation folder (opened only when it is a regular file: a FIFO would
    block); problems raise `error` with one line starting with `label` (the folder as given)."""
    try:
        with open_regular(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{label}: no {path.name}; give a folder `dhf-cache eval --out` wrote") from None
    except (OSError, ValueError) as exc:
        raise error(f"{label}: {path.name} cannot be read as {what} ({first_line(exc)}); rerun `dhf-cache eval`") from None


def read_predictions(path: Path, label: str, error: type[Exception] = EvaluationError) -> list[dict[str, Any]]:
    """predictions.jsonl's records, each checked for RECORD_FIELDS; `_arrays` holds its src, trg
    and pred keypoints as (K, 2) float arrays (NaN: no prediction), `_box` and `_size` the target's."""
    try:
        with open_regular(path) as f:
            lines = f.read().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise error(f"{label}: no {path.name}; give a folder `dhf-cache eval --out` wrote") from None
    except (OSError, ValueError) as exc:
        raise error(f"{label}: {path.name} cannot be read ({first_line(exc)})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or any(key not in record for key in RECORD_FIELDS):
                raise ValueError(f"expected an object with {', '.join(RECORD_FIELDS)}")
            record["_arrays"] = tuple(_as_points(record[key]) for key in ("src_kps", "trg_kps", "pred_kps"))
            if not len(record["_arrays"][0]) == len(record["_arrays"][1]) == len(record["_arrays"][2]):
                raise ValueError("src_kps, trg_kps and pred_kps differ in length")
            box, size = record["trg_bndbox"], record["trg_imsize"]
            if not (isinstance(box, list) and len(box) == 4 and isinstance(size, list) and len(size) == 2):
                raise ValueError("trg_bndbox must be [x1, y1, x2, y2] and trg_imsize [W, H]")
            record["_box"] = tuple(float(v) for v in box)
            record["_size"] = (int(size[0]), int(size[1]))
        except (ValueError, TypeError) as exc:
            raise error(f"{label}: {path.name} line {number}: not a prediction record ({first_line(exc)}); "
                        "rerun `dhf-cache eval`") from None
        records.append(record)
    return records


def _as_points(value: Any) -> np.ndarray:
    array = np.array([[np.nan if v is None else float(v) for v in point] for point in value], dtype=np.float64)
    return array.reshape(-1, 2)
