"""Feature chunks of a local cache read straight from their files: the training loader's hot path.

Why: zarr's read path costs ~1 ms of CPU per chunk (event loop, codec pipeline, buffers). On
small chunks that is most of the loader's work, and it runs on the cores the training step
needs (bench/train_speed.py: step time with the real loader vs features preloaded in memory).

What: the one chunk layout and codec chain dhf-cache writes by default (docs/cache-format.md):
Zarr v3, default chunk keys with "/" (`c/<image>/0/0/0/0`), one image per chunk, float16,
`bytes` (little endian) -> `zstd` -> `crc32c`. This module decodes exactly that, with the same
checksum test as zarr's codec. Arrays stored otherwise (bitround, quant8, other chunking, any
object store) are not touched, and a chunk this module cannot read (missing file, checksum
mismatch, short data) is left to zarr, so errors and fill values stay zarr's.
tests/test_direct_reads.py checks equality with zarr, array by array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXPECTED_CODECS = ("bytes", "zstd", "crc32c")


@dataclass(frozen=True)
class DirectArray:
    """Where one feature array's chunks live on disk, and their decoded shape."""

    folder: Path  # the array's folder: chunk i is folder / "c" / i / 0 / 0 / 0 / 0
    chunk_shape: tuple[int, ...]  # (1, T, C, H, W)

    def chunk_path(self, index: int) -> Path:
        return self.folder.joinpath("c", str(int(index)), *(["0"] * (len(self.chunk_shape) - 1)))


def direct_array(array) -> DirectArray | None:
    """A `DirectArray` for a zarr array of a local store stored the default way, else None."""
    from zarr.storage import LocalStore

    store = array.store
    if not isinstance(store, LocalStore):
        return None
    meta = array.metadata
    try:
        if meta.zarr_format != 3 or np.dtype(meta.data_type.to_native_dtype()) != np.dtype("<f2"):
            return None
        if meta.chunk_key_encoding.to_dict() != {"name": "default", "configuration": {"separator": "/"}}:
            return None
        codecs = [codec.to_dict() for codec in meta.codecs]
        if tuple(c.get("name") for c in codecs) != EXPECTED_CODECS:
            return None
        if codecs[0].get("configuration", {}).get("endian", "little") != "little":
            return None
        if codecs[1].get("configuration", {}).get("checksum", False):
            return None
        chunk_shape = tuple(int(n) for n in meta.chunk_grid.chunk_shape)
        if chunk_shape[0] != 1 or chunk_shape[1:] != tuple(int(n) for n in meta.shape[1:]):
            return None
        if meta.storage_transformers:
            return None
    except AttributeError:  # metadata of a shape this module does not know: leave it to zarr
        return None
    return DirectArray(Path(store.root) / array.path, chunk_shape)


def read_chunk(target: DirectArray, index: int) -> np.ndarray | None:
    """Image `index`'s maps (T, C, H, W) float16, or None when zarr should read this chunk."""
    import google_crc32c
    from numcodecs.zstd import Zstd

    try:
        data = target.chunk_path(index).read_bytes()
    except OSError:
        return None
    if len(data) < 4:
        return None
    body = np.frombuffer(data, dtype=np.uint8)[:-4]  # no copy; zarr hands these codecs numpy arrays too
    if np.uint32(google_crc32c.value(body)).tobytes() != data[-4:]:
        return None
    try:
        raw = Zstd().decode(body)
    except Exception:  # noqa: BLE001 - corrupt data: zarr reads it again and raises its own error
        return None
    values = np.frombuffer(raw, dtype="<f2")
    if values.size != int(np.prod(target.chunk_shape)):
        return None
    return values.reshape(target.chunk_shape[1:]).copy()  # writable, as zarr's reads (torch.from_numpy)
