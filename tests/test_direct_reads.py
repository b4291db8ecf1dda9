"""Direct chunk reads (the training loader's hot path) must return exactly what zarr returns,
use the direct path only where they can, and leave every doubtful chunk to zarr."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from dhf_cache.cache import FeatureCache
from dhf_cache.direct_reads import direct_array, read_chunk
from dhf_cache.feature_loader import FeatureReader, select_features


def test_direct_reads_equal_zarr_reads_for_every_layer_and_image(train_cache):
    cache = FeatureCache.open(train_cache)
    for layer in cache.layers:
        array = cache.feature_array(layer.name)
        target = direct_array(array)
        assert target is not None, f"{layer.name}: the default codec chain should be read directly"
        for index in range(len(cache.image_ids)):
            direct = read_chunk(target, index)
            via_zarr = array[index]
            assert direct.dtype == np.float16 and direct.flags.writeable
            np.testing.assert_array_equal(direct, via_zarr)
    # the reader the training loop uses, on a subset of steps, against plain zarr indexing
    selection = select_features(cache, timesteps=[cache.timesteps[-1], cache.timesteps[0]])
    got = FeatureReader(cache, selection).read(3)
    for layer in selection.layers:
        want = cache.feature_array(layer.name)[3][list(selection.positions)]
        np.testing.assert_array_equal(got[layer.name].numpy(), want)


def test_doubtful_chunks_are_left_to_zarr(tmp_path, train_cache):
    url = tmp_path / "copy.zarr"
    shutil.copytree(train_cache, url)
    cache = FeatureCache.open(str(url))
    layer = cache.layers[0].name
    target = direct_array(cache.feature_array(layer))
    chunk = target.chunk_path(1)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert read_chunk(target, 1) is None  # checksum mismatch: not decoded here
    with pytest.raises(ValueError, match="checksum"):
        FeatureCache.open(str(url)).read_features(1, [layer])  # zarr's own error, as before
    target.chunk_path(2).unlink()
    assert read_chunk(target, 2) is None  # missing chunk: zarr returns the fill value
    np.testing.assert_array_equal(FeatureCache.open(str(url)).read_features(2, [layer])[layer], 0)
    chunk.write_bytes(b"\x00\x01")
    assert read_chunk(target, 1) is None


def test_other_codecs_and_layouts_are_not_read_directly(tmp_path):
    from zarr.codecs.numcodecs import BitRound

    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    # dhf-cache's chain: zstd then crc32c (zarr's own default has no checksum)
    common = dict(shape=(4, 2, 3, 5, 5), dtype="float16", fill_value=0,
                  compressors=[zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()])
    default = root.create_array("default", chunks=(1, 2, 3, 5, 5), **common)
    assert direct_array(default) is not None
    lossy = root.create_array("bitround", chunks=(1, 2, 3, 5, 5), filters=[BitRound(keepbits=5)], **common)
    split = root.create_array("split", chunks=(1, 1, 3, 5, 5), **common)
    wide = root.create_array("float32", chunks=(1, 2, 3, 5, 5), **{**common, "dtype": "float32"})
    unchecked = root.create_array("no-crc", chunks=(1, 2, 3, 5, 5),
                                  **{**common, "compressors": [zarr.codecs.ZstdCodec()]})
    for array in (lossy, split, wide, unchecked):
        assert direct_array(array) is None, array.path
    values = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float16)
    default[2] = values
    np.testing.assert_array_equal(read_chunk(direct_array(default), 2), values)
    assert isinstance(direct_array(default).folder, Path)
