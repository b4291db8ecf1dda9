"""Cache format 2: several feature sources in one cache, format 1 read as one source, migrate.

A second source (DINOv2) is built into a cache of SD maps without touching a byte of them; its
stored maps equal a recomputation written here from transformers' model and forward hooks; a
format-1 cache (SD arrays at the root) is read, verified and trained on as one source, and
`dhf-cache migrate` upgrades it in place by moving folders (same files, same inodes), resumable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_NET, invoke, small_build_args, source_dir

TRAIN_STEPS = ["--steps", "3", "--val-every", "3", "--val-pairs-per-category", "1"]


def dino_build_args(data: Path, cache: Path, model: Path, *extra: str) -> list[str]:
    return ["build", "--dataset", f"spair:{data}", "--cache", str(cache), "--model", str(model),
            "--load-size", "56", "--image-size", "56", "--device", "cpu", "--no-progress", *extra]


def files_of(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file below `folder`: bytes, inode and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, mini_spair, tiny_model_dir, tiny_dino_dir):
    """The 8 mini-spair images with SD maps, then DINOv2 maps (all layers) added: (cache, SD files before)."""
    cache = tmp_path_factory.mktemp("caches") / "two.zarr"
    assert invoke(*small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir)).exit_code == 0
    before = files_of(source_dir(cache, "sd"))
    added = invoke(*dino_build_args(mini_spair, cache, tiny_dino_dir, "--layers", "all"))
    assert added.exit_code == 0, added.output
    return cache, before


def test_a_second_source_leaves_the_first_byte_identical(two_sources):
    cache, before = two_sources
    assert files_of(source_dir(cache, "sd")) == before  # bytes, inodes and mtimes of every SD file
    info = json.loads(invoke("info", str(cache), "--json").stdout)
    assert [s["source"] for s in info["sources"]] == ["sd", "dinov2"]
    dino = info["sources"][1]
    assert dino["n_done"] == dino["n_images"] == 8 and dino["timesteps"] == [0]
    assert [l["name"] for l in dino["layers"]] == [f"encoder.layer.{i}" for i in range(4)] + ["layernorm"]
    assert dino["layers"][0] == {"name": "encoder.layer.0", "channels": 32, "height": 4, "width": 4}
    assert dino["spec"]["feature_space"]["kind"] == "dinov2"
    text = invoke("info", str(cache)).output
    assert "2 source(s): sd, dinov2" in text and "Dinov2Model" in text and "UNet2DConditionModel" in text
    checked = json.loads(invoke("verify", str(cache), "--json", "--no-progress").stdout)
    assert checked["ok"] and set(checked["sources"]) == {"sd", "dinov2"}
    assert checked["sources"]["dinov2"]["n_chunks"] == 8 * (5 + 1)  # 5 maps and the size per image; no latent


def test_stored_dinov2_maps_equal_a_recomputation_with_hooks(two_sources, mini_spair, tiny_dino_dir):
    """Independent of dhf-cache's extraction: transformers' model, hooks on each block and on the
    final layernorm, the preprocessing written out (PIL bilinear, /255, ImageNet mean and std)."""
    from PIL import Image
    from transformers import Dinov2Model

    from dhf_cache.cache.feature_cache import FeatureCache

    cache = FeatureCache.open(str(two_sources[0]), source="dinov2")
    model = Dinov2Model.from_pretrained(tiny_dino_dir).eval()
    captured = {}
    for i, block in enumerate(model.encoder.layer):
        block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(f"encoder.layer.{i}", out[0] if isinstance(out, tuple) else out))
    model.layernorm.register_forward_hook(lambda m, a, out: captured.__setitem__("layernorm", out))
    image_id = cache.image_ids[3]
    path = next(p for p in (mini_spair / "JPEGImages").rglob("*") if p.relative_to(mini_spair / "JPEGImages").as_posix() == image_id)
    rgb = np.asarray(Image.open(path).convert("RGB").resize((56, 56), Image.BILINEAR), dtype=np.float32) / 255
    x = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        model(pixel_values=torch.from_numpy(x).permute(2, 0, 1)[None].float())
    stored = cache.read_features(3)
    assert set(stored) == set(captured)
    for name, tokens in captured.items():
        patches = tokens[0, 1:]  # the CLS token first, then 4 x 4 patches row by row
        want = patches.reshape(4, 4, 32).permute(2, 0, 1).numpy()
        assert stored[name].shape == (1, 32, 4, 4) and stored[name].dtype == np.float16
        np.testing.assert_allclose(stored[name][0].astype(np.float32), want, rtol=2e-3, atol=2e-3)
    assert not np.allclose(stored["encoder.layer.0"][0], stored["layernorm"][0], atol=1e-2)  # really two maps


def test_a_source_over_other_images_is_refused_naming_them(tmp_path, two_sources, train_data, tiny_dino_dir):
    cache = tmp_path / "c.zarr"
    shutil.copytree(two_sources[0], cache)
    before = files_of(cache)
    result = invoke(*dino_build_args(train_data, cache, tiny_dino_dir, "--source", "dino-b"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "source dino-b would cover other images than the cache's" in result.output
    assert "images not in source sd (" in result.output and "of its images missing" in result.output
    assert files_of(cache).keys() - before.keys() <= {"sources/dino-b/zarr.json"}  # no arrays, no source


def test_commands_on_a_cache_of_several_sources_say_which(tmp_path, two_sources, mini_spair):
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.errors import UsageError

    url = str(two_sources[0])
    with pytest.raises(UsageError, match=r"holds 2 feature sources \(sd, dinov2\); name one with --source"):
        FeatureCache.open(url)
    with pytest.raises(UsageError, match="--source dino: .* holds no such source; it holds sd, dinov2"):
        FeatureCache.open(url, source="dino")
    result = invoke("train", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "run",
                    "--device", "cpu", "--no-progress", *SMALL_NET, *TRAIN_STEPS, "--val-split", "")
    assert result.exit_code != 0 and "name one with --source" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "last").exists()


def test_training_and_eval_read_the_source_asked_for(tmp_path, two_sources, mini_spair):
    url = str(two_sources[0])
    run = tmp_path / "run"
    trained = invoke("train", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", run, "--device", "cpu",
                     "--no-progress", "--source", "dinov2", *SMALL_NET, *TRAIN_STEPS, "--val-split", "")
    assert trained.exit_code == 0, trained.output
    config = json.loads((run / "config.json").read_text())
    assert config["features"]["source"] == "dinov2" and config["network"]["n_timesteps"] == 1
    assert [l["name"] for l in config["features"]["layers"]][-1] == "layernorm"
    # eval opens the run's source without being told, and scores raw DINOv2 maps by SOURCE:LAYER
    scored = invoke("eval", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "e",
                    "--checkpoint", run, "--device", "cpu", "--no-progress", "--load-size", "64", "--json")
    assert scored.exit_code == 0, scored.output
    raw = invoke("eval", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "r",
                 "--raw", "dinov2:layernorm", "--device", "cpu", "--no-progress", "--load-size", "64", "--json")
    assert raw.exit_code == 0, raw.output
    bad = invoke("eval", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "b",
                 "--raw", "dinov2:nolayer", "--device", "cpu", "--no-progress", "--load-size", "64")
    assert bad.exit_code != 0 and "source dinov2: layers: encoder.layer.0" in bad.output


# ------------------------------------------------------------------------------- format 1


def as_format_1(cache: Path) -> None:
    """Rewrite a one-source format-2 cache into format 1's layout (what dhf-cache wrote before
    format 2): the source's arrays and attributes at the root, format_version 1, no source name."""
    folder = cache / "sources" / "sd"
    meta = json.loads((folder / "zarr.json").read_text())
    source_meta = meta["attributes"]["dhf_cache"]
    source_meta["format_version"] = 1
    source_meta.pop("source")
    for child in folder.iterdir():
        if child.is_dir():
            os.replace(child, cache / child.name)
    shutil.rmtree(cache / "sources")
    root = json.loads((cache / "zarr.json").read_text())
    root["attributes"] = {"dhf_cache": source_meta}
    (cache / "zarr.json").write_text(json.dumps(root))


@pytest.fixture(scope="module")
def format_1_original(tmp_path_factory, mini_spair, tiny_model_dir) -> Path:
    cache = tmp_path_factory.mktemp("caches") / "old.zarr"
    assert invoke(*small_build_args(f"spair:{mini_spair}", cache, tiny_model_dir, "--limit", "4")).exit_code == 0
    as_format_1(cache)
    return cache


@pytest.fixture
def format_1_cache(tmp_path, format_1_original) -> Path:
    """A fresh copy of a 4-image format-1 cache, for one test to change."""
    return Path(shutil.copytree(format_1_original, tmp_path / "old.zarr"))


def test_a_format_1_cache_is_read_as_one_source(format_1_cache, mini_spair, tiny_model_dir, tiny_dino_dir, tmp_path):
    from dhf_cache.cache.feature_cache import FeatureCache

    cache = FeatureCache.open(str(format_1_cache))
    assert cache.name == "sd" and cache.format_version == 1 and cache.group.path == ""
    assert cache.done_mask().sum() == 4 and len(cache.read_features(0)) == 12
    info = invoke("info", str(format_1_cache))
    assert "(format 1, read as one source; `dhf-cache migrate` upgrades it)" in info.output
    assert json.loads(invoke("verify", str(format_1_cache), "--json", "--no-progress").stdout)["ok"]
    before = files_of(format_1_cache)
    again = invoke(*small_build_args(f"spair:{mini_spair}", format_1_cache, tiny_model_dir, "--limit", "4"))
    assert again.exit_code == 0 and "4 already done" in again.output
    assert files_of(format_1_cache) == before  # resumed in format 1, nothing rewritten
    refused = invoke(*dino_build_args(mini_spair, format_1_cache, tiny_dino_dir, "--limit", "4"))
    assert refused.exit_code != 0 and f"run `dhf-cache migrate {format_1_cache}`" in refused.output
    assert files_of(format_1_cache) == before
    # stages two and three on it: train, eval from the run (descriptors stored in the cache), raw maps
    run = tmp_path / "run"
    trained = invoke("train", "--cache", format_1_cache, "--dataset", f"spair:{mini_spair}", "--out", run,
                     "--device", "cpu", "--no-progress", *SMALL_NET, "--steps", "1", "--val-split", "",
                     "--split", "test", "--skip-missing")
    assert trained.exit_code == 0, trained.output
    assert json.loads((run / "config.json").read_text())["features"]["source"] == "sd"
    for extra in (["--checkpoint", run], ["--raw", "up_blocks.3.resnets.2@-1"]):
        scored = invoke("eval", "--cache", format_1_cache, "--dataset", f"spair:{mini_spair}", "--out",
                        tmp_path / "e", "--device", "cpu", "--no-progress", "--load-size", "64", "--skip-missing", *extra)
        assert scored.exit_code == 0, scored.output
    assert (format_1_cache / "descriptors").is_dir()  # format 1 keeps its layout: sets at the root


def test_migrate_moves_folders_without_rewriting_a_chunk(format_1_cache, mini_spair, tiny_dino_dir):
    from dhf_cache.cache.feature_cache import FeatureCache

    features_before = cache_read(format_1_cache)
    before = {k: v for k, v in files_of(format_1_cache).items() if k != "zarr.json"}
    result = invoke("migrate", str(format_1_cache))
    assert result.exit_code == 0, result.output
    assert "format 1 -> 2, source sd" in result.output and "no chunk rewritten" in result.output
    after = files_of(format_1_cache / "sources" / "sd")
    assert {k: v for k, v in after.items() if k != "zarr.json"} == before  # same bytes, inodes, mtimes
    cache = FeatureCache.open(str(format_1_cache))
    assert cache.format_version == 2 and cache.name == "sd" and cache_read(format_1_cache) == features_before
    assert "already format 2: nothing to do" in invoke("migrate", str(format_1_cache)).output
    added = invoke(*dino_build_args(mini_spair, format_1_cache, tiny_dino_dir, "--limit", "4"))
    assert added.exit_code == 0, added.output
    from dhf_cache.cache.feature_cache import FeatureCache

    # no --layers: DINOv2's own default (its final layernorm), not SD's "up"
    assert [layer.name for layer in FeatureCache.open(str(format_1_cache), source="dinov2").layers] == ["layernorm"]


def cache_read(url: Path) -> dict:
    from dhf_cache.cache.feature_cache import FeatureCache

    cache = FeatureCache.open(str(url))
    return {(i, k): v.tobytes() for i in range(len(cache.image_ids)) for k, v in cache.read_features(i).items()}


def test_a_killed_migrate_is_finished_by_rerunning_it(format_1_cache, monkeypatch):
    from dhf_cache.cache import migrate as migrate_module
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.errors import CacheError

    want = cache_read(format_1_cache)
    real_replace, calls = os.replace, []

    def dies_at_the_third_folder(src, dst):
        if Path(src).is_dir():
            calls.append(src)
            if len(calls) == 3:
                raise KeyboardInterrupt  # killed mid-way: two folders moved, the rest not
        return real_replace(src, dst)

    monkeypatch.setattr(migrate_module.os, "replace", dies_at_the_third_folder)
    with pytest.raises(KeyboardInterrupt):
        migrate_module.migrate(str(format_1_cache))
    monkeypatch.setattr(migrate_module.os, "replace", real_replace)
    with pytest.raises(CacheError, match="a `dhf-cache migrate` was interrupted; rerun `dhf-cache migrate"):
        FeatureCache.open(str(format_1_cache))
    result = invoke("info", str(format_1_cache))
    assert result.exit_code != 0 and "interrupted" in result.output and "Traceback" not in result.output
    assert "format 1 -> 2" in migrate_module.migrate(str(format_1_cache))
    assert cache_read(format_1_cache) == want


# ------------------------------------------------------------------------------- fusion


def test_a_fused_aggregator_trains_resumes_and_evaluates_across_sources(tmp_path, two_sources, mini_spair):
    """All SD maps plus DINOv2's last layer, from the one cache, without re-extraction."""
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.aggregator.checkpoint import load_checkpoint
    from dhf_cache.cache.feature_loader import SourcesReader, select_across_sources

    url, run = str(two_sources[0]), tmp_path / "fused"
    common = ["--cache", url, "--dataset", f"spair:{mini_spair}", "--out", run, "--device", "cpu", "--no-progress"]
    trained = invoke("train", *common, "--source", "sd,dinov2", "--layers", "dinov2:layernorm", *SMALL_NET,
                     "--steps", "2", "--val-split", "")
    assert trained.exit_code == 0, trained.output
    config = json.loads((run / "config.json").read_text())
    assert [(s["name"], len(s["layers"]), s["n_timesteps"]) for s in config["network"]["sources"]] == [
        ("sd", 12, 3), ("dinov2", 1, 1)]
    assert sorted(config["features"]["sources"]) == ["dinov2", "sd"]
    assert config["features"]["sources"]["dinov2"]["layers"][0]["name"] == "layernorm"
    ckpt = load_checkpoint(run)
    assert ckpt.fused and list(ckpt.bindings) == ["sd", "dinov2"] and ckpt.bindings["dinov2"].layer_names == ["layernorm"]
    assert ckpt.network.mixing_weights.numel() == 12 * 3 + 1 and len(ckpt.network.bottlenecks) == 13
    # the network reads exactly the stored maps: its output equals one on maps read here by hand
    caches = FeatureCache.open_all(url)
    reader = SourcesReader(caches, select_across_sources(caches, ["sd", "dinov2"], ["dinov2:layernorm"]))
    by_hand = {f"sd:{name}": torch.from_numpy(array)[None] for name, array in caches["sd"].read_features(1).items()}
    index = caches["dinov2"].index_of()[caches["sd"].image_ids[1]]
    by_hand["dinov2:layernorm"] = torch.from_numpy(caches["dinov2"].read_features(index, ["layernorm"])["layernorm"])[None]
    with torch.no_grad():
        torch.testing.assert_close(ckpt.network({k: v[None] for k, v in reader.read(1).items()}),
                                   ckpt.network(by_hand))
    resumed = invoke("train", *common, "--resume", "--steps", "3")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and json.loads((run / "last" / "state.json").read_text())["step"] == 3
    scored = invoke("eval", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "e",
                    "--checkpoint", run, "--device", "cpu", "--no-progress", "--load-size", "64", "--json")
    assert scored.exit_code == 0, scored.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["checkpoint_feature_source"] == "sd,dinov2" and metrics["descriptors"]["computed"] == 4
    again = invoke("eval", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "e2",
                   "--checkpoint", run, "--device", "cpu", "--no-progress", "--load-size", "64")
    assert again.exit_code == 0 and json.loads((tmp_path / "e2" / "metrics.json").read_text())["pck"] == metrics["pck"]


def test_a_fused_checkpoint_on_a_cache_without_one_of_its_sources_is_refused(tmp_path, two_sources, mini_spair):
    url, run = str(two_sources[0]), tmp_path / "fused"
    assert invoke("train", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", run, "--device", "cpu",
                  "--no-progress", "--source", "sd,dinov2", "--layers", "dinov2:layernorm", *SMALL_NET,
                  "--steps", "1", "--val-split", "").exit_code == 0
    sd_only = Path(shutil.copytree(two_sources[0], tmp_path / "sd.zarr"))
    shutil.rmtree(sd_only / "sources" / "dinov2")  # the same cache without its DINOv2 source
    result = invoke("eval", "--cache", sd_only, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "e",
                    "--checkpoint", run, "--device", "cpu", "--no-progress", "--load-size", "64")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "fuses maps of sources sd, dinov2" in result.output and "lacks dinov2" in result.output
    matched = invoke("match", str(next((mini_spair / "JPEGImages").rglob("*.jpg"))),
                     str(next((mini_spair / "JPEGImages").rglob("*.jpg"))), "--checkpoint", run,
                     "--out", tmp_path / "m.png", "--device", "cpu")
    assert matched.exit_code != 0 and "extraction on the fly covers SD models only" in matched.output
    unknown = invoke("train", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "r2",
                     "--device", "cpu", "--no-progress", "--source", "sd,dinov2", "--layers", "dinov2:nope",
                     *SMALL_NET, "--steps", "1", "--val-split", "")
    assert unknown.exit_code != 0 and "source dinov2: --layers nope: not in the cache" in unknown.output


def test_zero_shot_fusion_of_raw_maps_is_the_sd_dino_recipe(tmp_path, two_sources, mini_spair):
    """`--raw A+B`: each map L2-normalised per pixel, resized to the largest grid, concatenated."""
    import torch.nn.functional as F

    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.pipelines.evaluate import _fused_raw_provider, parse_raw_part

    url = str(two_sources[0])
    raw = "sd:up_blocks.3.resnets.2@-1+dinov2:layernorm"
    result = invoke("eval", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "e",
                    "--raw", raw, "--device", "cpu", "--no-progress", "--load-size", "64")
    assert result.exit_code == 0, result.output
    assert "raw fused" in json.loads((tmp_path / "e" / "metrics.json").read_text())["options"]["descriptor"]
    caches = FeatureCache.open_all(url)
    parts = [parse_raw_part(p, caches, raw) for p in raw.split("+")]
    image = caches["sd"].image_ids[2]
    got = _fused_raw_provider(caches, parts)(image)
    sd = torch.from_numpy(caches["sd"].read_features(2, ["up_blocks.3.resnets.2"])["up_blocks.3.resnets.2"][0]).float()
    dino = torch.from_numpy(caches["dinov2"].read_features(caches["dinov2"].index_of()[image], ["layernorm"])["layernorm"][0]).float()
    want = torch.cat([F.normalize(sd, dim=0), F.interpolate(F.normalize(dino, dim=0)[None], size=(8, 8), mode="bilinear",
                                                            align_corners=False)[0]])
    assert got.shape == (32 + 32, 8, 8)
    torch.testing.assert_close(got, want)
    bad = invoke("eval", "--cache", url, "--dataset", f"spair:{mini_spair}", "--out", tmp_path / "b",
                 "--raw", "up_blocks.3.resnets.2@-1+nolayer", "--device", "cpu", "--no-progress")
    assert bad.exit_code != 0 and "map 'nolayer' is in no source; the cache's maps: sd: layers" in bad.output
    assert "dinov2: layers encoder.layer.0" in bad.output and "(no time axis)" in bad.output


# ------------------------------------------------------------------------------- SDXL


def test_sdxl_maps_are_built_into_a_cache_and_equal_an_independent_inversion(tmp_path, mini_spair):
    """SDXL through `dhf-cache build`: conditioning from the real pipeline's encode_prompt, the
    SD 1.5 DDIM inversion of METHOD.md written out, conv2 outputs captured with plain hooks."""
    from diffusers import StableDiffusionXLPipeline

    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.sources.sdxl import write_tiny_sdxl

    model = write_tiny_sdxl(tmp_path / "sdxl", seed=0)
    cache = tmp_path / "c.zarr"
    result = invoke("build", "--dataset", f"spair:{mini_spair}", "--cache", cache, "--model", model, "--split", "test",
                    "--load-size", "64", "--image-size", "64", "--steps", "10", "--save-steps", "9,5,0",
                    "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    built = FeatureCache.open(str(cache))
    assert built.name == "sdxl" and built.spec.feature_space.kind == "sdxl"
    assert built.spec.feature_space.model.text_encoder_2_sha256 is not None
    assert "SDXL UNet2DConditionModel" in invoke("info", str(cache)).output

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    unet = pipe.unet.eval()
    names = [l.name for l in built.layers]
    assert names == [f"up_blocks.{i}.resnets.{j}" for i in range(3) for j in range(3)]
    captured = {}
    for name in names:
        i, j = int(name.split(".")[1]), int(name.split(".")[3])
        unet.up_blocks[i].resnets[j].conv2.register_forward_hook(lambda m, a, out, n=name: captured.__setitem__(n, out))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1.0 - betas, 0)
    a = lambda t: 1.0 if t == -1 else float(alphas[t])  # noqa: E731
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt("", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
        x = torch.from_numpy(built.read_latent(2))[None]
        saved = {}
        for k, t in enumerate([-1] + list(range(0, 900, 100))):  # 10 steps of 100: calls at -1, 0, ..., 800
            eps = unet(x, torch.tensor(t), encoder_hidden_states=emb, added_cond_kwargs=cond).sample
            saved[9 - k] = {n: captured[n][0].clone() for n in names}
            t_next = t + 100 if t >= 0 else 0
            x0 = (x - (1 - a(t)) ** 0.5 * eps) / a(t) ** 0.5
            x = a(t_next) ** 0.5 * x0 + (1 - a(t_next)) ** 0.5 * eps
            if k == 9:
                break
    stored = built.read_features(2)
    for name in names:
        want = torch.stack([saved[s][name] for s in (9, 5, 0)]).numpy().astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(stored[name].astype(np.float32), want, rtol=2e-3, atol=2e-4, err_msg=name)
