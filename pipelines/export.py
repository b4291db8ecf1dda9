"""`dhf-cache export-images`: a generation cache's images as PNG files, for annotation tools.

Files are named by image id (`<prompt line>-<variant>.png`), so a `pairs:FILE.json` placed in
the same folder refers to them by the ids the cache uses; `prompts.jsonl` lists id, prompt, seed.

An id is used as a path inside the output folder only when it is a safe relative name ending in
`.png` (as `build --generate` makes them). Renaming an unsafe id would silently break that link
with the annotations, so a cache holding one is refused, naming it, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from PIL import Image

from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.datasets import safe_join
from dhf_cache.errors import CacheError, DatasetError
from dhf_cache.progress import progress_bar

MAX_NAME_BYTES = 255  # one path component's limit on common filesystems (ext4, XFS, APFS)


def id_problem(image_id: str) -> str | None:
    """Why `image_id` cannot name an exported file inside the output folder; None when it can."""
    if any(c == "\\" or ord(c) < 32 or c == "\x7f" for c in image_id):
        return "holds a backslash or a control character"
    parts = image_id.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "is absolute or has an empty, '.' or '..' part"
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in parts):
        return f"has a part longer than {MAX_NAME_BYTES} bytes"
    name = parts[-1]
    if not name.lower().endswith(".png") or len(name) <= len(".png"):
        return "is not a file name ending in .png"
    return None


def _targets(url: str, out: Path, ids: list[str]) -> list[Path]:
    """The file of each id, all checked before anything is written."""
    bad = [(i, problem) for i in ids if (problem := id_problem(i))]
    if bad:
        shown = "; ".join(f"{i!r} {problem}" for i, problem in bad[:5])
        raise CacheError(
            f"{url}: {len(bad)} image ids cannot be used as file names inside {out} ({shown}"
            + (f"; ... {len(bad)} in all" if len(bad) > 5 else "")
            + "). export-images writes each image as <id>: relative paths ending in .png, as `build "
            "--generate` names them; nothing was written"
        )
    try:  # judged on the text, as for data sets: links the user made in the folder are followed
        return [safe_join(out, *image_id.split("/")) for image_id in ids]
    except DatasetError as exc:  # not reached after id_problem; kept as the one rule for paths from data
        raise CacheError(f"{url}: {exc}; nothing was written") from None


def export_images(url: str, out: Path, storage_options: dict, progress: bool = True,
                  log: Callable[[str], None] = print) -> int:
    cache = FeatureCache.open(url, storage_options, prefer="sd")  # generation caches are SD sources
    if not cache.is_generated:
        raise CacheError(f"{url} holds features of real images (source {cache.spec.feature_space.source!r}); "
                         "only a cache built with --generate stores images")
    done = cache.done_mask()
    indices = [i for i, ok in enumerate(done) if ok]
    targets = _targets(url, out, [cache.image_ids[i] for i in indices])
    out.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(len(indices), "export", unit="img", enabled=progress)
    with open(out / "prompts.jsonl", "w") as index_file:
        for i, path in zip(indices, targets):
            pixels, prompt, seed = cache.generated_image(i)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, format="PNG")
            index_file.write(json.dumps({"id": cache.image_ids[i], "prompt": prompt, "seed": seed}) + "\n")
            bar.update(1)
    bar.close()
    log(f"exported {len(indices)} generated images ({len(cache.image_ids) - len(indices)} not done) to {out}")
    return len(indices)
