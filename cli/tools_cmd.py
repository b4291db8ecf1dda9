"""`dhf-cache tiny-model` and `dhf-cache sample-data`: offline stand-ins for weights and data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dhf_cache.cli.app import app, report_errors


@app.command("tiny-model", epilog="**Example**\n\n    dhf-cache tiny-model ./tiny --seed 0")
@report_errors
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write the pipeline into.")],
    seed: Annotated[int, typer.Option(help="Weight seed: the same seed gives the same weights.")] = 0,
) -> None:
    """Write an offline SD-shaped pipeline with seeded random weights (loads with from_pretrained)."""
    from dhf_cache.tiny_model import write_tiny_model

    write_tiny_model(directory, seed)
    typer.echo(f"wrote tiny SD-shaped pipeline (seed {seed}) to {directory}")


@app.command(
    "sample-data",
    epilog="**Example**\n\n    dhf-cache sample-data ./sample && dhf-cache build --dataset spair:./sample ...",
)
@report_errors
def sample_data(
    directory: Annotated[Path, typer.Argument(help="Folder to write the data set into.")],
    seed: Annotated[int, typer.Option(help="Seed of the random warps and colour changes.")] = 0,
    size: Annotated[int, typer.Option(min=32, help="Height of each image in pixels.")] = 192,
) -> None:
    """Write a small SPair-71k-layout data set of warped real photos with exact keypoints."""
    from dhf_cache.sample_data import write_sample_data

    summary = write_sample_data(directory, seed=seed, size=size)
    pairs = ", ".join(f"{n} {s}" for s, n in summary.n_pairs.items())
    typer.echo(
        f"wrote {summary.n_images} images in {len(summary.categories)} categories "
        f"({', '.join(summary.categories)}), pairs: {pairs} -> {directory}"
    )
