"""Datasets: where images (and keypoint pairs) come from."""

from dhf_cache.datasets.base import Dataset, ImageRecord, PairRecord, open_dataset, safe_join

__all__ = ["Dataset", "ImageRecord", "PairRecord", "open_dataset", "safe_join"]
