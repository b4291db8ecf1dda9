"""Feature sources: the models whose maps a cache stores (one module per family).

Every family's stage-one extractor offers the same interface, which the build loop, dask
workers and `layer_table` use without knowing the family:

    preprocessing               the cache's Preprocessing (load and input sizes, seed)
    timesteps                   the stored time axis (UNet t, clean first; [0] without one)
    latent_shape                what each image stores beside its maps (None: nothing)
    preprocess(image)           one loaded PIL image -> the model's input tensor (3, S, S)
    extract(pixels, image_ids)  a batch -> one `extract.ExtractedImage` per image: its maps
                                {layer: (T, C, H, W) float16} and why it cannot be stored, if so
    layer_table()               the `LayerInfo` (name, channels, height, width) of each map

SD 1.x/2.x: `dhf_cache.sources.sd.extract.FeatureExtractor` (the UNet called in one place, `unet_output`,
by inversion, generation and the layer table); SDXL: `sdxl.sdxl_extractor_class()`, the same
inversion with SDXL's conditioning; DINOv2: `dinov2.Dinov2Extractor`.
"""
