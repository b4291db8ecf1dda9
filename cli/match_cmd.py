"""`dhf-cache match`: draw and print the correspondences of two images that are in no cache."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from dhf_cache.cli.app import app, before_compute, log, print_json, report_errors, require_build_extra
from dhf_cache.config import EVAL_LOAD_SIZE
from dhf_cache.errors import UsageError

MATCH_EPILOG = """
**Examples**

Match a 5 x 5 grid of points of one photo in another and draw the lines:

    dhf-cache match cat1.jpg cat2.jpg --checkpoint runs/dhf --out matches.png

Chosen points ([x, y] in the first image's pixels), as JSON for a script:

    dhf-cache match a.jpg b.jpg --checkpoint runs/dhf --points "120,80;200,150" --out m.png --json

A checkpoint imported without --cache records no model: name the backbone it was trained with:

    dhf-cache match a.jpg b.jpg --checkpoint runs/paper --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out m.png
"""

POINTS_HINT = 'expected "x,y;x,y;..." (pairs of numbers in image A\'s pixels), e.g. "120,80;200,150"'


def parse_points(text: str) -> tuple[tuple[float, float], ...]:
    """`"x,y;x,y"` -> ((x, y), ...); UsageError naming the part that is not a pair of numbers."""
    parts = [part.strip() for part in text.split(";")]
    if not any(parts):
        raise UsageError(f"--points {text!r}: no points; {POINTS_HINT}")
    points = []
    for part in parts:
        if not part:
            continue  # tolerate a trailing ';'
        coords = [c.strip() for c in part.split(",")]
        try:
            if len(coords) != 2:
                raise ValueError
            x, y = float(coords[0]), float(coords[1])
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError
        except ValueError:
            raise UsageError(f"--points {text!r}: {part!r} is not a point; {POINTS_HINT}") from None
        points.append((x, y))
    return tuple(points)


@app.command(epilog=MATCH_EPILOG)
@report_errors
def match(
    image_a: Annotated[Path, typer.Argument(help="Source image: the points are on this one.")],
    image_b: Annotated[Path, typer.Argument(help="Target image: where the points are looked for.")],
    checkpoint: Annotated[Path, typer.Option(help="Run folder of `dhf-cache train` or `import-checkpoint`.")],
    out: Annotated[Path, typer.Option(help="PNG to draw the two images and the matches into.")],
    model: Annotated[Optional[str], typer.Option(help="Backbone (hub id or folder); default: the one the checkpoint records (a relative folder is looked for under the run folder, then here). Must be the same weights.")] = None,
    points: Annotated[Optional[str], typer.Option(help='Points on A as "x,y;x,y;..." in A\'s pixels.')] = None,
    grid: Annotated[Optional[int], typer.Option(min=1, help="Without --points: an N x N grid of points over A (default 5).")] = None,
    load_size: Annotated[int, typer.Option(min=1, help="Matching resolution: descriptor maps are upsampled to it (eval's 224).")] = EVAL_LOAD_SIZE,
    refine: Annotated[str, typer.Option(help="none (hard argmax, as eval) or window-softargmax.")] = "none",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the point lists as JSON on stdout.")] = False,
) -> None:
    """Match points of image A in image B with features extracted on the fly (no cache needed)."""
    before_compute()
    require_build_extra("match")
    from dhf_cache.pipelines.match import MatchRequest, run_match

    if points is not None and grid is not None:
        raise UsageError("--points and --grid: give one of them (--grid makes points, --points names them)")
    request = MatchRequest(
        image_a=image_a, image_b=image_b, checkpoint=checkpoint, out=out, model=model,
        points=parse_points(points) if points is not None else None, grid=grid or 5,
        load_size=load_size, refine=refine, device=device,
    )
    result = run_match(request, log=log)
    if json_output:
        print_json(result.as_dict())
        return
    typer.echo(f"{len(result.points_a)} matches from {image_a} ({result.size_a[0]} x {result.size_a[1]}) "
               f"to {image_b} ({result.size_b[0]} x {result.size_b[1]}), drawn in {result.out} "
               f"({result.seconds:.1f} s)")
    for (xa, ya), (xb, yb) in zip(result.points_a, result.points_b):
        typer.echo(f"  A ({xa:7.1f}, {ya:7.1f})  ->  B ({xb:7.1f}, {yb:7.1f})")
