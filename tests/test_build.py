"""`dhf-cache build` end to end: bad inputs, failures, resume, spec mismatch, info, model lookup."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from conftest import cli, done_flags, small_build_args, source_dir, start_cli, wait_for_first_done
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.cli.app import app
from dhf_cache.cli import main as _register  # noqa: F401  (registers the commands)

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"HF_HUB_OFFLINE": "1"})


def _photo(w=48, h=40, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 4, : w // 4] = (255, 0, 0)  # a red marker in the top-left corner
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> Path:
    """Every kind of image a real collection contains, good and bad."""
    root = tmp_path_factory.mktemp("messy")
    (root / "sub").mkdir()
    _photo(seed=1).save(root / "good.jpg")
    _photo(seed=2).convert("L").save(root / "gray.png")
    rgba = _photo(seed=3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    _photo(seed=4).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)).save(root / "sixteen.png")
    _photo(seed=5).convert("P", palette=Image.ADAPTIVE).save(root / "sub" / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _photo(w=48, h=32, seed=6).save(root / "rotated.jpg", exif=exif.tobytes())
    _photo(w=300, h=300, seed=7).save(root / "huge.png")
    (root / "corrupt.jpg").write_bytes(os.urandom(600))
    good = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


FAILING = {"corrupt.jpg", "truncated.jpg", "empty.png", "huge.png"}
GOOD = {"good.jpg", "gray.png", "rgba.png", "cmyk.jpg", "sixteen.png", "sub/palette.png", "rotated.jpg"}


def test_bad_images_are_recorded_and_the_build_goes_on(tmp_path, messy_folder, tiny_model_dir):
    cache = tmp_path / "messy.zarr"
    args = small_build_args(f"folder:{messy_folder}", cache, tiny_model_dir, "--batch-size", "3",
                            "--max-pixels", "50000")
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for name in FAILING:
        assert f"FAILED {name}:" in result.output
    assert "built 7 image(s)" in result.output
    assert "disk: up to" in result.output and "for 11 image(s)" in result.output  # checked before building
    c = FeatureCache.open(str(cache))
    done = dict(zip(c.image_ids, c.done_mask()))
    assert {k for k, v in done.items() if v} == GOOD
    reasons = {f["id"]: f["error"] for f in c.failures()}
    assert set(reasons) == FAILING
    assert "empty file" in reasons["empty.png"]
    assert "decompression-bomb" in reasons["huge.png"] and "90,000" in reasons["huge.png"]
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
    assert "not a readable image" in reasons["corrupt.jpg"]
    sizes = dict(zip(c.image_ids, c.sizes().tolist()))
    assert sizes["rotated.jpg"] == [32, 48]  # EXIF orientation applied: width and height swap
    assert sizes["good.jpg"] == [48, 40]

    # a rerun retries only the failures and leaves finished images untouched
    chunk = source_dir(cache) / "features" / "up_blocks.3.resnets.2" / "c" / str(c.index_of()["good.jpg"])
    before = {p: p.stat().st_mtime_ns for p in chunk.rglob("*") if p.is_file()}
    (messy_folder / "empty.png").write_bytes((messy_folder / "good.jpg").read_bytes())  # the user fixes one
    try:
        again = invoke(*args, "--json")
    finally:
        (messy_folder / "empty.png").write_bytes(b"")
    assert again.exit_code == 1
    summary = json.loads(again.stdout)
    assert summary["n_skipped"] == 7 and summary["n_built"] == 1 and summary["n_failed"] == 3
    assert {p: p.stat().st_mtime_ns for p in chunk.rglob("*") if p.is_file()} == before
    assert FeatureCache.open(str(cache)).done_mask().sum() == 8


def test_spair_annotations_naming_missing_or_escaping_files_are_failures(tmp_path, mini_spair, tiny_model_dir, copy_dir):
    data = copy_dir(mini_spair, "spair")
    pair_files = sorted((data / "PairAnnotation" / "test").glob("*.json"))
    escaping = json.loads(pair_files[0].read_text())
    escaping["src_imname"] = "../../../../etc/passwd"
    pair_files[0].write_text(json.dumps(escaping))
    missing = json.loads(pair_files[1].read_text())
    missing_image = data / "JPEGImages" / missing["category"] / missing["trg_imname"]
    missing_image.unlink()
    result = invoke(*small_build_args(f"spair:{data}", tmp_path / "c.zarr", tiny_model_dir, "--split", "test"))
    assert result.exit_code == 1
    c = FeatureCache.open(str(tmp_path / "c.zarr"))
    reasons = {f["id"]: f["error"] for f in c.failures()}
    escaping_id = f"{escaping['category']}/../../../../etc/passwd"
    assert "leaves the dataset folder" in reasons[escaping_id]
    assert "file not found" in reasons[f"{missing['category']}/{missing['trg_imname']}"]
    assert c.done_mask().sum() == len(c.image_ids) - 2


def test_non_finite_features_are_refused_not_stored(tmp_path, tiny_model_dir, mini_spair):
    from diffusers import UNet2DConditionModel

    model = tmp_path / "overflow-model"
    shutil.copytree(tiny_model_dir, model)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    with np.errstate(all="ignore"):
        unet.up_blocks[3].resnets[2].conv2.weight.data *= 1e6  # activations beyond fp16's 65504
    unet.save_pretrained(model / "unet")
    result = invoke(*small_build_args(f"spair:{mini_spair}", tmp_path / "c.zarr", model, "--split", "trn"))
    assert result.exit_code == 1, result.output
    c = FeatureCache.open(str(tmp_path / "c.zarr"))
    assert not c.done_mask().any()
    assert all("non-finite" in f["error"] and "up_blocks.3.resnets.2" in f["error"] for f in c.failures())
    assert len(c.failures()) == len(c.image_ids) == 4


def test_building_with_another_spec_is_refused_with_the_differences(tmp_path, mini_spair, tiny_model_dir):
    cache = tmp_path / "c.zarr"
    assert invoke(*small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--split", "trn")).exit_code == 0
    other = small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--split", "trn")
    other[other.index("--steps") + 1] = "12"
    other[other.index("--load-size") + 1] = "32"
    result = invoke(*other)
    assert result.exit_code == 1
    assert "different spec" in result.output
    assert "feature_space.steps: cache has 10, requested 12" in result.output
    assert "preprocessing.load_size: cache has 64, requested 32" in result.output
    assert "save_steps" not in result.output  # only fields that differ are listed
    assert "Traceback" not in result.output


def test_another_split_is_appended_to_the_same_cache(tmp_path, mini_spair, tiny_model_dir):
    cache = tmp_path / "c.zarr"
    base = small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir)
    assert invoke(*base, "--split", "trn").exit_code == 0
    first = FeatureCache.open(str(cache))
    val_ids = list(first.image_ids)
    val_feats = first.read_features(0)
    assert invoke(*base, "--split", "test").exit_code == 0
    c = FeatureCache.open(str(cache))
    assert c.image_ids[: len(val_ids)] == val_ids and len(c.image_ids) == len(val_ids) + 4
    assert c.done_mask().all()
    for name, arr in c.read_features(0).items():
        assert np.array_equal(arr, val_feats[name])


def test_info_describes_the_cache_truthfully(tmp_path, mini_spair, tiny_model_dir):
    cache = tmp_path / "c.zarr"
    assert invoke(*small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--split", "test",
                                    "--layers", "down")).exit_code == 0
    result = invoke("info", str(cache), "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["n_images"] == 4 and data["n_done"] == 4 and data["failures"] == []
    assert data["timesteps"] == [-1, 300, 800]  # indices 9, 5, 0 of a 10-step inversion (t step 100)
    assert [l["name"] for l in data["layers"]] == [f"down_blocks.{i}.resnets.{j}" for i in range(4) for j in range(2)]
    assert data["layers"][0] == {"name": "down_blocks.0.resnets.0", "channels": 32, "height": 8, "width": 8}
    on_disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert data["bytes"] == on_disk
    group = zarr.open_group(str(source_dir(cache)), mode="r")
    for layer in data["layers"]:
        arr = group["features"][layer["name"]]
        assert arr.shape == (4, 3, layer["channels"], layer["height"], layer["width"])
        assert arr.chunks == (1, 3, layer["channels"], layer["height"], layer["width"])
        assert arr.dtype == np.float16
        assert [type(c).__name__ for c in arr.metadata.codecs] == ["BytesCodec", "ZstdCodec", "Crc32cCodec"]
    fp = data["fingerprint"]
    assert set(fp) == {"feature_space", "preprocessing", "spec"} and all(len(v) == 64 for v in fp.values())
    assert data["bytes_to_finish_estimate"] == 0
    text = invoke("info", str(cache))
    assert "4 done / 4" in text.output and "down_blocks.3.resnets.1" in text.output and "more" not in text.output


def test_info_estimates_the_disk_a_build_still_needs(tmp_path, mini_spair, tiny_model_dir):
    from dhf_cache.cache.disk_space import bytes_per_image

    cache = tmp_path / "c.zarr"
    args = small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--split", "test")
    assert invoke(*args, "--prepare-only").exit_code == 0
    before = json.loads(invoke("info", str(cache), "--json").stdout)
    assert before["n_done"] == 0
    assert before["bytes_to_finish_estimate"] == 4 * bytes_per_image(FeatureCache.open(str(cache)))  # upper bound
    assert "the other 4 need about" in invoke("info", str(cache)).output
    assert invoke(*args).exit_code == 0
    stored = json.loads(invoke("info", str(cache), "--json").stdout)["bytes"] - before["bytes"]
    assert stored <= before["bytes_to_finish_estimate"]  # the estimate was an upper bound



def test_bad_options_name_the_option_without_pydantics_dump(tmp_path, mini_spair, tiny_model_dir):
    def refused(*changes: str) -> str:
        args = small_build_args(f"spair:{mini_spair}", tmp_path / "c.zarr", tiny_model_dir)
        for option, value in zip(changes[::2], changes[1::2]):
            args[args.index(option) + 1] = value
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "pydantic" not in result.output and "validation error" not in result.output
        return result.output

    assert "--image-size 60: image_size must be a multiple of 8" in refused("--image-size", "60")
    assert "--save-steps [12, 3]: save_steps [12] outside 0..9 for 10 steps" in refused("--save-steps", "12,3")
    assert not (tmp_path / "c.zarr").exists()  # nothing created for a refused build


def test_step_options_are_checked_before_the_model_loads(tmp_path, mini_spair):
    """A typo in --steps is reported at once: the model named here does not exist, so an error
    about steps proves they were checked first."""
    for option, value, expected in (("--steps", "0", "--steps 0: needs at least 1"),
                                    ("--save-steps", "12", "save_steps [12] outside 0..9")):
        args = small_build_args(f"spair:{mini_spair}", tmp_path / "c.zarr", Path("/no/such/model"))
        args[args.index(option) + 1] = value
        result = invoke(*args)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert "model" not in result.output.split("error:")[1]
    assert not (tmp_path / "c.zarr").exists()


def test_one_step_variant(tmp_path, mini_spair, tiny_model_dir):
    cache = tmp_path / "onestep.zarr"
    args = small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--split", "trn")
    args[args.index("--steps") + 1] = "1"
    args[args.index("--save-steps") + 1] = "0"
    assert invoke(*args).exit_code == 0
    c = FeatureCache.open(str(cache))
    assert c.timesteps == [-1]
    assert c.feature_array("up_blocks.0.resnets.0").shape[1] == 1


def test_model_that_cannot_be_found_says_what_was_tried(tmp_path, mini_spair):
    result = invoke(*small_build_args(f"spair:{mini_spair}", tmp_path / "c.zarr", Path("nobody/no-such-model")))
    assert result.exit_code == 1
    assert "model not found" in result.output and "Hugging Face cache" in result.output
    assert "HF_HUB_OFFLINE" in result.output and "hf download nobody/no-such-model --include" in result.output
    assert "--model DIR" in result.output and "Traceback" not in result.output
    not_a_pipeline = tmp_path / "empty-dir"
    not_a_pipeline.mkdir()
    result = invoke(*small_build_args(f"spair:{mini_spair}", tmp_path / "c.zarr", not_a_pipeline))
    assert result.exit_code == 1 and "not a diffusers pipeline directory" in result.output
    assert not (tmp_path / "c.zarr").exists()  # nothing written before the model loads


def test_hub_id_without_network_fails_at_once_and_quietly(tmp_path, mini_spair):
    """Not offline by setting, but the Hub's host does not resolve (RFC 2606's .invalid): no
    download attempt (it would retry with back-off for ~25 s, printing each retry), no library
    warnings, one error that says why."""
    result = cli(*small_build_args(f"spair:{mini_spair}", tmp_path / "c.zarr", Path("nobody/no-such-model")),
                 env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.no-such-host.invalid"})
    assert result.returncode == 1
    assert "download: skipped, hub.no-such-host.invalid cannot be resolved" in result.stderr
    assert "no network here?" in result.stderr and "hf download nobody/no-such-model --include" in result.stderr
    assert "Retrying" not in result.stderr and "Warning" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "c.zarr").exists()


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(source_dir(cache)), mode="r")
    out = {}
    for path, arr in group.arrays():
        out[path] = arr[:]
    for path, arr in group["features"].arrays():
        out[f"features/{path}"] = arr[:]
    return out


def test_resume_after_sigkill_ends_with_the_arrays_of_an_uninterrupted_build(tmp_path, mini_spair, tiny_model_dir):
    args = lambda cache: small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--batch-size", "2")  # noqa: E731
    reference = tmp_path / "reference.zarr"
    assert cli(*args(reference)).returncode == 0

    killed = tmp_path / "killed.zarr"
    proc = start_cli(*args(killed))
    done_dir = wait_for_first_done(killed)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(done_flags(done_dir))
    assert 0 < n_done < 8, "the kill should land mid-build"  # trn + test: 8 images

    rerun = cli(*args(killed), "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["n_images"] == 8
    assert summary["n_skipped"] >= n_done and summary["n_built"] == 8 - summary["n_skipped"]
    want, got = _arrays(reference), _arrays(killed)
    assert sorted(got) == sorted(want)
    for path in want:
        assert np.array_equal(got[path], want[path]), path


def test_lossy_codecs_store_bounded_errors_and_are_smaller(tmp_path, mini_spair, tiny_model_dir):
    from numcodecs import BitRound

    base = small_build_args(f"spair:{mini_spair}", tmp_path / "zstd.zarr", tiny_model_dir, "--split", "test")
    assert invoke(*base).exit_code == 0
    lossy = small_build_args(f"spair:{mini_spair}", tmp_path / "br.zarr", tiny_model_dir, "--split", "test",
                             "--codec", "bitround", "--keepbits", "4")
    assert invoke(*lossy).exit_code == 0
    exact, rounded = FeatureCache.open(str(tmp_path / "zstd.zarr")), FeatureCache.open(str(tmp_path / "br.zarr"))
    assert rounded.spec.storage.codec.keepbits == 4
    assert rounded.fingerprint["feature_space"] == exact.fingerprint["feature_space"]  # same features, stored lossily
    assert rounded.fingerprint["spec"] != exact.fingerprint["spec"]
    for name, values in exact.read_features(0).items():
        want = BitRound(keepbits=4).decode(BitRound(keepbits=4).encode(values))
        got = rounded.read_features(0)[name]
        assert np.array_equal(got, want), name
        normal = np.abs(values) >= np.finfo(np.float16).tiny  # subnormals keep fewer bits than normals
        rel = np.abs(got[normal].astype(np.float64) - values[normal]) / np.abs(values[normal].astype(np.float64))
        assert rel.max() <= 2.0 ** -5 + 1e-9
    np.testing.assert_array_equal(rounded.read_latent(0), exact.read_latent(0))  # latents stay lossless
    assert rounded.info()["feature_bytes"] < 0.8 * exact.info()["feature_bytes"]
    bad = invoke(*small_build_args(f"spair:{mini_spair}", tmp_path / "x.zarr", tiny_model_dir, "--codec", "bitround"))
    assert bad.exit_code == 2 and "keepbits" in bad.output

    # quant8: each (timestep, channel) map as uint8 codes with its own minimum and step
    from dhf_cache.cache.quant8 import dequantize, quantize

    q8 = small_build_args(f"spair:{mini_spair}", tmp_path / "q8.zarr", tiny_model_dir, "--split", "test",
                          "--codec", "quant8")
    assert invoke(*q8).exit_code == 0
    quantized = FeatureCache.open(str(tmp_path / "q8.zarr"))
    assert quantized.fingerprint["feature_space"] == exact.fingerprint["feature_space"]
    for name, values in exact.read_features(0).items():
        got = quantized.read_features(0)[name]
        assert got.dtype == np.float16 and np.array_equal(got, dequantize(*quantize(values), values.shape)), name
        x = values.astype(np.float64)
        half_step = (x.max(axis=(2, 3), keepdims=True) - x.min(axis=(2, 3), keepdims=True)) / 510
        # half a step, plus the fp16 rounding of the decoded value
        assert (np.abs(got - x) <= half_step + np.abs(got.astype(np.float64)) * 2.0 ** -11 + 1e-7).all(), name
        assert not np.array_equal(got, values) or values.shape[-1] == 1, name  # lossy, except 1x1 maps
    assert quantized.info()["feature_bytes"] < 0.85 * exact.info()["feature_bytes"]
    assert invoke("verify", str(tmp_path / "q8.zarr")).exit_code == 0
    refused = invoke(*small_build_args(f"spair:{mini_spair}", tmp_path / "y.zarr", tiny_model_dir, "--codec", "quant8",
                                       "--keepbits", "3"))
    assert refused.exit_code == 2 and "keepbits" in refused.output


def test_verify_finds_a_flipped_byte_and_repair_plus_rebuild_restores_it(tmp_path, mini_spair, tiny_model_dir):
    cache = tmp_path / "c.zarr"
    args = small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--split", "test")
    assert invoke(*args).exit_code == 0
    good = invoke("verify", str(cache), "--json")
    assert good.exit_code == 0 and json.loads(good.stdout)["ok"] and json.loads(good.stdout)["n_chunks"] == 4 * 14
    c = FeatureCache.open(str(cache))
    before = c.read_features(2)["up_blocks.2.resnets.1"].copy()
    src = source_dir(cache)
    chunk = src / "features" / "up_blocks.2.resnets.1" / "c" / "2" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    chunk.write_bytes(bytes(data))
    (src / "latents" / "c" / "3" / "0" / "0" / "0").unlink()  # and a lost chunk
    stray = src / "done" / "c" / "1.0123abcd.partial"  # what a writer killed mid-write leaves
    stray.write_bytes(b"\x01")
    bad = invoke("verify", str(cache))
    assert bad.exit_code == 1
    assert f"BAD {c.image_ids[2]}: features/up_blocks.2.resnets.1: unreadable chunk" in bad.output
    assert "checksum" in bad.output
    assert f"BAD {c.image_ids[3]}: latents: chunk missing" in bad.output
    assert "1 temp file(s) left by killed writers" in bad.output
    repaired = invoke("verify", str(cache), "--repair")
    assert repaired.exit_code == 0 and "cleared the done flag of 2 image(s)" in repaired.output
    assert "removed 1 temp file(s)" in repaired.output and not stray.exists()
    assert FeatureCache.open(str(cache)).done_mask().tolist() == [True, True, False, False]
    rebuilt = invoke(*args, "--json")
    assert rebuilt.exit_code == 0 and json.loads(rebuilt.stdout)["n_built"] == 2
    assert invoke("verify", str(cache)).exit_code == 0
    assert np.array_equal(FeatureCache.open(str(cache)).read_features(2)["up_blocks.2.resnets.1"], before)


def test_the_writer_queue_holds_two_batches_within_a_quarter_of_memory():
    from dhf_cache.pipelines.build import writer_depth

    sd15 = 156_794_880  # bytes of one SD 1.5 image's maps (METHOD.md)
    assert writer_depth(8, sd15, memory_bytes=128 * 2**30) == 16  # two batches fit easily
    assert writer_depth(32, sd15, memory_bytes=32 * 2**30) == 54  # 8 GiB: 54 images, not 64
    assert writer_depth(32, sd15, memory_bytes=8 * 2**30) == 32  # never less than one batch
    assert writer_depth(1, 1000) == 2  # this machine's memory read, two batches of small maps
