"""`dhf-cache demo`: the whole tool end to end, offline, on the embedded sample data.

With no `--model` it uses the tiny random-weight pipeline at 64 px (CPU, about a minute);
with `--model` it runs the same steps on a real backbone at the paper's 512 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dhf_cache.config import BuildOptions, Preprocessing
from dhf_cache.datasets import open_dataset
from dhf_cache.pipelines.build import BuildRequest, BuildResult, run_build


@dataclass
class DemoPaths:
    workdir: Path

    @property
    def model(self) -> Path:
        return self.workdir / "tiny-model"

    @property
    def data(self) -> Path:
        return self.workdir / "sample-data"

    @property
    def cache(self) -> Path:
        return self.workdir / "features.zarr"


def prepare_inputs(paths: DemoPaths, model: str | None, log: Callable[[str], None]) -> str:
    """Write the tiny model and the sample data unless they are already there."""
    from dhf_cache.sample_data import write_sample_data
    from dhf_cache.tiny_model import write_tiny_model

    if model is None:
        if not (paths.model / "model_index.json").is_file():
            log(f"writing the tiny SD-shaped model to {paths.model}")
            write_tiny_model(paths.model, seed=0)
        model = str(paths.model)
    if not (paths.data / "Layout").is_dir():
        log(f"writing the sample data set (SPair-71k layout) to {paths.data}")
        write_sample_data(paths.data, seed=0)
    return model


def run_demo_build(paths: DemoPaths, model: str | None, device: str, log: Callable[[str], None],
                   progress: bool = True) -> BuildResult:
    model_source = prepare_inputs(paths, model, log)
    size = 64 if model is None else 512
    request = BuildRequest(
        dataset=open_dataset(f"spair:{paths.data}"),
        cache_url=str(paths.cache),
        model=model_source,
        preprocessing=Preprocessing(load_size=size, image_size=size),
    )
    return run_build(request, BuildOptions(batch_size=4, device=device, progress=progress), log=log)
