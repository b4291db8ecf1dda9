"""`dhf-cache compare EVAL_A EVAL_B`: the difference of two evaluations of the same pairs under the
same convention, with a paired bootstrap interval, overall and per category.

Both folders are read as `dhf-cache eval` left them (metrics.json for the protocol and matching,
predictions.jsonl for every pair's ground truth and predictions), so the comparison rescores
both from their predictions with conventions.py: nothing is taken from a number in a report.
Paired: every bootstrap resample draws the same pairs for A and B, so the interval is that of
the difference, much narrower than two independent intervals when the runs err on the same pairs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


from dhf_cache.correspondence.conventions import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, PairTable, bootstrap_weights,
                                                  interval, within_category)
from dhf_cache.correspondence.pck import PCKAccumulator
from dhf_cache.errors import UsageError
from dhf_cache.reports.eval_folder import read_json_file, read_predictions

# what must agree for a difference to mean anything (besides the pairs themselves)
SAME = (("protocol", "name"), ("protocol", "threshold_base"), ("protocol", "inequality"), ("protocol", "alpha"),
        ("matching", "match_at"), ("matching", "load_size"), ("matching", "refine"), ("options", "split"))


@dataclass
class Evaluation:
    folder: Path
    metrics: dict
    records: dict[str, dict]  # pair name -> its predictions.jsonl line


def load_evaluation(folder: Path) -> Evaluation:
    """An eval folder's metrics.json and predictions.jsonl, refused in one line when unusable."""
    folder = Path(folder)
    metrics = read_json_file(folder / "metrics.json", "JSON", str(folder), UsageError)
    records = {r["pair"]: r for r in read_predictions(folder / "predictions.jsonl", str(folder), UsageError)}
    if not isinstance(metrics, dict) or "protocol" not in metrics:
        raise UsageError(f"{folder}: written by an older `dhf-cache eval` (no protocol in metrics.json); rerun it")
    return Evaluation(folder, metrics, records)


def _get(metrics: dict, path: tuple[str, str]):
    return (metrics.get(path[0]) or {}).get(path[1])


def check_comparable(a: Evaluation, b: Evaluation) -> None:
    """Refuse runs of other pairs or conventions, naming the first differences."""
    problems = [f"{'.'.join(path)}: {_get(a.metrics, path)!r} vs {_get(b.metrics, path)!r}"
                for path in SAME if _get(a.metrics, path) != _get(b.metrics, path)]
    only_a, only_b = sorted(set(a.records) - set(b.records)), sorted(set(b.records) - set(a.records))
    if only_a or only_b:
        problems.append(f"pairs: {len(only_a)} only in A (e.g. {only_a[:3]}), {len(only_b)} only in B (e.g. {only_b[:3]})")
    else:
        differ = [name for name in a.records if any(a.records[name][k] != b.records[name][k]
                                                    for k in ("trg_kps", "trg_bndbox", "trg_imsize", "category"))]
        if differ:
            problems.append(f"ground truth differs for {len(differ)} pairs (e.g. {differ[:3]})")
    if problems:
        raise UsageError(f"cannot compare {a.folder} with {b.folder}: " + "; ".join(problems))


def _table(evaluation: Evaluation, names: list[str]) -> PairTable:
    accumulator = PCKAccumulator((0.1,))
    for name in names:
        r = evaluation.records[name]
        _, trg_kps, pred_kps = r["_arrays"]
        accumulator.add(name, r["category"], pred_kps, trg_kps, r["_box"], r["_size"], r.get("flags"))
    return PairTable(accumulator.pairs)


def compare(a: Evaluation, b: Evaluation, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """A - B under A's headline rule, overall and per category, each with a paired 95% interval."""
    check_comparable(a, b)
    protocol = a.metrics["protocol"]
    base, inequality, alpha = protocol["threshold_base"], protocol["inequality"], float(protocol["alpha"])
    averaging = protocol["averagings"][0]
    names = list(a.records)
    tables = _table(a, names), _table(b, names)
    weights = bootstrap_weights(len(names), max(1, resamples), seed)

    def scored(subset, how: str) -> dict:
        counts = [t.counts(base, inequality, alpha, subset) for t in tables]
        values = [c.values()[how] for c in counts]
        samples = [c.values(weights)[how] for c in counts]
        diff = None if None in values else values[0] - values[1]
        return {"a": values[0], "b": values[1], "difference": diff,
                "ci95": None if diff is None else interval(samples[0] - samples[1]),
                "a_ci95": interval(samples[0]), "b_ci95": interval(samples[1]), "n_pairs": int(counts[0].kept.shape[0])}

    categories = tables[0].categories
    return {
        "a": str(a.folder), "b": str(b.folder),
        "a_descriptor": a.metrics.get("options", {}).get("descriptor"),
        "b_descriptor": b.metrics.get("options", {}).get("descriptor"),
        "rule": f"{base}{inequality}{alpha:g} {averaging}", "protocol": protocol["name"],
        "overall": scored(None, averaging),
        "categories": {c: scored(tables[0].category == i, within_category(averaging)) for i, c in enumerate(categories)},
        "bootstrap": {"resamples": int(resamples), "seed": int(seed), "level": 0.95, "paired": True, "unit": "pairs"},
        "n_pairs": len(names),
    }


def run_compare(folder_a: Path, folder_b: Path, out: Path | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = BOOTSTRAP_SEED, log: Callable[[str], None] = print) -> dict:
    result = compare(load_evaluation(folder_a), load_evaluation(folder_b), resamples, seed)
    if out is not None:
        from dhf_cache.reports.plots import plot_compare
        from dhf_cache.reports.report import render_compare

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "compare.md").write_text(render_compare(result))
        plot_compare(result, out / "compare.png")
        log(f"wrote {out / 'compare.json'}, compare.md and compare.png")
    return result
