"""The cache never lies: damaged chunks are refused where they are read, creation survives a kill
at every write, and metadata that breaks the contract is one line, never a traceback or a hang."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner
from zarr.storage import LocalStore

import dhf_cache.cache.feature_cache as cache_mod
from conftest import SMALL_NET, source_dir
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.cli import main as _register  # noqa: F401
from dhf_cache.cli.app import app
from dhf_cache.config import BuildSpec, FeatureSpace, ModelIdentity
from dhf_cache.cache.direct_chunks import direct_array
from dhf_cache.errors import CacheError
from dhf_cache.cache.feature_loader import FeatureReader, select_features
from dhf_cache.cache.layers import LayerInfo

runner = CliRunner()
SPEC = BuildSpec(feature_space=FeatureSpace(
    model=ModelIdentity(unet_class="UNet2DConditionModel", unet_sha256="u", vae_sha256="v", text_encoder_sha256="t"),
    steps=2, save_steps=(1, 0), layers=("a", "b")))
LAYERS = [LayerInfo("a", 4, 2, 2), LayerInfo("b", 2, 4, 4)]
LATENT = (4, 8, 8)


def prepare(url, ids):
    return FeatureCache.prepare(str(url), SPEC, LAYERS, [-1, 500], ids, LATENT)


def _snapshot(url: Path) -> dict:
    """What a cache holds, to compare a resumed creation with an uninterrupted one."""
    cache = FeatureCache.open(str(url))
    meta = json.loads(json.dumps(cache.meta))
    meta["provenance"].pop("created_at")
    arrays = {path: (cache.group[path].shape, cache.group[path].dtype.str)
              for path in ["latents", "done", "sizes", "errors", "image_ids", "features/a", "features/b"]}
    root = zarr.open_group(str(url), mode="r").attrs.asdict()["dhf_cache"]
    return {"meta": meta, "ids": cache.image_ids, "done": cache.done_mask().tolist(), "arrays": arrays,
            "attrs": sorted(cache.group.attrs.asdict()), "root": (root["format_version"], sorted(root))}


def _killed_at_write(url: Path, k: int, ids: list[str]) -> bool:
    """prepare() in a forked child that dies (os._exit, like SIGKILL: no cleanup) just before
    the store's k-th write; True when it got that far."""
    pid = os.fork()
    if pid == 0:  # the child
        count = [0]
        original = LocalStore.set

        async def dying(self, key, value, *a, **kw):
            if count[0] == k:
                os._exit(86)
            count[0] += 1
            return await original(self, key, value, *a, **kw)

        LocalStore.set = dying
        try:
            prepare(url, ids)
        except BaseException:  # noqa: BLE001 - report as a distinct exit code
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 86), f"child failed with exit code {code} before write {k}"
    return code == 86


def test_cache_creation_killed_at_every_write_is_completed_by_the_rerun(tmp_path):
    reference = tmp_path / "reference.zarr"
    prepare(reference, ["x.jpg", "y.jpg"])
    want = _snapshot(reference)
    k = 0
    while True:
        url = tmp_path / f"killed-{k}.zarr"
        if not _killed_at_write(url, k, ["x.jpg", "y.jpg"]):
            break  # the k-th write never came: every write point was tried
        prepare(url, ["x.jpg", "y.jpg"])  # the rerun: same command, same ids
        assert _snapshot(url) == want, f"killed before write {k}"
        k += 1
    assert k >= 15  # group, arrays, attributes, resizes and ids were all kill points


def test_adding_images_killed_at_every_write_leaves_no_phantom_image(tmp_path):
    base = tmp_path / "base.zarr"
    prepare(base, ["x.jpg", "y.jpg"])
    reference = tmp_path / "reference.zarr"
    shutil.copytree(base, reference)
    prepare(reference, ["x.jpg", "y.jpg", "z.jpg", "w.jpg"])
    want = _snapshot(reference)
    k = 0
    while True:
        url = tmp_path / f"added-{k}.zarr"
        shutil.copytree(base, url)
        if not _killed_at_write(url, k, ["x.jpg", "y.jpg", "z.jpg", "w.jpg"]):
            break
        ids = FeatureCache.open(str(url)).image_ids
        assert "" not in ids and ids in (["x.jpg", "y.jpg"], ["x.jpg", "y.jpg", "w.jpg", "z.jpg"]), ids
        prepare(url, ["x.jpg", "y.jpg", "z.jpg", "w.jpg"])
        got = _snapshot(url)
        assert got["ids"] == want["ids"] and got["arrays"] == want["arrays"] and got["done"] == want["done"]
        k += 1
    assert k >= 8


def test_an_empty_group_is_taken_over_a_foreign_one_refused(tmp_path):
    zarr.open_group(tmp_path / "empty.zarr", mode="w")
    prepare(tmp_path / "empty.zarr", ["x.jpg"])
    assert FeatureCache.open(str(tmp_path / "empty.zarr")).image_ids == ["x.jpg"]
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w")
    foreign.create_array("mine", shape=(3,), dtype="int32")
    with pytest.raises(CacheError, match="not a dhf-cache cache"):
        prepare(tmp_path / "foreign.zarr", ["x.jpg"])
    assert "mine" in zarr.open_group(tmp_path / "foreign.zarr", mode="r")  # untouched


# ----------------------------------------------------------------------- damaged chunks
@pytest.fixture
def damaged(tmp_path, train_cache):
    url = tmp_path / "damaged.zarr"
    shutil.copytree(train_cache, url)
    cache = FeatureCache.open(str(url))
    return url, cache.layers[1].name, 2, cache.image_ids[2]


def _chunk(url: Path, layer: str, index: int) -> Path:
    return direct_array(FeatureCache.open(str(url)).feature_array(layer)).chunk_path(index)


DAMAGE = {
    "missing": lambda path: path.unlink(),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
    "bit-flipped": lambda path: path.write_bytes(bytes(b ^ (0xFF if i == 40 else 0) for i, b in enumerate(path.read_bytes()))),
}


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "zarr"])
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_chunk_is_refused_by_both_read_paths(damaged, monkeypatch, kind, direct):
    url, layer, index, image_id = damaged
    DAMAGE[kind](_chunk(url, layer, index))
    monkeypatch.setattr(cache_mod, "DIRECT_READS", direct)
    cache = FeatureCache.open(str(url))
    with pytest.raises(CacheError) as err:
        cache.read_features(index)
    message = str(err.value)
    assert image_id in message and layer in message and "verify --repair" in message
    assert ("missing" if kind == "missing" else "damaged") in message
    assert "\n" not in message
    cache.read_features(index - 1)  # its neighbours are fine


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "zarr"])
def test_non_finite_maps_are_refused_when_asked(damaged, monkeypatch, direct):
    url, layer, index, image_id = damaged
    array = zarr.open_array(source_dir(url) / "features" / layer, mode="r+")
    values = array[index]
    values[0, 0, 0, 0] = np.nan
    array[index] = values
    monkeypatch.setattr(cache_mod, "DIRECT_READS", direct)
    cache = FeatureCache.open(str(url))
    assert np.isnan(cache.read_features(index, [layer])[layer]).any()  # training's reader does not look
    reader = FeatureReader(cache, select_features(cache), check_finite=True)
    with pytest.raises(CacheError, match=f"{image_id}.*{layer}.*non-finite"):
        reader.read(index)


def test_train_refuses_a_missing_chunk_in_one_line(tmp_path, damaged, train_data):
    url, layer, index, image_id = damaged
    _chunk(url, layer, index).unlink()
    result = runner.invoke(app, ["train", "--cache", str(url), "--dataset", f"spair:{train_data}", "--out",
                                 str(tmp_path / "run"), "--steps", "30", "--val-split", "", "--device", "cpu",
                                 "--no-progress", *SMALL_NET])
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and image_id in error[0] and layer in error[0], result.output


# ----------------------------------------------------------------------- crafted metadata
def _edit_meta(url: Path, edit) -> None:
    path = source_dir(url) / "zarr.json"  # the source's attributes hold its spec
    doc = json.loads(path.read_text())
    edit(doc["attributes"]["dhf_cache"])
    path.write_text(json.dumps(doc))


def _edit_array(url: Path, path: str, edit) -> None:
    meta = source_dir(url) / path / "zarr.json"
    doc = json.loads(meta.read_text())
    edit(doc)
    meta.write_text(json.dumps(doc))


CRAFTED = {
    "spec edited under its old fingerprint": (lambda u: _edit_meta(u, lambda m: m["spec"]["preprocessing"].update(load_size=224)),
                                             "does not match its fingerprint"),
    "fingerprint missing": (lambda u: _edit_meta(u, lambda m: m.pop("fingerprint")), "fingerprint is missing"),
    "layers not a list": (lambda u: _edit_meta(u, lambda m: m.update(layers="up")), "layers is a str"),
    "layer with a negative size": (lambda u: _edit_meta(u, lambda m: m["layers"][0].update(channels=-3)), "layers[0]"),
    "timesteps of strings": (lambda u: _edit_meta(u, lambda m: m.update(timesteps=["a"] * len(m["timesteps"]))),
                             "timesteps must be"),
    "spec not valid": (lambda u: _edit_meta(u, lambda m: m["spec"]["feature_space"].update(steps="many")),
                       "spec"),
    "feature array of the wrong dtype": (lambda u: _edit_array(u, "features/up_blocks.0.resnets.0",
                                                               lambda d: d.update(data_type="float32")), "dtype"),
    "feature array of the wrong shape": (lambda u: _edit_array(u, "features/up_blocks.0.resnets.0",
                                                               lambda d: d["shape"].__setitem__(2, 7)), "shape"),
    "a done array of 10^9 entries": (lambda u: _edit_array(u, "done", lambda d: d["shape"].__setitem__(0, 10**9)),
                                     "1,000,000,000 images"),
    "image ids array missing": (lambda u: shutil.rmtree(source_dir(u) / "image_ids"), "image_ids is missing"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_metadata_is_one_line_from_every_command(tmp_path, train_cache, train_data, case):
    url = tmp_path / "crafted.zarr"
    shutil.copytree(train_cache, url)
    craft, expected = CRAFTED[case]
    craft(url)
    before = sorted(str(p.relative_to(url)) for p in url.rglob("*"))
    commands = {
        "info": ["info", str(url)],
        "verify": ["verify", str(url), "--no-progress"],
        "train": ["train", "--cache", str(url), "--dataset", f"spair:{train_data}", "--out", str(tmp_path / "run"),
                  "--steps", "2", "--val-split", "", "--device", "cpu", "--no-progress", *SMALL_NET],
        "eval": ["eval", "--cache", str(url), "--dataset", f"spair:{train_data}", "--out", str(tmp_path / "ev"),
                 "--raw", "best", "--load-size", "64", "--device", "cpu", "--no-progress"],
    }
    signal.alarm(600)  # a done array of 10^9 entries once hung info, verify and train
    try:
        for name, args in commands.items():
            result = runner.invoke(app, args)
            assert result.exit_code == 1, (name, result.output)
            errors = [line for line in result.output.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and expected in errors[0] and str(url) in errors[0], (name, result.output)
            assert result.exception is None or isinstance(result.exception, SystemExit), (name, result.exception)
    finally:
        signal.alarm(0)
    assert sorted(str(p.relative_to(url)) for p in url.rglob("*")) == before  # nothing written
    assert not (tmp_path / "run" / "last").exists()


# ----------------------------------------------------------------------- verify: the cache's own lists
def _verify(url, *extra):
    return runner.invoke(app, ["verify", str(url), "--no-progress", "--json", *extra])


def _damage_array_chunk(url: Path, path: str, chunk: str) -> None:
    file = source_dir(url) / path / "c" / chunk
    file.write_bytes(b"\x13\x37" + file.read_bytes()[2:])


def test_verify_lists_and_repairs_duplicate_ids(tmp_path, train_cache):
    url = tmp_path / "dup.zarr"
    shutil.copytree(train_cache, url)
    ids = zarr.open_array(source_dir(url) / "image_ids", mode="r+")
    values = ids[:]
    values[3] = values[1]
    ids[:] = values
    with pytest.raises(CacheError, match="more than once"):
        FeatureCache.open(str(url)).index_of()
    report = json.loads(_verify(url).stdout)
    assert any("listed at entries 1 and 3" in p for p in report["problems"]["(image_ids, done)"])
    assert _verify(url, "--repair").exit_code == 0
    cache = FeatureCache.open(str(url))
    assert cache.image_ids[3] == f"<duplicate:3:{values[1]}>" and not cache.done_mask()[3]
    assert len(cache.index_of()) == len(values)
    assert json.loads(_verify(url).stdout)["ok"]


def test_verify_repairs_a_damaged_done_flag_that_every_other_command_refuses(tmp_path, train_cache, train_data):
    url = tmp_path / "done.zarr"
    shutil.copytree(train_cache, url)
    _damage_array_chunk(url, "done", "4")
    result = runner.invoke(app, ["info", str(url)])
    assert result.exit_code == 1 and "done has a damaged chunk" in result.output and "verify --repair" in result.output
    report = json.loads(_verify(url).stdout)
    assert report["problems"]["(image_ids, done)"] == ["done flag of entry 4: unreadable chunk"]
    assert _verify(url, "--repair").exit_code == 0
    cache = FeatureCache.open(str(url))
    assert not cache.done_mask()[4] and cache.done_mask().sum() == len(cache.image_ids) - 1


def test_verify_repairs_an_unreadable_ids_chunk_with_placeholders(tmp_path, train_cache):
    url = tmp_path / "ids.zarr"
    shutil.copytree(train_cache, url)
    n = len(FeatureCache.open(str(url)).image_ids)
    _damage_array_chunk(url, "image_ids", "0")
    with pytest.raises(CacheError, match="image_ids has a damaged chunk"):
        FeatureCache.open(str(url)).image_ids
    assert _verify(url, "--repair").exit_code == 0
    cache = FeatureCache.open(str(url))
    assert cache.image_ids == [f"<lost-id:{i}>" for i in range(n)] and not cache.done_mask().any()


def test_eval_refuses_a_missing_stored_descriptor_and_names_the_remedy(tmp_path, train_cache, train_data):
    url = tmp_path / "desc.zarr"
    shutil.copytree(train_cache, url)
    run = tmp_path / "run"
    common = ["--dataset", f"spair:{train_data}", "--device", "cpu", "--no-progress"]
    trained = runner.invoke(app, ["train", "--cache", str(url), "--out", str(run), "--steps", "2", "--val-split", "",
                                  *common, *SMALL_NET])
    assert trained.exit_code == 0, trained.output
    args = ["eval", "--cache", str(url), "--checkpoint", str(run), "--load-size", "64", *common]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    chunks = sorted(p for p in (source_dir(url) / "descriptors").rglob("maps/c/*/0/0/0") if p.is_file())
    chunks[0].unlink()  # its done flag stays set
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "chunk missing" in error[0] and "dhf-cache prune" in error[0], result.output


@pytest.mark.parametrize("kind", ["bit-flipped", "nan"])
def test_eval_refuses_a_damaged_or_nan_chunk_in_one_line(tmp_path, damaged, train_data, kind):
    from dhf_cache.datasets import open_dataset

    url, layer, _, _ = damaged
    image_id = open_dataset(f"spair:{train_data}").pairs("test")[0].src  # an image eval scores
    index = FeatureCache.open(str(url)).index_of()[image_id]
    if kind == "nan":
        array = zarr.open_array(source_dir(url) / "features" / layer, mode="r+")
        values = array[index]
        values[:] = np.nan
        array[index] = values
    else:
        DAMAGE[kind](_chunk(url, layer, index))
    result = runner.invoke(app, ["eval", "--cache", str(url), "--dataset", f"spair:{train_data}", "--out",
                                 str(tmp_path / "ev"), "--raw", f"{layer}@-1", "--load-size", "64", "--device", "cpu",
                                 "--no-progress"])
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and image_id in error[0] and layer in error[0], result.output
    assert ("non-finite" if kind == "nan" else "damaged") in error[0]


# A `dhf-cache build` whose store dies (os._exit, as SIGKILL: no cleanup) at the first write of a
# done flag: every chunk of that image is written, its flag is not.
DIE_AT_DONE = """
import os, sys
from zarr.storage import LocalStore
original = LocalStore.set
async def dying(self, key, value, *a, **kw):
    if key.startswith(("done/c/", "sources/sd/done/c/")):  # format 1 or 2
        os._exit(86)
    return await original(self, key, value, *a, **kw)
LocalStore.set = dying
from dhf_cache.cli.main import main
sys.argv[0] = "dhf-cache"
main()
"""


def test_a_build_killed_between_chunks_and_done_is_completed_exactly_by_the_rerun(tmp_path, mini_spair, tiny_model_dir):
    import subprocess
    import sys

    from conftest import ROOT, cli, small_build_args

    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    args = small_build_args(f"spair:{mini_spair}", killed, tiny_model_dir, "--split", "trn", "--batch-size", "2")
    proc = subprocess.run([sys.executable, "-c", DIE_AT_DONE, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 86, proc.stderr[-2000:]
    cache = FeatureCache.open(str(killed))
    assert not cache.done_mask().any()
    assert any((source_dir(killed) / "features" / layer.name / "c" / "0").exists() for layer in cache.layers)  # chunks were written
    assert cli(*args).returncode == 0
    assert cli(*small_build_args(f"spair:{mini_spair}", clean, tiny_model_dir, "--split", "trn",
                                 "--batch-size", "2")).returncode == 0
    a, b = FeatureCache.open(str(killed)), FeatureCache.open(str(clean))
    assert a.image_ids == b.image_ids and a.done_mask().all() and b.done_mask().all()
    for i in range(len(a.image_ids)):
        for name, values in a.read_features(i).items():
            np.testing.assert_array_equal(values, b.read_features(i)[name])
