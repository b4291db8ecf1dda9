"""A plain diffusers inversion loop, written as a user would write it without dhf-cache.

The baseline that `build_overhead.py --whole-process` runs as its own process, in the
environment it was given (no OpenMP setting, nothing of dhf-cache imported): load the pipeline
with `from_pretrained`, then per batch of images PIL-resize, VAE-encode, sample the latent and
make the same UNet calls as METHOD.md's inversion (t = -1 first, a = 1 there), keeping nothing.
It prints one JSON line: wall time of the whole process and of its parts.

    python bench/plain_build.py MODEL_DIR IMAGE [IMAGE ...] --size 64 --steps 50 --batch-size 1
"""

import argparse
import json
import math
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

IMPORTED = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    unet, vae = pipe.unet.eval(), pipe.vae.eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=0,
                          clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(args.steps)
    ascending = sorted(int(t) for t in sched.timesteps)
    alphas = sched.alphas_cumprod
    with torch.no_grad():
        ids = pipe.tokenizer("", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        prompt = pipe.text_encoder(ids)[0]
    loaded = time.perf_counter()

    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        pixels = []
        for path in paths:
            im = Image.open(path).convert("RGB").resize((args.size, args.size), Image.BILINEAR)
            pixels.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        with torch.no_grad():
            x = vae.encode(torch.stack(pixels)).latent_dist.sample() * vae.config.scaling_factor
            emb = prompt.expand(len(paths), -1, -1)
            for t, t_next in zip([-1, *ascending[:-1]], ascending):
                eps = unet(x, t, encoder_hidden_states=emb).sample
                a_t = 1.0 if t < 0 else float(alphas[t])
                a_next = float(alphas[t_next])
                x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
                x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    end = time.perf_counter()
    print(json.dumps({"import_s": IMPORTED - START, "load_s": loaded - IMPORTED, "loop_s": end - loaded,
                      "process_s": end - START, "images": len(args.images), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
