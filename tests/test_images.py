"""`load_image` and `preprocess`: every bad input a photo collection throws at the loader.

Every test writes a real file and reads it back through `load_image`; expected pixel values
are computed by hand, not by the PIL conversion the loader itself uses.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.ImageFile
import pytest
import torch
from PIL import Image

from dhf_cache.errors import DhfCacheError, ImageError
from dhf_cache.datasets.images import load_image, preprocess


def _rgb(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im, dtype=np.int16)


def _photo_like(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """A smooth-plus-noise RGB image, JPEG-friendly and non-trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height RGB pixels (its data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _assert_image_error(path: Path, *words: str, max_pixels: int | None = None) -> str:
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word in message.lower(), message
    assert isinstance(info.value, DhfCacheError)
    return message


# ---------------------------------------------------------------------------------------------
# files that cannot be read


def test_missing_file(tmp_path):
    _assert_image_error(tmp_path / "nope.jpg", "not found")


def test_directory_is_not_an_image(tmp_path):
    folder = tmp_path / "dir.jpg"
    folder.mkdir()
    _assert_image_error(folder, "not found")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_image_error(path, "empty", "0 bytes")


def test_random_bytes(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_image_error(path, "not a readable image")


def test_text_file_with_image_extension(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    _assert_image_error(path, "not a readable image")


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    _photo_like(128, 96).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(data)
    assert load_image(whole).size == (128, 96)  # the uncut file is fine
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    _assert_image_error(cut, "truncated")


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    _photo_like(128, 96).save(buf, "PNG")
    data = buf.getvalue()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    _assert_image_error(cut, "truncated")


def test_png_with_corrupted_data(tmp_path):
    buf = io.BytesIO()
    _photo_like(64, 64).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4
    for i in range(start + 10, start + 60):  # scribble over the compressed pixel data
        data[i] ^= 0x5A
    path = tmp_path / "scribbled.png"
    path.write_bytes(bytes(data))
    _assert_image_error(path, "corrupt")


def test_header_only_jpeg(tmp_path):
    buf = io.BytesIO()
    _photo_like().save(buf, "JPEG")
    path = tmp_path / "header.jpg"
    path.write_bytes(buf.getvalue()[:200])  # markers begin, no scan data
    _assert_image_error(path)


# ---------------------------------------------------------------------------------------------
# modes: everything becomes 8-bit RGB with the right values


def test_rgb_passes_through_exactly(tmp_path):
    arr = np.asarray(_photo_like())
    path = tmp_path / "rgb.png"
    Image.fromarray(arr).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(im), arr)


def test_grayscale_L(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, "L").save(path)
    out = _rgb(load_image(path))
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_grayscale_with_alpha_LA(tmp_path):
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[0, 0] = (10, 255)  # opaque dark
    la[0, 1] = (10, 0)  # transparent: white
    la[1, 0] = (0, 128)  # half black over white
    la[1, 1] = (200, 255)
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out[0, 0], [10, 10, 10])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert np.all(np.abs(out[1, 0] - 127) <= 1)
    np.testing.assert_array_equal(out[1, 1], [200, 200, 200])


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 30, 40, 255)  # opaque: keeps its colour
    rgba[0, 1] = (200, 30, 40, 0)  # fully transparent: white, whatever its colour
    rgba[0, 2] = (0, 0, 0, 0)  # transparent black: white, not black
    rgba[1, 0] = (0, 0, 255, 128)  # half blue over white
    rgba[1, 1] = (0, 255, 0, 255)
    rgba[1, 2] = (255, 0, 0, 64)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out[0, 0], [200, 30, 40])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 2], [255, 255, 255])
    expected_half = 255 * (1 - 128 / 255)  # ~127 for the zero channels, 255 for blue
    assert np.all(np.abs(out[1, 0] - [expected_half, expected_half, 255]) <= 1), out[1, 0]
    np.testing.assert_array_equal(out[1, 1], [0, 255, 0])
    expected_quarter = 255 * (1 - 64 / 255)
    assert np.all(np.abs(out[1, 2] - [255, expected_quarter, expected_quarter]) <= 1), out[1, 2]


def _cmyk_expected(cmyk: np.ndarray) -> np.ndarray:
    c, m, y, k = (cmyk[..., i].astype(np.float64) / 255 for i in range(4))
    return np.stack([255 * (1 - c) * (1 - k), 255 * (1 - m) * (1 - k), 255 * (1 - y) * (1 - k)], -1)


CMYK_PIXELS = np.array(
    [[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0]],
     [[0, 0, 0, 255], [128, 0, 0, 0], [0, 0, 0, 128], [255, 255, 0, 0]]],
    dtype=np.uint8,
)


def test_cmyk_tiff(tmp_path):
    path = tmp_path / "cmyk.tif"
    Image.fromarray(CMYK_PIXELS, "CMYK").save(path)
    assert Image.open(path).mode == "CMYK"
    out = _rgb(load_image(path))
    # white, cyan, magenta, yellow, black, half cyan, half grey, blue
    assert np.all(np.abs(out - _cmyk_expected(CMYK_PIXELS)) <= 1), out
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 255])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[1, 3], [0, 0, 255])


def test_cmyk_jpeg(tmp_path):
    block = np.repeat(np.repeat(CMYK_PIXELS, 16, axis=0), 16, axis=1)  # 16x16 blocks survive JPEG
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(block, "CMYK").save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    out = _rgb(load_image(path))
    centres = out[8::16, 8::16]
    assert np.all(np.abs(centres - _cmyk_expected(CMYK_PIXELS)) <= 12), centres


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 65535, 32768, 257], [1000, 128 * 257, 65535 // 3, 255]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    out = _rgb(load_image(path))
    expected = np.rint(values.astype(np.float64) * 255 / 65535)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)
    assert out[0, 1, 0] == 255 and out[0, 0, 0] == 0
    assert out[0, 2, 0] == 128  # mid grey, not clipped to 255
    assert out[1, 3, 0] == 1  # 255/65535 is almost black, not white


def test_16bit_grayscale_dark_image_stays_dark(tmp_path):
    """A 16-bit file whose values all happen to be <= 255 is still 16-bit (nearly black)."""
    values = np.array([[0, 100, 200, 255]], dtype=np.uint16)
    path = tmp_path / "dark16.png"
    Image.fromarray(values).save(path)
    out = _rgb(load_image(path))
    assert out.max() <= 1, out


def test_palette_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 17, 34, 51] + [0] * (256 * 3 - 12)
    idx = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette)
    path = tmp_path / "pal.png"
    im.save(path)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" not in raw.info
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out, [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [17, 34, 51]]])


def test_palette_with_transparent_index(tmp_path):
    palette = [255, 0, 0, 0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    idx = np.array([[0, 1, 2]], dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette)
    path = tmp_path / "pal_t.png"
    im.save(path, transparency=1)  # index 1 (black) is transparent
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out, [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]])


def test_palette_with_per_index_alpha(tmp_path):
    palette = [0, 0, 0, 0, 0, 0, 200, 0, 0] + [0] * (256 * 3 - 9)
    idx = np.array([[0, 1, 2]], dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette)
    path = tmp_path / "pal_a.png"
    im.save(path, transparency=bytes([0, 128, 255]))  # tRNS: transparent, half, opaque
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    assert np.all(np.abs(out[0, 1] - 127) <= 1), out[0, 1]
    np.testing.assert_array_equal(out[0, 2], [200, 0, 0])


def test_palette_gif_with_transparency(tmp_path):
    palette = [10, 20, 30, 0, 0, 0] + [0] * (256 * 3 - 6)
    im = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    im.putpalette(palette)
    path = tmp_path / "t.gif"
    im.save(path, transparency=1)
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out, [[[10, 20, 30], [255, 255, 255]], [[255, 255, 255], [10, 20, 30]]])


def test_one_bit(tmp_path):
    bits = np.array([[True, False, True], [False, False, True]])
    path = tmp_path / "bits.png"
    Image.fromarray(bits).convert("1").save(path)
    with Image.open(path) as raw:
        assert raw.mode == "1"
    out = _rgb(load_image(path))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], np.where(bits, 255, 0))


def test_returned_image_is_independent_of_the_file(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.full((4, 5, 3), 77, np.uint8)).save(path)
    im = load_image(path)
    path.unlink()  # the returned image must already be decoded
    assert np.asarray(im).mean() == 77 and im.size == (5, 4)


# ---------------------------------------------------------------------------------------------
# EXIF orientation

def _marked_jpeg(path: Path, orientation: int | None, w: int = 60, h: int = 40) -> None:
    """Stored image: grey, red block at stored top-left, blue block at stored top-right."""
    arr = np.full((h, w, 3), 128, np.uint8)
    arr[:10, :10] = (255, 0, 0)
    arr[:10, -10:] = (0, 0, 255)
    im = Image.fromarray(arr)
    if orientation is None:
        im.save(path, quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, quality=95, exif=exif.tobytes())


def _corner_colours(im: Image.Image) -> dict[str, str]:
    arr = np.asarray(im, dtype=np.int16)
    corners = {"tl": arr[:5, :5], "tr": arr[:5, -5:], "bl": arr[-5:, :5], "br": arr[-5:, -5:]}
    found = {}
    for name, block in corners.items():
        r, g, b = block.reshape(-1, 3).mean(0)
        if r > 200 and g < 60 and b < 60:
            found[name] = "red"
        elif b > 200 and r < 60 and g < 60:
            found[name] = "blue"
        else:
            assert abs(r - 128) < 20 and abs(g - 128) < 20 and abs(b - 128) < 20, (name, r, g, b)
    return found


@pytest.mark.parametrize(
    "orientation, size, corners",
    [
        (None, (60, 40), {"tl": "red", "tr": "blue"}),
        (1, (60, 40), {"tl": "red", "tr": "blue"}),
        # 3: rotate 180 -> stored top-left ends bottom-right
        (3, (60, 40), {"br": "red", "bl": "blue"}),
        # 6: the camera was turned; display = stored rotated 90 degrees clockwise
        (6, (40, 60), {"tr": "red", "br": "blue"}),
        # 8: display = stored rotated 90 degrees counter-clockwise
        (8, (40, 60), {"bl": "red", "tl": "blue"}),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, corners):
    path = tmp_path / f"o{orientation}.jpg"
    _marked_jpeg(path, orientation)
    if orientation is not None:
        with Image.open(path) as raw:
            assert raw.getexif()[0x0112] == orientation and raw.size == (60, 40)
    im = load_image(path)
    assert im.mode == "RGB"
    assert im.size == size
    assert _corner_colours(im) == corners


# ---------------------------------------------------------------------------------------------
# decompression bombs


def test_max_pixels_guard_names_the_pixel_count(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 120, 3), np.uint8)).save(path)
    message = _assert_image_error(path, "12,000", "5,000", max_pixels=5_000)
    assert "120x100" in message
    assert load_image(path, max_pixels=12_000).size == (120, 100)  # the limit itself is allowed


def _forbid_decoding(monkeypatch):
    calls = []

    def no_load(self, *args, **kwargs):
        calls.append(self)
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_load)
    return calls


def test_header_claiming_huge_size_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(100_000, 100_000))  # 10^10 pixels, 30 GB as RGB
    assert path.stat().st_size < 200
    calls = _forbid_decoding(monkeypatch)
    message = _assert_image_error(path, "10,000,000,000", "100000x100000")
    assert calls == []
    assert "max-pixels" in message


def test_header_just_over_default_limit_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(10_000, 10_000))  # 10^8 > 89,478,485
    calls = _forbid_decoding(monkeypatch)
    _assert_image_error(path, "100,000,000", "89,478,485")
    assert calls == []


def test_small_max_pixels_refuses_header_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "medium.png"
    path.write_bytes(_png_with_header(2_000, 1_000))
    calls = _forbid_decoding(monkeypatch)
    _assert_image_error(path, "2,000,000", max_pixels=1_000_000)
    assert calls == []


def test_raising_max_pixels_above_pil_default_is_honoured(tmp_path, monkeypatch):
    """PIL has a process-wide bomb limit; `max_pixels` must win over it, both ways."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # stands in for PIL's 89M default
    path = tmp_path / "trusted.png"
    Image.fromarray(np.full((50, 50, 3), 9, np.uint8)).save(path)  # 2,500 > 2 x PIL's limit
    im = load_image(path, max_pixels=10_000)
    assert im.size == (50, 50) and np.asarray(im).max() == 9
    _assert_image_error(path, "2,500", max_pixels=2_000)
    assert Image.MAX_IMAGE_PIXELS == 1_000  # PIL's global is left as it was


def test_pil_global_limit_restored_after_errors(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageError):
        load_image(bad)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_header(100_000, 100_000))
    with pytest.raises(ImageError):
        load_image(bomb)
    assert Image.MAX_IMAGE_PIXELS == before


# ---------------------------------------------------------------------------------------------
# preprocess: PIL bilinear to load_size, [-1, 1], F.interpolate bilinear (align_corners=False)


def _pil_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """PIL's BILINEAR resampling as a matrix (triangle filter widened when downscaling)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        js = np.arange(lo, hi)
        w = np.clip(1 - np.abs((js + 0.5 - centre) / support), 0, None)
        weights[i, lo:hi] = w / w.sum()
    return weights


def _torch_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear, align_corners=False, no antialias, as a matrix (PyTorch's source-index rule)."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        weights[i, i0] += 1 - frac
        weights[i, i1] += frac
    return weights


def _resize(arr: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.einsum("ij,jkc,lk->ilc", rows, arr, cols)


def _random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_pil_step_is_bilinear_to_load_size(tmp_path):
    """Our matrix model of PIL BILINEAR agrees with PIL to one grey level (PIL rounds)."""
    for (w, h), load in [((50, 37), 24), ((30, 20), 48)]:
        im = _random_image(w, h)
        ref = _resize(np.asarray(im, np.float64), _pil_bilinear_weights(h, load), _pil_bilinear_weights(w, load))
        got = np.asarray(im.resize((load, load), Image.BILINEAR), np.float64)
        assert np.abs(got - ref).max() <= 1.0


@pytest.mark.parametrize("size, load_size, image_size", [((50, 37), 24, 32), ((40, 60), 48, 32), ((33, 33), 17, 64)])
def test_preprocess_matches_independent_chain(size, load_size, image_size):
    im = _random_image(*size, seed=load_size)
    x = preprocess(im, load_size, image_size)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert tuple(x.shape) == (3, image_size, image_size)

    # 1. PIL bilinear resize: independent matrix model, within PIL's rounding
    pil_rows = _pil_bilinear_weights(size[1], load_size)
    pil_cols = _pil_bilinear_weights(size[0], load_size)
    step1 = _resize(np.asarray(im, np.float64), pil_rows, pil_cols)
    # 2. to [-1, 1]; 3. bilinear, align_corners=False, to image_size
    rows, cols = _torch_bilinear_weights(load_size, image_size), _torch_bilinear_weights(load_size, image_size)
    expected = _resize(step1 / 127.5 - 1.0, rows, cols).transpose(2, 0, 1)
    assert np.abs(x.numpy() - expected).max() <= 1.0 / 127.5 + 1e-5

    # exact, given PIL's own first step (so only our steps 2 and 3 are compared)
    pil = np.asarray(im.resize((load_size, load_size), Image.BILINEAR), np.float64)
    exact = _resize(pil / 127.5 - 1.0, rows, cols).transpose(2, 0, 1)
    np.testing.assert_allclose(x.numpy(), exact, atol=1e-5)


def test_preprocess_is_not_another_resampling():
    """The checks above would catch bicubic / align_corners=True / antialias: prove they differ."""
    im = _random_image(50, 37, seed=3)
    x = preprocess(im, 48, 32).numpy()
    pil = torch.from_numpy(np.asarray(im.resize((48, 48), Image.BILINEAR), np.float32).copy()).permute(2, 0, 1)
    pil = pil[None] / 127.5 - 1
    for other in (
        torch.nn.functional.interpolate(pil, size=(32, 32), mode="bilinear", align_corners=True),
        torch.nn.functional.interpolate(pil, size=(32, 32), mode="bilinear", align_corners=False, antialias=True),
        torch.nn.functional.interpolate(pil, size=(32, 32), mode="bicubic", align_corners=False),
    ):
        assert np.abs(other[0].numpy() - x).max() > 0.05
    bicubic_first = np.asarray(im.resize((48, 48), Image.BICUBIC), np.float32) / 127.5 - 1
    assert not np.allclose(pil[0].numpy(), bicubic_first.transpose(2, 0, 1), atol=0.02)


def test_preprocess_identity_when_load_equals_image_size():
    im = _random_image(40, 30, seed=5)
    x = preprocess(im, 32, 32)
    expected = np.asarray(im.resize((32, 32), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)


def test_preprocess_range_is_minus_one_to_one():
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, 8:] = 255
    x = preprocess(Image.fromarray(arr), 16, 16)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    checker = (np.indices((40, 40)).sum(0) // 8 % 2 * 255).astype(np.uint8)  # black/white diagonal bands
    y = preprocess(Image.fromarray(checker, "L").convert("RGB"), 20, 57)
    assert y.min().item() >= -1.0 and y.max().item() <= 1.0
    assert y.min().item() < -0.99 and y.max().item() > 0.99  # the range is used, not squashed
    z = preprocess(_random_image(37, 23, seed=9), 20, 57)
    assert z.min().item() >= -1.0 and z.max().item() <= 1.0


def test_preprocess_keeps_channel_order_and_orientation():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:16, :16] = (255, 0, 0)  # red top-left
    arr[16:, 16:] = (0, 0, 255)  # blue bottom-right
    x = preprocess(Image.fromarray(arr), 32, 64)
    assert x[0, 2, 2] == 1.0 and x[1, 2, 2] == -1.0 and x[2, 2, 2] == -1.0
    assert x[2, 61, 61] == 1.0 and x[0, 61, 61] == -1.0
    assert x[0, 61, 2] == -1.0 and x[2, 2, 61] == -1.0


def test_load_then_preprocess_grayscale_file(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.full((20, 30), 255, np.uint8), "L").save(path)
    x = preprocess(load_image(path), 16, 32)
    assert tuple(x.shape) == (3, 32, 32)
    torch.testing.assert_close(x, torch.ones_like(x))
