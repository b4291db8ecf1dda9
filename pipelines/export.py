"""`dhf-cache export-images`: a generation cache's images as PNG files, for annotation tools.

Files are named by image id (`<prompt line>-<variant>.png`), so a `pairs:FILE.json` placed in
the same folder refers to them by the ids the cache uses; `prompts.jsonl` lists id, prompt, seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from PIL import Image

from dhf_cache.cache import FeatureCache
from dhf_cache.datasets import safe_join
from dhf_cache.progress import progress_bar


def export_images(url: str, out: Path, storage_options: dict, progress: bool = True,
                  log: Callable[[str], None] = print) -> int:
    cache = FeatureCache.open(url, storage_options)
    if not cache.is_generated:
        from dhf_cache.errors import CacheError

        raise CacheError(f"{url} holds features of real images (source {cache.spec.feature_space.source!r}); "
                         "only a cache built with --generate stores images")
    out.mkdir(parents=True, exist_ok=True)
    done = cache.done_mask()
    indices = [i for i, ok in enumerate(done) if ok]
    bar = progress_bar(len(indices), "export", unit="img", enabled=progress)
    with open(out / "prompts.jsonl", "w") as index_file:
        for i in indices:
            image_id = cache.image_ids[i]
            pixels, prompt, seed = cache.generated_image(i)
            path = safe_join(out, *image_id.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            index_file.write(json.dumps({"id": image_id, "prompt": prompt, "seed": seed}) + "\n")
            bar.update(1)
    bar.close()
    log(f"exported {len(indices)} generated images ({len(cache.image_ids) - len(indices)} not done) to {out}")
    return len(indices)
