"""Generation-mode hyperfeatures: deterministic, flipped to inversion order, resumable, transferable."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from conftest import SMALL_NET, cli, done_flags, source_dir, start_cli, wait_for_first_done
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.cli import main as _register  # noqa: F401
from dhf_cache.cli.app import app

runner = CliRunner()
PROMPTS = ["a photo of a cat", "a red motorbike in a garage", "a cup of coffee"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def gen_args(prompts_file, cache, model, *extra):
    return ["build", "--generate", prompts_file, "--cache", cache, "--model", model, "--image-size", "64",
            "--steps", "4", "--save-steps", "3,1,0", "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory, prompts_file, tiny_model_dir):
    cache = tmp_path_factory.mktemp("gen") / "gen.zarr"
    result = invoke(*gen_args(prompts_file, cache, tiny_model_dir, "--batch-size", "2"))
    assert result.exit_code == 0, result.output
    return cache


def _arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(source_dir(path)), mode="r")
    out = {name: arr[:] for name, arr in group.arrays()}
    for sub in ("features", "generated"):
        out.update({f"{sub}/{name}": arr[:] for name, arr in group[sub].arrays()})
    return out


def test_generation_is_deterministic_per_prompt_and_seed(tmp_path, generated, prompts_file, tiny_model_dir):
    again = tmp_path / "again.zarr"
    assert invoke(*gen_args(prompts_file, again, tiny_model_dir, "--batch-size", "2")).exit_code == 0
    a, b = _arrays(generated), _arrays(again)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a), "same prompts, same seed"
    other = tmp_path / "seed1.zarr"
    assert invoke(*gen_args(prompts_file, other, tiny_model_dir, "--seed", "1", "--batch-size", "2")).exit_code == 0
    c = _arrays(other)
    assert not np.array_equal(a["generated/images"], c["generated/images"])
    # an image depends on its prompt, variant and seed, not on the prompt's line (batch size 1:
    # batched convolutions round differently with other neighbours)
    single = tmp_path / "single.zarr"
    assert invoke(*gen_args(prompts_file, single, tiny_model_dir, "--batch-size", "1")).exit_code == 0
    a = _arrays(single)
    reordered = tmp_path / "reordered.txt"
    reordered.write_text("\n".join(reversed(PROMPTS)))
    rev = tmp_path / "rev.zarr"
    assert invoke(*gen_args(reordered, rev, tiny_model_dir, "--batch-size", "1")).exit_code == 0
    d = _arrays(rev)
    first = list(a["generated/prompts"]).index(PROMPTS[0])
    same = list(d["generated/prompts"]).index(PROMPTS[0])
    assert np.array_equal(a["generated/images"][first], d["generated/images"][same])
    assert a["generated/seeds"][first] == d["generated/seeds"][same]


def test_images_prompts_and_seeds_are_stored_and_exported(tmp_path, generated):
    cache = FeatureCache.open(str(generated))
    assert cache.spec.feature_space.source == "generation"
    assert cache.spec.feature_space.generation.guidance == 7.5
    assert cache.image_ids == ["00000-00.png", "00001-00.png", "00002-00.png"]
    image, prompt, seed = cache.generated_image(1)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 0
    assert prompt == PROMPTS[1] and seed > 0
    assert cache.sizes()[1].tolist() == [64, 64]
    out = tmp_path / "exported"
    assert invoke("export-images", generated, out, "--no-progress").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(out / "00001-00.png")), image)  # PNG is lossless
    lines = [json.loads(l) for l in (out / "prompts.jsonl").read_text().splitlines()]
    assert [l["prompt"] for l in lines] == PROMPTS and lines[1]["seed"] == seed
    refused = invoke("export-images", str(tmp_path / "missing.zarr"), out)
    assert refused.exit_code == 1


def test_capture_covers_the_inversion_layers_and_steps_flipped(generated, tiny_model_dir):
    """Stored position 0 is the last (cleanest) generation call, as the inversion stores t = -1 first."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    cache = FeatureCache.open(str(generated))
    assert [l.name for l in cache.layers] == [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]
    assert cache.meta["save_steps"] == [3, 1, 0]
    assert cache.timesteps == [0, 500, 750]  # DDIM calls 750, 500, 250, 0: indices 3, 1, 0

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    tok = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=0)
    sched.set_timesteps(4)
    seen = {}
    unet.up_blocks[3].resnets[2].conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[1].clone()))
    embed = lambda p: text(tok(p, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]  # noqa: E731
    calls = []
    with torch.no_grad():
        emb = torch.cat([embed(""), embed(PROMPTS[0])])
        x = torch.from_numpy(cache.read_latent(0))[None]  # the stored noise
        for t in sched.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
            calls.append(seen["out"].numpy())  # conditional half of the guided call
            eps = out[0:1] + 7.5 * (out[1:2] - out[0:1])
            x = sched.step(eps, t, x).prev_sample
    stored = cache.read_features(0)["up_blocks.3.resnets.2"].astype(np.float32)
    for position, call in enumerate([3, 1, 0]):
        np.testing.assert_allclose(stored[position], calls[call].astype(np.float16).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
    assert np.abs(stored[0] - calls[0]).mean() > 10 * np.abs(stored[0] - calls[3]).mean()


def test_generation_build_resumes_after_sigkill(tmp_path, prompts_file, tiny_model_dir):
    reference = tmp_path / "ref.zarr"
    assert cli(*gen_args(prompts_file, reference, tiny_model_dir, "--images-per-prompt", "3")).returncode == 0
    killed = tmp_path / "killed.zarr"
    proc = start_cli(*gen_args(prompts_file, killed, tiny_model_dir, "--images-per-prompt", "3"))
    done = wait_for_first_done(killed)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(done_flags(done)) < 9
    rerun = cli(*gen_args(prompts_file, killed, tiny_model_dir, "--images-per-prompt", "3"), "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["n_skipped"] > 0
    want, got = _arrays(reference), _arrays(killed)
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key


def test_inversion_checkpoint_transfers_to_generated_pairs(tmp_path, generated, train_cache, train_data,
                                                            tiny_model_dir, prompts_file):
    run = tmp_path / "run"
    trained = invoke("train", "--cache", train_cache, "--dataset", f"spair:{train_data}", "--out", run, "--steps",
                     "4", "--val-split", "", "--device", "cpu", "--no-progress", *SMALL_NET)
    assert trained.exit_code == 0, trained.output
    synth = tmp_path / "synth.zarr"  # the training cache's steps: 10 with 9, 5, 0 saved
    build = invoke("build", "--generate", prompts_file, "--cache", synth, "--model", tiny_model_dir, "--image-size",
                   "64", "--steps", "10", "--save-steps", "9,5,0", "--device", "cpu", "--no-progress")
    assert build.exit_code == 0, build.output
    images = tmp_path / "synth-images"
    assert invoke("export-images", synth, images, "--no-progress").exit_code == 0
    pairs = {"pairs": [
        {"src": "00000-00.png", "trg": "00001-00.png", "src_kps": [[10, 12], [40, 30]], "trg_kps": [[12, 10], [41, 33]],
         "category": "synthetic"},
        {"src": "00001-00.png", "trg": "00002-00.png", "src_kps": [[20, 20]], "trg_kps": [[22, 19]],
         "category": "synthetic"},
    ]}
    (images / "pairs.json").write_text(json.dumps(pairs))
    result = invoke("eval", "--cache", synth, "--dataset", f"pairs:{images / 'pairs.json'}", "--checkpoint", run,
                    "--out", tmp_path / "eval", "--load-size", "64", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "features from generation (checkpoint trained on inversion features)" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["feature_source"] == "generation" and metrics["checkpoint_feature_source"] == "inversion"
    assert any("transfer" in note and "generation t [0, 400, 900]" in note for note in metrics["notes"])
    assert metrics["n_pairs"] == 2 and metrics["n_points"] == 3
    # two generated images can be matched like any photos
    drawn = invoke("match", images / "00000-00.png", images / "00002-00.png", "--checkpoint", run, "--grid", "2",
                   "--out", tmp_path / "m.png", "--load-size", "64", "--device", "cpu")
    assert drawn.exit_code == 0, drawn.output
    assert Image.open(tmp_path / "m.png").size[0] > 64
    # a cache of another number of steps does not fit: refused, naming why
    result = invoke("eval", "--cache", generated, "--dataset", f"pairs:{images / 'pairs.json'}", "--checkpoint", run,
                    "--out", tmp_path / "eval2", "--load-size", "64", "--device", "cpu", "--no-progress")
    assert result.exit_code == 1 and "steps: cache has 4, checkpoint has 10" in result.output
