"""`write_sample_data`: a deterministic SPair-layout data set whose ground truth is exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dhf_cache.datasets import sample_data
from dhf_cache.datasets import open_dataset
from dhf_cache.datasets.images import load_image
from dhf_cache.datasets.sample_data import PHOTOS, _apply, _homography, _view, write_sample_data

SMALL = {"trn": 2, "test": 2}  # a small configuration (no val split)
LAYOUT = {"trn": 2, "val": 2, "test": 2}  # every split has pairs
SIZE = 96


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "spair"
    summary = write_sample_data(root, seed=0, size=SIZE, split_views=LAYOUT)
    assert summary.root == root
    return root


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _fit_homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares DLT over all points (independent of the module's 4-point solver)."""
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    h = np.linalg.svd(np.asarray(rows, float))[2][-1].reshape(3, 3)
    return h / h[2, 2]


def _project(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    q = np.c_[pts, np.ones(len(pts))] @ h.T
    return q[:, :2] / q[:, 2:]


# ---------------------------------------------------------------------------------------------
# determinism


def test_a_split_with_fewer_than_two_views_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2 views"):
        write_sample_data(tmp_path / "x", split_views={"trn": 2, "val": 1}, photos=PHOTOS[:1])


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    photos = PHOTOS[:2]
    a = write_sample_data(tmp_path / "a", seed=0, size=64, split_views=SMALL, photos=photos)
    b = write_sample_data(tmp_path / "b", seed=0, size=64, split_views=SMALL, photos=photos)
    c = write_sample_data(tmp_path / "c", seed=1, size=64, split_views=SMALL, photos=photos)
    ta, tb, tc = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert len(ta) > 20
    assert ta == tb  # byte-identical, every file
    assert (a.n_images, a.n_pairs, a.categories) == (b.n_images, b.n_pairs, b.categories)
    assert a.n_images == 2 * 4 and a.categories == ["cat", "person"]
    assert a.n_pairs == {"trn": 4, "test": 4}  # 2 views -> 2 ordered pairs per photo
    # another seed: the same layout, different views and keypoint positions
    assert set(tc) == set(ta)
    jpegs = [k for k in ta if k.endswith(".jpg")]
    assert all(ta[k] != tc[k] for k in jpegs)
    anns = [k for k in ta if k.startswith("ImageAnnotation/")]
    assert all(_kps(ta[k]) != _kps(tc[k]) for k in anns)
    assert c.n_images == a.n_images


def _kps(raw: bytes) -> dict:
    return json.loads(raw)["kps"]


def test_summary_counts_match_files(sample_root):
    summary = write_sample_data(sample_root.parent / "again", seed=0, size=SIZE, split_views=LAYOUT)
    assert summary.n_images == len(PHOTOS) * sum(LAYOUT.values())
    assert summary.categories == [c for c, _, _ in PHOTOS]
    for split, n in summary.n_pairs.items():
        assert n == len(list((sample_root / "PairAnnotation" / split).glob("*.json")))
        assert n == len((sample_root / "Layout" / "large" / f"{split}.txt").read_text().split())
    assert len(list((sample_root / "JPEGImages").rglob("*.jpg"))) == summary.n_images
    assert _tree(sample_root) == _tree(summary.root)


# ---------------------------------------------------------------------------------------------
# the SPair layout


def test_layout_is_readable_and_splits_are_disjoint(sample_root):
    ds = open_dataset(f"spair:{sample_root}")
    assert ds.splits == ["trn", "val", "test"]
    per_split = {s: {r.id for r in ds.images(s)} for s in ds.splits}
    assert per_split["trn"].isdisjoint(per_split["val"])
    assert per_split["trn"].isdisjoint(per_split["test"])
    assert per_split["val"].isdisjoint(per_split["test"])
    every = {r.id for r in ds.images()}
    assert every == set().union(*per_split.values())
    assert len(every) == len(PHOTOS) * sum(LAYOUT.values())  # every image is in some pair
    for split, n_views in LAYOUT.items():
        for cat, _, _ in PHOTOS:
            assert sum(i.startswith(f"{cat}/") for i in per_split[split]) == n_views
    for rec in ds.images():
        assert rec.error is None and rec.path.is_file()
        img = load_image(rec.path)
        ann = _json(sample_root / "ImageAnnotation" / f"{rec.id[:-4]}.json")
        assert img.size == (ann["image_width"], ann["image_height"])
        assert img.size[1] == SIZE and img.size[0] % 8 == 0
        assert ann["filename"] == rec.path.name and ann["category"] == rec.id.split("/")[0]
        mask = Image.open(sample_root / "Segmentation" / f"{rec.id[:-4]}.png")
        assert mask.size == img.size


PAIR_NAME = re.compile(r"^(\d+)-(.+)-(.+):([a-z]+)$")


def test_pair_files_follow_spair_conventions(sample_root):
    for split in LAYOUT:
        folder = sample_root / "PairAnnotation" / split
        listed = (sample_root / "Layout" / "large" / f"{split}.txt").read_text().split()
        assert sorted(listed) == sorted(p.stem for p in folder.glob("*.json"))
        assert len(listed) > 0
        ids = []
        for name in listed:
            pair = _json(folder / f"{name}.json")
            m = PAIR_NAME.match(name)
            assert m, name
            assert pair["filename"] == name
            assert int(m.group(1)) == pair["pair_id"]
            assert f"{m.group(2)}.jpg" == pair["src_imname"] and f"{m.group(3)}.jpg" == pair["trg_imname"]
            assert m.group(4) == pair["category"]
            assert pair["src_imname"] != pair["trg_imname"]
            for key in ("src_pose", "trg_pose", "mirror", "viewpoint_variation", "scale_variation",
                        "truncation", "occlusion", "src_bndbox", "trg_bndbox"):
                assert key in pair
            ids.append(pair["pair_id"])
        assert sorted(ids) == list(range(len(ids)))


def test_every_pair_keypoint_is_inside_images_and_boxes(sample_root):
    ds = open_dataset(f"spair:{sample_root}")
    n_checked = 0
    for split in ds.splits:
        pairs = ds.pairs(split)
        assert pairs
        for p in pairs:
            assert len(p.src_kps) == len(p.trg_kps) >= 4
            for kps, size, box, image_id in ((p.src_kps, p.src_size, p.src_bbox, p.src),
                                             (p.trg_kps, p.trg_size, p.trg_bbox, p.trg)):
                w, h = size
                assert Image.open(sample_root / "JPEGImages" / image_id).size == (w, h)
                assert np.all(kps >= 0) and np.all(kps[:, 0] <= w - 1) and np.all(kps[:, 1] <= h - 1)
                x1, y1, x2, y2 = box
                assert 0 <= x1 < x2 <= w - 1 and 0 <= y1 < y2 <= h - 1
                assert np.all((kps[:, 0] >= x1) & (kps[:, 0] <= x2)), (p.name, kps, box)
                assert np.all((kps[:, 1] >= y1) & (kps[:, 1] <= y2)), (p.name, kps, box)
                mask = np.asarray(Image.open(sample_root / "Segmentation" / f"{image_id[:-4]}.png"))
                r = np.clip(np.rint(kps).astype(int), 0, [w - 1, h - 1])
                assert np.all(mask[r[:, 1], r[:, 0]] == 1), p.name  # on the object
                n_checked += len(kps)
    assert n_checked > 100


def test_kps_ids_agree_with_image_annotations(sample_root):
    for split in LAYOUT:
        for path in (sample_root / "PairAnnotation" / split).glob("*.json"):
            pair = _json(path)
            cat = pair["category"]
            src = _json(sample_root / "ImageAnnotation" / cat / pair["src_imname"].replace(".jpg", ".json"))
            trg = _json(sample_root / "ImageAnnotation" / cat / pair["trg_imname"].replace(".jpg", ".json"))
            ids = pair["kps_ids"]
            assert all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids)
            assert len(ids) == len(pair["src_kps"]) == len(pair["trg_kps"])
            # exactly the keypoints visible in both images, in the images' own positions
            both = [k for k in src["kps"] if src["kps"][k] is not None and trg["kps"][k] is not None]
            assert ids == both
            for i, k in enumerate(ids):
                assert pair["src_kps"][i] == src["kps"][k]
                assert pair["trg_kps"][i] == trg["kps"][k]
            assert pair["src_imsize"] == [src["image_width"], src["image_height"], 3]
            assert pair["trg_bndbox"] == trg["bndbox"]
            assert set(src["kps"]) == {str(i) for i in range(sample_data.N_KEYPOINTS)}


# ---------------------------------------------------------------------------------------------
# ground truth: homographies and real content


def test_homography_maps_four_points_exactly():
    rng = np.random.default_rng(0)
    for _ in range(20):
        src = rng.uniform(0, 500, (4, 2))
        dst = rng.uniform(0, 200, (4, 2))
        h = _homography(src, dst)
        assert h[2, 2] == pytest.approx(1.0)
        np.testing.assert_allclose(_apply(h, src), dst, atol=1e-6)


def test_homography_recovers_a_known_matrix():
    true = np.array([[0.9, -0.2, 12.0], [0.15, 1.1, -7.0], [1e-4, -2e-4, 1.0]])
    src = np.array([[0, 0], [640, 0], [640, 480], [0, 480]], float)
    dst = _project(true, src)
    np.testing.assert_allclose(_homography(src, dst), true, rtol=1e-6, atol=1e-9)


def test_apply_on_hand_computed_cases():
    pts = np.array([[0.0, 0.0], [2.0, 3.0]])
    translate_scale = np.array([[2.0, 0, 5], [0, 3.0, -1], [0, 0, 1]])
    np.testing.assert_allclose(_apply(translate_scale, pts), [[5, -1], [9, 8]])
    perspective = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.5, 0, 1]])  # divide by (0.5 x + 1)
    np.testing.assert_allclose(_apply(perspective, pts), [[0, 0], [1.0, 1.5]])
    np.testing.assert_allclose(_apply(np.eye(3) * 7, pts), pts)  # scale-invariant


def _blob_photo(w: int, h: int, centres: np.ndarray, sigma: float) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    img = np.zeros((h, w))
    for cx, cy in centres:
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    grey = (img * 200).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def _centroid(view: np.ndarray, x: float, y: float, r: int = 5) -> np.ndarray:
    x0, y0 = int(round(x)), int(round(y))
    patch = view[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1]
    weight = np.clip(patch - np.median(patch), 0, None)
    gy, gx = np.mgrid[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1]
    return np.array([(weight * gx).sum(), (weight * gy).sum()]) / weight.sum()


BLOBS = np.array([[x, y] for x in (180, 260, 340, 420, 500) for y in (150, 230, 310)], float)


def test_view_homography_maps_photo_pixels_to_the_same_content():
    """A bright blob centred on photo pixel p must appear centred on view pixel H(p)."""
    photo = _blob_photo(640, 480, BLOBS, sigma=7)
    for seed in range(4):
        view, h = _view(photo, np.random.default_rng(seed), 160, 120)
        assert view.size == (160, 120)
        grey = np.asarray(view, float).mean(axis=2)
        expected = _apply(h, BLOBS)
        inside = np.all((expected > 8) & (expected < [160 - 9, 120 - 9]), axis=1)
        assert inside.sum() >= 10
        for (x, y) in expected[inside]:
            err = _centroid(grey, x, y) - [x, y]
            assert np.abs(err).max() < 0.12, (seed, x, y, err)


def test_view_is_a_real_perspective_change():
    photo = _blob_photo(640, 480, BLOBS, sigma=7)
    (_, h0), (_, h1) = (_view(photo, np.random.default_rng(s), 160, 120) for s in (0, 1))
    assert np.abs(_apply(h0, BLOBS) - _apply(h1, BLOBS)).max() > 3  # views differ between draws
    assert np.abs(h0[2, :2]).max() > 1e-6  # not merely affine


def test_written_keypoints_sit_on_the_content(tmp_path, monkeypatch):
    """End to end: with a blob photo and blob keypoints, every annotation hits its blob centre."""
    photo = np.asarray(_blob_photo(640, 480, BLOBS[:12], sigma=7))
    monkeypatch.setattr(sample_data, "_photo", lambda name: photo)
    monkeypatch.setattr(sample_data, "_keypoints", lambda img, box, n: BLOBS[:n].copy())
    root = tmp_path / "blobs"
    write_sample_data(root, seed=3, size=120, split_views=LAYOUT, photos=(("dot", "blobs", (100, 100, 580, 400)),))
    n = 0
    for path in (root / "ImageAnnotation" / "dot").glob("*.json"):
        ann = _json(path)
        grey = np.asarray(Image.open(root / "JPEGImages" / "dot" / ann["filename"]).convert("L"), float)
        for k, xy in ann["kps"].items():
            if xy is None:
                continue
            x, y = xy
            if not (6 <= x <= grey.shape[1] - 7 and 6 <= y <= grey.shape[0] - 7):
                continue
            err = _centroid(grey, x, y) - [x, y]
            assert np.abs(err).max() < 0.15, (path.name, k, err)
            n += 1
    assert n >= 50


def test_pair_keypoints_correspond_by_content(sample_root):
    """Real photos: src->trg keypoints fit one homography, and warping src by it reproduces trg."""
    ds = open_dataset(f"spair:{sample_root}")
    for split in ds.splits:
        for p in ds.pairs(split)[::3]:
            h = _fit_homography(p.src_kps, p.trg_kps)
            # annotations are rounded to 0.01 px: a single projective map explains all of them
            assert np.abs(_project(h, p.src_kps) - p.trg_kps).max() < 0.05, p.name
            src = np.asarray(Image.open(sample_root / "JPEGImages" / p.src).convert("L"), float)
            trg = np.asarray(Image.open(sample_root / "JPEGImages" / p.trg).convert("L"), float)
            right = _warp_ncc(src, trg, h, p.trg_bbox)
            wrong = _warp_ncc(src, trg, np.array([[1, 0, 4], [0, 1, -4], [0, 0, 1.0]]) @ h, p.trg_bbox)
            shuffled = _fit_homography(p.src_kps, np.roll(p.trg_kps, 1, axis=0))
            assert right > 0.8, (p.name, right)
            assert right > wrong + 0.2, (p.name, right, wrong)
            assert np.abs(_project(shuffled, p.src_kps) - np.roll(p.trg_kps, 1, axis=0)).max() > 1


def _warp_ncc(src: np.ndarray, trg: np.ndarray, h: np.ndarray, box) -> float:
    """Normalised cross-correlation of trg (inside its box) with src sampled through h^-1."""
    x1, y1, x2, y2 = (int(v) for v in box)
    yy, xx = np.mgrid[y1:y2 + 1, x1:x2 + 1]
    tp = np.c_[xx.ravel(), yy.ravel()].astype(float)
    sp = _project(np.linalg.inv(h), tp)
    ok = (sp[:, 0] >= 0) & (sp[:, 0] < src.shape[1] - 1) & (sp[:, 1] >= 0) & (sp[:, 1] < src.shape[0] - 1)
    sp, tp = sp[ok], tp[ok].astype(int)
    x0, y0 = np.floor(sp[:, 0]).astype(int), np.floor(sp[:, 1]).astype(int)
    fx, fy = sp[:, 0] - x0, sp[:, 1] - y0
    a = (src[y0, x0] * (1 - fx) * (1 - fy) + src[y0, x0 + 1] * fx * (1 - fy)
         + src[y0 + 1, x0] * (1 - fx) * fy + src[y0 + 1, x0 + 1] * fx * fy)
    b = trg[tp[:, 1], tp[:, 0]]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


EDGE_KPS = np.array(
    [[3, 240], [636, 240], [320, 2], [320, 477], [2, 2], [637, 477],
     [320, 240], [8, 100], [630, 380], [100, 6], [500, 473], [320, 100]],
    float,
)


def test_keypoints_outside_a_view_are_null_and_the_rest_inside(tmp_path, monkeypatch):
    """Keypoints near the photo's border leave some views: those (and only those) are null."""
    monkeypatch.setattr(sample_data, "_photo", lambda name: np.zeros((480, 640, 3), np.uint8))
    monkeypatch.setattr(sample_data, "_keypoints", lambda img, box, n: EDGE_KPS[:n].copy())
    root = tmp_path / "edges"
    write_sample_data(root, seed=0, size=120, split_views=LAYOUT, photos=(("dot", "edge", (0, 0, 640, 480)),))
    n_null = n_visible = n_views = 0
    for path in sorted((root / "ImageAnnotation" / "dot").glob("*.json")):
        ann = _json(path)
        w, h = ann["image_width"], ann["image_height"]
        keys = [str(k) for k in range(len(EDGE_KPS))]
        assert list(ann["kps"]) == keys
        seen = np.array([ann["kps"][k] is not None for k in keys])
        view_xy = np.array([ann["kps"][k] for k in keys if ann["kps"][k] is not None], float)
        assert np.all(view_xy >= 0) and np.all(view_xy <= [w - 1, h - 1])
        n_null += int((~seen).sum())
        n_visible += int(seen.sum())
        if seen.sum() >= 6:  # recover this view's homography from its visible keypoints
            hom = _fit_homography(EDGE_KPS[seen], view_xy)
            assert np.abs(_project(hom, EDGE_KPS[seen]) - view_xy).max() < 0.05
            hidden = _project(hom, EDGE_KPS[~seen])
            outside = (hidden[:, 0] < 0) | (hidden[:, 0] > w - 1) | (hidden[:, 1] < 0) | (hidden[:, 1] > h - 1)
            assert np.all(outside), (path.name, hidden)
            n_views += 1
    assert n_null >= 5 and n_visible >= 30 and n_views >= 3
