"""`open_dataset`: the SPair-71k layout and plain image folders, built by hand in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dhf_cache.datasets import ImageRecord, PairRecord, open_dataset, safe_join
from dhf_cache.datasets.folder import FolderDataset
from dhf_cache.datasets.spair import SPairDataset
from dhf_cache.errors import DatasetError, DhfCacheError, UsageError


def _jpeg(path: Path, w: int = 20, h: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 150)).save(path)


def _pair(pair_id: int, cat: str, src: str, trg: str, **overrides) -> dict:
    name = f"{pair_id}-{src.removesuffix('.jpg')}-{trg.removesuffix('.jpg')}:{cat}"
    pair = {
        "pair_id": pair_id, "filename": name, "src_imname": src, "trg_imname": trg,
        "src_imsize": [20, 16, 3], "trg_imsize": [30, 24, 3],
        "src_bndbox": [1, 2, 18, 15], "trg_bndbox": [3, 4, 29, 23], "category": cat,
        "src_pose": "Unspecified", "trg_pose": "Unspecified",
        "src_kps": [[2, 3], [10.5, 11]], "trg_kps": [[4, 5], [20, 22.25]], "kps_ids": ["0", "3"],
        "mirror": 0, "viewpoint_variation": 1, "scale_variation": 0, "truncation": 0, "occlusion": 0,
    }
    pair.update(overrides)
    return pair


def _write_pairs(root: Path, split: str, pairs: list[dict], layout: bool = True) -> None:
    folder = root / "PairAnnotation" / split
    folder.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        (folder / f"{pair['filename']}.json").write_text(json.dumps(pair))
    if layout:
        path = root / "Layout" / "large" / f"{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{p['filename']}\n" for p in pairs))


TRN = [
    _pair(0, "cat", "2008_001.jpg", "2008_002.jpg"),
    _pair(1, "cat", "2008_002.jpg", "2008_001.jpg"),  # same images again: deduplicated
    _pair(2, "dog", "2009_010.jpg", "2007_005.jpg",
          src_kps=[[1, 1], [2, 2], [3, 3]], trg_kps=[[4, 4], [5, 5], [6, 6]], kps_ids=["1", "2", "7"],
          src_imsize=[40, 32, 3], trg_imsize=[44, 36, 3],
          src_bndbox=[0, 0, 39, 31], trg_bndbox=[2, 2, 40, 30]),
]
TEST = [
    _pair(0, "cat", "2010_100.jpg", "2008_001.jpg"),  # 2008_001 is in both splits
    _pair(1, "aeroplane", "2011_200.jpg", "2011_201.jpg"),
]


@pytest.fixture
def spair_root(tmp_path) -> Path:
    root = tmp_path / "SPair-71k"
    for pair in TRN + TEST:
        for key in ("src_imname", "trg_imname"):
            _jpeg(root / "JPEGImages" / pair["category"] / pair[key])
    _jpeg(root / "JPEGImages" / "cat" / "unused.jpg")  # not in any pair: never listed
    _write_pairs(root, "trn", TRN)
    _write_pairs(root, "test", TEST)
    (root / "ImageAnnotation" / "cat").mkdir(parents=True)
    return root


def _ids(records: list[ImageRecord]) -> list[str]:
    return [r.id for r in records]


# ---------------------------------------------------------------------------------------------
# SPair: images and pairs


def test_spair_images_per_split(spair_root):
    ds = open_dataset(f"spair:{spair_root}")
    assert isinstance(ds, SPairDataset)
    assert ds.splits == ["trn", "test"]
    trn = ds.images("trn")
    assert _ids(trn) == ["cat/2008_001.jpg", "cat/2008_002.jpg", "dog/2007_005.jpg", "dog/2009_010.jpg"]
    assert _ids(ds.images("test")) == [
        "aeroplane/2011_200.jpg", "aeroplane/2011_201.jpg", "cat/2008_001.jpg", "cat/2010_100.jpg",
    ]
    for rec in trn:
        assert rec.error is None
        cat, name = rec.id.split("/")
        assert rec.path == spair_root / "JPEGImages" / cat / name
        assert rec.path.is_file()


def test_spair_images_all_splits_is_the_union(spair_root):
    ds = open_dataset(f"spair:{spair_root}")
    every = _ids(ds.images(None))
    assert every == sorted(set(_ids(ds.images("trn"))) | set(_ids(ds.images("test"))))
    assert len(every) == len(set(every)) == 7
    assert "cat/unused.jpg" not in every
    assert _ids(ds.images()) == every


def test_spair_pairs_are_parsed(spair_root):
    ds = open_dataset(f"spair:{spair_root}")
    pairs = ds.pairs("trn")
    assert [p.name for p in pairs] == [p["filename"] for p in TRN]  # Layout order
    first = pairs[0]
    assert isinstance(first, PairRecord)
    assert first.name == "0-2008_001-2008_002:cat"
    assert first.category == "cat"
    assert (first.src, first.trg) == ("cat/2008_001.jpg", "cat/2008_002.jpg")
    np.testing.assert_array_equal(first.src_kps, [[2, 3], [10.5, 11]])
    np.testing.assert_array_equal(first.trg_kps, [[4, 5], [20, 22.25]])
    assert first.src_kps.dtype == np.float64 and first.src_kps.shape == (2, 2)
    assert first.src_bbox == (1.0, 2.0, 18.0, 15.0)
    assert first.trg_bbox == (3.0, 4.0, 29.0, 23.0)
    assert first.src_size == (20, 16) and first.trg_size == (30, 24)  # [W, H, 3] -> (W, H)
    dog = pairs[2]
    assert dog.src_kps.shape == dog.trg_kps.shape == (3, 2)
    np.testing.assert_array_equal(dog.trg_kps[:, 0], [4, 5, 6])
    assert dog.src_size == (40, 32) and dog.trg_size == (44, 36)
    # every pair's images are exactly the split's images
    ids = {i for p in pairs for i in (p.src, p.trg)}
    assert ids == set(_ids(ds.images("trn")))
    assert [p.name for p in ds.pairs("test")] == [p["filename"] for p in TEST]


def test_spair_empty_keypoint_list(spair_root):
    _write_pairs(spair_root, "trn", [_pair(0, "cat", "2008_001.jpg", "2008_002.jpg", src_kps=[], trg_kps=[])])
    (pair,) = open_dataset(f"spair:{spair_root}").pairs("trn")
    assert pair.src_kps.shape == (0, 2) and pair.trg_kps.shape == (0, 2)


def test_spair_layout_is_the_list_of_pairs(spair_root):
    """Layout/large/<split>.txt decides which pairs are used; without it, every JSON file is."""
    (spair_root / "PairAnnotation" / "trn" / "99-x-y:cat.json").write_text(
        json.dumps(_pair(99, "cat", "x.jpg", "y.jpg"))
    )
    ds = open_dataset(f"spair:{spair_root}")
    assert "cat/x.jpg" not in _ids(ds.images("trn"))
    (spair_root / "Layout" / "large" / "trn.txt").unlink()
    ds = open_dataset(f"spair:{spair_root}")
    assert {"cat/x.jpg", "cat/y.jpg"} <= set(_ids(ds.images("trn")))
    assert len(ds.pairs("trn")) == 4


def test_spair_layout_listing_a_missing_pair_file(spair_root):
    with open(spair_root / "Layout" / "large" / "trn.txt", "a") as f:
        f.write("7-ghost-ghost:cat\n")
    with pytest.raises(DatasetError, match="7-ghost-ghost:cat.json") as info:
        open_dataset(f"spair:{spair_root}").images("trn")
    assert "missing" in str(info.value)


def test_spair_layout_name_leaving_the_folder_is_refused(spair_root, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps(_pair(5, "cat", "a.jpg", "b.jpg")))
    with open(spair_root / "Layout" / "large" / "trn.txt", "a") as f:
        f.write("../../../secret\n")
    with pytest.raises(DatasetError, match="leaves the dataset folder") as info:
        open_dataset(f"spair:{spair_root}").images("trn")
    assert "trn.txt" in str(info.value)


def test_spair_images_dir_may_be_a_symlink(spair_root, tmp_path):
    """A JPEGImages/ that links elsewhere (a big disk) is still inside the dataset."""
    moved = tmp_path / "elsewhere"
    (spair_root / "JPEGImages").rename(moved)
    (spair_root / "JPEGImages").symlink_to(moved, target_is_directory=True)
    recs = open_dataset(f"spair:{spair_root}").images("trn")
    assert all(r.error is None and r.path.is_file() for r in recs)


# ---------------------------------------------------------------------------------------------
# SPair: annotations are not trusted as paths


@pytest.mark.parametrize(
    "category, imname",
    [
        ("cat", "../../../../etc/passwd"),
        ("cat", "../../../outside.jpg"),
        ("cat", "/etc/passwd"),
        ("cat", "sub/../../../../outside.jpg"),
        ("../../..", "outside.jpg"),
        ("/tmp", "outside.jpg"),
        ("cat", ""),
    ],
)
def test_spair_unsafe_image_names_become_failed_records(spair_root, tmp_path, category, imname):
    (tmp_path / "outside.jpg").write_bytes(b"not yours")
    bad = _pair(3, category, imname, "2008_001.jpg", filename="3-evil-2008_001:cat")
    _write_pairs(spair_root, "trn", TRN + [bad])
    records = {r.id: r for r in open_dataset(f"spair:{spair_root}").images("trn")}
    rec = records[f"{category}/{imname}"]
    assert rec.path is None
    assert rec.error and "unsafe path" in rec.error
    # the good images are unaffected, and no record points outside the root
    root = spair_root.resolve()
    for r in records.values():
        if r.path is not None:
            assert root in r.path.resolve().parents
    assert records["cat/2008_002.jpg"].error is None


def test_spair_missing_image_file_still_gives_a_record(spair_root):
    (spair_root / "JPEGImages" / "cat" / "2008_002.jpg").unlink()
    records = {r.id: r for r in open_dataset(f"spair:{spair_root}").images("trn")}
    rec = records["cat/2008_002.jpg"]
    assert rec.error is None
    assert rec.path == spair_root / "JPEGImages" / "cat" / "2008_002.jpg"
    assert not rec.path.exists()  # the build records this as a failure when it loads it


def test_safe_join():
    root = Path("/data/root")
    assert safe_join(root, "a", "b.jpg") == root / "a" / "b.jpg"
    assert safe_join(root, "a/../b.jpg") == root / "a/../b.jpg"  # stays inside: allowed
    for parts in (("../x",), ("/etc",), ("a", "../../x"), ("",), ("\\x",)):
        with pytest.raises(DatasetError):
            safe_join(root, *parts)


# ---------------------------------------------------------------------------------------------
# bad specs and malformed annotations


@pytest.mark.parametrize("spec", ["nope:x", "spair", "folder:", "spair:", ":x", "SPair:/x", "pairs-typo:/x"])
def test_bad_spec_names_the_value(spec):
    with pytest.raises(DatasetError) as info:
        open_dataset(spec)
    assert repr(spec) in str(info.value)
    assert "KIND:PATH" in str(info.value)


def test_spair_missing_folder(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DatasetError) as info:
        open_dataset(f"spair:{missing}")
    assert str(missing) in str(info.value) and "not a folder" in str(info.value)


def test_spair_folder_without_pair_annotation(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DatasetError) as info:
        open_dataset(f"spair:{tmp_path}")
    assert str(tmp_path) in str(info.value) and "PairAnnotation" in str(info.value)


def test_spair_with_no_split_folders(tmp_path):
    (tmp_path / "PairAnnotation").mkdir()
    ds = open_dataset(f"spair:{tmp_path}")
    assert ds.splits == []
    with pytest.raises(DatasetError, match="none of trn, val, test"):
        ds.images()


@pytest.mark.parametrize("split", ["val", "train", "../trn"])
def test_spair_unknown_split(spair_root, split):
    ds = open_dataset(f"spair:{spair_root}")
    for call in (ds.images, ds.pairs):
        with pytest.raises((DatasetError, UsageError)) as info:
            call(split)
        assert split in str(info.value)
        assert "trn, test" in str(info.value)  # says which splits exist


@pytest.mark.parametrize(
    "content",
    [
        "{ not json",
        "",
        "[1, 2, 3]",
        '"a string"',
        json.dumps({"src_imname": "a.jpg", "category": "cat"}),  # no trg_imname
    ],
)
def test_malformed_pair_json_names_the_file(spair_root, content):
    bad = spair_root / "PairAnnotation" / "trn" / f"{TRN[1]['filename']}.json"
    bad.write_text(content)
    ds = open_dataset(f"spair:{spair_root}")
    with pytest.raises(DatasetError) as info:
        ds.images("trn")
    assert str(bad) in str(info.value)
    ds.images("test")  # the other split is still readable


@pytest.mark.parametrize(
    "field, value",
    [("src_kps", "abc"), ("trg_bndbox", None), ("src_imsize", []), ("trg_kps", [[1, 2, 3]])],
)
def test_malformed_pair_fields_name_the_pair(spair_root, field, value):
    bad = _pair(1, "cat", "2008_002.jpg", "2008_001.jpg", **{field: value})
    _write_pairs(spair_root, "trn", [TRN[0], bad])
    ds = open_dataset(f"spair:{spair_root}")
    assert len(ds.images("trn")) == 2  # images are fine; only the pair's fields are bad
    with pytest.raises(DatasetError) as info:
        ds.pairs("trn")
    assert bad["filename"] in str(info.value)


def test_dataset_errors_are_dhf_errors():
    assert issubclass(DatasetError, DhfCacheError) and issubclass(UsageError, DhfCacheError)


# ---------------------------------------------------------------------------------------------
# folder:PATH


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    for rel in ["a.jpg", "B.JPG", "nested/c.png", "nested/deeper/d.Jpeg", "nested/e.WebP",
                "x/f.tif", "x/g.TIFF", "x/h.bmp", "x/i.gif"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"whatever")  # listing does not open the files
    for rel in ["notes.txt", "nested/meta.json", "README", "x/jpg", "x/archive.jpg.zip", "x/.jpg.bak"]:
        (root / rel).write_text("not an image")
    (root / "dir.jpg").mkdir()  # a folder with an image-like name
    return root


def test_folder_lists_every_image_below(photo_folder):
    ds = open_dataset(f"folder:{photo_folder}")
    assert isinstance(ds, FolderDataset)
    assert ds.splits == []
    recs = ds.images()
    expected = sorted(["B.JPG", "a.jpg", "nested/c.png", "nested/deeper/d.Jpeg", "nested/e.WebP",
                       "x/f.tif", "x/g.TIFF", "x/h.bmp", "x/i.gif"])
    assert _ids(recs) == expected
    for rec in recs:
        assert rec.error is None
        assert rec.path == photo_folder / rec.id
        assert "\\" not in rec.id and not rec.id.startswith("/")


def test_folder_ids_do_not_depend_on_spelling_of_the_path(photo_folder, monkeypatch):
    monkeypatch.chdir(photo_folder.parent)
    rel = _ids(open_dataset("folder:photos").images())
    slash = _ids(open_dataset(f"folder:{photo_folder}/").images())
    assert rel == slash == _ids(open_dataset(f"folder:{photo_folder}").images())


def test_folder_refuses_split(photo_folder):
    ds = open_dataset(f"folder:{photo_folder}")
    with pytest.raises(UsageError) as info:
        ds.images("trn")
    assert "--split trn" in str(info.value)


def test_folder_has_no_pairs(photo_folder):
    spec = f"folder:{photo_folder}"
    with pytest.raises(DatasetError) as info:
        open_dataset(spec).pairs("trn")
    assert spec in str(info.value)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError) as info:
        open_dataset(f"folder:{tmp_path}").images()
    assert str(tmp_path) in str(info.value) and "no image files" in str(info.value)


def test_folder_missing_or_a_file(tmp_path):
    for target in (tmp_path / "missing", tmp_path / "file.jpg"):
        if target.name == "file.jpg":
            target.write_bytes(b"x")
        with pytest.raises(DatasetError) as info:
            open_dataset(f"folder:{target}")
        assert str(target) in str(info.value)


# ---------------------------------------------------------------------------------------------
# issue 14: the records' new fields, and safe_join under symlinks (more in test_bad_datasets.py)


def test_pair_record_error_and_dropped_kps_have_defaults():
    kps = np.zeros((1, 2))
    pair = PairRecord("p", "c", "a", "b", kps, kps, (0, 0, 1, 1), (0, 0, 1, 1), (8, 8), (8, 8))
    assert pair.error is None and pair.dropped_kps == 0


def test_safe_join_follows_links_below_root_but_not_dotdot_through_them(tmp_path):
    root, disk = tmp_path / "root", tmp_path / "disk"
    (disk / "sub").mkdir(parents=True)
    root.mkdir()
    (root / "imgs").symlink_to(disk, target_is_directory=True)  # JPEGImages/ on another disk
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    assert safe_join(root, "imgs", "a.jpg") == root / "imgs" / "a.jpg"
    assert safe_join(tmp_path / "link", "imgs", "a.jpg") == tmp_path / "link" / "imgs" / "a.jpg"
    assert safe_join(root, "imgs/sub/../a.jpg") == root / "imgs/sub/../a.jpg"  # '..' inside the link's folder
    with pytest.raises(DatasetError, match="symbolic link"):
        safe_join(root, "imgs/../secret.jpg")  # the OS takes this '..' in the link's target: tmp_path
    for parts in (("imgs", "../../x.jpg"), ("a\x00b.jpg",)):
        with pytest.raises(DatasetError):
            safe_join(root, *parts)
