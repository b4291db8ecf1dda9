"""Pictures for the browser: similarity heatmaps, PCA images of feature maps, photos.

Everything is encoded here, once per answer, as PNG (maps) or JPEG (photos) bytes; the page
shows them as they come (a heatmap is stretched over the target photo: its load x load grid is
the square the photo was resized to, so the stretch puts each load pixel on its image region).
"""

from __future__ import annotations

import base64
import functools
import io

import numpy as np
import torch
from PIL import Image

HEATMAP_COLORMAP = "inferno"
PHOTO_MAX_SIDE = 1024  # photos are shown scaled to the page; larger ones are sent downscaled
PHOTO_QUALITY = 90


@functools.lru_cache(maxsize=4)
def colormap_table(name: str = HEATMAP_COLORMAP) -> np.ndarray:
    """(256, 3) uint8 RGB of a matplotlib colormap (looked up once)."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 as PNG, compression level 1: an answer's latency is mostly
    encoding at higher levels, and these images are seen once."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def heatmap_png(similarity: torch.Tensor) -> tuple[bytes, float, float]:
    """A (L, L) similarity map coloured from its own minimum (dark) to its maximum (bright):
    (PNG bytes, minimum, maximum). Non-finite values are drawn as the minimum."""
    values = similarity.detach().float().cpu()
    finite = torch.isfinite(values)
    if not bool(finite.any()):
        return png_bytes(np.zeros((*values.shape, 3), dtype=np.uint8)), float("nan"), float("nan")
    low, high = float(values[finite].min()), float(values[finite].max())
    scaled = (values - low) * (255.0 / (high - low) if high > low else 0.0)
    codes = torch.where(finite, scaled, torch.zeros_like(scaled)).clamp_(0, 255).round().to(torch.uint8).numpy()
    return png_bytes(colormap_table()[codes]), low, high


def pca_rgb(desc: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """The first three principal components of a (C, h, w) map's pixels as an (h, w, 3) uint8
    RGB image, and the share of the variance each explains.

    Exact and deterministic: the eigenvectors of the smaller of the C x C covariance and the
    (h w) x (h w) Gram matrix (no random projections), each component's sign chosen so that its
    largest projection is positive, each channel stretched from its 1st to its 99th percentile.
    """
    c, h, w = desc.shape
    x = desc.detach().to(torch.float64).reshape(c, h * w).T  # (n, C): one row per pixel
    x = x - x.mean(dim=0, keepdim=True)
    k = min(3, c, h * w)
    if c <= h * w:
        values, vectors = torch.linalg.eigh(x.T @ x)
        proj = x @ vectors[:, -k:].flip(1)
    else:
        values, vectors = torch.linalg.eigh(x @ x.T)
        proj = vectors[:, -k:].flip(1) * values[-k:].flip(0).clamp_min(0).sqrt()
    total = float(values.clamp_min(0).sum())
    explained = [float(v) / total if total > 0 else 0.0 for v in values[-k:].flip(0).clamp_min(0)]
    rgb = torch.zeros(h * w, 3, dtype=torch.float64)
    for j in range(k):
        column = proj[:, j]
        if column[column.abs().argmax()] < 0:
            column = -column
        low, high = torch.quantile(column, 0.01), torch.quantile(column, 0.99)
        rgb[:, j] = ((column - low) / (high - low)).clamp(0, 1) if high > low else 0.5
    return (rgb.reshape(h, w, 3) * 255).round().to(torch.uint8).numpy(), explained


def photo_jpeg(image: Image.Image) -> bytes:
    """An RGB photo as JPEG, at most PHOTO_MAX_SIDE on its longer side (the page scales it
    to the annotated size; coordinates never refer to these pixels)."""
    if max(image.size) > PHOTO_MAX_SIDE:
        scale = PHOTO_MAX_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=PHOTO_QUALITY)
    return out.getvalue()
