"""The typer app and the error boundary: a DhfCacheError is printed as one message, no traceback."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import typer

from dhf_cache.errors import DhfCacheError
from dhf_cache.storage import storage_exceptions

app = typer.Typer(
    name="dhf-cache",
    help=(
        "Diffusion Hyperfeatures with a feature cache. Stage one (build) inverts each image once "
        "and stores every layer x timestep map in a Zarr cache; train and eval read the cache."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
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


