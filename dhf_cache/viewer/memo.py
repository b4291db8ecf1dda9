"""A thread-safe least-recently-used memory of computed values, bounded in bytes.

The server computes on a small thread pool, so two requests may ask for the same value at once:
both compute it and the second result replaces the first (same value, nothing lost). Values are
never written anywhere but here: the viewer keeps what it computes in memory only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch


def size_of(value: Any) -> int:
    """Bytes a value holds (tensors, arrays, bytes, and tuples or objects of them; 1 otherwise)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (tuple, list)):
        return sum(size_of(v) for v in value) or 1
    if hasattr(value, "__dict__"):
        return sum(size_of(v) for v in vars(value).values()) or 1
    return 1


class Memo:
    """`get(key, compute)`: the value kept for key, else compute() kept; least recently used
    values leave first once more than `max_bytes` are held (one value larger than that is
    returned without being kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(1, int(max_bytes))
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = compute()  # outside the lock: other keys are served meanwhile
        size = size_of(value)
        with self._lock:
            if size > self.max_bytes:
                return value
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
