"""Shapes and channels of the captured maps for an SD 1.5-config UNet, on torch's meta device:
the real diffusers model and hooks with shapes but no values (its forward at 64x64 took ~18 s on
this 2-core CPU; the shapes are all this test needs)."""

from __future__ import annotations

import pytest
import torch

from dhf_cache.sources.sd.capture import FeatureCapture, resolve_layers
from dhf_cache.sources.sd.tiny_model import build_sd15_unet

# METHOD.md, "Which feature maps", at 512 px input (64x64 latent)
EXPECTED = (
    [(f"up_blocks.0.resnets.{j}", 1280, 8, 8) for j in range(3)]
    + [(f"up_blocks.1.resnets.{j}", 1280, 16, 16) for j in range(3)]
    + [(f"up_blocks.2.resnets.{j}", 640, 32, 32) for j in range(3)]
    + [(f"up_blocks.3.resnets.{j}", 320, 64, 64) for j in range(3)]
)


@pytest.fixture(scope="module")
def sd15_table():
    with torch.device("meta"):
        unet = build_sd15_unet(seed=0).eval()
        layers = resolve_layers(unet, "up")
        with FeatureCapture(unet, layers) as capture, torch.inference_mode():
            capture.enabled = True
            unet(torch.randn(1, 4, 64, 64), torch.tensor(-1), encoder_hidden_states=torch.zeros(1, 77, 768))
            outputs = capture.take()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's UNet
    table = [(name, *outputs[name].shape[1:]) for name in layers]
    del unet
    return table


def test_sd15_up_block_resnets_have_the_papers_shapes(sd15_table):
    assert sd15_table == EXPECTED


def test_sd15_channel_total_and_bytes_per_image(sd15_table):
    assert sum(c for _, c, _, _ in sd15_table) == 10_560
    per_image = sum(11 * c * h * w * 2 for _, c, h, w in sd15_table)  # 11 steps, fp16
    assert per_image == 156_794_880
    upsampled = sum(11 * c * 64 * 64 * 2 for _, c, _, _ in sd15_table)  # what Ref keeps
    assert upsampled == 951_582_720 and 6.0 < upsampled / per_image < 6.1  # "6x that"
