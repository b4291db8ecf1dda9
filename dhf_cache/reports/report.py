"""`report.md`: the tables a paper needs from one evaluation, with the protocol that made them.

Input is the metrics dict eval writes (metrics.json) and, for a `--raw best` sweep, its
layer x timestep table. Every number is a percentage with one decimal; a value with nothing
to average (None in metrics.json) is shown as "–", never as 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dhf_cache.errors import UsageError
from dhf_cache.reports.plots import short_layer_name

MISSING = "–"
AVERAGINGS = (
    ("per_point", "per point", "correct points / all points, pooled over pairs (the reference implementation's average)"),
    ("per_image", "per image", "mean over pairs of each pair's fraction of correct points"),
    ("per_category_mean", "per category", "unweighted mean over categories of each category's per-point PCK"),
)


def percent(value: float | None) -> str:
    """0.6125 -> '61.3'; None -> '–'."""
    return MISSING if value is None else f"{100.0 * float(value):.1f}"


def _key_order(key: str) -> tuple:
    kind, _, alpha = key.partition("@")
    try:
        return (kind != "bbox", kind, float(alpha))
    except ValueError:
        return (kind != "bbox", kind, float("inf"), alpha)


def sorted_keys(keys: Iterable[str]) -> list[str]:
    """bbox before img, then by alpha: bbox@0.05, bbox@0.1, ..., img@0.05, ..."""
    return sorted(keys, key=_key_order)


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _code(value: Any) -> str:
    return MISSING if value is None else f"`{value}`"


def _overall_section(pck: dict) -> list[str]:
    keys = sorted_keys(pck)
    lines = ["## Overall PCK (%)", ""]
    rows = [[label] + [percent(pck[k].get(field)) for k in keys] for field, label, _ in AVERAGINGS]
    lines += _table(["averaging"] + keys, rows)
    lines += [""] + [f"- **{label}**: {why}." for _, label, why in AVERAGINGS]
    lines += ["- `bbox@α`: correct when the error is ≤ α · max(w, h) of the target bounding box; "
              "`img@α`: ≤ α · max(W, H) of the target image. Errors are measured in original target pixels.", ""]
    counted = [(k, pck[k].get("n_pairs"), pck[k].get("n_points")) for k in keys]
    if any(n is not None for _, n, _ in counted):
        lines += ["Pairs and points each metric averaged over (bbox metrics leave out pairs without a usable box):", ""]
        lines += _table(["key", "pairs", "points"], [[k, str(p if p is not None else MISSING),
                                                      str(n if n is not None else MISSING)] for k, p, n in counted])
        lines.append("")
    return lines


def _category_section(categories: dict, keys: list[str]) -> list[str]:
    lines = ["## Per category (%, per point)", ""]
    rows = []
    for cat in sorted(categories):
        entry = categories[cat]
        first = next((entry[k] for k in keys if isinstance(entry.get(k), dict)), {})
        n_pairs = entry.get("n_pairs", first.get("n_pairs"))
        n_points = entry.get("n_points", first.get("n_points"))
        values = [percent((entry.get(k) or {}).get("per_point")) for k in keys]
        rows.append([cat] + values + [str(MISSING if n_pairs is None else n_pairs),
                                      str(MISSING if n_points is None else n_points)])
    lines += _table(["category"] + keys + ["n_pairs", "n_points"], rows)
    lines.append("")
    return lines


def _protocol_section(metrics: dict) -> list[str]:
    options = metrics.get("options", {})
    alphas = options.get("alphas")
    items = [
        ("descriptor", _code(options.get("descriptor"))),
        ("split", _code(options.get("split"))),
        ("load size", MISSING if options.get("load_size") is None else f"{options['load_size']} px"),
        ("refine", _code(options.get("refine"))),
        ("matched at", _code(options.get("match_at", "load"))),
        ("alphas", MISSING if not alphas else ", ".join(f"{a:g}" for a in alphas)),
        ("limit per category", "none" if options.get("limit_per_category") is None else str(options["limit_per_category"])),
        ("feature source", _code(metrics.get("feature_source"))),
        ("pairs", str(metrics.get("n_pairs", MISSING))),
        ("points", str(metrics.get("n_points", MISSING))),
    ]
    desc = metrics.get("descriptors")
    if desc:
        items.append(("descriptor maps", ", ".join(f"{v} {k}" for k, v in desc.items())))
    lines = ["## Protocol", ""] + [f"- {name}: {value}" for name, value in items]
    skipped = metrics.get("skipped") or {}
    if skipped:
        lines += ["", "Skipped or degenerate input (counted, not raised):", ""]
        lines += _table(["counter", "count"], [[k, str(v)] for k, v in sorted(skipped.items())])
    notes = metrics.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    lines.append("")
    return lines


def _fingerprint_section(fingerprints: dict) -> list[str]:
    lines = ["## Fingerprints", "", f"- checkpoint: {_code(fingerprints.get('checkpoint'))}"]
    cache = fingerprints.get("cache") or {}
    if isinstance(cache, dict):
        lines += [f"- cache {name}: {_code(value)}" for name, value in cache.items()]
    else:
        lines.append(f"- cache: {_code(cache)}")
    lines.append("")
    return lines


def sweep_rank(value: float, row: int, column: int) -> tuple[float, int, int]:
    """Sort key of a `--raw best` cell (row = timestep, column = layer, in the cache's order):
    the larger key is the better map, so ties go to the first cell in row-major order."""
    return (float(value), -int(row), -int(column))


def best_cell(table) -> tuple[int, int] | None:
    """(row, column) of the best map in a (T, L) raw-sweep table: the highest value; among equal
    values the earliest timestep row, then the first layer column (numpy's nanargmax). None (or
    NaN) cells hold no value; None when no cell does.

    The one tie rule of `--raw best`: eval keeps this map's results (metrics.json,
    predictions.jsonl) and raw_sweep.json and report.md name it.
    """
    cells = [(sweep_rank(v, i, j), (i, j)) for i, row in enumerate(table) for j, v in enumerate(row)
             if v is not None and not math.isnan(float(v))]
    return max(cells)[1] if cells else None


def _raw_section(raw: dict) -> list[str]:
    try:
        layers, timesteps, table = list(raw["layers"]), list(raw["timesteps"]), raw["pck"]
    except (KeyError, TypeError):
        raise UsageError("raw_table: expected a dict with 'layers', 'timesteps' and 'pck' (T x L)") from None
    if len(table) != len(timesteps) or any(len(row) != len(layers) for row in table):
        raise UsageError(f"raw_table: 'pck' must be {len(timesteps)} rows (timesteps) x {len(layers)} columns (layers)")
    metric = raw.get("metric", "PCK")
    best = raw.get("best") or {}
    marked = None
    if best.get("layer") in layers and best.get("timestep") in timesteps:
        marked = (timesteps.index(best["timestep"]), layers.index(best["layer"]))
    else:  # no usable "best": mark the one `best_cell` names
        marked = best_cell(table)
        if marked is not None:
            i, j = marked
            best = {"layer": layers[j], "timestep": timesteps[i], "pck": table[i][j]}
    rows = []
    for i, t in enumerate(timesteps):
        cells = []
        for j, value in enumerate(table[i]):
            text = percent(value)
            cells.append(f"**{text}** ★" if (i, j) == marked else text)
        rows.append([str(t)] + cells)
    lines = [f"## Single layer x timestep ({metric}, %)", ""]
    lines += _table(["t \\ layer"] + [short_layer_name(n) for n in layers], rows)
    lines.append("")
    if marked is not None:
        lines.append(f"Best (★): `{best['layer']}` at t = {best['timestep']}: {percent(best.get('pck'))}%.")
    shorts = {short_layer_name(n): n for n in layers if short_layer_name(n) != n}
    if shorts:
        lines.append("Columns: " + ", ".join(f"`{s}` = `{n}`" for s, n in shorts.items()) + ".")
    lines.append("")
    return lines


def _interval(row: dict) -> str:
    ci = row.get("ci95")
    return f" [{percent(ci[0])}, {percent(ci[1])}]" if ci else ""


def _headline_section(metrics: dict) -> list[str]:
    """The protocol's numbers with their bootstrap intervals (absent in older metrics.json)."""
    protocol, headline = metrics.get("protocol"), metrics.get("headline")
    if not protocol or not headline:
        return []
    boot = metrics.get("bootstrap", {})
    lines = ["## Headline", "",
             f"Protocol `{protocol['name']}` (the rule of {protocol['code']}; docs/evaluation.md)."
             + (" Its matching differs here: see the notes." if protocol.get("matching_differs") else ""), ""]
    lines += [f"- **PCK `{row['name']}`: {percent(row['value'])}%**{_interval(row)} over {row['n_pairs']} pairs"
              for row in headline]
    if boot.get("resamples"):
        lines += ["", f"Intervals: {int(100 * boot['level'])}% percentile bootstrap over pairs, "
                  f"{boot['resamples']} resamples, seed {boot['seed']}."]
    matching = metrics.get("matching") or {}
    if matching.get("reproduces"):
        lines += ["", f"Matching reproduces {matching['reproduces']}."]
    return lines + [""]


def _conventions_section(rows: list[dict]) -> list[str]:
    """The matrix: per matching (the run's own first), one table per alpha, rows (base,
    inequality), columns the averagings; other matchings show alpha 0.1 only."""
    if not rows:
        return []
    averagings = list(dict.fromkeys(r["averaging"] for r in rows))
    matchings = list(dict.fromkeys(r.get("matching") for r in rows))
    lines = ["## Every convention (%)", "",
             "The same predictions under each published rule: threshold base (`bbox`: max side of the target box, "
             "`img`: of the target image, `kps`: of the box around the target keypoints), `<=` or `<`, and "
             "the averaging (docs/evaluation.md names the code behind each).", ""]
    for n, matching in enumerate(matchings):
        mine = [r for r in rows if r.get("matching") == matching]
        alphas = sorted({r["alpha"] for r in mine})
        if n:
            alphas = [a for a in alphas if a == 0.1] or alphas[:1]
        if matching is not None and len(matchings) > 1:
            lines += [f"Matched at `{matching}`" + (" (this run's predictions)" if n == 0 else "") + ":", ""]
        for alpha in alphas:
            cells = {(r["base"], r["inequality"], r["averaging"]): r for r in mine if r["alpha"] == alpha}
            body = []
            for base, inequality in dict.fromkeys((r["base"], r["inequality"]) for r in mine):
                body.append([f"{base} {inequality} {alpha:g}"] + [percent(cells[(base, inequality, a)]["value"])
                                                                  for a in averagings])
            lines += _table(["rule"] + [a.replace("_", " ") for a in averagings], body) + [""]
    return lines


def _breakdown_section(metrics: dict) -> list[str]:
    breakdowns, headline = metrics.get("breakdowns"), metrics.get("headline")
    if not breakdowns or not headline:
        return []
    name = headline[0]["name"]
    lines = []
    categories = breakdowns.get("categories") or {}
    if categories:
        lines += [f"## Per category, headline rule (`{name}`, %)", ""]
        rows = [[cat, percent(e["value"]) + _interval(e), str(e["n_pairs"])] for cat, e in sorted(categories.items())]
        lines += _table(["category", "PCK [95% interval]", "pairs"], rows) + [""]
    flags = breakdowns.get("flags") or {}
    if flags:
        lines += [f"## By difficulty (`{name}`, %)", ""]
        rows = [[flag, value, percent(e["value"]) + _interval(e), str(e["n_pairs"])]
                for flag, values in flags.items() for value, e in values.items()]
        lines += _table(["flag", "value", "PCK", "pairs"], rows, ["---", "---:", "---:", "---:"]) + [""]
    return lines


def render_report(metrics: dict, raw_table: dict | None = None) -> str:
    """The markdown text of `write_report`."""
    pck = metrics.get("pck")
    if not isinstance(pck, dict) or not pck:
        raise UsageError("metrics: no 'pck' section; pass the metrics.json written by `dhf-cache eval`")
    keys = sorted_keys(pck)
    descriptor = metrics.get("options", {}).get("descriptor")
    lines = ["# Evaluation report", ""]
    if descriptor:
        lines += [f"Descriptor: `{descriptor}`. {metrics.get('n_pairs', MISSING)} pairs, "
                  f"{metrics.get('n_points', MISSING)} points.", ""]
    lines += _headline_section(metrics)
    lines += _overall_section(pck)
    lines += _conventions_section(metrics.get("conventions") or [])
    lines += _breakdown_section(metrics)
    if metrics.get("categories"):
        lines += _category_section(metrics["categories"], keys)
    if raw_table is not None:
        lines += _raw_section(raw_table)
    lines += _protocol_section(metrics)
    if metrics.get("fingerprints"):
        lines += _fingerprint_section(metrics["fingerprints"])
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def write_report(path: str | Path, metrics: dict, raw_table: dict | None = None) -> Path:
    """Write the report to `path` (or `path`/report.md when `path` is a folder); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.md"
    text = render_report(metrics, raw_table)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def load_metrics(path: str | Path) -> dict:
    """metrics.json as a dict, with a clear error when it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such metrics file; run `dhf-cache eval` first") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None


def _signed(value: float | None) -> str:
    return MISSING if value is None else f"{100.0 * float(value):+.1f}"


def compare_lines(result: dict) -> list[str]:
    """`dhf-cache compare` as a plain table: A, B, A - B with its paired interval, per category."""
    def row(name: str, e: dict) -> str:
        ci = e.get("ci95")
        interval = f"[{_signed(ci[0])}, {_signed(ci[1])}]" if ci else MISSING
        return f"{name:<16} {percent(e['a']):>6} {percent(e['b']):>6} {_signed(e['difference']):>7} {interval:>16} {e['n_pairs']:>6}"

    lines = [f"A: {result['a']} ({result.get('a_descriptor')})", f"B: {result['b']} ({result.get('b_descriptor')})",
             f"PCK {result['rule']} (protocol {result['protocol']}), %; A - B with a paired 95% bootstrap interval "
             f"({result['bootstrap']['resamples']} resamples of {result['n_pairs']} pairs):",
             f"{'':<16} {'A':>6} {'B':>6} {'A - B':>7} {'95% interval':>16} {'pairs':>6}",
             row("all", result["overall"])]
    lines += [row(c, e) for c, e in sorted(result["categories"].items())]
    return lines


def render_compare(result: dict) -> str:
    """compare.md: the same table as `compare_lines`, in markdown."""
    rows = []
    for name, e in [("**all**", result["overall"]), *sorted(result["categories"].items())]:
        ci = e.get("ci95")
        rows.append([name, percent(e["a"]), percent(e["b"]), _signed(e["difference"]),
                     f"[{_signed(ci[0])}, {_signed(ci[1])}]" if ci else MISSING, str(e["n_pairs"])])
    lines = ["# Comparison", "", f"- A: `{result['a']}` ({result.get('a_descriptor')})",
             f"- B: `{result['b']}` ({result.get('b_descriptor')})", "",
             f"PCK `{result['rule']}` (protocol `{result['protocol']}`), in %. The interval is a paired percentile "
             f"bootstrap over pairs ({result['bootstrap']['resamples']} resamples, seed {result['bootstrap']['seed']}): "
             "each resample draws the same pairs for A and B.", ""]
    lines += _table(["", "A", "B", "A − B", "95% interval", "pairs"], rows)
    return "\n".join(lines) + "\n"
