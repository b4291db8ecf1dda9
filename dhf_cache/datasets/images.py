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


def preprocess(image: Image.Image, load_size: int, image_size: int) -> torch.Tensor:
    """METHOD.md's chain: PIL bilinear to load_size^2, to [-1, 1], F.interpolate to image_size^2.

    Returns a float32 tensor (3, image_size, image_size).
    """
    resized = image.resize((load_size, load_size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1)
    x = x / 127.5 - 1.0
    if load_size != image_size:
        x = F.interpolate(x[None], size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
    return x
