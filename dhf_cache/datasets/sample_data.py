"""Embedded sample data: a small data set in the SPair-71k layout, made from real photographs.

The photographs ship with scikit-image (no download). Each photo becomes several views by a
random perspective warp plus colour changes; because each warp is known, every keypoint's
position in every view is known exactly, which gives ground-truth correspondences for training
and PCK. Views of one photo are split into trn / val / test so that no test image is seen in
training. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

# (category, photo, object box [x1, y1, x2, y2] in the photo's pixels)
PHOTOS = (
    ("cat", "chelsea", (10, 0, 400, 300)),
    ("person", "astronaut", (20, 10, 360, 512)),
    ("cup", "coffee", (75, 15, 480, 395)),
    ("motorbike", "motorcycle_left", (90, 70, 690, 450)),
    ("rocket", "rocket", (280, 115, 360, 427)),
)
SPLIT_VIEWS = {"trn": 5, "val": 2, "test": 3}
N_KEYPOINTS = 12


@dataclass(frozen=True)
class SampleDataSummary:
    root: Path
    n_images: int
    n_pairs: dict[str, int]
    categories: list[str]


def _photo(name: str) -> np.ndarray:
    import skimage
    from skimage import data as skdata

    if name == "motorcycle_left":  # shipped in the package, read directly (no fetch)
        path = Path(skimage.__file__).parent / "data" / "motorcycle_left.png"
        return np.asarray(Image.open(path).convert("RGB"))
    return np.asarray(getattr(skdata, name)())[..., :3]


def _keypoints(photo: np.ndarray, box: tuple[int, int, int, int], n: int) -> np.ndarray:
    """Distinct corners inside the object box (Harris), as [x, y] floats."""
    from skimage.color import rgb2gray
    from skimage.feature import corner_harris, corner_peaks

    x1, y1, x2, y2 = box
    gray = rgb2gray(photo[y1:y2, x1:x2])
    margin = max(4, min(x2 - x1, y2 - y1) // 12)
    peaks = corner_peaks(
        corner_harris(gray, sigma=2), min_distance=margin, num_peaks=n, exclude_border=margin
    )
    return np.array([[x1 + c, y1 + r] for r, c in peaks], dtype=np.float64)


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 H with dst ~ H @ src for four point pairs."""
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    _, _, vt = np.linalg.svd(np.asarray(rows))
    h = vt[-1].reshape(3, 3)
    return h / h[2, 2]


def _apply(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.c_[pts, np.ones(len(pts))] @ h.T
    return p[:, :2] / p[:, 2:3]


def _view(photo: Image.Image, rng: np.random.Generator, out_w: int, out_h: int):
    """A random perspective view of `photo` at (out_w, out_h); returns (image, H photo->view).

    H maps pixel indices (the keypoint convention) of the photo to those of the view.
    """
    w, h = photo.size
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.8, 1.05)
    c, s = np.cos(angle), np.sin(angle)
    base = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], dtype=np.float64)
    centre = np.array([out_w, out_h]) / 2
    dst = (base - centre) @ np.array([[c, -s], [s, c]]).T * scale + centre
    dst += rng.uniform(-0.08, 0.08, size=(4, 2)) * np.array([out_w, out_h])  # perspective jitter
    dst += rng.uniform(-0.06, 0.06, size=2) * np.array([out_w, out_h])  # shift
    forward = _homography(corners, dst)
    inverse = np.linalg.inv(forward)
    inverse /= inverse[2, 2]
    view = photo.transform((out_w, out_h), Image.PERSPECTIVE, tuple(inverse.ravel()[:8]), Image.BILINEAR,
                           fillcolor=tuple(int(v) for v in rng.integers(0, 256, 3)))
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.7, 1.3))
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.5, 1.5))
    # PIL samples output pixel (i, j) at the continuous point (i + 0.5, j + 0.5) and `forward` maps
    # continuous points; keypoints are pixel indices, so return H in pixel-index coordinates.
    to_index = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    pixel_forward = to_index @ forward @ np.linalg.inv(to_index)
    return view, pixel_forward / pixel_forward[2, 2]


def write_sample_data(root: str | Path, seed: int = 0, size: int = 192, split_views: dict | None = None,
                      photos: tuple = PHOTOS) -> SampleDataSummary:
    """Write the data set under `root` in the SPair-71k layout; deterministic for `seed`."""
    root = Path(root)
    split_views = split_views or SPLIT_VIEWS
    if any(n < 2 for n in split_views.values()):
        raise ValueError(f"every split needs at least 2 views per photo to form pairs, got {split_views}")
    rng = np.random.default_rng(seed)
    pair_counts = {s: 0 for s in split_views}
    layout: dict[str, list[str]] = {s: [] for s in split_views}
    n_images = 0
    for category, photo_name, box in photos:
        photo_np = _photo(photo_name)
        photo = Image.fromarray(photo_np)
        kps = _keypoints(photo_np, box, N_KEYPOINTS)
        box_corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]], float)
        aspect = photo.size[0] / photo.size[1]
        views: dict[str, list[dict]] = {}
        for split, count in split_views.items():
            views[split] = []
            for _ in range(count):
                index = n_images
                n_images += 1
                out_w = int(round(size * min(aspect, 1.6) / 8)) * 8
                view, forward = _view(photo, rng, out_w, size)
                name = f"{photo_name}_{index:03d}"
                warped = _apply(forward, kps)
                visible = (warped[:, 0] >= 0) & (warped[:, 0] <= out_w - 1) & (warped[:, 1] >= 0) & (warped[:, 1] <= size - 1)
                wbox = _apply(forward, box_corners)
                bbox = [
                    int(np.clip(np.floor(wbox[:, 0].min()), 0, out_w - 1)),
                    int(np.clip(np.floor(wbox[:, 1].min()), 0, size - 1)),
                    int(np.clip(np.ceil(wbox[:, 0].max()), 0, out_w - 1)),
                    int(np.clip(np.ceil(wbox[:, 1].max()), 0, size - 1)),
                ]
                record = {
                    "name": name,
                    "size": [out_w, size],
                    "bbox": bbox,
                    "kps": {str(k): ([round(float(x), 2), round(float(y), 2)] if visible[k] else None)
                            for k, (x, y) in enumerate(warped)},
                }
                _write_image(root, category, view, record, wbox)
                views[split].append(record)
        for split, recs in views.items():
            for src in recs:
                for trg in recs:
                    if src is trg:
                        continue
                    pair_name = _write_pair(root, split, category, len(layout[split]), src, trg)
                    if pair_name:
                        layout[split].append(pair_name)
                        pair_counts[split] += 1
    for split, names in layout.items():
        path = root / "Layout" / "large" / f"{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{n}\n" for n in names))
    return SampleDataSummary(root, n_images, pair_counts, [c for c, _, _ in photos])


def _write_image(root: Path, category: str, view: Image.Image, record: dict, box_polygon: np.ndarray) -> None:
    jpg = root / "JPEGImages" / category / f"{record['name']}.jpg"
    jpg.parent.mkdir(parents=True, exist_ok=True)
    view.save(jpg, quality=92)
    w, h = record["size"]
    ann = {
        "filename": f"{record['name']}.jpg", "src_database": "scikit-image sample photos",
        "annotation_path": f"{category}/{record['name']}.json", "image_width": w, "image_height": h,
        "image_depth": 3, "category": category, "pose": "Unspecified", "truncated": 0, "occluded": 0,
        "difficult": 0, "bndbox": record["bbox"], "kps": record["kps"], "azimuth_id": 0,
    }
    ann_path = root / "ImageAnnotation" / category / f"{record['name']}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps(ann, indent=1))
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in box_polygon.tolist()], fill=1)
    seg = root / "Segmentation" / category / f"{record['name']}.png"
    seg.parent.mkdir(parents=True, exist_ok=True)
    mask.save(seg)


def _write_pair(root: Path, split: str, category: str, pair_id: int, src: dict, trg: dict) -> str | None:
    ids = [k for k in src["kps"] if src["kps"][k] is not None and trg["kps"][k] is not None]
    if not ids:
        return None
    name = f"{pair_id}-{src['name']}-{trg['name']}:{category}"
    pair = {
        "pair_id": pair_id, "filename": name, "src_imname": f"{src['name']}.jpg",
        "trg_imname": f"{trg['name']}.jpg", "src_imsize": [*src["size"], 3], "trg_imsize": [*trg["size"], 3],
        "src_bndbox": src["bbox"], "trg_bndbox": trg["bbox"], "category": category,
        "src_pose": "Unspecified", "trg_pose": "Unspecified",
        "src_kps": [src["kps"][k] for k in ids], "trg_kps": [trg["kps"][k] for k in ids], "kps_ids": ids,
        "mirror": 0, "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0,
    }
    path = root / "PairAnnotation" / split / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pair, indent=1))
    return name
