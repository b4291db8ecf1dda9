"""Every command answers --help with its options and at least one worked example; --version."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from dhf_cache import __version__
from dhf_cache.cli import main as _register  # noqa: F401  (registers the commands)
from dhf_cache.cli.app import app

COMMANDS = sorted(typer.main.get_command(app).commands)
runner = CliRunner()


def test_the_documented_commands_exist():
    assert {"build", "info", "verify", "train", "eval", "demo", "match", "tiny-model", "sample-data",
            "export-images", "import-checkpoint"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_options_and_an_example(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    assert f"Usage: dhf-cache {command}" in text and "--help" in text
    examples = [line for line in text.splitlines()
                if f"dhf-cache {command} " in line and "Usage:" not in line]
    assert examples, f"`dhf-cache {command} --help` shows no example"


def test_version_names_the_libraries_a_cache_depends_on():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"dhf-cache {__version__} (torch ")
    assert all(name in result.output for name in ("diffusers", "transformers", "zarr", "numcodecs", "Python"))


def test_no_arguments_shows_the_command_list():
    result = runner.invoke(app, [])
    assert "build" in result.output and "train" in result.output and "eval" in result.output


def test_the_command_list_follows_the_workflow_at_80_columns():
    from dhf_cache.cli.app import WORKFLOW

    text = runner.invoke(app, ["--help"], terminal_width=80).output
    listed = [line.split()[0] for line in text.split("Commands:")[1].splitlines() if line.startswith("  ") and line.split()]
    assert listed == [name for name in WORKFLOW if name in COMMANDS] and set(listed) == set(COMMANDS)
    assert max(len(line) for line in text.splitlines()) <= 80 and "..." not in text.split("Commands:")[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_well_at_80_columns(command):
    """Click's plain layout: every option name whole, conventional metavars (not typer's
    `<str>`), prose wrapped within 80 columns; only example command lines may be wider."""
    result = runner.invoke(app, [command, "--help"], terminal_width=80)
    text = result.output
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        for name in getattr(param, "opts", []):
            if name.startswith("--"):
                assert re.search(rf"(^|[\s,/]){re.escape(name)}(\s|=|,|$)", text, re.M), f"{name} not shown whole"
    options = [line for line in text.splitlines() if line.startswith("  -")]
    assert not any(re.search(r"--\S*(…|\.\.\.)|<str>|<int|<float|<path>", line) for line in options), options
    # only example blocks (indented 6+, kept as written) may be wider than 80 columns
    wide = [line for line in text.splitlines() if len(line) > 80 and not line.startswith("      ")]
    assert not wide, wide
