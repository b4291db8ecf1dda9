"""`dhf-cache compare`: the difference of two evaluations with a paired bootstrap interval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhf_cache.cli.app import app, log, print_json, report_errors
from dhf_cache.correspondence.conventions import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

COMPARE_EPILOG = """
**Examples**

The trained network against the best raw map, on the same pairs and protocol:

    dhf-cache compare eval/dhf eval/raw-best
    dhf-cache compare eval/dhf eval/raw-best --out compare/   # + compare.json, compare.md, compare.png

Both folders must come from `dhf-cache eval` on the same pairs with the same protocol and
matching (load size, where, refinement); anything else is refused, naming the difference.
"""


@app.command("compare", epilog=COMPARE_EPILOG)
@report_errors
def compare_command(
    eval_a: Annotated[Path, typer.Argument(help="An eval folder (metrics.json, predictions.jsonl).")],
    eval_b: Annotated[Path, typer.Argument(help="Another eval folder of the same pairs.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for compare.json, compare.md and compare.png.")] = None,
    bootstrap: Annotated[int, typer.Option(min=1, help="Bootstrap resamples over pairs.")] = BOOTSTRAP_RESAMPLES,
    seed: Annotated[int, typer.Option(help="Seed of the resamples.")] = BOOTSTRAP_SEED,
    json_output: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON on stdout.")] = False,
) -> None:
    """A - B under A's headline rule, overall and per category, with paired 95% bootstrap intervals."""
    from dhf_cache.pipelines.compare import run_compare
    from dhf_cache.reports.report import compare_lines

    result = run_compare(eval_a, eval_b, out, bootstrap, seed, log=log)
    if json_output:
        print_json(result)
        return
    for line in compare_lines(result):
        typer.echo(line)
