"""Mutation audit of METHOD.md: change one number or rule of the method in the code, run the tests
that should notice, and report which test failed (or that none did).

Why: the project promises that every number in METHOD.md "has a test that would fail if it
changed". Reading the tests cannot prove that; changing the code can. Each mutation below edits
one exact snippet (it must occur exactly once, so a refactor that moves it is reported as
"stale" rather than silently skipped), runs the listed test files with `pytest -x`, and restores
the file whatever happens. Not part of `make test` (it runs test files ~75 times: 17 min on 2
cores); run it after changing the method's code (results: docs/faithfulness.md):

    .venv/bin/python dev/method_mutations.py                 # all, table on stdout
    .venv/bin/python dev/method_mutations.py --only inv.t0,loss.temp --out /tmp/audit.md
    .venv/bin/python dev/method_mutations.py --list

Outcomes: `killed` (a test failed; the first failing test is named), `SURVIVED` (every listed
test passed: a gap, or an equivalent mutant, which the table says when known), `stale` (the
snippet is not in the file any more: update this list).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAST = ["tests/test_inversion.py", "tests/test_extract.py", "tests/test_sd15_shapes.py"]


@dataclass(frozen=True)
class Mutation:
    id: str
    claim: str  # the METHOD.md fact that the mutation breaks
    path: str
    old: str
    new: str
    tests: list[str] = field(default_factory=list)
    equivalent: str = ""  # why no test can tell, when that is the expected outcome


M = Mutation
MUTATIONS: list[Mutation] = [
    # -- real images: preprocessing and latent
    M("img.pil", "load resize is PIL bilinear", "dhf_cache/datasets/images.py",
      "resized = image.resize((width, height), Image.BILINEAR)", "resized = image.resize((width, height), Image.BICUBIC)",
      ["tests/test_images.py"]),
    M("img.range", "pixels to [-1, 1]", "dhf_cache/datasets/images.py",
      "x = x / 127.5 - 1.0", "x = x / 255.0", ["tests/test_images.py"]),
    M("img.align", "F.interpolate bilinear, align_corners=False, to 512", "dhf_cache/datasets/images.py",
      'size=(image_size, image_size), mode="bilinear", align_corners=False)[0]',
      'size=(image_size, image_size), mode="bilinear", align_corners=True)[0]', ["tests/test_images.py"]),
    M("model.id", "SD 1.5's hub id stable-diffusion-v1-5/stable-diffusion-v1-5", "dhf_cache/config.py",
      'SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"', 'SD15_MODEL_ID = "runwayml/stable-diffusion-v1-5"',
      ["tests/test_method_defaults.py"]),
    M("lat.mean", "the latent is sampled, not the mean", "dhf_cache/sources/sd/extract.py",
      "return (mean + std * noise) * self.scaling_factor", "return mean * self.scaling_factor",
      FAST + ["tests/test_build.py"]),
    M("lat.scale", "latent x VAE scaling factor (0.18215)", "dhf_cache/sources/sd/extract.py",
      "return (mean + std * noise) * self.scaling_factor", "return (mean + std * noise)",
      FAST + ["tests/test_build.py"]),
    M("prompt.pad", "empty prompt padded to 77 tokens", "dhf_cache/sources/sd/extract.py",
      'padding="max_length",', 'padding="longest",', FAST),
    # -- inversion schedule
    M("sched.beta_start", "beta_start 0.00085", "dhf_cache/config.py",
      "beta_start: float = 0.00085", "beta_start: float = 0.0009", FAST),
    M("sched.beta_end", "beta_end 0.012", "dhf_cache/config.py",
      "beta_end: float = 0.012", "beta_end: float = 0.0125", FAST),
    M("sched.kind", "betas scaled_linear", "dhf_cache/config.py",
      'beta_schedule: str = "scaled_linear"', 'beta_schedule: str = "linear"', FAST),
    M("sched.train_steps", "1000 train timesteps", "dhf_cache/config.py",
      "num_train_timesteps: int = 1000", "num_train_timesteps: int = 1100", FAST),
    M("sched.offset", "steps_offset 0 (timesteps 980 ... 0)", "dhf_cache/config.py",
      "steps_offset: int = 0", "steps_offset: int = 1", FAST),
    M("sched.steps", "50 inference steps", "dhf_cache/config.py",
      "DEFAULT_STEPS = 50", "DEFAULT_STEPS = 25", FAST + ["tests/test_build.py"]),
    M("inv.t0", "first UNet call at t = -1", "dhf_cache/sources/sd/inversion.py",
      "calls = (-1, *ascending[:-1])", "calls = (0, *ascending[:-1])", FAST),
    M("inv.a_clean", "a = 1 at t = -1", "dhf_cache/sources/sd/inversion.py",
      "return 1.0 if t < 0 else self.alphas_cumprod[t]", "return self.alphas_cumprod[max(t, 0)]", FAST),
    M("inv.formula", "x_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps", "dhf_cache/sources/sd/inversion.py",
      "return math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps",
      "return math.sqrt(a_next) * x0 + (1.0 - a_next) * eps", FAST),
    M("inv.index", "call i has step index 49 - i", "dhf_cache/sources/sd/inversion.py",
      "return self.steps - 1 - step_index", "return step_index", FAST),
    M("save.steps", "saved indices 49, 45, 40, ..., 0", "dhf_cache/config.py",
      "SD15_SAVE_STEPS = (49, 45, 40,", "SD15_SAVE_STEPS = (49, 44, 40,", FAST),
    M("save.order", "stored clean first", "dhf_cache/sources/sd/extract.py",
      "self.schedule.call_of_step(step): pos for pos, step in enumerate(feature_space.save_steps)",
      "self.schedule.call_of_step(step): len(feature_space.save_steps) - 1 - pos "
      "for pos, step in enumerate(feature_space.save_steps)", FAST),
    # -- which feature maps
    M("cap.conv2", "captured tensor is the residual branch (resnet conv2 output)", "dhf_cache/sources/sd/capture.py",
      "return conv2 if isinstance(conv2, nn.Conv2d) else module", "return module", FAST),
    M("cap.up", "the 12 up-block resnets", "dhf_cache/sources/sd/capture.py",
      '"up": ("up_blocks.",),', '"up": ("mid_block.", "up_blocks."),', FAST + ["tests/test_build.py"]),
    M("layers.default", "the 12 up-block resnets by default", "dhf_cache/config.py",
      'DEFAULT_LAYERS = "up"', 'DEFAULT_LAYERS = "all"', ["tests/test_method_defaults.py"]),
    M("bytes.fp16", "156,794,880 bytes per image (fp16, native size, 11 steps)", "dhf_cache/cache/feature_cache.py",
      "len(self.timesteps) * l.channels * l.height * l.width * 2 for l", "len(self.timesteps) * l.channels * l.height * l.width * 4 for l",
      ["tests/test_disk_space.py", "tests/test_sd15_shapes.py"]),
    # -- aggregation network
    M("agg.bottleneck", "bottleneck 96 = 384 / 4", "dhf_cache/aggregator/network.py",
      "BottleneckBlock(layer.channels, projection_dim // 4, projection_dim, num_groups)",
      "BottleneckBlock(layer.channels, projection_dim // 2, projection_dim, num_groups)", ["tests/test_aggregator.py"]),
    M("agg.gn", "GroupNorm(32)", "dhf_cache/config.py",
      "= 384, 64, 32  #", "= 384, 64, 16  #", ["tests/test_aggregator.py", "tests/test_method_defaults.py"]),
    M("agg.gn_train", "GroupNorm(32) (training's default)", "dhf_cache/config.py",
      "norm_groups: int = Field(NORM_GROUPS, ge=1)", "norm_groups: int = Field(16, ge=1)",
      ["tests/test_aggregator.py", "tests/test_method_defaults.py"]),
    M("agg.gn_net", "GroupNorm(32) (the network's default)", "dhf_cache/aggregator/network.py",
      "        output_size: int = DESCRIPTOR_GRID,\n        num_groups: int = NORM_GROUPS,\n    ):\n        super().__init__()",
      "        output_size: int = DESCRIPTOR_GRID,\n        num_groups: int = 16,\n    ):\n        super().__init__()",
      ["tests/test_aggregator.py"]),
    M("agg.relu", "final ReLU after the add", "dhf_cache/aggregator/network.py",
      "return F.relu(out + identity)", "return out + identity", ["tests/test_aggregator.py"]),
    M("agg.bias", "convs without bias", "dhf_cache/aggregator/network.py",
      "self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)",
      "self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=True)", ["tests/test_aggregator.py"]),
    M("agg.msra", "MSRA init (fan_out)", "dhf_cache/aggregator/network.py",
      'nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")',
      'nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")', ["tests/test_aggregator.py"]),
    M("agg.shortcut_gn", "projection shortcut with GN", "dhf_cache/aggregator/network.py",
      "identity = self.shortcut_norm(s) if self.shortcut is not None else s", "identity = s",
      ["tests/test_aggregator.py"]),
    M("agg.resize", "inputs bilinearly resized to 64x64", "dhf_cache/aggregator/network.py",
      'return F.interpolate(t, size=size, mode="bilinear", align_corners=False)',
      'return F.interpolate(t, size=size, mode="nearest")', ["tests/test_aggregator.py"]),
    M("agg.softmax", "one softmax over all L x T weights jointly", "dhf_cache/aggregator/network.py",
      "return torch.softmax(self.mixing_weights, dim=0)",
      "return torch.softmax(self.mixing_weights.view(self.n_timesteps, -1), dim=0).flatten()",
      ["tests/test_aggregator.py"]),
    M("agg.ones", "mixing weights initialised to ones", "dhf_cache/aggregator/network.py",
      "self.mixing_weights = nn.Parameter(torch.ones(weights))",
      "self.mixing_weights = nn.Parameter(torch.zeros(weights))",
      ["tests/test_aggregator.py", "tests/test_interop.py"],
      equivalent="softmax(0) = softmax(1) and their gradients are equal: only the raw parameter differs"),
    M("agg.order", "mixing weight index t * L + l (timestep-major, as Ref)", "dhf_cache/aggregator/network.py",
      "coeffs[start:start + source.n_timesteps * len(source.layers)].view(\n                source.n_timesteps, len(source.layers))",
      "coeffs[start:start + source.n_timesteps * len(source.layers)].view(\n                len(source.layers), source.n_timesteps).t()",
      ["tests/test_aggregator.py", "tests/test_interop.py"]),
    M("agg.P", "384-channel descriptors", "dhf_cache/config.py",
      "= 384, 64, 32  #", "= 256, 64, 32  #", ["tests/test_aggregator.py", "tests/test_method_defaults.py"]),
    M("agg.P_train", "384-channel descriptors (training's default)", "dhf_cache/config.py",
      "projection_dim: int = Field(PROJECTION_DIM, ge=4)", "projection_dim: int = Field(256, ge=4)",
      ["tests/test_aggregator.py", "tests/test_method_defaults.py"]),
    M("agg.grid", "64 x 64 descriptor grid", "dhf_cache/config.py",
      "= 384, 64, 32  #", "= 384, 32, 32  #", ["tests/test_aggregator.py", "tests/test_method_defaults.py"]),
    M("agg.grid_train", "64 x 64 descriptor grid (training's default)", "dhf_cache/config.py",
      "output_size: int = Field(DESCRIPTOR_GRID, ge=1)", "output_size: int = Field(32, ge=1)",
      ["tests/test_aggregator.py", "tests/test_method_defaults.py"]),
    # -- loss and training
    M("loss.temp", "fixed temperature 0.07", "dhf_cache/aggregator/losses.py",
      "TEMPERATURE = 0.07", "TEMPERATURE = 0.1", ["tests/test_losses.py"]),
    M("loss.sym", "average of both directions", "dhf_cache/aggregator/losses.py",
      "return (loss_src + loss_trg) / 2", "return loss_src", ["tests/test_losses.py"]),
    M("loss.cos", "cosine similarity", "dhf_cache/aggregator/losses.py",
      "src = F.normalize(src_desc.reshape(p, hs * ws).t(), dim=1)", "src = src_desc.reshape(p, hs * ws).t()",
      ["tests/test_losses.py"]),
    M("kps.round", "keypoints rescaled to 64x64 and rounded", "dhf_cache/aggregator/losses.py",
      "return torch.stack([x.round(), y.round()], dim=1).long()", "return torch.stack([x.floor(), y.floor()], dim=1).long()",
      ["tests/test_losses.py", "tests/test_train.py"]),
    M("kps.scale", "keypoints rescaled from the original size to the 64 x 64 grid", "dhf_cache/aggregator/losses.py",
      "x = (pts[:, 0] * (gw / width)).clamp(0, gw - 1)", "x = (pts[:, 0] * ((gw - 1) / width)).clamp(0, gw - 1)",
      ["tests/test_losses.py", "tests/test_train.py"]),
    M("train.val_pick", "20 validation pairs per category", "pipelines/train.py",
      "picks = sorted(rng.permutation(len(items))[:per_category])", "picks = sorted(rng.permutation(len(items))[:per_category + 1])",
      ["tests/test_train.py"]),
    M("train.lr", "AdamW lr 1e-3", "dhf_cache/config.py",
      "lr: float = Field(1e-3, gt=0)", "lr: float = Field(2e-3, gt=0)", ["tests/test_method_defaults.py", "tests/test_train.py"]),
    M("train.wd", "weight decay 0", "dhf_cache/config.py",
      "weight_decay: float = Field(0.0, ge=0)", "weight_decay: float = Field(0.01, ge=0)", ["tests/test_method_defaults.py", "tests/test_train.py"]),
    M("train.adamw", "AdamW", "pipelines/train.py",
      "optimizer = torch.optim.AdamW(", "optimizer = torch.optim.Adam(", ["tests/test_train.py"]),
    M("train.steps", "5,000 steps", "dhf_cache/config.py",
      "steps: int = Field(5000, ge=1)", "steps: int = Field(4000, ge=1)", ["tests/test_method_defaults.py", "tests/test_train.py"]),
    M("train.pairs", "one pair per step", "dhf_cache/config.py",
      "pairs_per_step: int = Field(1, ge=1)", "pairs_per_step: int = Field(2, ge=1)", ["tests/test_method_defaults.py", "tests/test_train.py"]),
    M("train.seed", "a fixed permutation, seed 0", "dhf_cache/config.py",
      "    seed: int = 0\n    skip_missing", "    seed: int = 1\n    skip_missing", ["tests/test_method_defaults.py", "tests/test_train.py"]),
    M("train.val_every", "validation every 1,000 steps", "dhf_cache/config.py",
      "val_every: int = Field(1000, ge=1)", "val_every: int = Field(500, ge=1)", ["tests/test_method_defaults.py", "tests/test_train.py"]),
    M("train.val_pairs", "360 val pairs (20 per category)", "dhf_cache/config.py",
      "val_pairs_per_category: int = Field(20, ge=1)", "val_pairs_per_category: int = Field(10, ge=1)",
      ["tests/test_method_defaults.py", "tests/test_train.py"]),
    M("train.precision", "fp32 training (bf16 autocast opt-in)", "dhf_cache/config.py",
      'precision: Literal["fp32", "bf16"] = "fp32"', 'precision: Literal["fp32", "bf16"] = "bf16"',
      ["tests/test_method_defaults.py"]),
    M("train.autocast", "bf16 autocast only when asked", "pipelines/train.py",
      'enabled=precision == "bf16"', "enabled=True", ["tests/test_train.py"]),
    M("build.compile", "the UNet run as is (no torch.compile) unless asked", "dhf_cache/config.py",
      'compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"',
      'compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "default"',
      ["tests/test_method_defaults.py"]),
    M("cli.train_steps", "5,000 steps (the CLI's default)", "cli/train_cmd.py",
      'help="Optimizer steps.")] = DEFAULTS.steps', 'help="Optimizer steps.")] = 4000', ["tests/test_method_defaults.py"]),
    M("cli.train_lr", "AdamW lr 1e-3 (the CLI's default)", "cli/train_cmd.py",
      '(weight decay 0, no schedule).")] = DEFAULTS.lr', '(weight decay 0, no schedule).")] = 2e-3', ["tests/test_method_defaults.py"]),
    M("cli.build_steps", "50 inversion steps (the CLI's default)", "cli/build_cmd.py",
      'help="DDIM inversion steps.")] = DEFAULT_STEPS', 'help="DDIM inversion steps.")] = 25', ["tests/test_method_defaults.py"]),
    M("cli.build_load", "load size 512 (the CLI's default)", "cli/build_cmd.py",
      '64/224/512.")] = _PRE.load_size', '64/224/512.")] = 224', ["tests/test_method_defaults.py"]),
    M("build.steps", "50 inversion steps (the Python API's default)", "pipelines/build.py",
      "    steps: int = DEFAULT_STEPS\n", "    steps: int = 25\n", ["tests/test_method_defaults.py"]),
    M("build.layers", "the 12 up-block resnets (SD's default when --layers is not given)", "dhf_cache/config.py",
      'FAMILY_DEFAULT_LAYERS = {"sd": DEFAULT_LAYERS,', 'FAMILY_DEFAULT_LAYERS = {"sd": "all",', ["tests/test_method_defaults.py"]),
    # -- evaluation
    M("pck.le", "correct when distance <= alpha * L (inclusive)", "dhf_cache/correspondence/pck.py",
      "return np.asarray(distances) <= alpha * length", "return np.asarray(distances) < alpha * length",
      ["tests/test_pck.py"]),
    M("pck.bbox", "L = max(w, h) of the target box", "dhf_cache/correspondence/pck.py",
      "length = max(x2 - x1, y2 - y1)", "length = min(x2 - x1, y2 - y1)", ["tests/test_pck.py"]),
    M("pck.img", "L = max(W, H) of the target image", "dhf_cache/correspondence/pck.py",
      "    return max(w, h)\n", "    return min(w, h)\n", ["tests/test_pck.py"]),
    M("pck.alpha", "alpha = 0.1 among the reported thresholds", "dhf_cache/config.py",
      "PCK_ALPHAS = (0.05, 0.1, 0.15)", "PCK_ALPHAS = (0.05, 0.12, 0.15)", ["tests/test_pck.py", "tests/test_eval.py", "tests/test_method_defaults.py"]),
    M("pck.per_point", "Ref averages per point", "dhf_cache/correspondence/pck.py",
      '"per_point": correct / points if points else None,',
      '"per_point": float(np.mean(fractions)) if fractions else None,', ["tests/test_pck.py"]),
    M("eval.load", "descriptors upsampled to load size 224", "dhf_cache/config.py",
      "EVAL_LOAD_SIZE = 224", "EVAL_LOAD_SIZE = 256", ["tests/test_method_defaults.py", "tests/test_eval.py"]),
    M("eval.load_api", "load size 224 (the Python API's default)", "pipelines/evaluate.py",
      "    load_size: int = EVAL_LOAD_SIZE\n", "    load_size: int = 256\n", ["tests/test_method_defaults.py", "tests/test_eval.py"]),
    # `eval`'s matching options default to the protocol's; the paper's protocol is `dhf`
    M("protocol.load", "load size 224 (the CLI's default, through --protocol dhf)", "dhf_cache/correspondence/protocols.py",
      '"bbox", "<=", ("per_point",), "load", EVAL_LOAD_SIZE, "none"),', '"bbox", "<=", ("per_point",), "load", 256, "none"),',
      ["tests/test_method_defaults.py"]),
    M("protocol.le", "the headline counts distance <= alpha * L (inclusive)", "dhf_cache/correspondence/protocols.py",
      '"bbox", "<=", ("per_point",), "load", EVAL_LOAD_SIZE, "none"),', '"bbox", "<", ("per_point",), "load", EVAL_LOAD_SIZE, "none"),',
      ["tests/test_method_defaults.py", "tests/test_compare.py"]),
    M("protocol.per_point", "the headline averages per point (Ref)", "dhf_cache/correspondence/protocols.py",
      '"bbox", "<=", ("per_point",), "load", EVAL_LOAD_SIZE, "none"),', '"bbox", "<=", ("per_image",), "load", EVAL_LOAD_SIZE, "none"),',
      ["tests/test_method_defaults.py", "tests/test_compare.py"]),
    M("protocol.bbox", "the headline's threshold is the target box", "dhf_cache/correspondence/protocols.py",
      '"bbox", "<=", ("per_point",), "load", EVAL_LOAD_SIZE, "none"),', '"img", "<=", ("per_point",), "load", EVAL_LOAD_SIZE, "none"),',
      ["tests/test_method_defaults.py", "tests/test_compare.py"]),
    M("match.round", "source keypoints rescaled to the load size and rounded (Ref)", "dhf_cache/correspondence/matching.py",
      "return np.round(pts).astype(np.int64)", "return np.floor(pts).astype(np.int64)",
      ["tests/test_matching.py", "tests/test_scoring.py"]),
    M("match.upsample", "descriptor maps bilinearly upsampled to the load size", "dhf_cache/correspondence/matching.py",
      'up_t = F.interpolate(trg[None], size=trg_grid[::-1], mode="bilinear", align_corners=False)[0]',
      'up_t = F.interpolate(trg[None], size=trg_grid[::-1], mode="nearest")[0]', ["tests/test_matching.py", "tests/test_scoring.py"]),
    M("match.back", "predictions mapped back to the original target size", "dhf_cache/correspondence/matching.py",
      "out[valid] = from_load(load_xy.detach().cpu().double().numpy().reshape(-1, 2), load_size, trg_size, fit)",
      "out[valid] = load_xy.detach().cpu().double().numpy().reshape(-1, 2)",
      ["tests/test_matching.py", "tests/test_scoring.py"]),
    M("match.first", "hard argmax, first maximum on ties (torch's argmax)", "dhf_cache/correspondence/matching.py",
      "within = sim[torch.arange(k, device=sim.device), row].argmax(dim=1)",
      "within = (w - 1) - sim[torch.arange(k, device=sim.device), row].flip(1).argmax(dim=1)",
      ["tests/test_matching.py", "tests/test_scoring.py"]),
    # -- synthetic images
    M("gen.guidance", "guidance 7.5", "dhf_cache/config.py",
      "guidance: float = Field(7.5, ge=1.0)", "guidance: float = Field(5.0, ge=1.0)", ["tests/test_generation.py"]),
    M("cli.guidance", "guidance 7.5 (the CLI's default)", "cli/build_cmd.py",
      'guidance scale.")] = _GEN.guidance', 'guidance scale.")] = 5.0', ["tests/test_method_defaults.py"]),
    M("gen.flip", "generation's time axis flipped to clean first", "dhf_cache/sources/sd/generation.py",
      "self.save_positions = {step: pos for pos, step in enumerate(space.save_steps)}",
      "self.save_positions = {step: len(space.save_steps) - 1 - pos for pos, step in enumerate(space.save_steps)}",
      ["tests/test_generation.py"]),
    M("gen.cond", "features of the conditional branch", "dhf_cache/sources/sd/generation.py",
      "pos, len(self.save_positions), rows=slice(n, None))", "pos, len(self.save_positions), rows=slice(0, n))",
      ["tests/test_generation.py"]),
    # -- SPair layout
    M("spair.size", "imsize is [W, H, 3]", "dhf_cache/datasets/annotations.py",
      "return (int(size[0]), int(size[1]))", "return (int(size[1]), int(size[0]))", ["tests/test_datasets.py"]),
    M("spair.layout", "pairs listed in Layout/large/<split>.txt", "dhf_cache/datasets/spair.py",
      'layout = self.root / "Layout" / "large" / f"{split}.txt"', 'layout = self.root / "Layout" / "small" / f"{split}.txt"',
      ["tests/test_datasets.py"]),
]


def run_one(m: Mutation, python: str, timeout: int) -> tuple[str, str, float]:
    path = ROOT / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        return "stale", f"snippet found {count} times in {m.path}", 0.0
    start = time.perf_counter()
    try:
        path.write_text(text.replace(m.old, m.new))
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *m.tests]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed", f"timed out after {timeout} s", time.perf_counter() - start
    finally:
        path.write_text(text)
    took = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "SURVIVED", "all listed tests passed", took
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    if failed:
        return "killed", failed[0], took
    last = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["?"]
    return "killed", f"pytest exit {proc.returncode}: {last[0][:120]}", took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation ids")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per mutation run")
    args = parser.parse_args()
    chosen = MUTATIONS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.id for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutation ids: {sorted(unknown)}")
        chosen = [m for m in MUTATIONS if m.id in wanted]
    if args.list:
        for m in chosen:
            print(f"{m.id:20s} {m.claim}  ({m.path})")
        return 0
    rows = ["| id | METHOD.md | file | outcome | first failing test |", "|---|---|---|---|---|"]
    survivors = 0
    for m in chosen:
        outcome, detail, took = run_one(m, sys.executable, args.timeout)
        if outcome == "SURVIVED" and m.equivalent:
            outcome, detail = "equivalent", m.equivalent
        survivors += outcome in ("SURVIVED", "stale")
        print(f"{m.id:20s} {outcome:10s} {took:6.1f} s  {detail}", flush=True)
        rows.append(f"| {m.id} | {m.claim} | {m.path} | {outcome} | {detail} |")
    table = "\n".join(rows) + "\n"
    if args.out:
        args.out.write_text(table)
    print()
    print(table)
    print(f"{len(chosen)} mutations, {survivors} survived or stale")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
