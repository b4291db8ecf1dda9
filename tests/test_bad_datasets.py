"""Bad data set input: one clear DatasetError naming the file and field, or a per-pair `error`.

Malformed annotations (not UTF-8, duplicate names, keypoint counts, boxes, sizes), non-finite
keypoints (dropped and counted), FIFOs (refused, never opened: each reader runs in a subprocess
with a timeout, so a reader that does open one fails the test instead of hanging it), unsafe or
unusable images in `pairs:` files (that pair's `error`), and symlinked data sets (accepted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, cli, small_build_args
from dhf_cache.datasets import open_dataset
from dhf_cache.errors import DatasetError

LATIN1 = "caf\xe9".encode("latin-1")  # not UTF-8


def _raises(call, *words: str) -> str:
    """The DatasetError `call` raises: one line, holding every word."""
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def _reader(code: str, *args: str, timeout: float = 60) -> list:
    """Run `code` (which prints one JSON value) in a fresh interpreter; a hang fails the test."""
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the reader was still blocked after {timeout} s: it opened a FIFO")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# SPair layout


@pytest.fixture
def spair(mini_spair, copy_dir) -> Path:
    return copy_dir(mini_spair, "spair")


def _test_files(root: Path) -> list[Path]:
    names = (root / "Layout" / "large" / "test.txt").read_text().split()
    return [root / "PairAnnotation" / "test" / f"{n}.json" for n in names]


def _edit(path: Path, **fields) -> dict:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))  # json writes NaN/Infinity literals, as Python's reader accepts
    return data


def test_spair_pair_file_not_utf8(spair):
    bad = _test_files(spair)[1]
    bad.write_bytes(bad.read_bytes().replace(b'"cat"', b'"' + LATIN1 + b'"'))
    _raises(lambda: open_dataset(f"spair:{spair}").images("test"), str(bad), "UTF-8")


def test_spair_layout_not_utf8(spair):
    layout = spair / "Layout" / "large" / "test.txt"
    layout.write_bytes(layout.read_bytes() + LATIN1 + b"\n")
    _raises(lambda: open_dataset(f"spair:{spair}").images("test"), str(layout), "UTF-8")


def test_spair_layout_listing_a_pair_twice(spair):
    layout = spair / "Layout" / "large" / "test.txt"
    name = layout.read_text().split()[2]
    layout.write_text(layout.read_text() + name + "\n")
    _raises(lambda: open_dataset(f"spair:{spair}").pairs("test"), str(layout), repr(name), "listed twice")


def test_spair_two_pair_files_with_one_name(spair):
    first = _test_files(spair)[0]
    copy = first.with_name("9-copy:cat.json")
    shutil.copy(first, copy)  # same "filename" field inside
    with open(spair / "Layout" / "large" / "test.txt", "a") as f:
        f.write("9-copy:cat\n")
    _raises(lambda: open_dataset(f"spair:{spair}").pairs("test"), str(copy), str(first), "filename")


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("trg_kps", "drop-last", ("src_kps has", "trg_kps")),  # counts differ
        ("src_kps", [1.0, 2.0, 3.0, 4.0], ("src_kps[0]", "[x, y]")),  # flat list, not pairs
        ("src_bndbox", [0, 0], ("src_bndbox", "4 finite numbers")),
        ("trg_bndbox", [0, 0, 10, 10, 5], ("trg_bndbox",)),
        ("src_imsize", [0, 64, 3], ("src_imsize", "positive")),
        ("trg_imsize", [-96, 64, 3], ("trg_imsize", "positive")),
    ],
)
def test_spair_malformed_field_names_the_file_and_field(spair, field, value, words):
    bad = _test_files(spair)[2]
    data = json.loads(bad.read_text())
    _edit(bad, **{field: data[field][:-1] if value == "drop-last" else value})
    ds = open_dataset(f"spair:{spair}")
    _raises(lambda: ds.pairs("test"), str(bad), data["filename"], *words)


def test_spair_non_finite_keypoints_are_dropped_and_counted(spair):
    bad = _test_files(spair)[0]
    data = json.loads(bad.read_text())
    k = len(data["src_kps"])
    src, trg = data["src_kps"], data["trg_kps"]
    src[1], trg[3] = [float("nan"), 5.0], [7.0, float("inf")]
    _edit(bad, src_kps=src, trg_kps=trg)
    pairs = {p.name: p for p in open_dataset(f"spair:{spair}").pairs("test")}
    pair = pairs[data["filename"]]
    assert pair.dropped_kps == 2 and pair.error is None
    assert pair.src_kps.shape == pair.trg_kps.shape == (k - 2, 2)
    assert np.isfinite(pair.src_kps).all() and np.isfinite(pair.trg_kps).all()
    kept = [i for i in range(k) if i not in (1, 3)]
    np.testing.assert_array_equal(pair.src_kps, np.asarray(src, dtype=float)[kept])
    np.testing.assert_array_equal(pair.trg_kps, np.asarray(trg, dtype=float)[kept])
    assert all(p.dropped_kps == 0 for name, p in pairs.items() if name != pair.name)


def test_spair_unsafe_image_name_sets_the_pair_error(spair):
    bad = _test_files(spair)[1]
    data = _edit(bad, src_imname="../../../../etc/passwd")
    pairs = {p.name: p for p in open_dataset(f"spair:{spair}").pairs("test")}
    assert "leaves the dataset folder" in pairs[data["filename"]].error
    assert "etc/passwd" in pairs[data["filename"]].error
    assert [p.error for n, p in pairs.items() if n != data["filename"]] == [None] * 3


_LIST_SPAIR = """
import json, sys
from dhf_cache.datasets import open_dataset
from dhf_cache.errors import DatasetError
try:
    print(json.dumps(len(open_dataset(sys.argv[1]).pairs("test"))))
except DatasetError as exc:
    print(json.dumps(str(exc)))
"""


def test_spair_pair_annotation_fifo_is_refused_unopened(spair):
    fifo = _test_files(spair)[1]
    fifo.unlink()
    os.mkfifo(fifo)
    message = _reader(_LIST_SPAIR, f"spair:{spair}")
    assert str(fifo) in message and "FIFO" in message and "\n" not in message


def test_spair_layout_fifo_is_refused_not_skipped(spair):
    layout = spair / "Layout" / "large" / "test.txt"
    layout.unlink()
    os.mkfifo(layout)
    message = _reader(_LIST_SPAIR, f"spair:{spair}")
    assert str(layout) in message and "FIFO" in message


def test_symlinked_spair_root_of_linked_files_lists_the_same(spair, tmp_path):
    """A data set reached through a link, whose folders and files are links (as `cp -rs` makes)."""
    farm = tmp_path / "farm"
    for path in sorted(spair.rglob("*")):
        target = farm / path.relative_to(spair)
        if path.is_dir():
            target.mkdir(parents=True)
        else:
            target.symlink_to(path)
    shutil.rmtree(farm / "JPEGImages" / "cat")
    (farm / "JPEGImages" / "cat").symlink_to(spair / "JPEGImages" / "cat", target_is_directory=True)
    (tmp_path / "link").symlink_to(farm, target_is_directory=True)
    real, linked = open_dataset(f"spair:{spair}"), open_dataset(f"spair:{tmp_path / 'link'}")
    for split in ("trn", "test"):
        records = linked.images(split)
        assert [r.id for r in records] == [r.id for r in real.images(split)]
        for r in records:
            assert r.error is None and r.path.is_file(), r
            assert r.path.read_bytes() == (spair / "JPEGImages" / r.id).read_bytes()
        for a, b in zip(real.pairs(split), linked.pairs(split), strict=True):
            assert (a.name, a.src, a.trg, a.src_size, a.trg_size, a.src_bbox) == (b.name, b.src, b.trg, b.src_size,
                                                                                 b.trg_size, b.src_bbox)
            np.testing.assert_array_equal(a.src_kps, b.src_kps)
            assert b.error is None


# ---------------------------------------------------------------------------------------------
# pairs: files


@pytest.fixture
def pairs_dir(mini_spair, tmp_path) -> Path:
    """A folder with imgs/a.jpg, imgs/b.jpg (from mini_spair, 96x64) and nothing else."""
    root = tmp_path / "mine"
    (root / "imgs").mkdir(parents=True)
    for name, src in (("a.jpg", "cat/chelsea_000.jpg"), ("b.jpg", "cat/chelsea_001.jpg")):
        shutil.copy(mini_spair / "JPEGImages" / src, root / "imgs" / name)
    return root


def _entry(src="imgs/a.jpg", trg="imgs/b.jpg", **fields) -> dict:
    return {"src": src, "trg": trg, "src_kps": [[1, 2], [10, 20]], "trg_kps": [[3, 4], [30, 40]], **fields}


def _pairs_file(root: Path, *entries: dict) -> Path:
    path = root / "pairs.json"
    path.write_text(json.dumps({"pairs": list(entries)}))
    return path


def test_pairs_file_not_utf8(pairs_dir):
    path = _pairs_file(pairs_dir, _entry(category="x"))
    path.write_bytes(path.read_bytes().replace(b'"x"', b'"' + LATIN1 + b'"'))
    _raises(lambda: open_dataset(f"pairs:{path}").images(), str(path), "UTF-8")


def test_pairs_file_duplicate_names(pairs_dir):
    path = _pairs_file(pairs_dir, _entry(name="p"), _entry(name="q"), _entry(trg="imgs/a.jpg", name="p"))
    _raises(lambda: open_dataset(f"pairs:{path}").images(), str(path), "pairs 0 and 2", "'p'")


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"src_kps": [1, 2, 10, 20]}, ("pair 1", "src_kps[0]", "[x, y]")),  # flat list
        ({"trg_kps": [["3", "4"], [30, 40]]}, ("pair 1", "trg_kps[0]")),  # strings, not numbers
        ({"src_bbox": [0, 0, 50]}, ("pair 1", "src_bbox", "4 finite numbers")),
        ({"trg_bbox": [0, 0, 50, float("nan")]}, ("pair 1", "trg_bbox")),
        ({"src": 7}, ("pair 1", "src must be an image path")),
    ],
)
def test_pairs_file_malformed_field_is_found_when_read(pairs_dir, fields, words):
    path = _pairs_file(pairs_dir, _entry(), _entry(**fields))
    _raises(lambda: open_dataset(f"pairs:{path}").images(), str(path), *words)  # images(): before any matching


def test_pairs_file_non_finite_keypoints_are_dropped_and_counted(pairs_dir):
    path = pairs_dir / "pairs.json"
    # NaN, Infinity and null (JavaScript's JSON.stringify(NaN)) as a writer puts them
    path.write_text('{"pairs": [{"src": "imgs/a.jpg", "trg": "imgs/b.jpg", "name": "p",'
                    ' "src_kps": [[1, 2], [NaN, 3], [4, 5], [6, 7]],'
                    ' "trg_kps": [[1, 1], [2, 2], [null, 3], [8, -Infinity]]},'
                    ' {"src": "imgs/b.jpg", "trg": "imgs/a.jpg", "name": "q",'
                    ' "src_kps": [[1, 2]], "trg_kps": [[3, 4]]}]}')
    p, q = open_dataset(f"pairs:{path}").pairs("test")
    assert (p.dropped_kps, q.dropped_kps) == (3, 0)
    np.testing.assert_array_equal(p.src_kps, [[1, 2]])
    np.testing.assert_array_equal(p.trg_kps, [[1, 1]])
    assert p.error is None and p.src_size == (96, 64)


def test_pairs_file_bad_images_set_their_pairs_error_only(pairs_dir, tmp_path):
    (tmp_path / "outside.jpg").write_bytes((pairs_dir / "imgs" / "a.jpg").read_bytes())
    (pairs_dir / "imgs" / "garbage.jpg").write_bytes(b"not an image at all")
    (pairs_dir / "imgs" / "folder.jpg").mkdir()
    bad = {"unsafe": "../outside.jpg", "missing": "imgs/none.jpg", "garbage": "imgs/garbage.jpg",
           "folder": "imgs/folder.jpg", "absolute": str(tmp_path / "outside.jpg")}
    path = _pairs_file(pairs_dir, _entry(name="good", src_bbox=[1, 2, 3, 4]),
                       *(_entry(trg=image, name=name) for name, image in bad.items()))
    pairs = {p.name: p for p in open_dataset(f"pairs:{path}").pairs("test")}
    good = pairs.pop("good")
    assert good.error is None and (good.src_size, good.trg_size) == ((96, 64), (96, 64))
    assert good.src_bbox == (1, 2, 3, 4) and good.trg_bbox == (0, 0, 96, 64)
    words = {"unsafe": "leaves the dataset folder", "missing": "file not found", "garbage": "not a readable image",
             "folder": "folder", "absolute": "absolute"}
    for name, pair in pairs.items():
        assert bad[name] in pair.error and words[name] in pair.error, pair.error
        assert pair.trg_size == (0, 0) and pair.src_size == (96, 64)
        assert len(pair.src_kps) == 2  # keeps its keypoints, name and ids
        assert pair.trg == bad[name]


def test_pairs_file_fifo_image_is_refused_unopened(pairs_dir):
    os.mkfifo(pairs_dir / "imgs" / "pipe.jpg")
    path = _pairs_file(pairs_dir, _entry(name="ok"), _entry(src="imgs/pipe.jpg", name="piped"))
    code = ("import json, sys\nfrom dhf_cache.datasets import open_dataset\n"
            "print(json.dumps({p.name: p.error for p in open_dataset(sys.argv[1]).pairs('test')}))")
    errors = _reader(code, f"pairs:{path}")
    assert errors["ok"] is None
    assert "imgs/pipe.jpg" in errors["piped"] and "FIFO" in errors["piped"]


def test_images_fifo_is_an_image_error_unopened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    code = """
import json, sys
from dhf_cache.errors import ImageError
from dhf_cache.datasets.images import image_size, load_image
out = []
for read in (load_image, image_size):
    try:
        read(sys.argv[1])
        out.append("read")
    except ImageError as exc:
        out.append(str(exc))
print(json.dumps(out))
"""
    for message in _reader(code, str(fifo)):
        assert str(fifo) in message and "FIFO" in message and "not a regular file" in message


def test_pairs_file_images_through_symlinks(pairs_dir, tmp_path):
    """imgs/ linked to another disk, the JSON's folder reached through a link: both accepted."""
    disk = tmp_path / "disk"
    shutil.move(pairs_dir / "imgs", disk)
    (pairs_dir / "imgs").symlink_to(disk, target_is_directory=True)
    (tmp_path / "link").symlink_to(pairs_dir, target_is_directory=True)
    _pairs_file(pairs_dir, _entry(name="p"))
    ds = open_dataset(f"pairs:{tmp_path / 'link' / 'pairs.json'}")
    assert [(r.id, r.error) for r in ds.images()] == [("imgs/a.jpg", None), ("imgs/b.jpg", None)]
    (pair,) = ds.pairs("test")
    assert pair.error is None and pair.src_size == (96, 64)


def test_folder_follows_symlinked_subfolders_once(pairs_dir, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    shutil.copy(pairs_dir / "imgs" / "a.jpg", disk / "c.jpg")
    (pairs_dir / "imgs" / "2019").symlink_to(disk, target_is_directory=True)
    (disk / "up").symlink_to(pairs_dir, target_is_directory=True)  # a loop back up the tree
    ids = [r.id for r in open_dataset(f"folder:{pairs_dir}").images()]
    assert ids == ["imgs/2019/c.jpg", "imgs/a.jpg", "imgs/b.jpg"]


# ---------------------------------------------------------------------------------------------
# through the CLI


def test_cli_malformed_pairs_file_is_one_line_and_writes_nothing(pairs_dir, tmp_path, tiny_model_dir):
    path = _pairs_file(pairs_dir, _entry(), _entry(src_kps=[[1, 2]]))
    path.write_bytes(path.read_bytes() + b" " + LATIN1)
    cache = tmp_path / "c.zarr"
    result = cli(*small_build_args(f"pairs:{path}", cache, tiny_model_dir), timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # lines before it are the CPU-load note
    assert last.startswith("error: ") and str(path) in last and "UTF-8" in last
    assert not cache.exists()


def test_cli_build_of_pairs_file_with_bad_images_builds_the_others(pairs_dir, tmp_path, tiny_model_dir):
    (tmp_path / "outside.jpg").write_bytes((pairs_dir / "imgs" / "a.jpg").read_bytes())
    os.mkfifo(pairs_dir / "imgs" / "pipe.jpg")
    path = _pairs_file(pairs_dir, _entry(), _entry(src="../outside.jpg"), _entry(trg="imgs/pipe.jpg"))
    cache = tmp_path / "c.zarr"
    result = cli(*small_build_args(f"pairs:{path}", cache, tiny_model_dir, "--batch-size", "4"), timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "built 2 image(s)" in result.stdout and "2 failed" in result.stdout
    failed = {line.split(": ", 1)[0].removeprefix("  FAILED "): line for line in result.stderr.splitlines()
              if line.startswith("  FAILED ")}
    assert set(failed) == {"../outside.jpg", "imgs/pipe.jpg"}
    assert "leaves the dataset folder" in failed["../outside.jpg"]
    assert "FIFO" in failed["imgs/pipe.jpg"]
