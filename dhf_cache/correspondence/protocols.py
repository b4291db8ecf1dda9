"""The published evaluation protocols `eval --protocol` reproduces: how each code base matches and
which convention (conventions.py) its headline number is.

Each entry was written from the evaluation code it names (docs/evaluation.md quotes the lines).
What is not reproduced is said there too: SD+DINO predicts patch centres of a 60 x 60 grid
where this tool takes the argmax of the bilinearly upsampled similarity; GeoAware-SC keeps the
pixels outside its soft-argmax window in the softmax at similarity 0; HPF downsizes only images
larger than 300 px.
"""

from __future__ import annotations

from dataclasses import dataclass

from dhf_cache.config import EVAL_LOAD_SIZE
from dhf_cache.errors import UsageError


@dataclass(frozen=True)
class Protocol:
    name: str
    code: str  # the public code whose formula this is
    base: str  # threshold base (pck.BASES), or "dataset": the data set's default_threshold
    inequality: str  # "<=" or "<"
    averagings: tuple[str, ...]  # the numbers that code reports, the headline first
    match_at: str  # matching.MATCH_AT
    load_size: int  # the matching grid's side (load square) or long side (square); unused by "original"
    refine: str  # "none" or "window-softargmax"
    alpha: float = 0.1

    def threshold_base(self, dataset_default: str) -> str:
        return dataset_default if self.base == "dataset" else self.base

    def matching(self) -> dict:
        return {"match_at": self.match_at, "load_size": self.load_size, "refine": self.refine}


PROTOCOLS = {
    p.name: p for p in (
        # Ref: archs/correspondence_utils.py compute_pck, train_hyperfeatures.py validate: both
        # numbers pooled over every point; the paper's test at load 224 (METHOD.md)
        Protocol("dhf", "diffusion-hyperfeatures/diffusion_hyperfeatures archs/correspondence_utils.py",
                 "bbox", "<=", ("per_point",), "load", EVAL_LOAD_SIZE, "none"),
        # DIFT eval_spair.py: features upsampled to each image's own size, `<=`; "per image" is the
        # mean over all pairs, "per point" pooled
        Protocol("dift", "Tsingularity/dift eval_spair.py", "bbox", "<=", ("per_image", "per_point"),
                 "original", EVAL_LOAD_SIZE, "none"),
        # SD+DINO pck_spair_pascal.py: aspect-preserving padded square of side 840, strict `<`,
        # the threshold scaled with the image (SPair: the bbox, PF-PASCAL: the image); "Average" =
        # mean over categories of pooled per-category PCK, "Weighted" = the same weighted by pairs
        Protocol("sd-dino", "Junyi42/sd-dino pck_spair_pascal.py", "dataset", "<",
                 ("per_category_per_point", "per_category_weighted"), "square", 840, "none"),
        # GeoAware-SC pck_train.py: the same square and thresholds (AP-10K: the bbox), window
        # soft-argmax (SOFT_EVAL), strict `<`; per-category per-image PCK weighted by pairs, i.e.
        # the mean over pairs
        Protocol("geoaware", "Junyi42/GeoAware-SC pck_train.py", "dataset", "<", ("per_image", "per_point"),
                 "square", 840, "window-softargmax"),
        # HPF model/evaluation.py: the threshold base of each benchmark (PF-PASCAL: image,
        # PF-WILLOW: keypoint box, SPair: bbox), `<=`, mean over pairs; images at long side 300
        Protocol("hpf", "juhongm999/hpf model/evaluation.py", "dataset", "<=", ("per_image",),
                 "square", 300, "none"),
    )
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UsageError(f"--protocol {name!r}: unknown; use one of {', '.join(PROTOCOLS)}") from None
