"""Entry point of the `dhf-cache` console script."""

from __future__ import annotations

from dhf_cache.cli import build_cmd, demo_cmd, eval_cmd, match_cmd, tools_cmd, train_cmd  # noqa: F401  (registers commands)
from dhf_cache.cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
