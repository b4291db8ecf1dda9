"""`dhf-cache train` and `dhf-cache import-checkpoint`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhf_cache.cli.app import app, before_compute, log, print_json, report_errors
from dhf_cache.config import TrainOptions
from dhf_cache.errors import UsageError, invalid_values

TRAIN_EPILOG = """
**Examples**

The paper's run (SPair-71k train split, 5,000 steps, validation every 1,000):

    dhf-cache train --cache spair.zarr --dataset spair:/data/SPair-71k --out runs/dhf

A layer x timestep ablation from the same cache, without re-extracting anything:

    dhf-cache train --cache spair.zarr --dataset spair:/data/SPair-71k --out runs/up3-clean \\
        --layers up_blocks.3.resnets.0,up_blocks.3.resnets.1,up_blocks.3.resnets.2 --timesteps -1,60

Continue a run stopped by Ctrl-C, a kill or a crash (the same command with --resume; the run's
options come from its config.json, and a later --steps trains further):

    dhf-cache train --cache spair.zarr --dataset spair:/data/SPair-71k --out runs/dhf --resume --steps 8000

On a GPU with bf16 (A100, H100 and later), the forward pass in bf16 autocast; weights, optimizer,
loss and validation stay fp32 (docs/benchmarks.md, GPU, for the step time it buys):

    dhf-cache train --cache spair.zarr --dataset spair:/data/SPair-71k --out runs/dhf-bf16 --precision bf16
"""


def _split_names(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _split_ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated UNet timesteps such as -1,60,160") from None


DEFAULTS = TrainOptions()  # the CLI shows and uses the config's defaults (METHOD.md's numbers)
# Options whose parameter names are TrainOptions fields: those typed go to run_train as `given`
# (with --resume, the others come from the run's config.json).
OPTION_FIELDS = tuple(name for name in TrainOptions.model_fields if name != "weight_decay")
LOADER_WAIT_HINT = 0.2  # above this share of the loop waiting for reads, the summary suggests a wider loader


@app.command(epilog=TRAIN_EPILOG)
@report_errors
def train(
    ctx: typer.Context,
    cache: Annotated[str, typer.Option(help="Cache URL built by `dhf-cache build`.")],
    dataset: Annotated[str, typer.Option(help="The keypoint pairs: spair:PATH, pairs:FILE.json, or a benchmark with a training split: pfpascal:, ap10k:, cub:, dhf: (docs/datasets.md).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, config.json, metrics.jsonl.")],
    split: Annotated[str, typer.Option(help="Training split.")] = DEFAULTS.split,
    val_split: Annotated[str, typer.Option(help="Validation split ('' for none).")] = DEFAULTS.val_split or "",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = DEFAULTS.steps,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (weight decay 0, no schedule).")] = DEFAULTS.lr,
    pairs_per_step: Annotated[int, typer.Option(min=1, help="Pairs per step (the paper: 1).")] = DEFAULTS.pairs_per_step,
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated cached layers to use (default: all).")] = None,
    timesteps: Annotated[Optional[str], typer.Option(help="Comma-separated UNet t of cached steps to use (default: all).")] = None,
    projection_dim: Annotated[int, typer.Option(min=4, help="Descriptor channels P.")] = DEFAULTS.projection_dim,
    output_size: Annotated[int, typer.Option(min=1, help="Descriptor grid side (maps are resized to it).")] = DEFAULTS.output_size,
    norm_groups: Annotated[int, typer.Option(min=1, help="GroupNorm groups; must divide projection_dim / 4.")] = DEFAULTS.norm_groups,
    val_every: Annotated[int, typer.Option(min=1, help="Validate and checkpoint every N steps.")] = DEFAULTS.val_every,
    val_pairs_per_category: Annotated[int, typer.Option(min=1, help="Validation pairs per category.")] = DEFAULTS.val_pairs_per_category,
    val_load_size: Annotated[int, typer.Option(min=8, help="Load size of validation PCK (as eval).")] = DEFAULTS.val_load_size,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the pair order.")] = DEFAULTS.seed,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="The step's forward pass: fp32 (the reference) or bf16 (autocast; weights, optimizer, loss and validation stay fp32; GPUs with bf16 and CPUs).")] = DEFAULTS.precision,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint, with the options of its config.json (options typed now must match them, except --steps, --lr, --val-every, --skip-missing, --precision).")] = False,
    skip_missing: Annotated[bool, typer.Option(help="Train on the pairs whose images are built; skip the rest.")] = False,
    storage_options: Annotated[Optional[str], typer.Option(help="JSON object of fsspec storage options.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Which feature source of the cache (see `dhf-cache info`); needed when it holds several.")] = None,
    loader_workers: Annotated[Optional[int], typer.Option(min=1, help="Threads that read and decode cached maps ahead of the step (default: half the CPU cores, 2 to 8). At SD 1.5 size one thread decodes ~0.3 s per image: raise it if the summary's loader wait is high.")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: one per usable core). On a CPU shared with other work, fewer threads can be faster.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Train the aggregation network from cached features (no diffusion model is loaded)."""
    before_compute()
    from dhf_cache.pipelines.train import TrainRequest, run_train
    from dhf_cache.cache.storage import parse_storage_options

    try:
        options = TrainOptions(
            split=split, val_split=val_split or None, steps=steps, lr=lr, pairs_per_step=pairs_per_step,
            layers=_split_names(layers), timesteps=_split_ints(timesteps, "--timesteps"),
            projection_dim=projection_dim, output_size=output_size, norm_groups=norm_groups, val_every=val_every, val_pairs_per_category=val_pairs_per_category,
            val_load_size=val_load_size, seed=seed, skip_missing=skip_missing, precision=precision,
        )
    except ValueError as exc:
        raise UsageError(invalid_values(exc)) from None
    request = TrainRequest(cache_url=cache, dataset=dataset, out=out, options=options, device=device, resume=resume,
                           storage_options=parse_storage_options(storage_options), source=source, progress=progress,
                           given=typed_options(ctx), loader_workers=loader_workers, threads=threads)
    result = run_train(request, log=log)
    steps_run = result.end_step - result.start_step
    loop = max(result.loop_seconds, 1e-9)
    summary = {
        "run": str(result.run), "steps": result.end_step, "steps_this_run": steps_run,
        "pairs": result.n_pairs, "skipped": result.skipped, "final_loss": result.final_loss,
        "best_val_pck": result.best_val, "best_step": result.best_step, "last_val_pck": result.last_val,
        "seconds": round(result.seconds, 2), "loop_seconds": round(result.loop_seconds, 3),
        "steps_per_second": round(steps_run / loop, 3),
        "loader_wait_fraction": round(result.loader_wait_seconds / loop, 4), "loader_workers": result.loader_workers,
        "peak_rss_mb": round(result.peak_rss_mb, 1),
    }
    if json_output:
        print_json(summary)
        return
    typer.echo(f"trained {steps_run} steps (now at step {result.end_step}) in {result.seconds:.1f} s "
               f"({summary['steps_per_second']} steps/s) -> {result.run}")
    if steps_run == 0:  # --resume of a finished run: nothing was done
        return
    if result.final_loss is not None:
        typer.echo(f"  final loss (mean of last 50 steps): {result.final_loss:.4f}")
    if result.best_val is not None:
        last = "-" if result.last_val is None else f"{result.last_val:.4f}"
        typer.echo(f"  val PCK@0.1 (bbox, per point): last {last}, best {result.best_val:.4f} at step {result.best_step}")
    typer.echo(f"  skipped pairs: {result.skipped}; loader wait {100 * summary['loader_wait_fraction']:.1f}% of the time; "
               f"peak RSS {result.peak_rss_mb:.0f} MB")
    if summary["loader_wait_fraction"] > LOADER_WAIT_HINT and steps_run >= 20:
        typer.echo(f"  the step waited for cached features {100 * summary['loader_wait_fraction']:.0f}% of the time: "
                   f"more reader threads may help (--loader-workers, {result.loader_workers} now), or a faster disk")


def typed_options(ctx: typer.Context) -> frozenset[str]:
    """The TrainOptions fields whose options were set on the command line (or from the
    environment), not left at their defaults."""
    return frozenset(name for name in OPTION_FIELDS
                     if (source := ctx.get_parameter_source(name)) is not None
                     and source.name not in ("DEFAULT", "DEFAULT_MAP"))


IMPORT_EPILOG = """
**Examples**

Evaluate the paper's own SD 1.5 aggregator on your SD 1.5 cache:

    dhf-cache import-checkpoint aggregation_network.pt --out runs/paper --cache spair.zarr
    dhf-cache eval --cache spair.zarr --dataset spair:/data/SPair-71k --checkpoint runs/paper --out eval/paper
"""


@app.command("import-checkpoint", epilog=IMPORT_EPILOG)
@report_errors
def import_checkpoint(
    file: Annotated[Path, typer.Argument(help="The authors' released .pt (state dict + config).")],
    out: Annotated[Path, typer.Option(help="Run folder to write (config.json + last/model.safetensors).")],
    cache: Annotated[Optional[str], typer.Option(help="Bind to this cache's feature space (checks layers and steps).")] = None,
    storage_options: Annotated[Optional[str], typer.Option(help="JSON object of fsspec storage options.")] = None,
) -> None:
    """Convert a released Diffusion Hyperfeatures checkpoint (loaded with weights_only=True)."""
    from dhf_cache.pipelines.import_checkpoint import import_reference_checkpoint
    from dhf_cache.cache.storage import parse_storage_options

    summary = import_reference_checkpoint(file, out, cache, parse_storage_options(storage_options))
    typer.echo(
        f"imported {file} -> {out}: {summary['layers']} layers x {summary['timesteps']} timesteps, "
        f"projection {summary['projection_dim']}, feature space "
        + (f"bound to {cache}" if cache else "unbound (checked by layer names, channels and timesteps at eval)")
    )
