"""`dhf-cache view`: a local web app over a cache, its checkpoints and evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhf_cache.cli.app import app, before_compute, log, report_errors

VIEW_EPILOG = """
**Examples**

After `make demo`: the demo's cache, run and both evaluations, at http://127.0.0.1:8765/:

    dhf-cache view --cache demo-out/features.zarr --checkpoint demo-out/run --eval demo-out/eval/trained --eval demo-out/eval/raw-best

SPair-71k from a cache on object storage, with two checkpoints side by side, on another port:

    dhf-cache view --cache s3://bucket/spair.zarr --dataset spair:/data/SPair-71k --checkpoint runs/dhf --checkpoint runs/paper --eval eval/dhf --port 9000

The page lists the evaluation's pairs (sort and filter by category, PCK and SPair's difficulty
flags); a click on a source pixel shows the cosine similarity over the target for a checkpoint
or any cached layer x timestep map, and its argmax (the pixel `dhf-cache eval` would predict).
It also shows a checkpoint's mixing weights, a PCA of any map, and matches two uploaded photos
with the checkpoint's backbone. It only reads: nothing is written to the cache, runs or
evaluations. It listens on 127.0.0.1 unless --host says otherwise; stop it with Ctrl-C.
"""


@app.command("view", epilog=VIEW_EPILOG)
@report_errors
def view(
    cache: Annotated[str, typer.Option(help="Cache URL (a folder or any fsspec URL) built by `dhf-cache build`.")],
    dataset: Annotated[Optional[str], typer.Option(help="Where the images are: spair:PATH, pairs:FILE.json or folder:PATH (default: the data set each --eval names).")] = None,
    checkpoint: Annotated[Optional[list[Path]], typer.Option(help="Run folder of `dhf-cache train`; repeat for several.")] = None,
    eval_dir: Annotated[Optional[list[Path]], typer.Option("--eval", help="Folder `dhf-cache eval --out` wrote; repeat for several.")] = None,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: a free one).")] = 8765,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but 127.0.0.1 lets other machines in.")] = "127.0.0.1",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps: for descriptors not stored and for uploads.")] = "auto",
    storage_options: Annotated[Optional[str], typer.Option(help="JSON object of fsspec storage options.")] = None,
) -> None:
    """Browse an evaluation's pairs and match pixels in a local web page."""
    before_compute()
    from dhf_cache.cache.storage import parse_storage_options
    from dhf_cache.viewer.data import ViewerData, ViewerInputs
    from dhf_cache.viewer.server import ViewerServer, is_loopback

    inputs = ViewerInputs(cache=cache, dataset=dataset, checkpoints=tuple(checkpoint or ()), evals=tuple(eval_dir or ()),
                          storage_options=parse_storage_options(storage_options), device=device)
    if not is_loopback(host):
        log(f"warning: --host {host}: the viewer will answer anyone who can reach this machine on port {port}; "
            "it has no login. Use it on trusted networks only")
    log(f"opening {cache}" + (f", {len(inputs.checkpoints)} checkpoints" if inputs.checkpoints else "")
        + (f", {len(inputs.evals)} evaluations" if inputs.evals else ""))
    data = ViewerData(inputs, log=log)
    server = ViewerServer(data, host=host, port=port, log=log)
    url = server.start()
    typer.echo(f"dhf-cache view: open {url} (Ctrl-C stops it)")
    try:
        server.wait()
    except KeyboardInterrupt:
        log("stopping the viewer")
    finally:
        server.stop()
