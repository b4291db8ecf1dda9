"""Direct chunk reads (the training loader's hot path) must return exactly what zarr returns,
use the direct path only where they can, and leave every doubtful chunk to zarr; direct chunk
writes (the build writer's hot path) must store exactly the bytes zarr stores."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import dhf_cache.cache.feature_cache as cache_mod
from conftest import source_dir
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.cache.direct_chunks import ChunkProblem, direct_array, read_chunk, write_chunk
from dhf_cache.cache.feature_loader import FeatureReader, select_features


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


def test_damaged_chunks_say_why_instead_of_falling_back_to_zarrs_fill_value(tmp_path, train_cache):
    url = tmp_path / "copy.zarr"
    shutil.copytree(train_cache, url)
    cache = FeatureCache.open(str(url))
    layer = cache.layers[0].name
    target = direct_array(cache.feature_array(layer))
    chunk = target.chunk_path(1)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChunkProblem, match="checksum"):
        read_chunk(target, 1)
    target.chunk_path(2).unlink()
    with pytest.raises(ChunkProblem, match="missing"):  # zarr would answer zeros (its fill value)
        read_chunk(target, 2)
    chunk.write_bytes(b"\x00\x01")
    with pytest.raises(ChunkProblem, match="truncated"):
        read_chunk(target, 1)


def test_a_checksummed_chunk_of_another_size_is_refused(tmp_path, train_cache):
    """A chunk whose bytes are intact (crc32c matches) but hold fewer values than the array's
    chunk shape (a writer's bug) is refused, not half-read into the array."""
    from numcodecs.zstd import Zstd

    from dhf_cache.cache.direct_chunks import crc32c_bytes

    url = tmp_path / "copy.zarr"
    shutil.copytree(train_cache, url)
    cache = FeatureCache.open(str(url))
    target = direct_array(cache.feature_array(cache.layers[0].name))
    short = np.zeros(int(np.prod(target.chunk_shape)) - 1, dtype="<f2")
    body = Zstd(level=3).encode(short)
    target.chunk_path(1).write_bytes(body + crc32c_bytes(np.frombuffer(body, np.uint8)))
    with pytest.raises(ChunkProblem, match=f"holds {short.size} values"):
        read_chunk(target, 1)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 257, 65791, 65792, 2**20])
def test_zstd_content_size_reads_every_size_field_width(size):
    from numcodecs.zstd import Zstd

    from dhf_cache.cache.direct_chunks import zstd_content_size

    for level in (1, 3, 19):
        frame = Zstd(level=level).encode(np.arange(size, dtype=np.uint64).astype(np.uint8))
        assert zstd_content_size(np.frombuffer(frame, np.uint8)) == size
    assert zstd_content_size(b"not a zstd frame") is None and zstd_content_size(b"") is None


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


def test_direct_writes_store_the_bytes_zarr_stores(tmp_path, train_cache):
    url = tmp_path / "copy.zarr"
    shutil.copytree(train_cache, url)
    cache = FeatureCache.open(str(url), mode="r+")
    rng = np.random.default_rng(0)
    for layer in cache.layers:
        array = cache.feature_array(layer.name)
        target = direct_array(array)
        values = rng.standard_normal(array.shape[1:]).astype(np.float16) * 40
        array[5] = values  # through zarr's own write path
        by_zarr = target.chunk_path(5).read_bytes()
        write_chunk(target, 5, values)
        assert target.chunk_path(5).read_bytes() == by_zarr, layer.name
        np.testing.assert_array_equal(array[5], values)
    assert not list(Path(url).rglob("*.partial"))
    # another zstd level is written with that level (it changes the bytes)
    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    values = rng.standard_normal((2, 3, 5, 5)).astype(np.float16)
    for level in (0, 9):
        arr = root.create_array(f"level{level}", shape=(2, 2, 3, 5, 5), chunks=(1, 2, 3, 5, 5), dtype="float16",
                                fill_value=0, compressors=[zarr.codecs.ZstdCodec(level=level), zarr.codecs.Crc32cCodec()])
        arr[1] = values
        target = direct_array(arr)
        assert target.level == level
        by_zarr = target.chunk_path(1).read_bytes()
        write_chunk(target, 1, values)
        assert target.chunk_path(1).read_bytes() == by_zarr
    with pytest.raises(ValueError, match="shape"):
        write_chunk(target, 0, values[:1])


def test_write_image_takes_the_direct_path_and_stores_what_zarr_would(tmp_path, train_cache, monkeypatch):
    """One image rewritten with direct writes on and off: the same files, byte for byte."""
    used = []

    def counting_write_chunk(target, index, values):
        used.append(target.folder.name)
        return write_chunk(target, index, values)

    monkeypatch.setattr(cache_mod, "write_chunk", counting_write_chunk)
    image = _image_of(train_cache, 3)
    files = {}
    for direct in (True, False):
        url = tmp_path / f"direct-{direct}.zarr"
        shutil.copytree(train_cache, url)
        cache = FeatureCache.open(str(url), mode="r+")
        for layer in cache.layers:  # start from no chunk, so nothing old can be left in place
            direct_array(cache.feature_array(layer.name)).chunk_path(3).unlink()
        cache._array("done")[3] = False
        monkeypatch.setattr(cache_mod, "DIRECT_WRITES", direct)
        used.clear()
        cache.write_image(3, image, (64, 64))
        assert len(used) == (len(cache.layers) if direct else 0)
        assert FeatureCache.open(str(url)).done_mask()[3]
        files[direct] = {p.relative_to(url): p.read_bytes() for p in (source_dir(url) / "features").rglob("*") if p.is_file()}
        assert files[direct], "no feature chunk found"
    assert files[True] == files[False]


def test_a_failed_chunk_write_leaves_the_image_not_done(tmp_path, train_cache):
    url = tmp_path / "copy.zarr"
    shutil.copytree(train_cache, url)
    cache = FeatureCache.open(str(url), mode="r+")
    image = _image_of(train_cache, 2)
    cache._array("done")[2] = False
    target = direct_array(cache.feature_array(cache.layers[-1].name))
    folder = target.chunk_path(2).parents[len(target.chunk_shape) - 2]  # .../c/2
    shutil.rmtree(folder)
    folder.write_bytes(b"not a folder")  # mkdir of the chunk's folder fails
    with pytest.raises(OSError):
        cache.write_image(2, image, (64, 64))
    assert not FeatureCache.open(str(url)).done_mask()[2]
    assert not list(Path(url).rglob("*.partial"))


def _image_of(url, index):
    from dhf_cache.sources.sd.extract import ExtractedImage

    cache = FeatureCache.open(str(url))
    return ExtractedImage(cache.read_latent(index), cache.read_features(index), None)


def test_a_forked_child_writes_with_its_own_threads(tmp_path, train_cache):
    """The write pool's threads do not survive fork: a child must not wait on them forever."""
    url = tmp_path / "copy.zarr"
    shutil.copytree(train_cache, url)
    cache = FeatureCache.open(str(url), mode="r+")
    image = _image_of(train_cache, 1)
    cache.write_image(1, image, (64, 64))  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: write another image, exit 0 if it landed
        code = 1
        try:
            child = FeatureCache.open(str(url), mode="r+")
            child._array("done")[4] = False
            child.write_image(4, image, (64, 64))
            code = 0 if FeatureCache.open(str(url)).done_mask()[4] else 3
        finally:
            os._exit(code)
    for _ in range(600):  # up to 60 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the forked child hung writing an image")
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(FeatureCache.open(str(url)).read_features(4)[cache.layers[0].name],
                                  image.features[cache.layers[0].name])
