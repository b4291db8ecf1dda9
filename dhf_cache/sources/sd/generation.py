"""Generation-mode hyperfeatures: features captured while *generating* an image (METHOD.md).

The DDIM generation pass runs from noise to image with classifier-free guidance (a negative
prompt as the unconditional branch), with the same scheduler settings as the inversion. The
same layers are captured from the conditional half of each guided call at the same step
indices; generation call i has step index i (S - 1 = the last, cleanest call at t = 0), so
storing by the spec's save steps (clean first) flips the generation's time axis into the
inversion's order. The generated image is stored with its prompt and seed.
"""

from __future__ import annotations

import numpy as np
import torch

from dhf_cache.config import GenerationSpec
from dhf_cache.sources.sd.extract import ExtractedImage, FeatureExtractor, image_seed, nonfinite_reasons, store_outputs
from dhf_cache.sources.sd.inversion import noise_estimate


class FeatureGenerator:
    """Generates images from prompts and captures the extractor's layers on the way."""

    def __init__(self, extractor: FeatureExtractor, spec: GenerationSpec):
        from diffusers import DDIMScheduler

        self.extractor = extractor
        self.spec = spec
        space = extractor.space
        scheduler = DDIMScheduler(
            num_train_timesteps=space.scheduler.num_train_timesteps, beta_start=space.scheduler.beta_start,
            beta_end=space.scheduler.beta_end, beta_schedule=space.scheduler.beta_schedule,
            steps_offset=space.scheduler.steps_offset, timestep_spacing=space.scheduler.timestep_spacing,
            clip_sample=False, set_alpha_to_one=False,
        )
        scheduler.set_timesteps(space.steps)
        self.scheduler = scheduler
        self.call_timesteps = [int(t) for t in scheduler.timesteps]  # noisy first: 980, 960, ..., 0
        self.save_positions = {step: pos for pos, step in enumerate(space.save_steps)}
        self.negative_embedding = extractor.encode_prompt(spec.negative_prompt)

    @property
    def timesteps(self) -> list[int]:
        """UNet t of each stored step, clean first (e.g. 0, 80, ..., 980 for 50 steps)."""
        return [self.call_timesteps[s] for s in self.extractor.space.save_steps]

    @torch.inference_mode()
    def generate(self, prompts: list[str], seed_keys: list[str]) -> list[ExtractedImage]:
        """One image per prompt; each image's noise comes from its own generator seeded by
        (seed, seed key), so an image depends only on its prompt, variant and seed."""
        ex = self.extractor
        unet, vae = ex.backbone.unet, ex.backbone.vae
        n = len(prompts)
        cond = torch.cat([ex.encode_prompt(p) for p in prompts])
        embeddings = torch.cat([self.negative_embedding.expand(n, -1, -1), cond])
        side = ex.preprocessing.image_size // ex.vae_factor
        shape = (unet.config.in_channels, side, side)
        seeds = [image_seed(ex.preprocessing.seed, key) for key in seed_keys]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        x = noise.to(ex.device) * self.scheduler.init_noise_sigma
        buffers: dict[str, torch.Tensor] = {}
        for i, t in enumerate(self.call_timesteps):
            pos = self.save_positions.get(i)
            ex.capture.enabled = pos is not None
            both = noise_estimate(ex.unet_output(torch.cat([x, x]), t, embeddings), torch.cat([x, x]).float(),
                                  float(self.scheduler.alphas_cumprod[t]), ex.prediction_type)
            eps_uncond, eps_cond = both.chunk(2)
            eps = eps_uncond + self.spec.guidance * (eps_cond - eps_uncond)
            outputs = ex.capture.after_call(saved=pos is not None)
            if outputs is not None:  # the conditional half of the guided call
                store_outputs(buffers, outputs, pos, len(self.save_positions), rows=slice(n, None))
            x = self.scheduler.step(eps, t, x).prev_sample
        ex.capture.enabled = False
        decoded = vae.decode((x / ex.scaling_factor).to(ex.dtype)).sample.float()
        images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        bad = nonfinite_reasons(buffers, ex.space.layers, self.timesteps)
        features = {name: buffers[name].cpu() for name in ex.space.layers}
        return [
            ExtractedImage(
                latent=noise[b].numpy(), features={k: v[b].numpy() for k, v in features.items()},
                error=bad.get(b), image=np.ascontiguousarray(images[b]), prompt=prompts[b], seed=seeds[b],
            )
            for b in range(n)
        ]
