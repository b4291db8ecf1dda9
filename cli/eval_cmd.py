"""`dhf-cache eval`: PCK from cached descriptors, with reports, plots and raw baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhf_cache.cli.app import app, before_compute, log, print_json, report_errors
from dhf_cache.config import PCK_ALPHAS
from dhf_cache.correspondence.conventions import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from dhf_cache.errors import UsageError

EVAL_EPILOG = """
**Examples**

The paper's protocol (SPair-71k test, load size 224, PCK@0.1 with bbox and image thresholds):

    dhf-cache eval --cache spair.zarr --dataset spair:/data/SPair-71k --checkpoint runs/dhf --out eval/dhf

The same descriptors scored the way another code base does it (its matching and headline):

    dhf-cache eval --cache spair.zarr --dataset spair:/data/SPair-71k --checkpoint runs/dhf --out eval/dift --protocol dift

One raw cached map as a baseline, and the best single map (chosen on the val split):

    dhf-cache eval --cache spair.zarr --dataset spair:/data/SPair-71k --raw up_blocks.1.resnets.1@260 --out eval/raw
    dhf-cache eval --cache spair.zarr --dataset spair:/data/SPair-71k --raw best --out eval/raw-best

Two evaluations of the same pairs, with a paired bootstrap interval of the difference:

    dhf-cache compare eval/dhf eval/raw-best

Every evaluation reports its headline with a 95% bootstrap interval over pairs and the whole
convention matrix (thresholds bbox/img/kps, <= and <, five averagings); docs/evaluation.md
says which code each comes from. Outputs: metrics.json, predictions.jsonl, report.md,
pck_per_category.png, mixing_weights.png (checkpoints), raw_sweep.png (--raw best) and
correspondences/*.png. A checkpoint's descriptor maps are stored in the cache for later evals
(`dhf-cache info` lists them, `dhf-cache prune` removes them). `--raw best` keeps the map with
the highest bbox@0.1 PCK per point on the selection split, on a tie the first in
raw_sweep.json's order (earliest timestep row, then layer).
"""


def headline_lines(metrics: dict) -> list[str]:
    """The protocol's headline numbers with their intervals, then where matching happened."""
    protocol = metrics["protocol"]
    lines = []
    for row in metrics["headline"]:
        ci = row.get("ci95")
        interval = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
        value = "–" if row["value"] is None else f"{100 * row['value']:.1f}"
        lines.append(f"{protocol['name']} headline  PCK {row['name']}: {value}{interval} (95% bootstrap over "
                     f"{row['n_pairs']} pairs)")
    m = metrics["matching"]
    where = {"load": f"a {m['load_size']} x {m['load_size']} square", "original": "each image's own size",
             "square": f"the aspect-preserving size of long side {m['load_size']}"}[m["match_at"]]
    lines.append(f"matched at {where}, {m['refine']}" + (f"; reproduces {m['reproduces']}" if m.get("reproduces") else ""))
    return lines


def pck_lines(metrics: dict) -> list[str]:
    """A one-screen PCK table: every key with its three averagings, in percent."""
    lines = [f"{'PCK':<10} {'per point':>10} {'per image':>10} {'per category':>13}"]
    for key in sorted(metrics["pck"], key=lambda k: (k.split("@")[0], float(k.split("@")[1]))):
        row = metrics["pck"][key]
        cells = ["–" if row[a] is None else f"{100 * row[a]:.1f}" for a in ("per_point", "per_image", "per_category_mean")]
        lines.append(f"{key:<10} {cells[0]:>10} {cells[1]:>10} {cells[2]:>13}")
    return lines


@app.command("eval", epilog=EVAL_EPILOG)
@report_errors
def eval_command(
    cache: Annotated[str, typer.Option(help="Cache URL built by `dhf-cache build`.")],
    dataset: Annotated[str, typer.Option(help="The keypoint pairs: spair:PATH, pairs:FILE.json, or a benchmark: pfpascal:, pfwillow:, ap10k:, cub:, spairu:, dhf: (docs/datasets.md).")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, predictions.jsonl, report.md and plots.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Run folder (RUN uses best/, else last/; or RUN/last).")] = None,
    raw: Annotated[Optional[str], typer.Option(help="LAYER@T to score one raw cached map (T = UNet timestep), or 'best'.")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    alpha: Annotated[str, typer.Option(help="Comma-separated PCK thresholds.")] = ",".join(f"{a:g}" for a in PCK_ALPHAS),
    protocol: Annotated[str, typer.Option(help="Whose headline and matching: dhf (the paper), dift, sd-dino, geoaware, hpf (docs/evaluation.md).")] = "dhf",
    load_size: Annotated[Optional[int], typer.Option(min=8, help="Matching grid: the load square's side, or the long side with --match-at square (default: the protocol's; dhf: 224; at most 2048).", show_default=False)] = None,
    match_at: Annotated[Optional[str], typer.Option(help="load (a load-size square, the paper), original (each image's size, DIFT) or square (aspect kept, SD+DINO). Default: the protocol's.", show_default=False)] = None,
    refine: Annotated[Optional[str], typer.Option(help="none (hard argmax, the paper) or window-softargmax (GeoAware-SC). Default: the protocol's.", show_default=False)] = None,
    matrix_matchings: Annotated[Optional[str], typer.Option(help="Add the convention matrices of other matchings (MATCH_AT/REFINE, comma-separated, e.g. original/none,square/window-softargmax; or all), each one more matching pass over the same descriptors.")] = None,
    select_split: Annotated[Optional[str], typer.Option(help="Where --raw best chooses its map (default: val); never the evaluated split.")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples over pairs for the headline's 95% interval (0: none).")] = BOOTSTRAP_RESAMPLES,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resamples.")] = BOOTSTRAP_SEED,
    limit_per_category: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N pairs of each category.")] = None,
    subset: Annotated[Optional[str], typer.Option(help="A named subset: ref360 (the reference's validation pairs: 20 per category of the val split).")] = None,
    skip_missing: Annotated[bool, typer.Option(help="Score the pairs whose images are built and usable; skip the rest (counted in metrics.json).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    drawings: Annotated[int, typer.Option(min=0, help="Correspondence drawings of the first N pairs.")] = 6,
    storage_options: Annotated[Optional[str], typer.Option(help="JSON object of fsspec storage options.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Which feature source of the cache (see `dhf-cache info`); needed when it holds several and neither the run nor --raw SOURCE:MAP names one.")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: one per usable core). On a CPU shared with other work, fewer threads can be faster.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print metrics.json on stdout.")] = False,
) -> None:
    """Score keypoint pairs by PCK from cached descriptors (a checkpoint) or raw cached maps."""
    before_compute()
    from dhf_cache.pipelines.evaluate import EvalRequest, run_eval
    from dhf_cache.cache.storage import parse_storage_options
    from dhf_cache.correspondence.protocols import get_protocol

    chosen = get_protocol(protocol)

    try:
        alphas = tuple(float(a) for a in alpha.split(",") if a.strip())
    except ValueError:
        raise UsageError(f"--alpha {alpha!r}: expected comma-separated numbers such as 0.05,0.1,0.15") from None
    request = EvalRequest(
        cache_url=cache, dataset=dataset, out=out, checkpoint=checkpoint, raw=raw, split=split, alphas=alphas,
        load_size=chosen.load_size if load_size is None else load_size, refine=refine or chosen.refine,
        match_at=match_at or chosen.match_at, protocol=protocol, select_split=select_split, bootstrap=bootstrap, seed=seed,
        subset=subset, matrix_matchings=tuple(m.strip() for m in (matrix_matchings or "").split(",") if m.strip()),
        limit_per_category=limit_per_category, skip_missing=skip_missing,
        device=device, storage_options=parse_storage_options(storage_options), source=source, progress=progress, drawings=drawings,
        threads=threads,
    )
    result = run_eval(request, log=log)
    metrics = result.metrics
    if json_output:
        print_json(metrics)
        return
    typer.echo(f"{metrics['options']['descriptor']}: {metrics['n_pairs']} pairs, {metrics['n_points']} points, "
               f"{metrics['options']['split']} split, load size {metrics['options']['load_size']}, "
               f"features from {metrics['feature_source']}"
               + (f" (checkpoint trained on {metrics['checkpoint_feature_source']} features)"
                  if metrics.get("checkpoint_feature_source") else ""))
    for line in headline_lines(metrics) + pck_lines(metrics):
        typer.echo("  " + line)
    for note in metrics["notes"]:
        typer.echo(f"  note: {note}")
    if metrics["descriptors"]:
        d = metrics["descriptors"]
        typer.echo(f"  descriptors: {d['computed']} computed, {d['reused']} reused from the cache")
    typer.echo(f"  {result.seconds:.1f} s -> {result.out}/ (report.md, metrics.json, predictions.jsonl, plots)")
