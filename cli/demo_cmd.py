"""`dhf-cache demo`: build, train and eval end to end on the embedded sample data, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhf_cache.cli.app import app, before_compute, log, report_errors, require_build_extra

DEMO_EPILOG = """
**Examples**

    dhf-cache demo                      # tiny random-weight model, offline, a few minutes on a CPU
    dhf-cache demo --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --workdir demo-sd15
    dhf-cache demo --image-size 64 --inversion-steps 10 --train-steps 50 --workdir quick   # a quicker look

The work folder keeps the model, the sample data, the cache, the run and the eval outputs;
a second run reuses them.
"""


@app.command(epilog=DEMO_EPILOG)
@report_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the model, data, cache, run and evals go (reused when present).")] = Path("demo-out"),
    model: Annotated[Optional[str], typer.Option(help="A real backbone (hub id or folder) instead of the tiny model.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
    image_size: Annotated[Optional[int], typer.Option(min=8, help="Image size (default: 64 tiny, 512 real).")] = None,
    inversion_steps: Annotated[Optional[int], typer.Option(min=1, help="DDIM inversion steps (default 50).")] = None,
    train_steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps (default: 300 tiny, 1000 real).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Build, train and evaluate on the embedded sample data; print trained vs best raw PCK."""
    before_compute()
    require_build_extra("demo")
    from dhf_cache.pipelines.demo import REAL, TINY, comparison_lines, run_demo

    settings = (TINY if model is None else REAL).quicker(image_size, inversion_steps, train_steps)
    result = run_demo(workdir, model, device, log, progress, settings)
    typer.echo("")
    for line in comparison_lines(result):
        typer.echo(line)
    typer.echo(f"\nreports: {workdir}/eval/trained/report.md, {workdir}/eval/raw-best/report.md; "
               f"cache: `dhf-cache info {workdir}/features.zarr`")
    typer.echo(f"compare them: dhf-cache compare {workdir}/eval/trained {workdir}/eval/raw-best")
    typer.echo(f"see them (then open the printed address): dhf-cache view --cache {workdir}/features.zarr "
               f"--checkpoint {workdir}/run --eval {workdir}/eval/trained --eval {workdir}/eval/raw-best")
    if not result.build.ok:
        raise typer.Exit(1)
