"""Stable Diffusion 1.x/2.x as a source: loading and identity, DDIM inversion (epsilon and v
prediction), the resnet hooks, the batched extractor, generation mode and the tiny model."""
