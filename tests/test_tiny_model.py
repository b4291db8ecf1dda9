"""The offline tiny pipeline: SD 1.5's block layout, loadable by diffusers, seeded."""

from __future__ import annotations

import hashlib

from dhf_cache.sources.sd.tiny_model import SD15_UNET_CONFIG, TINY_UNET_CONFIG, write_tiny_model


def _digest(directory) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*.safetensors"))}


def test_stable_diffusion_pipeline_loads_it(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    unet = pipe.unet
    assert [type(b).__name__ for b in unet.down_blocks] == list(SD15_UNET_CONFIG["down_block_types"])
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                           "CrossAttnUpBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert all(len(block.resnets) == 3 for block in unet.up_blocks)
    assert pipe.vae.config.scaling_factor == 0.18215
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8  # SD's VAE factor
    ids = pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer("a cat").input_ids != pipe.tokenizer("a dog").input_ids
    assert TINY_UNET_CONFIG["layers_per_block"] == SD15_UNET_CONFIG["layers_per_block"] == 2


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = write_tiny_model(tmp_path / "again", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    assert _digest(again) == _digest(tiny_model_dir)
    different = _digest(other)
    assert set(different) == set(_digest(tiny_model_dir))
    assert all(different[k] != v for k, v in _digest(tiny_model_dir).items())


def test_the_readme_download_command_fetches_what_loading_needs(tmp_path, tiny_model_dir):
    """The README's `hf download` is the command the code suggests (download_command), the pinned
    huggingface_hub's CLI knows its options, and a folder holding only those files loads."""
    import fnmatch
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from dhf_cache.sources.sd.backbone import HUB_FILES, download_command, load_backbone
    from dhf_cache.config import SD15_MODEL_ID

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"^    (hf download .*?)(?=\n    #|\n\n)", readme, re.S | re.M).group(1)
    assert " ".join(block.replace("\\\n", " ").split()) == download_command(SD15_MODEL_ID)
    hf = Path(sys.executable).with_name("hf")
    usage = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "--include" in usage.stdout
    only = tmp_path / "only-hub-files"
    for path in Path(tiny_model_dir).rglob("*"):
        relative = path.relative_to(tiny_model_dir).as_posix()
        if path.is_file() and any(fnmatch.fnmatch(relative, pattern) for pattern in HUB_FILES):
            (only / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, only / relative)
    assert not (only / "model_index.json").exists() and (only / "scheduler" / "scheduler_config.json").is_file()
    backbone = load_backbone(str(only))
    assert backbone.identity == load_backbone(str(tiny_model_dir)).identity and backbone.prediction_type == "epsilon"
