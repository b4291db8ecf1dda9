"""The public benchmarks as `--dataset` prefixes: each loader on a tiny fixture written here in the
layout its public evaluation code reads (docs/datasets.md), with keypoints, boxes, sizes, ids,
splits, thresholds and skip counts known, and the one-line error of a folder in another layout."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dhf_cache.datasets import open_dataset
from dhf_cache.datasets.ap10k import AP10KDataset
from dhf_cache.datasets.cub import CUBDataset
from dhf_cache.datasets.dhf_pairs import DHFPairsDataset
from dhf_cache.datasets.pf import PFPascalDataset, PFWillowDataset
from dhf_cache.datasets.spair_u import SPairUDataset
from dhf_cache.errors import DatasetError

NAN = math.nan


# ---------------------------------------------------------------- fixture writers (public layouts)

def write_image(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (120, 90, 60)).save(path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([header, *rows])
    path.write_text(out.getvalue())


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def write_pascal_mat(path: Path, kps: list[list[float]], bbox: list[int]) -> None:
    """A PF-PASCAL annotation as PF-dataset-PASCAL.zip has it: kps K x 2 (NaN rows), bbox 1 x 4."""
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"kps": np.array(kps, dtype=np.float64), "bbox": np.array([bbox], dtype=np.uint16)})


def write_pf_pascal(root: Path, layout: str) -> Path:
    """PF-PASCAL: JPEGImages/, Annotations/<class>/*.mat, and HPF's {trn,test}_pairs.csv or NCNet's
    {train,test}_pairs_pf_pascal.csv. Class 1 is aeroplane, 3 is bird."""
    write_image(root / "JPEGImages" / "2008_000001.jpg", 40, 30)
    write_image(root / "JPEGImages" / "2008_000002.jpg", 50, 20)
    write_image(root / "JPEGImages" / "2009_000003.jpg", 30, 30)
    write_image(root / "JPEGImages" / "2009_000004.jpg", 30, 30)
    ann = root / "Annotations"
    write_pascal_mat(ann / "aeroplane" / "2008_000001.mat", [[1, 2], [NAN, NAN], [10, 11], [5, 5]], [1, 2, 30, 25])
    write_pascal_mat(ann / "aeroplane" / "2008_000002.mat", [[3, 4], [6, 7], [NAN, NAN], [8, 9]], [0, 1, 45, 19])
    write_pascal_mat(ann / "bird" / "2009_000003.mat", [[NAN, NAN], [4, 4]], [2, 2, 20, 20])
    write_pascal_mat(ann / "bird" / "2009_000004.mat", [[7, 7], [NAN, NAN]], [3, 3, 25, 25])
    img = "PF-dataset-PASCAL/JPEGImages/"
    a_to_b = [img + "2008_000001.jpg", img + "2008_000002.jpg", 1]
    birds = [img + "2009_000003.jpg", img + "2009_000004.jpg", 3]  # no keypoint visible in both
    if layout == "hpf":
        write_csv(root / "test_pairs.csv", ["source_image", "target_image", "class"], [a_to_b, birds])
        write_csv(root / "trn_pairs.csv", ["source_image", "target_image", "class", "flip"], [[*a_to_b, 0]])
    else:
        write_csv(root / "test_pairs_pf_pascal.csv", ["source_image", "target_image", "class", "XA", "YA", "XB", "YB"],
                  [[*a_to_b, "1;10;-1", "2;11;-1", "3;6;-1", "4;7;-1"],  # the third is padding
                   [*birds, "-1", "-1", "-1", "-1"]])  # nothing but padding
        write_csv(root / "train_pairs_pf_pascal.csv", ["source_image", "target_image", "class", "flip"],
                  [[*a_to_b, 0]])
    return root


def write_pf_willow(root: Path) -> Path:
    """PF-WILLOW: <class>/<name>.png and HPF's test_pairs.csv (paths start with PF-dataset/)."""
    write_image(root / "car(G)" / "car_0001.png", 60, 40)
    write_image(root / "car(G)" / "car_0002.png", 64, 48)
    header = ["imageA", "imageB", *[f"{c}{i}" for c in ("XA", "YA", "XB", "YB") for i in range(1, 11)]]
    xa, ya = list(range(1, 11)), list(range(11, 21))
    xb, yb = [x + 30 for x in xa], [y + 5 for y in ya]
    xb[9] = "nan"  # one unreadable coordinate: dropped and counted
    write_csv(root / "test_pairs.csv", header, [
        ["PF-dataset/car(G)/car_0001.png", "PF-dataset/car(G)/car_0002.png", *xa, *ya, *xb, *yb],
        ["PF-dataset/car(G)/car_0002.png", "PF-dataset/car(G)/car_0001.png", *([-1] * 40)],  # padding only
    ])
    return root


def ap10k_animal(visible: dict[int, tuple[float, float]], bbox: list[float], w: int, h: int) -> dict:
    """An AP-10K image annotation as prepare_ap10k.ipynb writes it (17 keypoints, v = 2 or 0)."""
    flat = []
    for k in range(17):
        flat += [*visible[k], 2] if k in visible else [0, 0, 0]
    return {"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox, "keypoints": flat, "num_keypoints": len(visible),
            "width": w, "height": h, "file_name": "x.jpg", "name": "antelope", "supercategory": "Bovidae"}


def write_ap10k(root: Path) -> Path:
    ann, jpg = root / "ImageAnnotation" / "Bovidae", root / "JPEGImages" / "Bovidae"
    write_json(ann / "antelope" / "000000000001.json", ap10k_animal({0: (5, 6), 3: (10, 12), 16: (1, 1)}, [2, 3, 20, 10], 40, 30))
    write_json(ann / "antelope" / "000000000002.json", ap10k_animal({0: (7, 8), 3: (14, 15)}, [1, 1, 30, 25], 50, 40))
    write_json(ann / "argali sheep" / "000000000003.json", ap10k_animal({5: (9, 9)}, [0, 0, 10, 10], 20, 20))
    for name, size in (("antelope/000000000001", (40, 30)), ("antelope/000000000002", (50, 40)),
                       ("argali sheep/000000000003", (20, 20))):
        write_image(jpg / f"{name}.jpg", *size)
    rel = "data/ap-10k/ImageAnnotation/Bovidae"
    pair = {"src_json_path": f"{rel}/antelope/000000000001.json", "trg_json_path": f"{rel}/antelope/000000000002.json"}
    write_json(root / "PairAnnotation" / "test" / "000000000001-000000000002:antelope.json", pair)
    cross = {"src_json_path": f"{rel}/antelope/000000000001.json", "trg_json_path": f"{rel}/argali sheep/000000000003.json"}
    write_json(root / "PairAnnotation" / "test_cross_species" / "000000000001-000000000003:Bovidae.json", cross)
    write_json(root / "PairAnnotation" / "test_cross_family" / "000000000002-000000000001:all.json",
               {"src_json_path": pair["trg_json_path"], "trg_json_path": pair["src_json_path"]})
    return root


def write_cub(root: Path) -> Path:
    """CUB_200_2011/: 6 images of 2 classes (ids 1-3, 5-6 test; 4 train), 3 parts each."""
    images = {1: "001.Albatross/A_1.jpg", 2: "001.Albatross/A_2.jpg", 3: "001.Albatross/A_3.jpg",
              4: "001.Albatross/A_4.jpg", 5: "002.Auklet/B_5.jpg", 6: "002.Auklet/B_6.jpg"}
    parts = {  # image: [(x, y, visible)] for parts 1-3
        1: [(1, 1, 1), (2, 2, 1), (0, 0, 0)], 2: [(3, 3, 1), (0, 0, 0), (4, 4, 1)],
        3: [(0, 0, 0), (5, 5, 1), (0, 0, 0)], 4: [(1, 2, 1), (3, 4, 1), (5, 6, 1)],
        5: [(7, 7, 1), (8, 8, 1), (9, 9, 1)], 6: [(10, 10, 1), (0, 0, 0), (11, 11, 1)],
    }
    for i, name in images.items():
        write_image(root / "images" / name, 20 + i, 30)
    (root / "parts").mkdir(parents=True, exist_ok=True)
    (root / "images.txt").write_text("".join(f"{i} {n}\n" for i, n in images.items()))
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    (root / "image_class_labels.txt").write_text("".join(f"{i} {1 if i <= 4 else 2}\n" for i in images))
    (root / "train_test_split.txt").write_text("".join(f"{i} {int(i == 4)}\n" for i in images))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} {i}.0 2.0 10.0 {i + 10}.0\n" for i in images))
    (root / "parts" / "part_locs.txt").write_text("".join(
        f"{i} {k} {x}.0 {y}.0 {v}\n" for i, rows in parts.items() for k, (x, y, v) in enumerate(rows, 1)))
    return root


def spair_pair(name: str, src: str, trg: str) -> dict:
    return {"pair_id": 0, "filename": name, "src_imname": src, "trg_imname": trg, "src_imsize": [40, 30, 3],
            "trg_imsize": [44, 36, 3], "src_bndbox": [1, 2, 30, 25], "trg_bndbox": [3, 4, 40, 33], "category": "cat",
            "viewpoint_variation": 2, "scale_variation": 0, "truncation": 1, "occlusion": 0}


def write_spair_u(root: Path) -> Path:
    """A SPair-71k root with SPair-U's ExtraPairAnnotation/ and ExtraImageAnnotation/ (JamaisVu's reading)."""
    for name, size in (("a.jpg", (40, 30)), ("b.jpg", (44, 36)), ("c.jpg", (44, 36))):
        write_image(root / "JPEGImages" / "cat" / name, *size)
    write_json(root / "ExtraImageAnnotation" / "cat" / "a.json", {"kps": {"0": [1, 2], "1": None, "2": [5, 6]}})
    write_json(root / "ExtraImageAnnotation" / "cat" / "b.json", {"kps": {"0": [3, 4], "1": [7, 8], "2": [9, 10]}})
    write_json(root / "ExtraImageAnnotation" / "cat" / "c.json", {"kps": {"0": None, "1": [7, 8], "2": None}})
    folder = root / "ExtraPairAnnotation" / "test"
    write_json(folder / "0-a-b:cat.json", spair_pair("0-a-b:cat", "a.jpg", "b.jpg"))
    write_json(folder / "1-a-c:cat.json", spair_pair("1-a-c:cat", "a.jpg", "c.jpg"))  # nothing visible in both
    return root


def write_dhf_repo(root: Path) -> Path:
    """The reference repository's annotations/ (a pair list and a prompt list) and its image_path."""
    images = root / "datasets" / "SPair-71k" / "JPEGImages"
    write_image(images / "dog" / "2008_000001.jpg", 40, 30)
    write_image(images / "dog" / "2009_000002.jpg", 50, 20)
    write_json(root / "annotations" / "spair_71k_test-4.json", [
        {"source_path": "dog/2008_000001.jpg", "target_path": "dog/2009_000002.jpg",
         "source_points": [[3, 383], [14, 7]], "target_points": [[145, 394], [19, 5]], "category": "dog",
         "source_bounding_box": [2, 1, 37, 29], "target_bounding_box": [1, 1, 45, 19], "viewpoint_variation": 1},
        {"source_path": "dog/2009_000002.jpg", "target_path": "dog/2008_000001.jpg",  # no boxes: around the points
         "source_points": [[4, 5], [10, 2]], "target_points": [[6, 7], [20, 9]], "category": "dog"},
        {"source_path": "dog/2008_000001.jpg", "target_path": "dog/2009_000002.jpg",  # every point null
         "source_points": [[None, None]], "target_points": [[1, 1]], "category": "dog",
         "source_bounding_box": [0, 0, 1, 1], "target_bounding_box": [0, 0, 1, 1]},
        {"source_path": "dog/2008_000001.jpg", "target_path": "dog/2009_000002.jpg",  # outside the 40 x 30 source
         "source_points": [[100, 10]], "target_points": [[1, 1]], "category": "dog"},
    ])
    write_json(root / "annotations" / "synthetic-3.json", ["Cat sitting in a living room", "An astronaut"])
    return root


def one_line_error(spec: str) -> str:
    with pytest.raises(DatasetError) as info:
        open_dataset(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- PF-PASCAL

def test_pf_pascal_hpf_layout_reads_keypoints_from_the_mat_files(tmp_path):
    root = write_pf_pascal(tmp_path / "PF-PASCAL", "hpf")
    data = open_dataset(f"pfpascal:{root}")
    assert isinstance(data, PFPascalDataset) and data.layout == "hpf"
    assert data.splits == ["trn", "test"] and data.default_threshold == "img"
    assert [r.id for r in data.images("test")] == ["aeroplane/2008_000001.jpg", "aeroplane/2008_000002.jpg",
                                                    "bird/2009_000003.jpg", "bird/2009_000004.jpg"]
    assert data.images("test")[0].path == root / "JPEGImages" / "2008_000001.jpg"
    [pair] = data.pairs("test")
    assert pair.name == "0-2008_000001-2008_000002:aeroplane" and pair.category == "aeroplane"
    assert (pair.src, pair.trg) == ("aeroplane/2008_000001.jpg", "aeroplane/2008_000002.jpg")
    # rows 1 and 2 are NaN (not visible) in one image each: HPF keeps rows 0 and 3
    assert pair.src_kps.tolist() == [[1, 2], [5, 5]] and pair.trg_kps.tolist() == [[3, 4], [8, 9]]
    assert pair.src_bbox == (1, 2, 30, 25) and pair.trg_bbox == (0, 1, 45, 19)
    assert (pair.src_size, pair.trg_size, pair.error, pair.dropped_kps) == ((40, 30), (50, 20), None, 0)
    assert data.skipped == {"invisible": 1}  # the bird pair
    assert len(data.pairs("trn")) == 1 and data.skipped == {"invisible": 1}  # trn has no skipped pair


def test_pf_pascal_ncnet_layout_reads_the_semicolon_lists(tmp_path):
    root = write_pf_pascal(tmp_path / "PF-dataset-PASCAL", "ncnet")
    data = open_dataset(f"pfpascal:{root}")
    assert data.layout == "ncnet" and data.splits == ["trn", "test"]
    [pair] = data.pairs("test")
    assert pair.src_kps.tolist() == [[1, 2], [10, 11]] and pair.trg_kps.tolist() == [[3, 4], [6, 7]]  # padding out
    assert pair.src_bbox == (1, 2, 30, 25)  # boxes still from the .mat files
    assert data.skipped == {"padded": 1}
    [trn] = data.pairs("trn")  # GeoAware-SC's train list has no keypoints: the .mat files
    assert trn.src_kps.tolist() == [[1, 2], [5, 5]]


def test_pf_pascal_bad_input(tmp_path):
    message = one_line_error(f"pfpascal:{tmp_path}")
    assert f"no PF-PASCAL layout here: expected {tmp_path / 'test_pairs.csv'}" in message
    root = write_pf_pascal(tmp_path / "PF-PASCAL", "hpf")
    (root / "Annotations" / "aeroplane" / "2008_000002.mat").unlink()
    with pytest.raises(DatasetError, match=r"2008_000002\.mat: missing; .*test_pairs\.csv:2"):
        open_dataset(f"pfpascal:{root}").pairs("test")
    (root / "Annotations" / "aeroplane" / "2008_000002.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(DatasetError, match=r"2008_000002\.mat: not a readable MATLAB annotation file"):
        open_dataset(f"pfpascal:{root}").pairs("test")
    write_csv(root / "test_pairs.csv", ["source_image", "target_image", "class"], [["a.jpg", "b.jpg", 21]])
    with pytest.raises(DatasetError, match=r"test_pairs\.csv:2: class must be a PASCAL class number 1-20"):
        open_dataset(f"pfpascal:{root}").images("test")
    (root / "JPEGImages" / "2008_000002.jpg").unlink()
    write_pf_pascal(root, "hpf")
    (root / "JPEGImages" / "2008_000002.jpg").unlink()
    [pair] = open_dataset(f"pfpascal:{root}").pairs("test")  # a missing image: that pair's error only
    assert pair.trg_size == (0, 0) and "aeroplane/2008_000002.jpg: " in pair.error


# ---------------------------------------------------------------- PF-WILLOW

def test_pf_willow(tmp_path):
    root = write_pf_willow(tmp_path / "PF-WILLOW")
    data = open_dataset(f"pfwillow:{root}")
    assert isinstance(data, PFWillowDataset) and data.splits == ["test"] and data.default_threshold == "kps"
    assert [(r.id, r.path) for r in data.images()] == [
        ("car(G)/car_0001.png", root / "car(G)" / "car_0001.png"), ("car(G)/car_0002.png", root / "car(G)" / "car_0002.png")]
    [pair] = data.pairs("test")
    assert pair.category == "car(G)" and pair.dropped_kps == 1  # the NaN x of the 10th target point
    assert pair.src_kps.tolist() == [[x, x + 10] for x in range(1, 10)]
    assert pair.trg_kps.tolist() == [[x + 30, x + 15] for x in range(1, 10)]
    assert pair.src_bbox == (1, 11, 9, 19) and pair.trg_bbox == (31, 16, 39, 24)  # boxes around the keypoints
    assert (pair.src_size, pair.trg_size) == ((60, 40), (64, 48))
    assert data.skipped == {"padded": 1}
    assert "no PF-WILLOW layout here: expected" in one_line_error(f"pfwillow:{tmp_path}")
    write_csv(root / "test_pairs.csv", ["imageA", "imageB"], [["PF-dataset/car(G)/car_0001.png", "x"]])
    with pytest.raises(DatasetError, match=r"test_pairs\.csv:2: expected 42 columns"):
        open_dataset(f"pfwillow:{root}").images()


# ---------------------------------------------------------------- AP-10K

def test_ap10k_as_geoaware_prepares_it(tmp_path):
    root = write_ap10k(tmp_path / "ap-10k")
    data = open_dataset(f"ap10k:{root}")
    assert isinstance(data, AP10KDataset) and data.default_threshold == "bbox"
    assert data.splits == ["test", "test_cross_species", "test_cross_family"]
    assert [r.id for r in data.images("test")] == ["Bovidae/antelope/000000000001.jpg", "Bovidae/antelope/000000000002.jpg"]
    assert data.images("test")[0].path == root / "JPEGImages" / "Bovidae" / "antelope" / "000000000001.jpg"
    [pair] = data.pairs("test")
    assert (pair.name, pair.category, pair.flags) == ("000000000001-000000000002:antelope", "antelope", {"setting": 0})
    assert pair.src_kps.tolist() == [[5, 6], [10, 12]] and pair.trg_kps.tolist() == [[7, 8], [14, 15]]
    assert pair.src_bbox == (2, 3, 22, 13) and pair.trg_bbox == (1, 1, 31, 26)  # [x, y, w, h] -> corners
    assert (pair.src_size, pair.trg_size) == ((40, 30), (50, 40))
    [family] = data.pairs("test_cross_family")
    assert family.category == "all" and family.flags == {"setting": 2} and family.src.endswith("000000000002.jpg")
    assert data.pairs("test_cross_species") == [] and data.skipped == {"invisible": 1}  # no shared keypoint


def test_ap10k_bad_input(tmp_path):
    assert f"no AP-10K layout here: expected {tmp_path / 'PairAnnotation'}/" in one_line_error(f"ap10k:{tmp_path}")
    root = write_ap10k(tmp_path / "ap-10k")
    write_json(root / "PairAnnotation" / "test" / "000000000001-000000000002:antelope.json",
               {"src_json_path": "../../etc/passwd", "trg_json_path": "x"})
    with pytest.raises(DatasetError, match="src_json_path must be a path .*/ImageAnnotation/"):
        open_dataset(f"ap10k:{root}").images("test")
    write_json(root / "PairAnnotation" / "test" / "000000000001-000000000002:antelope.json",
               {"src_json_path": "data/ImageAnnotation/../../../x.json", "trg_json_path": "data/ImageAnnotation/a.json"})
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        open_dataset(f"ap10k:{root}").images("test")


# ---------------------------------------------------------------- CUB-200-2011

def test_cub_same_class_pairs_of_the_split(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011")
    data = open_dataset(f"cub:{root}")
    assert isinstance(data, CUBDataset) and data.splits == ["trn", "test"] and data.default_threshold == "bbox"
    assert [r.id for r in data.images("trn")] == ["001.Albatross/A_4.jpg"]
    assert len(data.images()) == 6 and data.images("test")[0].path == root / "images" / "001.Albatross" / "A_1.jpg"
    pairs = data.pairs("test")
    # class 1: (1,2), (1,3); (2,3) shares no visible part; class 2: (5,6)
    assert [p.name for p in pairs] == ["1-2:001.Albatross", "1-3:001.Albatross", "5-6:002.Auklet"]
    first = pairs[0]
    assert (first.src, first.trg, first.category) == ("001.Albatross/A_1.jpg", "001.Albatross/A_2.jpg", "001.Albatross")
    assert first.src_kps.tolist() == [[1, 1]] and first.trg_kps.tolist() == [[3, 3]]
    assert first.src_bbox == (1, 2, 11, 13) and first.trg_bbox == (2, 2, 12, 14)  # x y w h -> corners
    assert (first.src_size, first.trg_size) == ((21, 30), (22, 30))  # from the headers
    assert pairs[2].src_kps.tolist() == [[7, 7], [9, 9]] and pairs[2].trg_kps.tolist() == [[10, 10], [11, 11]]
    assert data.skipped == {"invisible": 1}


def test_cub_seeded_sampling_is_the_documented_rule(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011")

    def expected(seed: int) -> list[str]:
        out = []
        for cls, name, candidates in (("1", "001.Albatross", [("1", "2"), ("1", "3")]), ("2", "002.Auklet", [("5", "6")])):
            key = lambda p: hashlib.sha256(f"{seed}/{cls}/{p[0]}/{p[1]}".encode()).digest()  # noqa: E731
            out += [f"{a}-{b}:{name}" for a, b in sorted(candidates, key=key)[:1]]
        return out

    for seed in (0, 1, 2, 3):
        spec = f"cub:{root}?pairs=1&seed={seed}" if seed else f"cub:{root}?pairs=1"
        names = [p.name for p in open_dataset(spec).pairs("test")]
        assert names == expected(seed) and names == [p.name for p in open_dataset(spec).pairs("test")]
    assert len({tuple(expected(s)) for s in range(8)}) == 2  # the seed matters
    assert "pairs='0' must be a whole number >= 1" in one_line_error(f"cub:{root}?pairs=0")
    assert "option 'limit=3' is not one of this kind's options (pairs=..., seed=...)" in one_line_error(f"cub:{root}?limit=3")


def test_cub_bad_input(tmp_path):
    message = one_line_error(f"cub:{tmp_path}")
    assert f"no CUB-200-2011 layout here: expected {tmp_path / 'images.txt'}" in message
    root = write_cub(tmp_path / "CUB_200_2011")
    (root / "parts" / "part_locs.txt").write_text("1 1 3.0 4.0 yes\n")
    with pytest.raises(DatasetError, match=r"part_locs\.txt:1: expected numbers"):
        open_dataset(f"cub:{root}").pairs("test")
    (root / "parts" / "part_locs.txt").unlink()
    assert f"expected {root / 'parts' / 'part_locs.txt'}" in one_line_error(f"cub:{root}")


# ---------------------------------------------------------------- SPair-U

def test_spair_u_reads_jamaisvu_layout(tmp_path):
    root = write_spair_u(tmp_path / "SPair-71k")
    data = open_dataset(f"spairu:{root}")
    assert isinstance(data, SPairUDataset) and data.splits == ["test"] and data.default_threshold == "bbox"
    assert [r.id for r in data.images("test")] == ["cat/a.jpg", "cat/b.jpg", "cat/c.jpg"]  # spair:'s ids
    [pair] = data.pairs("test")
    assert (pair.name, pair.src, pair.trg) == ("0-a-b:cat", "cat/a.jpg", "cat/b.jpg")
    assert pair.src_kps.tolist() == [[1, 2], [5, 6]] and pair.trg_kps.tolist() == [[3, 4], [9, 10]]  # keys 0 and 2
    assert (pair.src_bbox, pair.trg_bbox) == ((1, 2, 30, 25), (3, 4, 40, 33))
    assert (pair.src_size, pair.trg_size) == ((40, 30), (44, 36))
    assert pair.flags == {"viewpoint_variation": 2, "scale_variation": 0, "truncation": 1, "occlusion": 0}
    assert data.skipped == {"invisible": 1}
    assert f"no SPair-U layout here: expected {tmp_path / 'ExtraPairAnnotation'}/" in one_line_error(f"spairu:{tmp_path}")
    (root / "ExtraImageAnnotation" / "cat" / "c.json").unlink()
    with pytest.raises(DatasetError, match=r"c\.json: missing; .*1-a-c:cat\.json names its image"):
        open_dataset(f"spairu:{root}").pairs("test")


# ---------------------------------------------------------------- the reference's processed pairs JSON

def test_dhf_reference_annotations_folder(tmp_path):
    repo = write_dhf_repo(tmp_path / "diffusion_hyperfeatures")
    data = open_dataset(f"dhf:{repo}")
    assert isinstance(data, DHFPairsDataset) and data.default_threshold == "bbox"
    assert data.splits == ["spair_71k_test-4"]  # synthetic-3.json lists prompts, not pairs
    images = data.images()
    assert [(r.id, r.path) for r in images] == [
        ("dog/2008_000001.jpg", repo / "datasets/SPair-71k/JPEGImages/dog/2008_000001.jpg"),
        ("dog/2009_000002.jpg", repo / "datasets/SPair-71k/JPEGImages/dog/2009_000002.jpg")]
    first, second = data.pairs("spair_71k_test-4")
    assert (first.name, first.src, first.trg) == ("0-2008_000001-2009_000002:dog", "dog/2008_000001.jpg",
                                                  "dog/2009_000002.jpg")
    # the first points lie outside both images: kept, as the reference keeps them (one inside is enough)
    assert first.src_kps.tolist() == [[3, 383], [14, 7]] and first.trg_kps.tolist() == [[145, 394], [19, 5]]
    assert (first.src_bbox, first.trg_bbox) == ((2, 1, 37, 29), (1, 1, 45, 19))
    assert (first.src_size, first.trg_size, first.flags) == ((40, 30), (50, 20), {"viewpoint_variation": 1})
    assert (second.src_bbox, second.trg_bbox) == ((4, 2, 10, 5), (6, 7, 20, 9))  # no boxes: around the points
    assert data.skipped == {"invisible": 1, "out_of_image": 1}  # the entry whose points are null; the last


def test_dhf_one_file_with_an_image_folder(tmp_path):
    repo = write_dhf_repo(tmp_path / "repo")
    file, images = repo / "annotations" / "spair_71k_test-4.json", repo / "datasets" / "SPair-71k" / "JPEGImages"
    moved = tmp_path / "elsewhere" / "pairs.json"
    moved.parent.mkdir()
    moved.write_text(file.read_text())
    data = open_dataset(f"dhf:{moved}?images={images}")
    assert data.splits == ["pairs"] and len(data.pairs("pairs")) == 2
    assert data.images()[0].path == images / "dog" / "2008_000001.jpg"
    assert open_dataset(f"dhf:{file}").image_root == images  # a file in annotations/: the reference's image_path
    assert "no image folder" in one_line_error(f"dhf:{moved}?images={tmp_path / 'nope'}")
    assert f"no reference pairs here: expected {tmp_path / 'annotations'}/*.json" in one_line_error(f"dhf:{tmp_path}")
    write_json(moved, [{"source_path": "a.jpg", "target_path": "b.jpg", "source_points": [[1, 2]]}])
    with pytest.raises(DatasetError, match=r"pairs\.json: pair 0 lacks target_points"):
        open_dataset(f"dhf:{moved}?images={images}").splits


# ---------------------------------------------------------------- all of them

def test_every_prefix_is_registered_and_named_in_the_error(tmp_path):
    message = one_line_error(f"nope:{tmp_path}")
    for kind in ("ap10k", "cub", "dhf", "pfpascal", "pfwillow", "spairu"):
        assert kind in message


def test_build_takes_a_benchmark_prefix_with_options(tmp_path, tiny_model_dir):
    """`dhf-cache build --dataset cub:PATH?pairs=1` end to end up to the cache's image list
    (--prepare-only: the model loads, nothing is inverted); the other prefixes' images() are above."""
    from conftest import invoke, small_build_args

    from dhf_cache.cache.feature_cache import FeatureCache

    root = write_cub(tmp_path / "CUB_200_2011")
    cache = tmp_path / "cub.zarr"
    result = invoke(*small_build_args(f"cub:{root}?pairs=1&seed=0", cache, tiny_model_dir, "--split", "test",
                                      "--prepare-only", "--json"))
    assert result.exit_code == 0, result.output
    assert FeatureCache.open(str(cache)).image_ids == [r.id for r in open_dataset(f"cub:{root}").images("test")]
    result = invoke(*small_build_args(f"pfwillow:{tmp_path}", cache, tiny_model_dir, "--prepare-only"))
    assert result.exit_code != 0 and "no PF-WILLOW layout here" in result.output


BENCHMARKS = {  # prefix: (fixture writer, split scored)
    "pfpascal": (lambda root: write_pf_pascal(root, "hpf"), "test"),
    "pfwillow": (write_pf_willow, "test"),
    "ap10k": (write_ap10k, "test"),
    "cub": (write_cub, "test"),
    "spairu": (write_spair_u, "test"),
    "dhf": (write_dhf_repo, "spair_71k_test-4"),
}


@pytest.mark.parametrize("kind", list(BENCHMARKS))
def test_one_eval_prints_the_headline_and_the_matrix_on_each_benchmark(kind, tmp_path, tiny_dino_dir):
    """Built with the tiny DINOv2 (the cheapest source), scored from its raw map under HPF's
    protocol, whose threshold is each benchmark's own (PF-PASCAL image, PF-WILLOW keypoint box)."""
    from conftest import invoke

    writer, split = BENCHMARKS[kind]
    spec = f"{kind}:{writer(tmp_path / kind)}"
    cache = tmp_path / "c.zarr"
    built = invoke("build", "--dataset", spec, "--split", split, "--cache", cache, "--model", tiny_dino_dir,
                   "--load-size", "56", "--image-size", "56", "--device", "cpu", "--no-progress")
    assert built.exit_code == 0, built.output
    result = invoke("eval", "--cache", cache, "--dataset", spec, "--split", split, "--out", tmp_path / "e",
                    "--raw", "layernorm", "--protocol", "hpf", "--load-size", "56", "--device", "cpu",
                    "--no-progress", "--drawings", "0", "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    assert "hpf headline  PCK" in result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    default = open_dataset(spec).default_threshold
    assert metrics["protocol"]["threshold_base"] == default
    assert metrics["headline"][0]["name"] == f"{default}<=0.1 per_image"
    assert len(metrics["conventions"]) == 3 * 2 * 5 * 3
    assert metrics["n_pairs"] == len(open_dataset(spec).pairs(split))
