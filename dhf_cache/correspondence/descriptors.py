"""Descriptor maps per image: from an aggregator over cached features, or a raw cached map.

A provider is a callable `image_id -> (P, h, w) float32 CPU tensor`. `LRUDescriptors` keeps a
bounded number of them, so scoring pairs grouped by image computes each image once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from dhf_cache.aggregator.network import AggregationNetwork
from dhf_cache.cache.feature_loader import FeatureReader

DescriptorFn = Callable[[str], torch.Tensor]


class LRUDescriptors:
    """Memoises a provider for the `capacity` most recently used images; counts computations."""

    def __init__(self, compute: DescriptorFn, capacity: int = 64):
        self.compute = compute
        self.capacity = max(1, capacity)
        self.computed = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, image_id: str) -> torch.Tensor:
        if image_id in self._items:
            self._items.move_to_end(image_id)
            return self._items[image_id]
        value = self.compute(image_id)
        self.computed += 1
        self._items[image_id] = value
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value


@torch.no_grad()
def aggregate(network: AggregationNetwork, features: dict[str, torch.Tensor], device) -> torch.Tensor:
    """One image's descriptor map (P, S, S) from its cached maps {layer: (T, C, H, W)}."""
    batch = {name: tensor[None].to(device, non_blocking=True) for name, tensor in features.items()}
    return network(batch)[0].float().cpu()


def network_descriptors(network: AggregationNetwork, reader: FeatureReader, index_of: dict[str, int],
                        device) -> DescriptorFn:
    """Descriptors computed by `network` from the cached features of each image."""

    def compute(image_id: str) -> torch.Tensor:
        was_training = network.training
        network.eval()
        try:
            return aggregate(network, reader.read(index_of[image_id]), device)
        finally:
            network.train(was_training)

    return compute
