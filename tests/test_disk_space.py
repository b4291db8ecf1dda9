"""A local build checks its disk before computing anything: an upper-bound estimate, a refusal."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from conftest import source_dir
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.config import BuildSpec, CodecSpec, FeatureSpace, ModelIdentity, StorageSpec
from dhf_cache.cache.disk_space import bytes_per_image, check_free_space, disk_bytes_per_image, human_bytes
from dhf_cache.errors import StorageError
from dhf_cache.cache.layers import LayerInfo
from dhf_cache.cache.storage import local_path, stored_bytes

SD15 = [LayerInfo(f"up_blocks.{i // 3}.resnets.{i % 3}", c, s, s)
        for i, (c, s) in enumerate([(1280, 8)] * 3 + [(1280, 16)] * 3 + [(640, 32)] * 3 + [(320, 64)] * 3)]
TIMESTEPS = [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]


def _empty_sd15_cache(path, codec: CodecSpec) -> FeatureCache:
    identity = ModelIdentity(unet_class="UNet2DConditionModel", unet_sha256="x", vae_sha256="x", text_encoder_sha256="x")
    spec = BuildSpec(feature_space=FeatureSpace(model=identity, layers=tuple(l.name for l in SD15)),
                     storage=StorageSpec(codec=codec))
    return FeatureCache.prepare(str(path), spec, SD15, TIMESTEPS, ["a"], latent_shape=(4, 64, 64))


def test_estimate_is_methods_native_figure_and_halved_for_quant8(tmp_path):
    zstd = _empty_sd15_cache(tmp_path / "z.zarr", CodecSpec())
    assert zstd.raw_bytes_per_image == 156_794_880  # METHOD.md: SD 1.5, 512 px, 11 steps, fp16
    assert bytes_per_image(zstd) == 156_794_880 + 4 * 4 * 64 * 64 + 1 + 2 * 4  # + latent, done flag, size
    assert zstd.files_per_image == 12 + 4  # a chunk per layer; latent, done, size, error
    quant8 = _empty_sd15_cache(tmp_path / "q.zarr", CodecSpec(name="quant8"))
    assert 0.5 * 156_794_880 < bytes_per_image(quant8) < 0.52 * 156_794_880


def test_estimate_bounds_what_a_build_stores(train_cache):
    cache = FeatureCache.open(train_cache)
    n_done = int(cache.done_mask().sum())
    stored = stored_bytes(cache.group.store) / n_done  # everything: features, latents, flags, metadata
    assert stored <= bytes_per_image(cache) < 1.5 * stored
    # what the build's chunk files take on disk, blocks rounded up (metadata exists before the check)
    block = os.statvfs(train_cache).f_frsize
    chunks = [p for p in source_dir(train_cache).rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    allocated = sum(p.stat().st_blocks * 512 for p in chunks) / n_done
    assert allocated <= disk_bytes_per_image(cache, block)


def test_a_build_that_cannot_fit_is_refused_before_it_starts(train_cache):
    cache = FeatureCache.open(train_cache)
    per_image = disk_bytes_per_image(cache, os.statvfs(train_cache).f_frsize)
    free = shutil.disk_usage(local_path(train_cache)).free  # other processes move it a little: 2x margins
    lines = []
    with pytest.raises(StorageError) as err:
        check_free_space(cache, 2 * (free // per_image) + 1, lines.append)
    text = str(err.value)
    assert f"{2 * (free // per_image) + 1} image(s) need up to" in text and "free at" in text
    limit = int(re.search(r"--limit (\d+) fits now", text).group(1))
    assert free // per_image // 2 < limit < 2 * (free // per_image)
    assert "--codec quant8" in text and lines and lines[0].startswith("disk: up to")

    lines.clear()
    check_free_space(cache, free // per_image // 2, lines.append)  # fits: logged, not refused
    assert f"for {free // per_image // 2} image(s)" in lines[0]


def test_nothing_to_build_checks_nothing(train_cache):
    lines = []
    check_free_space(FeatureCache.open(train_cache), 0, lines.append)
    assert lines == []


def test_human_bytes():
    assert [human_bytes(n) for n in (None, 999, 156_794_880, 282e9)] == ["-", "999 B", "156.8 MB", "282.0 GB"]
