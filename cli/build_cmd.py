"""`dhf-cache build` and `dhf-cache info`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhf_cache.cli.app import app, before_compute, log, print_json, report_errors, require_build_extra
from dhf_cache.config import (DEFAULT_STEPS, SD15_MODEL_ID, BuildOptions, CodecSpec, GenerationSpec,
                              Preprocessing, StorageSpec)
from dhf_cache.cache.disk_space import human_bytes
from dhf_cache.errors import UsageError, invalid_values

BUILD_EPILOG = """
**Examples**

Build SD 1.5 features for SPair-71k's test images on a GPU (the paper's setting):

    dhf-cache build --dataset spair:/data/SPair-71k --split test --cache spair.zarr --batch-size 8

All of SPair-71k with the GPU speed levers (stored values unchanged within fp16 rounding; which of them
pay on which card: docs/benchmarks.md, GPU section):

    dhf-cache build --dataset spair:/data/SPair-71k --cache spair.zarr --batch-size 16 --channels-last --compile reduce-overhead

Offline, on the embedded sample data with the tiny model (CPU, seconds):

    dhf-cache tiny-model tiny && dhf-cache sample-data sample
    dhf-cache build --dataset spair:sample --cache demo.zarr --model tiny --load-size 64 --image-size 64

Smaller caches: 8-bit codes per feature map (~2.1x smaller than fp16 for SD 1.5; error <= 1/510
of each map's range), or lossy bit rounding to 7 mantissa bits (relative error <= 2^-8):

    dhf-cache build --dataset spair:/data/SPair-71k --cache spair-q8.zarr --codec quant8
    dhf-cache build --dataset spair:/data/SPair-71k --cache spair-br7.zarr --codec bitround --keepbits 7

Feature sources (--family, detected from the model's files; --source names it in the cache):

    sd      SD 1.x / 2.x UNets (epsilon or v-prediction): resnets x saved inversion steps
    sdxl    SDXL base UNets: the same, with SDXL's text encoders, pooled embeds and time ids
    dinov2  facebook/dinov2-* (with or without registers): patch tokens of chosen blocks, T = 1

A second feature source over the same images, beside the SD maps (train fuses them):

    dhf-cache build --dataset spair:/data/SPair-71k --cache spair.zarr --model facebook/dinov2-base --image-size 448 --load-size 448

The one-step variant (a single UNet call at t = -1):

    dhf-cache build --dataset folder:photos --cache onestep.zarr --steps 1 --save-steps 0

Generation mode: images made from prompts (DDIM generation with guidance), their features
captured on the way and stored with the images, prompts and seeds:

    dhf-cache build --generate prompts.txt --cache synth.zarr --images-per-prompt 4 --batch-size 4
    dhf-cache export-images synth.zarr synth-images/

Many machines: a dask cluster (the client coordinates and shows cluster-wide progress), local
worker processes, or independent shards (e.g. a SLURM job array; see docs/cluster.md):

    dhf-cache build --dataset spair:/data/SPair-71k --cache /shared/spair.zarr --scheduler tcp://head:8786
    dhf-cache build --dataset spair:/data/SPair-71k --cache spair.zarr --scheduler local:2
    dhf-cache build --dataset spair:/data/SPair-71k --cache /shared/spair.zarr --shard $SLURM_ARRAY_TASK_ID/8

Rerunning the same command continues where a killed or failed build stopped.
"""


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated integers such as 49,45,40") from None


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N such as 0/4 (I from 0 to N-1)") from None
    return i, n


def _read_prompts(path: Path) -> tuple[str, ...]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--generate {path}: cannot read the prompts file ({exc})") from None
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise UsageError(f"--generate {path}: no prompts in it (one prompt a line)")
    return prompts


# the config models' defaults, shown in --help and used: one source for METHOD.md's numbers
_PRE, _GEN, _CODEC, _OPTS = Preprocessing(), GenerationSpec(), CodecSpec(), BuildOptions()


@app.command(epilog=BUILD_EPILOG)
@report_errors
def build(
    cache: Annotated[str, typer.Option(help="Cache URL: a folder, file://, or any fsspec URL such as s3://bucket/c.zarr.")],
    dataset: Annotated[Optional[str], typer.Option(help="spair:PATH (SPair-71k layout), folder:PATH (all images below PATH), pairs:FILE.json, or a benchmark: pfpascal:, pfwillow:, ap10k:, cub:PATH[?pairs=N&seed=S], spairu:, dhf: (docs/datasets.md).")] = None,
    generate: Annotated[Optional[Path], typer.Option(help="Generation mode: a text file of prompts, one a line (instead of --dataset).")] = None,
    images_per_prompt: Annotated[int, typer.Option(min=1, help="Generation mode: images per prompt (seeds derive from prompt, variant and --seed).")] = 1,
    guidance: Annotated[float, typer.Option(min=1.0, help="Generation mode: classifier-free guidance scale.")] = _GEN.guidance,
    negative_prompt: Annotated[str, typer.Option(help="Generation mode: the negative prompt (the unconditional branch).")] = _GEN.negative_prompt,
    model: Annotated[str, typer.Option(help="Hub id (looked up in the local HF cache first) or a local model folder: an SD 1.x/2.x or SDXL pipeline, or DINOv2.")] = SD15_MODEL_ID,
    family: Annotated[str, typer.Option(help="The model's family: auto (from its files or name), sd, sdxl, dinov2.")] = "auto",
    source: Annotated[Optional[str], typer.Option(help="Name of this feature source in the cache (default: the family); a cache holds several, e.g. sd and dinov2 maps of the same images.")] = None,
    split: Annotated[Optional[str], typer.Option(help="SPair split whose pairs' images to build (trn, val, test); all when omitted.")] = None,
    load_size: Annotated[int, typer.Option(help="Images are first resized to LOAD_SIZE x LOAD_SIZE (PIL bilinear): the paper's 64/224/512.")] = _PRE.load_size,
    image_size: Annotated[int, typer.Option(help="Model input size the loaded image is then upsampled to (512 for SD).")] = _PRE.image_size,
    fit: Annotated[str, typer.Option(help="How an image becomes the LOAD_SIZE square: stretch (the paper) or pad (aspect kept, centred on black, as SD+DINO and GeoAware-SC); part of the cache's spec.")] = _PRE.fit,
    steps: Annotated[int, typer.Option(help="DDIM inversion steps.")] = DEFAULT_STEPS,
    save_steps: Annotated[Optional[str], typer.Option(help="Step indices to store, clean first (S-1 = cleanest). Default for 50 steps: 49,45,40,...,5,0.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Default: the family's (SD, SDXL: up, the 12 up-block resnets; DINOv2: last, the final layernorm). SD, SDXL: up, down, mid, all, or module names. DINOv2: last, all, or encoder.layer.<i>,layernorm.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images that share each UNet call.")] = _OPTS.batch_size,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N, mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto (float16 on CUDA, float32 otherwise), float32, float16, bfloat16.")] = "auto",
    channels_last: Annotated[bool, typer.Option(help="Speed lever: the network in channels-last memory format (faster convolutions on recent GPUs); stored values stay within fp16 rounding.")] = _OPTS.channels_last,
    attention: Annotated[str, typer.Option(help="Speed lever: the attention kernel, auto (torch picks per call), flash, efficient, cudnn (CUDA only) or math.")] = _OPTS.attention,
    compile: Annotated[str, typer.Option(help="Speed lever: torch.compile the network: off, default, reduce-overhead (adds CUDA graphs; CUDA only) or max-autotune. The first batch compiles (minutes); a short last batch is padded to --batch-size.")] = _OPTS.compile,
    seed: Annotated[int, typer.Option(help="Seed of the sampled VAE latents (each image's generator derives from seed and image id).")] = _PRE.seed,
    codec: Annotated[str, typer.Option(help="zstd (lossless, default); bitround (lossy: keep --keepbits mantissa bits, then zstd); quant8 (lossy: 8-bit codes per map, then zstd; ~2x smaller).")] = _CODEC.name,
    keepbits: Annotated[Optional[int], typer.Option(min=1, max=9, help="Mantissa bits kept by --codec bitround (fp16 has 10).")] = None,
    zstd_level: Annotated[int, typer.Option(min=1, max=22, help="zstd compression level of stored chunks.")] = _CODEC.level,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Build only the first N images (by id).")] = None,
    shard: Annotated[Optional[str], typer.Option(help="I/N: build the I-th (0-based) of N disjoint shards, e.g. a SLURM array's $SLURM_ARRAY_TASK_ID/N.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Build on dask.distributed: a scheduler address (tcp://host:8786) or local:N for N local worker processes (on a multi-GPU machine with --device cuda or auto: one GPU each, round robin).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads per process (CPU results depend on it at the last bit; clusters default to 1).")] = None,
    prepare_only: Annotated[bool, typer.Option(help="Create or check the cache and exit (run once before shards on object stores).")] = False,
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse images with more pixels (decompression-bomb guard).")] = _OPTS.max_pixels,
    storage_options: Annotated[Optional[str], typer.Option(help="JSON object of fsspec storage options for remote caches.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Invert every image once (or generate images from prompts) and store all its layer x
    timestep feature maps in a Zarr cache."""
    before_compute()
    require_build_extra("build")
    from dhf_cache.config import GenerationSpec
    from dhf_cache.datasets import open_dataset
    from dhf_cache.pipelines.build import BuildRequest, run_build
    from dhf_cache.cache.storage import parse_storage_options

    if (dataset is None) == (generate is None):
        raise UsageError("give exactly one of --dataset D (real images) or --generate PROMPTS.txt (generation)")
    prompts = _read_prompts(generate) if generate is not None else None
    if prompts is not None:
        load_size = image_size  # generated images are made at the model's input size

    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise UsageError(f"--dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    try:
        preprocessing = Preprocessing(load_size=load_size, image_size=image_size, seed=seed, fit=fit)
    except ValueError as exc:
        raise UsageError(invalid_values(exc)) from None
    try:
        codec_spec = CodecSpec(name=codec, level=zstd_level, keepbits=keepbits)
    except ValueError as exc:
        raise UsageError(f"--codec {codec} --keepbits {keepbits}: {invalid_values(exc)}") from None
    request = BuildRequest(
        dataset=open_dataset(dataset) if dataset is not None else None,
        cache_url=cache,
        model=model,
        split=split,
        prompts=prompts,
        images_per_prompt=images_per_prompt,
        generation=GenerationSpec(guidance=guidance, negative_prompt=negative_prompt) if prompts is not None else None,
        steps=steps,
        save_steps=_int_list(save_steps, "--save-steps"),
        layers=layers,
        preprocessing=preprocessing,
        dtype=dtype,
        storage=StorageSpec(codec=codec_spec),
        storage_options=parse_storage_options(storage_options),
        family=family,
        source=source,
    )
    if shard is not None and scheduler is not None:
        raise UsageError("--shard and --scheduler are two ways to split a build; use one")
    try:
        options = BuildOptions(batch_size=batch_size, device=device, max_pixels=max_pixels, limit=limit,
                               progress=progress, shard=_parse_shard(shard), threads=threads,
                               prepare_only=prepare_only, channels_last=channels_last, attention=attention,
                               compile=compile)
    except ValueError as exc:
        raise UsageError(invalid_values(exc)) from None
    if scheduler is not None:
        from dhf_cache.pipelines.distributed import run_distributed_build

        result = run_distributed_build(request, options, scheduler, log=log)
    else:
        result = run_build(request, options, log=log)
    summary = {
        "cache": result.url,
        "n_images": result.n_images,
        "n_skipped": result.n_skipped,
        "n_built": result.n_built,
        "n_failed": len(result.failures),
        "failures": [{"id": i, "error": e} for i, e in result.failures],
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.n_built / result.seconds, 4) if result.seconds else None,
        "interrupted": result.interrupted,
    }
    if json_output:
        print_json(summary)
    else:
        typer.echo(
            f"built {result.n_built} image(s), skipped {result.n_skipped} already done, "
            f"{len(result.failures)} failed, in {result.seconds:.1f} s "
            f"({summary['images_per_second'] or 0:.3g} img/s) -> {result.url}"
        )
        for image_id, error in result.failures:
            typer.secho(f"  FAILED {image_id}: {error}", fg=typer.colors.RED, err=True)
        if result.failures:
            typer.echo("Fix or remove the failed files and rerun the same command; finished images are kept.", err=True)
    if result.interrupted:
        raise typer.Exit(130)
    if result.failures:
        raise typer.Exit(1)


INFO_EPILOG = """
**Examples**

    dhf-cache info spair.zarr
    dhf-cache info s3://lab/caches/spair.zarr --storage-options '{"endpoint_url": "http://minio:9000"}' --json
"""


@app.command(epilog=INFO_EPILOG)
@report_errors
def info(
    url: Annotated[str, typer.Argument(help="Cache URL.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
    storage_options: Annotated[Optional[str], typer.Option(help="JSON object of fsspec storage options.")] = None,
) -> None:
    """Describe a cache: spec, fingerprint, layers, timesteps, images done, failures, bytes."""
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.cache.storage import parse_storage_options

    from dhf_cache.cache.descriptor_store import list_descriptor_sets
    from dhf_cache.cache.storage import stored_bytes

    sources = FeatureCache.open_all(url, parse_storage_options(storage_options))
    if not sources:
        typer.echo(f"cache          {url}  (format 2): no feature source yet; `dhf-cache build --cache {url}` adds one")
        return
    infos = []
    for cache in sources.values():
        data = cache.info()
        data["descriptor_sets"] = [item.as_dict() for item in list_descriptor_sets(cache)]
        infos.append(data)
    first = next(iter(sources.values()))
    # the top level describes the first source (as for a one-source cache) and the whole cache's bytes
    whole = {**infos[0], "bytes": stored_bytes(first.group.store, timeout=first.timeout),
             "sources": infos}
    if json_output:
        print_json(whole)
        return
    echo = typer.echo
    fmt = first.format_version
    echo(f"cache          {url}  (format {fmt}{', read as one source; `dhf-cache migrate` upgrades it' if fmt == 1 else ''}), "
         f"{len(infos)} source(s): {', '.join(sources)}; {human_bytes(whole['bytes'])} on disk")
    for data in infos:
        _echo_source(data)


def _echo_source(data: dict) -> None:
    """One source's description, as `info` prints it."""
    from types import SimpleNamespace

    from dhf_cache.cli.tools_cmd import descriptor_set_line

    echo = typer.echo
    spec = data["spec"]
    space, pre = spec["feature_space"], spec["preprocessing"]
    fp = data["fingerprint"]
    model = space["model"]
    echo(f"source {data['source']}  ({data['provenance'].get('created_by', '?')}, {data['provenance'].get('created_at', '?')})")
    echo(f"fingerprint    feature_space {fp['feature_space'][:16]}  preprocessing {fp['preprocessing'][:16]}  spec {fp['spec'][:16]}")
    if space.get("kind") == "dinov2":
        echo(f"model          {model['model_class']} weights {model['weights_sha256'][:16]}, patch {model['patch_size']}, "
             f"{model['num_register_tokens']} register tokens  (loaded from {data['provenance'].get('model_source', '?')})")
        echo(f"features       {space['tokens']} tokens at input {space['image_size']}, {space['normalization']} "
             f"normalisation, stored {space['storage_dtype']}; no time axis (T = 1)")
        echo(f"preprocessing  load {pre['load_size']} -> input {pre['image_size']}, {pre['resampling']}, compute {spec['compute']['dtype']}")
    else:
        family = "SDXL " if space.get("kind") == "sdxl" else ""
        echo(f"model          {family}{model['unet_class']} unet {model['unet_sha256'][:16]}  (loaded from {data['provenance'].get('model_source', '?')})")
        predicts = space["scheduler"].get("prediction_type") or "epsilon"
        echo(f"features       {space['source']} DDIM, {space['steps']} steps, UNet predicts {predicts}, prompt {space['prompt']!r}, "
             f"capture {space['capture']}, stored {space['storage_dtype']}")
        if space.get("generation"):
            gen = space["generation"]
            echo(f"generation     guidance {gen['guidance']}, negative prompt {gen['negative_prompt']!r}; images, "
                 "prompts and seeds stored (`dhf-cache export-images`)")
        echo(f"saved steps    {', '.join(map(str, data['save_steps']))}  (clean first)")
        echo(f"timesteps      {', '.join(map(str, data['timesteps']))}  (UNet t of each stored step)")
        echo(f"preprocessing  load {pre['load_size']} -> input {pre['image_size']}, {pre['resampling']}, {pre['latent']} latent, seed {pre['seed']}, compute {spec['compute']['dtype']}")
    left = data["n_images"] - data["n_done"]
    echo(f"images         {data['n_done']} done / {data['n_images']}, {len(data['failures'])} failed"
         + (f"; the other {left} need about {human_bytes(data['bytes_to_finish_estimate'])} more" if left else ""))
    echo(f"layers         {len(data['layers'])}, {sum(l['channels'] for l in data['layers'])} channels in all")
    for layer in data["layers"]:
        echo(f"  {layer['name']:<28} {layer['channels']:>5} x {layer['height']:>3} x {layer['width']:<3}")
    codec = spec["storage"]["codec"]
    ratio = data["compression_ratio"]
    echo(
        f"storage        {human_bytes(data['bytes'])} on disk, features {human_bytes(data['feature_bytes'])}; "
        f"native fp16 {human_bytes(data['feature_bytes_per_image_native_fp16'])}/image; "
        + ("" if codec["name"] == "zstd" else f"{codec['name']}"
           + (f" keepbits {codec['keepbits']}" if codec.get("keepbits") else "") + " + ")
        + f"zstd level {codec['level']} + {codec['checksum']}"
        + (f", compression ratio {ratio:.2f}x" if ratio else "")
    )
    sets = data["descriptor_sets"]
    if sets:
        echo(f"descriptors    {len(sets)} set(s), {human_bytes(sum(item['bytes'] for item in sets))} "
             "(eval's maps per checkpoint; `dhf-cache prune` removes them)")
        for item in sets:
            echo("  " + descriptor_set_line(SimpleNamespace(**item)))
    for failure in data["failures"]:
        typer.secho(f"  FAILED {failure['id']}: {failure['error']}", fg=typer.colors.RED)


@app.command("export-images", epilog="**Example**\n\n    dhf-cache export-images synth.zarr synth-images/")
@report_errors
def export_images(
    url: Annotated[str, typer.Argument(help="A cache built with --generate.")],
    directory: Annotated[Path, typer.Argument(help="Folder for the PNG files and prompts.jsonl.")],
    storage_options: Annotated[Optional[str], typer.Option(help="JSON object of fsspec storage options.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Write a generation cache's images as PNGs named by image id (with prompts.jsonl).

    Each image is written as `<id>` inside DIRECTORY. Ids must be relative paths ending in .png
    without empty, '.' or '..' parts (as `build --generate` names them); a cache holding another
    id is refused before anything is written."""
    from dhf_cache.pipelines.export import export_images as run_export
    from dhf_cache.cache.storage import parse_storage_options

    run_export(url, directory, parse_storage_options(storage_options), progress, log=log)


VERIFY_EPILOG = """
**Examples**

    dhf-cache verify spair.zarr
    dhf-cache verify spair.zarr --repair && dhf-cache build --dataset spair:/data/SPair-71k --cache spair.zarr
"""


@app.command(epilog=VERIFY_EPILOG)
@report_errors
def verify(
    url: Annotated[str, typer.Argument(help="Cache URL.")],
    repair: Annotated[bool, typer.Option(help="Clear the done flag of every bad image so the next build redoes them.")] = False,
    storage_options: Annotated[Optional[str], typer.Option(help="JSON object of fsspec storage options.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Read every chunk of every done image: checksums, shapes, finiteness, missing chunks."""
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.cache.storage import parse_storage_options
    from dhf_cache.cache.verify import verify_cache

    sources = FeatureCache.open_all(url, parse_storage_options(storage_options), mode="r+" if repair else "r")
    reports = {name: verify_cache(cache, repair=repair, progress=progress, log=log) for name, cache in sources.items()}
    several = len(reports) > 1
    if json_output:
        # the top level sums every source (one-source caches: that source); "sources" has each report
        per = {name: {"n_images": r.n_images, "n_done": r.n_done, "n_chunks": r.n_chunks, "problems": r.problems,
                      "repaired": r.repaired, "ok": r.ok, "stray_files": r.stray_files} for name, r in reports.items()}
        print_json({"n_images": sum(r["n_images"] for r in per.values()), "n_done": sum(r["n_done"] for r in per.values()),
                    "n_chunks": sum(r["n_chunks"] for r in per.values()),
                    "problems": {(f"{n}:{i}" if several else i): p for n, r in per.items() for i, p in r["problems"].items()},
                    "repaired": [(f"{n}:{i}" if several else i) for n, r in per.items() for i in r["repaired"]],
                    "ok": all(r["ok"] for r in per.values()),
                    "stray_files": sorted({f for r in per.values() for f in r["stray_files"]}), "sources": per})
    else:
        for name, report in reports.items():
            where = f"source {name}: " if several else ""
            typer.echo(f"{where}verified {report.n_done} done images of {report.n_images} ({report.n_chunks} chunks): "
                       + ("all good" if report.ok else f"{len(report.problems)} bad"))
            for image_id, problems in report.problems.items():
                typer.secho(f"  BAD {image_id}: {'; '.join(problems)}", fg=typer.colors.RED)
        stray = sorted({f for r in reports.values() for f in r.stray_files})
        if stray and not repair:
            typer.echo(f"{len(stray)} temp file(s) left by killed writers (harmless; --repair deletes them)")
        if any(r.problems for r in reports.values()) and not repair:
            typer.echo("Run with --repair to mark them not done, then rerun the build to recompute exactly those.")
    if not all(r.ok for r in reports.values()) and not repair:
        raise typer.Exit(1)
