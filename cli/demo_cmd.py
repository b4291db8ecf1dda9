"""`dhf-cache demo`: build (and, once stages two and three land, train and eval) offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhf_cache.cli.app import app, log, report_errors

DEMO_EPILOG = """
**Examples**

    dhf-cache demo                      # tiny model, offline, CPU
    dhf-cache demo --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda
"""


@app.command(epilog=DEMO_EPILOG)
@report_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the model, sample data and cache go (reused when present).")] = Path("demo-out"),
    model: Annotated[Optional[str], typer.Option(help="A real backbone (hub id or folder) instead of the tiny model.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run the tool end to end on the embedded sample data, offline."""
    from dhf_cache.cli.build_cmd import info as info_command
    from dhf_cache.pipelines.demo import DemoPaths, run_demo_build

    paths = DemoPaths(workdir)
    result = run_demo_build(paths, model, device, log, progress)
    log(f"build: {result.n_built} built, {result.n_skipped} already done, {len(result.failures)} failed")
    info_command(str(paths.cache), json_output=False, storage_options=None)
    if not result.ok:
        raise typer.Exit(1)
