"""`dhf-cache demo`: the whole tool end to end, offline, on the embedded sample data.

build (stage one) -> train (stage two) -> eval of the trained network and of the best single
raw map (stage three), then one table comparing them. With no `--model` it uses the tiny
random-weight pipeline at a small size so that it runs on a laptop CPU in a few minutes; with
`--model` the same steps run on a real backbone at the paper's 512 px and network size.
Every stage reuses what an earlier run left in the work folder (the cache, a finished run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dhf_cache.config import EVAL_LOAD_SIZE, BuildOptions, Preprocessing, TrainOptions
from dhf_cache.datasets import open_dataset
from dhf_cache.pipelines.build import BuildRequest, BuildResult, run_build
from dhf_cache.pipelines.evaluate import EvalRequest, EvalResult, run_eval
from dhf_cache.pipelines.train import TrainRequest, TrainResult, run_train


@dataclass(frozen=True)
class DemoSettings:
    image_size: int
    train: TrainOptions
    inversion_steps: int = 50
    eval_load_size: int = EVAL_LOAD_SIZE

    def quicker(self, image_size: int | None, inversion_steps: int | None, train_steps: int | None) -> DemoSettings:
        """The same demo with smaller settings (for a quick look, or the test suite)."""
        train = self.train
        if train_steps is not None:
            train = train.model_copy(update={"steps": train_steps, "val_every": max(1, min(train.val_every, train_steps))})
        return DemoSettings(image_size or self.image_size, train, inversion_steps or self.inversion_steps,
                            self.eval_load_size)


TINY = DemoSettings(
    image_size=64,
    train=TrainOptions(steps=300, val_every=100, projection_dim=64, output_size=32, norm_groups=16),
)
REAL = DemoSettings(image_size=512, train=TrainOptions(steps=1000, val_every=250))


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

    @property
    def run(self) -> Path:
        return self.workdir / "run"

    def eval_dir(self, name: str) -> Path:
        return self.workdir / "eval" / name


@dataclass
class DemoResult:
    build: BuildResult
    train: TrainResult
    trained: EvalResult
    raw: EvalResult
    tiny_model: bool = False  # the offline random-weight model (no --model)


def prepare_inputs(paths: DemoPaths, model: str | None, log: Callable[[str], None]) -> str:
    """Write the tiny model and the sample data unless they are already there."""
    from dhf_cache.datasets.sample_data import write_sample_data
    from dhf_cache.sources.sd.tiny_model import write_tiny_model

    if model is None:
        if not (paths.model / "model_index.json").is_file():
            log(f"writing the tiny SD-shaped model to {paths.model}")
            write_tiny_model(paths.model, seed=0)
        model = str(paths.model)
    if not (paths.data / "Layout").is_dir():
        log(f"writing the sample data set (SPair-71k layout) to {paths.data}")
        write_sample_data(paths.data, seed=0)
    return model


def run_demo(workdir: Path, model: str | None, device: str, log: Callable[[str], None],
             progress: bool = True, settings: DemoSettings | None = None) -> DemoResult:
    paths = DemoPaths(workdir)
    settings = settings or (TINY if model is None else REAL)
    model_source = prepare_inputs(paths, model, log)
    dataset = f"spair:{paths.data}"
    log("== stage one: build the feature cache")
    built = run_build(
        BuildRequest(dataset=open_dataset(dataset), cache_url=str(paths.cache), model=model_source,
                     steps=settings.inversion_steps,
                     preprocessing=Preprocessing(load_size=settings.image_size, image_size=settings.image_size)),
        BuildOptions(batch_size=4, device=device, progress=progress), log=log,
    )
    log("== stage two: train the aggregation network from the cache")
    # resume=True: a finished run is reused ("nothing to train"), an interrupted one continues
    trained_run = run_train(
        TrainRequest(cache_url=str(paths.cache), dataset=dataset, out=paths.run, options=settings.train,
                     device=device, resume=True, progress=progress), log=log,
    )
    log("== stage three: evaluate the trained network and the best raw map")
    common = dict(cache_url=str(paths.cache), dataset=dataset, load_size=settings.eval_load_size,
                  device=device, progress=progress)
    trained = run_eval(EvalRequest(out=paths.eval_dir("trained"), checkpoint=paths.run, **common), log=log)
    raw = run_eval(EvalRequest(out=paths.eval_dir("raw-best"), raw="best", **common), log=log)
    return DemoResult(built, trained_run, trained, raw, tiny_model=model is None)


def comparison_lines(result: DemoResult) -> list[str]:
    """The demo's verdict: trained aggregator vs the best single raw map, PCK@0.1 in percent."""
    best = result.raw.raw_table["best"]
    chosen_on = result.raw.raw_table.get("selected_on", {}).get("split", "val")
    rows = [("trained aggregator", result.trained.metrics),
            (f"one raw map, best on {chosen_on} ({best['layer']}@{best['timestep']})", result.raw.metrics)]
    m = result.trained.metrics
    width = max(44, *(len(name) for name, _ in rows))
    lines = [
        f"PCK@0.1 on the sample data's test pairs ({m['n_pairs']} pairs, {m['n_points']} points, "
        f"load size {m['options']['load_size']}):",
        f"  {'':<{width}} {'bbox/point':>10} {'bbox/image':>10} {'bbox/cat':>9} {'img/point':>10}",
    ]
    for name, metrics in rows:
        b, i = metrics["pck"]["bbox@0.1"], metrics["pck"]["img@0.1"]
        cells = [b["per_point"], b["per_image"], b["per_category_mean"], i["per_point"]]
        lines.append(f"  {name:<{width}} " + " ".join(f"{100 * v:>10.1f}" if v is not None else f"{'–':>10}" for v in cells))
    for name, metrics in rows:
        head = metrics["headline"][0]
        if head.get("ci95"):
            lo, hi = head["ci95"]
            lines.append(f"  {name}: bbox/point {100 * head['value']:.1f}, 95% bootstrap interval over the "
                         f"{head['n_pairs']} pairs [{100 * lo:.1f}, {100 * hi:.1f}]")
    if result.tiny_model:
        lines += [
            "  Why the trained network need not win here: the tiny model's weights are random, so its maps hold",
            "  no learned semantics for the aggregator to combine, and a few hundred steps on a handful of photos",
            "  mostly fit those photos. The raw map was chosen on the val split, not on these test pairs. With a",
            "  real backbone (`dhf-cache demo --model stable-diffusion-v1-5/stable-diffusion-v1-5`) the trained",
            "  aggregator is the paper's method; `dhf-cache compare` tells a difference from the pairs' noise.",
        ]
    return lines

