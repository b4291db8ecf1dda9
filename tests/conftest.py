"""Shared fixtures: the tiny SD-shaped model, a miniature sample data set, CLI runners.

Everything is offline and seeded; session-scoped fixtures are read-only (tests that change
weights or files make their own copies).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP's wait policy is left as the user's (or CI's) environment has it: the CLI's compute
# commands choose theirs from the CPU's load (dhf_cache/openmp.py), and this process keeps libgomp's.

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from dhf_cache.sources.sd.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    """The tiny model loaded on the CPU in float32 (do not modify: shared by tests)."""
    from dhf_cache.sources.sd.backbone import load_backbone

    return load_backbone(str(tiny_model_dir)).to("cpu")


@pytest.fixture(scope="session")
def mini_spair(tmp_path_factory) -> Path:
    """8 images (2 photos x 4 views, trn and test) in the SPair-71k layout, 64 px high."""
    from dhf_cache.datasets.sample_data import PHOTOS, write_sample_data

    root = tmp_path_factory.mktemp("data") / "mini-spair"
    write_sample_data(root, seed=0, size=64, split_views={"trn": 2, "test": 2}, photos=PHOTOS[:2])
    return root


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """16 images (2 photos x 8 views: 4 trn, 2 val, 2 test) for training tests, 64 px high."""
    from dhf_cache.datasets.sample_data import PHOTOS, write_sample_data

    root = tmp_path_factory.mktemp("data") / "train-spair"
    write_sample_data(root, seed=1, size=64, split_views={"trn": 4, "val": 2, "test": 2}, photos=PHOTOS[:2])
    return root


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, train_data, tiny_model_dir) -> str:
    """`train_data` built with the tiny model (10 steps, 3 saved); shared, read-only."""
    from dhf_cache.config import BuildOptions, Preprocessing
    from dhf_cache.datasets import open_dataset
    from dhf_cache.pipelines.build import BuildRequest, run_build

    url = str(tmp_path_factory.mktemp("caches") / "train.zarr")
    request = BuildRequest(dataset=open_dataset(f"spair:{train_data}"), cache_url=url, model=str(tiny_model_dir),
                           steps=10, save_steps=(9, 5, 0), preprocessing=Preprocessing(load_size=64, image_size=64))
    result = run_build(request, BuildOptions(batch_size=4, device="cpu", progress=False), log=lambda _: None)
    assert result.ok and result.n_built == 16
    return url


# Small but complete aggregator settings for CPU tests: P=32 (GroupNorm 8), a 16x16 grid.
SMALL_NET = ["--projection-dim", "32", "--norm-groups", "8", "--output-size", "16"]


@pytest.fixture
def copy_dir(tmp_path):
    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copytree(src, dst)
        return dst

    return _copy


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `dhf-cache ARGS` in a real subprocess (as a user would)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", "from dhf_cache.cli.main import main; main()", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT,
    )


def start_cli(*args: str, capture: bool = False, env: dict | None = None) -> subprocess.Popen:
    """`dhf-cache ARGS` as a background process (to kill or stop things around it)."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-c", "from dhf_cache.cli.main import main; main()", *map(str, args)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, stdout=out, stderr=out, text=True,
        # as started from a terminal: a test suite run in the background of a non-interactive shell
        # inherits SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
        preexec_fn=_sigint_as_in_a_terminal,
    )


def _sigint_as_in_a_terminal() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def invoke(*args):
    """`dhf-cache ARGS` in this process (typer's CliRunner): fast, for checks of one command."""
    from typer.testing import CliRunner

    from dhf_cache.cli import main as _register  # noqa: F401  (registers the commands)
    from dhf_cache.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def eval_args(cache, data, out, *extra) -> list:
    """`dhf-cache eval` on a spair: data set, small and on the CPU (add --checkpoint or --raw)."""
    return ["eval", "--cache", cache, "--dataset", f"spair:{data}", "--out", out, "--device", "cpu",
            "--no-progress", "--load-size", "64", *extra]


def done_flags(done_dir: Path) -> list[Path]:
    """The finished chunk files of a `done` array (zarr's LocalStore writes `*.partial` then renames)."""
    return [p for p in done_dir.iterdir() if not p.name.endswith(".partial")] if done_dir.is_dir() else []


def source_dir(cache: Path | str, name: str = "sd") -> Path:
    """The folder of a local cache's source `name`: sources/<name> in format 2, the cache's root
    in format 1 (its one source's arrays and attributes lie at the root)."""
    folder = Path(cache) / "sources" / name
    return folder if folder.is_dir() else Path(cache)


def wait_for_first_done(cache_dir: Path, timeout: float = 300, source: str = "sd") -> Path:
    """Block until a build has set its first done flag (chunk files under the source's done/c);
    returns that folder."""
    deadline = time.time() + timeout
    done = source_dir(cache_dir, source) / "done" / "c"
    while time.time() < deadline and not done_flags(done):
        time.sleep(0.02)
        done = source_dir(cache_dir, source) / "done" / "c"  # sources/<name> appears once the build creates it
    return done


def small_build_args(dataset: str, cache: Path, model: Path, *extra: str) -> list[str]:
    return [
        "build", "--dataset", dataset, "--cache", str(cache), "--model", str(model),
        "--load-size", "64", "--image-size", "64", "--steps", "10", "--save-steps", "9,5,0",
        "--device", "cpu", "--no-progress", *extra,
    ]


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory) -> Path:
    """The tiny seeded DINOv2 (patch 14, 4 layers), saved and loaded through from_pretrained."""
    from dhf_cache.sources.dinov2 import write_tiny_dinov2

    return write_tiny_dinov2(tmp_path_factory.mktemp("models") / "dino", seed=0)
