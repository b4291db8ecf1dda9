"""Feature chunks of a local cache read and written straight to their files: the training
loader's and the build writer's hot paths.

Why, reads: zarr's read path costs CPU per chunk (event loop, codec pipeline, buffers).
On small chunks that is most of the loader's work, and it runs on the cores the training step
needs (bench/train_speed.py: step time with the real loader vs features preloaded in memory).
Why, writes: zarr's write path copies each chunk several times under the GIL (buffers, the
checksum appended with np.append); on a GPU the main thread holds the GIL launching kernels,
and the one writer thread fell behind the UNet: SD 1.5 at batch 8 on an H200 stored 1.41
images/s against 3.99 for the bare inversion; with this module and pinned D2H copies, 3.78
against 5.03 (docs/benchmarks.md, "GPU"). Here zstd, crc32c and the file write all release
the GIL, and the layers of an image are written in parallel threads.

What: the one chunk layout and codec chain dhf-cache writes by default (docs/cache-format.md):
Zarr v3, default chunk keys with "/" (`c/<image>/0/0/0/0`), one image per chunk, float16,
`bytes` (little endian) -> `zstd` -> `crc32c`. This module decodes exactly that, with the same
checksum test as zarr's codec. Arrays stored otherwise (bitround, quant8, other chunking, any
object store) are not touched. A chunk of this layout that cannot be read raises `ChunkProblem`
saying why (missing, checksum mismatch, undecodable, wrong size): never zarr's fill value, which
would turn a deleted chunk into zeros that train and score as if they were features.
Writes produce the bytes zarr writes (same codec, level, checksum; temp file + rename, as
zarr's LocalStore; feature arrays have write_empty_chunks, so zarr too stores all-zero chunks).
tests/test_direct_chunks.py checks equality with zarr, array by array, both ways.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXPECTED_CODECS = ("bytes", "zstd", "crc32c")


class ChunkProblem(Exception):
    """A chunk that should hold an image's maps cannot give them; the message says why.
    (The cache turns it into a CacheError naming the cache, image and layer.)"""


@dataclass(frozen=True)
class DirectArray:
    """Where one feature array's chunks live on disk, and their decoded shape."""

    folder: Path  # the array's folder: chunk i is folder / "c" / i / 0 / 0 / 0 / 0
    chunk_shape: tuple[int, ...]  # (1, T, C, H, W)
    level: int = 0  # zstd level (writes only)

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
        zstd = codecs[1].get("configuration", {})
        if zstd.get("checksum", False):
            return None
        chunk_shape = tuple(int(n) for n in meta.chunk_grid.chunk_shape)
        if chunk_shape[0] != 1 or chunk_shape[1:] != tuple(int(n) for n in meta.shape[1:]):
            return None
        if meta.storage_transformers:
            return None
    except AttributeError:  # metadata of a shape this module does not know: leave it to zarr
        return None
    return DirectArray(Path(store.root) / array.path, chunk_shape, int(zstd.get("level", 0)))


def read_chunk(target: DirectArray, index: int) -> np.ndarray:
    """Image `index`'s maps (T, C, H, W) float16; raises ChunkProblem when the chunk is missing
    or damaged."""
    from numcodecs.zstd import Zstd

    path = target.chunk_path(index)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ChunkProblem("chunk missing") from None
    except OSError as exc:
        raise ChunkProblem(f"chunk unreadable ({exc.strerror or exc})") from None
    if len(data) < 4:
        raise ChunkProblem(f"chunk truncated ({len(data)} bytes)")
    body = np.frombuffer(data, dtype=np.uint8)[:-4]  # no copy; zarr hands these codecs numpy arrays too
    if crc32c_bytes(body) != data[-4:]:
        raise ChunkProblem("chunk damaged (crc32c checksum mismatch: truncated or altered bytes)")
    expected = int(np.prod(target.chunk_shape))
    try:
        if zstd_content_size(body) == 2 * expected:  # decoded straight into the writable array
            values = np.empty(target.chunk_shape[1:], dtype="<f2")
            Zstd().decode(body, out=values)
            return values
        raw = Zstd().decode(body)
    except Exception as exc:  # noqa: BLE001 - a checksummed chunk that does not decompress
        raise ChunkProblem(f"chunk damaged (zstd: {exc})") from None
    values = np.frombuffer(raw, dtype="<f2")
    if values.size != expected:
        raise ChunkProblem(f"chunk damaged (holds {values.size} values, expected {expected})")
    return values.reshape(target.chunk_shape[1:]).copy()  # writable, as zarr's reads (torch.from_numpy)


def zstd_content_size(frame) -> int | None:
    """The decompressed size a zstd frame's header declares, or None when it declares none (or
    is no zstd frame). Zstd frame format (RFC 8878, 3.1.1): magic 0xFD2FB528, a descriptor byte
    (bits 7-6: size field flag, bit 5: single segment, bits 1-0: dictionary id flag), then the
    window byte (absent in a single segment), the dictionary id and the content size.

    Why: decoding into a buffer of the declared size saves a copy of every chunk the loader reads
    (docs/benchmarks.md); the size is checked against the chunk's own shape before that, so a
    chunk that declares another size takes the checked path."""
    head = bytes(frame[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = head[4]
    size_flag, single, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[size_flag]
    if width == 0 or len(head) < at + width:
        return None
    size = int.from_bytes(head[at:at + width], "little")
    return size + 256 if width == 2 else size


def write_chunk(target: DirectArray, index: int, values: np.ndarray) -> None:
    """Store image `index`'s maps (T, C, H, W) float16 as zarr would, atomically."""
    if values.shape != target.chunk_shape[1:]:
        raise ValueError(f"chunk {index} of {target.folder}: shape {values.shape}, expected {target.chunk_shape[1:]}")
    body = zstd_compress(np.ascontiguousarray(values, dtype="<f2"), target.level)
    store_atomically(target.chunk_path(index), body, crc32c_bytes(body))


def zstd_compress(raw: np.ndarray, level: int) -> bytes:
    from numcodecs.zstd import Zstd

    return Zstd(level=level).encode(raw)  # releases the GIL


def crc32c_bytes(data) -> bytes:
    """zarr's crc32c codec suffix: the checksum as 4 little-endian bytes."""
    import google_crc32c

    return np.uint32(google_crc32c.value(data)).tobytes()


def store_atomically(path: Path, *parts) -> None:
    """Write `parts` to a temp file beside `path`, then rename: a reader sees all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")  # zarr's own temp name
    try:
        with partial.open("wb") as f:
            for part in parts:
                f.write(part)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
