"""Entry point of the `dhf-cache` console script."""

from __future__ import annotations

import os

from dhf_cache.cli import build_cmd, demo_cmd, eval_cmd, match_cmd, tools_cmd, train_cmd  # noqa: F401  (registers commands)
from dhf_cache.cli.app import app


def main() -> None:
    # OpenMP threads that spin while waiting made CPU runs 10-50x slower on a shared machine
    # (bench/README.md); torch reads this at import, which happens later, inside the commands.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
