"""`dhf-cache tiny-model`, `sample-data` (offline stand-ins for weights and data) and `prune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhf_cache.cli.app import app, report_errors, require_build_extra
from dhf_cache.cache.disk_space import human_bytes
from dhf_cache.errors import UsageError


TINY_EPILOG = """
**Examples**

    dhf-cache tiny-model ./tiny --seed 0
    dhf-cache tiny-model ./tiny-dino --family dinov2
    dhf-cache tiny-model ./tiny-sdxl --family sdxl
"""


@app.command("tiny-model", epilog=TINY_EPILOG)
@report_errors
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write the model into.")],
    seed: Annotated[int, typer.Option(help="Weight seed: the same seed gives the same weights.")] = 0,
    family: Annotated[str, typer.Option(help="sd (an SD 1.5-shaped pipeline), dinov2, dinov2-registers or sdxl.")] = "sd",
) -> None:
    """Write an offline model with seeded random weights (loads with from_pretrained)."""
    require_build_extra("tiny-model")
    if family == "sd":
        from dhf_cache.sources.sd.tiny_model import write_tiny_model

        write_tiny_model(directory, seed)
    elif family in ("dinov2", "dinov2-registers"):
        from dhf_cache.sources.dinov2 import write_tiny_dinov2

        write_tiny_dinov2(directory, seed, registers=family == "dinov2-registers")
    elif family == "sdxl":
        from dhf_cache.sources.sdxl import write_tiny_sdxl

        write_tiny_sdxl(directory, seed)
    else:
        raise UsageError(f"--family {family!r}: use sd, dinov2, dinov2-registers or sdxl")
    typer.echo(f"wrote tiny {family} model (seed {seed}) to {directory}")


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
    from dhf_cache.datasets.sample_data import write_sample_data

    summary = write_sample_data(directory, seed=seed, size=size)
    pairs = ", ".join(f"{n} {s}" for s, n in summary.n_pairs.items())
    typer.echo(
        f"wrote {summary.n_images} images in {len(summary.categories)} categories "
        f"({', '.join(summary.categories)}), pairs: {pairs} -> {directory}"
    )


PRUNE_EPILOG = """
**Examples**

List the descriptor sets eval stored (one per checkpoint), then remove one or all of them:

    dhf-cache info spair.zarr
    dhf-cache prune spair.zarr --descriptors 3f9a2c1e --dry-run
    dhf-cache prune spair.zarr --all-descriptors

KEY is a set's key as `info` shows it, a unique start of it, or the checkpoint fingerprint
(metrics.json: fingerprints.checkpoint). Features are never touched; a later eval of that
checkpoint computes its descriptors again.
"""


def descriptor_set_line(item) -> str:
    """One line about a stored descriptor set (a `descriptor_store.DescriptorSet`), for info and prune."""
    state = f"{item.images_done}/{item.n_images} images" if item.complete else "incomplete (recreated by the next eval)"
    source = f", from {item.checkpoint}" if item.checkpoint else ""
    return f"descriptors/{item.key}  {state}, {human_bytes(item.bytes)}{source}"


@app.command("prune", epilog=PRUNE_EPILOG)
@report_errors
def prune(
    url: Annotated[str, typer.Argument(help="Cache URL.")],
    descriptors: Annotated[Optional[str], typer.Option(
        "--descriptors", metavar="KEY", help="Remove the descriptor set KEY (see `dhf-cache info`).")] = None,
    all_descriptors: Annotated[bool, typer.Option(
        "--all-descriptors", help="Remove every descriptor set.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    storage_options: Annotated[Optional[str], typer.Option(help="JSON object of fsspec storage options.")] = None,
) -> None:
    """Remove descriptor maps that eval stored in a cache (features stay)."""
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.cache.descriptor_store import find_descriptor_set, list_descriptor_sets, remove_descriptor_sets
    from dhf_cache.cache.storage import parse_storage_options

    if (descriptors is None) == (not all_descriptors):
        raise UsageError("give exactly one of --descriptors KEY or --all-descriptors")
    options = parse_storage_options(storage_options)
    # read-only first: a missing cache is refused without creating anything
    holders = {name: list_descriptor_sets(cache) for name, cache in FeatureCache.open_all(url, options).items()}
    sets = [item for found in holders.values() for item in found]
    chosen = sets if all_descriptors else [find_descriptor_set(sets, descriptors, url)]
    if not chosen:
        typer.echo(f"{url}: no descriptor sets stored; nothing to remove")
        return
    if not dry_run:
        writable = FeatureCache.open_all(url, options, mode="r+")
        for name, found in holders.items():  # each source keeps the sets of checkpoints over it
            mine = [item for item in chosen if item in found]
            if mine:
                remove_descriptor_sets(writable[name], mine)
    verb = "would remove" if dry_run else "removed"
    for item in chosen:
        typer.echo(f"{verb} {descriptor_set_line(item)}")
    typer.echo(f"{verb} {len(chosen)} descriptor sets, {human_bytes(sum(s.bytes for s in chosen))}")


MIGRATE_EPILOG = """
**Example**

    dhf-cache migrate spair.zarr && dhf-cache build --dataset spair:/data/SPair-71k --cache spair.zarr --model facebook/dinov2-base --image-size 448 --load-size 448
"""


@app.command("migrate", epilog=MIGRATE_EPILOG)
@report_errors
def migrate(url: Annotated[str, typer.Argument(help="A local format-1 cache.")]) -> None:
    """Upgrade a format-1 cache in place to format 2 (sources/<name>/), moving folders: no chunk is
    rewritten. Needed only to add a second feature source; every command reads format 1 as is.
    A killed migrate is finished by rerunning it."""
    from dhf_cache.cache.migrate import migrate as run_migrate

    typer.echo(run_migrate(url))
