"""Reading image files safely and turning them into model input, exactly as METHOD.md says.

Everything a real photo collection throws at a loader is handled here: corrupt, truncated or
empty files, grayscale/RGBA/CMYK/16-bit/palette modes, EXIF orientation and decompression bombs.
Each problem raises `ImageError` naming the file, so a build records it and goes on. Only
regular files are opened: a FIFO named like an image would block its reader forever.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from dhf_cache.config import MAX_PIXELS
from dhf_cache.datasets.files import NotRegularFileError, open_regular
from dhf_cache.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_PIL_LIMIT_LOCK = threading.Lock()


def _open_file(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file, else ImageError saying what it is."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: file not found (a folder has that name)") from None
    except NotRegularFileError as exc:
        raise ImageError(f"{path}: {exc}; replace it with the image file or remove it") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None


def _open_header(fp: BinaryIO) -> Image.Image:
    """`Image.open` (reads the header only) with PIL's global bomb limit lifted for the call, so
    that `max_pixels`, checked right after, is the limit: PIL has no per-call limit, and its
    default would otherwise refuse any image above 89M pixels whatever `max_pixels` says."""
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `path` as an upright 8-bit RGB image, or raise `ImageError` saying why not.

    The returned image's size is the size every coordinate refers to (after EXIF rotation).
    """
    path = Path(path)
    with _open_file(path) as fp:
        if os.fstat(fp.fileno()).st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with _open_header(fp) as im:
                    width, height = im.size
                    if width * height > max_pixels:
                        raise ImageError(
                            f"{path}: {width}x{height} = {width * height:,} pixels exceeds the "
                            f"decompression-bomb limit of {max_pixels:,}; raise --max-pixels if you "
                            "trust this file"
                        )
                    im.load()
                    im = ImageOps.exif_transpose(im)
                    return to_rgb(im)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{path}: refused as a decompression bomb ({exc})") from None
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not a readable image file (corrupt or unknown format)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{path}: corrupt or truncated image data ({exc})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) as `load_image` would return it (EXIF orientation applied), from the header only."""
    path = Path(path)
    with _open_file(path) as fp:
        try:
            with _open_header(fp) as im:
                width, height = im.size
                orientation = im.getexif().get(0x0112, 1)
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not a readable image file (corrupt or unknown format)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{path}: not a readable image file ({exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any mode; transparency is composited on white, 16-bit is rescaled."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and arr.max(initial=0) <= 1.0 else 255.0
        if im.mode != "F" and (im.mode.startswith("I;16") or arr.max(initial=0) > 255):
            top = 65535.0
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


FITS = ("stretch", "pad")


def placement(size, side: int, fit: str = "stretch") -> tuple[int, int, int, int]:
    """(width, height, left, top) of an image of `size` (W, H) inside the side x side square a
    model sees: `stretch` (METHOD.md) covers the square, `pad` (SD+DINO's resize-and-pad) keeps
    the aspect ratio with the long side `side` and centres the image on black."""
    if fit == "stretch":
        return side, side, 0, 0
    if fit != "pad":
        raise ValueError(f"fit {fit!r}: use one of {', '.join(FITS)}")
    w, h = (float(v) for v in size)
    scale = side / max(w, h)
    width, height = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    return width, height, (side - width) // 2, (side - height) // 2


def place_points(points: np.ndarray, size, side: int, fit: str = "stretch") -> np.ndarray:
    """[x, y] original pixels -> pixels of the side x side square (`placement`). For `stretch`
    the scale is computed first and then multiplied (`x * (side / W)`), as the reference does."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    w, h = (float(v) for v in size)
    width, height, left, top = placement(size, side, fit)
    return pts * np.array([width / w, height / h]) + np.array([left, top], dtype=np.float64)


def unplace_points(points: np.ndarray, side: int, size, fit: str = "stretch") -> np.ndarray:
    """Pixels of the side x side square -> [x, y] original pixels (inverse of `place_points`)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    w, h = (float(v) for v in size)
    width, height, left, top = placement(size, side, fit)
    return (pts - np.array([left, top], dtype=np.float64)) * np.array([w / width, h / height])


def fit_image(image: Image.Image, side: int, fit: str = "stretch") -> Image.Image:
    """The side x side RGB image a model sees (`placement`): PIL bilinear resize, and for `pad`
    the resized image pasted on a black square."""
    width, height, left, top = placement(image.size, side, fit)
    resized = image.resize((width, height), Image.BILINEAR)
    if fit == "stretch":
        return resized
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(resized, (left, top))
    return canvas


def preprocess(image: Image.Image, load_size: int, image_size: int, fit: str = "stretch") -> torch.Tensor:
    """METHOD.md's chain: PIL bilinear to load_size^2, to [-1, 1], F.interpolate to image_size^2.
    With `fit="pad"` the first step keeps the aspect ratio and pads (`fit_image`).

    Returns a float32 tensor (3, image_size, image_size).
    """
    resized = fit_image(image, load_size, fit)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1)
    x = x / 127.5 - 1.0
    if load_size != image_size:
        x = F.interpolate(x[None], size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
    return x
