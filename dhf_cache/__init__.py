"""dhf-cache: Diffusion Hyperfeatures with a Zarr feature cache.

Stage one (build) inverts each image once and stores every layer x timestep feature map;
stages two and three (train, eval) read arrays only and never import diffusers.
"""

__version__ = "0.1.0"
