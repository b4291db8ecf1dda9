"""Entry point of the `dhf-cache` console script."""

from __future__ import annotations

import gc

from dhf_cache.cli import build_cmd, compare_cmd, demo_cmd, eval_cmd, match_cmd, tools_cmd, train_cmd  # noqa: F401  (registers commands)
from dhf_cache.cli import view_cmd  # noqa: F401  (registers `view`)
from dhf_cache.cli.app import app


def main() -> None:
    # torch is imported inside the commands, after each compute command has chosen how its
    # OpenMP threads wait (dhf_cache/openmp.py): nothing here may import it.
    try:
        app()
    finally:
        # The interpreter's last garbage collections walk every object torch and diffusers made
        # (about a second per command, docs/benchmarks.md). Every file and store is closed
        # by now and atexit handlers still run; only cyclic garbage is left to the OS.
        gc.freeze()


if __name__ == "__main__":
    main()
