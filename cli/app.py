"""The typer app and the error boundary: a DhfCacheError is printed as one message, no traceback."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import typer
from typer.core import TyperGroup

from dhf_cache.errors import DhfCacheError
from dhf_cache.cache.storage import storage_exceptions

# `dhf-cache --help` lists the commands in the order a user meets them, each in a line that fits
# 80 columns (a command's own --help gives its docstring in full).
WORKFLOW = {
    "demo": "build, train and eval the sample data, offline",
    "build": "stage one: invert images, store their maps",
    "info": "a cache's spec, images, bytes, descriptor sets",
    "verify": "read every chunk of every done image; --repair",
    "train": "stage two: train the aggregation network from a cache",
    "import-checkpoint": "the authors' released aggregator as a run folder",
    "eval": "stage three: PCK from cached descriptors or raw maps",
    "compare": "two evaluations' difference, paired bootstrap interval",
    "view": "browse matches and features in a local web page",
    "match": "match points between two images of your own",
    "export-images": "a generation cache's images as PNG files",
    "prune": "remove the descriptor sets eval stored in a cache",
    "migrate": "upgrade a format-1 cache in place to format 2",
    "tiny-model": "write an offline tiny SD, SDXL or DINOv2 model",
    "sample-data": "write the embedded SPair-layout sample data",
}


class DhfGroup(TyperGroup):
    """The command group, shaped for a plain 80-column terminal (click's help layout, not rich's
    tables, which cut long option names): commands in workflow order, options shown with
    conventional metavars (`--cache CACHE`, `--steps STEPS`), example blocks in epilogs kept as
    written while prose is re-wrapped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rank = {name: i for i, name in enumerate(WORKFLOW)}
        self.commands = dict(sorted(self.commands.items(), key=lambda item: rank.get(item[0], len(rank))))
        for name, command in self.commands.items():
            command.short_help = WORKFLOW.get(name, command.short_help)
            for param in command.params:
                if param.metavar is None and not getattr(param, "is_flag", False) and param.name:
                    param.metavar = param.name.upper()
            if command.epilog:
                command.epilog = plain_epilog(command.epilog)


def plain_epilog(text: str) -> str:
    """An epilog for click's plain help: `**Examples**` as a heading, each paragraph holding
    indented example lines marked `\b` (click then keeps its line breaks)."""
    paragraphs = text.strip("\n").replace("**", "").split("\n\n")
    out = []
    for paragraph in paragraphs:
        if any(line.startswith("    ") for line in paragraph.splitlines()):
            paragraph = "\b\n" + paragraph
        out.append(paragraph)
    return "\n\n".join(out)


app = typer.Typer(
    name="dhf-cache",
    cls=DhfGroup,
    help=(
        "Diffusion Hyperfeatures with a feature cache. Stage one (build) inverts each image once "
        "and stores every layer x timestep map in a Zarr cache; train and eval read the cache."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def versions() -> str:
    """dhf-cache's version and the libraries that decide what a cache holds (for bug reports)."""
    from importlib.metadata import PackageNotFoundError, version

    from dhf_cache import __version__

    parts = []
    for name in ("torch", "diffusers", "transformers", "zarr", "numcodecs"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} missing")
    return f"dhf-cache {__version__} ({', '.join(parts)}; Python {sys.version.split()[0]})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(versions())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the versions of dhf-cache and its key libraries, then exit."),
) -> None:
    pass  # the app's help text is Typer(help=...) above; this callback only adds --version


def report_errors(func: Callable) -> Callable:
    """Turn DhfCacheError (and Ctrl-C) into a message on stderr and a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return func(*args, **kwargs)
        except DhfCacheError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None
        except storage_exceptions() as exc:
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            typer.secho(
                f"error: storage or I/O failure ({type(exc).__name__}: {detail}). Finished work is kept; "
                "check the path, the server and --storage-options, then rerun the same command.",
                fg=typer.colors.RED, err=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def before_compute() -> None:
    """First call of every command that computes with torch, before anything imports it: how
    its OpenMP threads wait depends on whether other processes keep the CPU busy (openmp.py)."""
    from dhf_cache.openmp import settle_wait_policy

    settle_wait_policy(log)


def log(message: str) -> None:
    typer.echo(message, err=True)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")




BUILD_LIBRARIES = ("diffusers", "transformers")


def require_build_extra(command: str) -> None:
    """Stage one's model libraries come with `pip install 'dhf-cache[build]'`; a command that
    needs them says so in one line instead of an ImportError from deep inside."""
    import importlib.util

    from dhf_cache.errors import UsageError

    missing = [name for name in BUILD_LIBRARIES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"`dhf-cache {command}` runs models and needs {' and '.join(missing)}: "
                         "pip install 'dhf-cache[build]' (training and eval from a cache do not)")
