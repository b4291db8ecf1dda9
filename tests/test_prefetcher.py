"""The training/eval loader's read-ahead: order, concurrency, errors, and its default width."""

from __future__ import annotations

import threading
import time

import pytest

from dhf_cache.errors import UsageError
from dhf_cache.cache.feature_loader import Prefetcher, default_loader_workers, usable_cores


def test_results_come_in_order_whatever_finishes_first():
    def slow_first(i):
        time.sleep(0.02 * (5 - i % 5))  # early items take longest
        return i * i

    assert list(Prefetcher(slow_first, range(20), depth=6, workers=4)) == [i * i for i in range(20)]


def test_every_worker_reads_at_once_when_depth_allows():
    running, peak, lock = 0, 0, threading.Lock()
    release = threading.Event()

    def read(i):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if peak >= 4:
                release.set()
        release.wait(0.5)  # hold until all four are in flight (or give up)
        with lock:
            running -= 1
        return i

    assert list(Prefetcher(read, range(8), depth=6, workers=4)) == list(range(8))
    assert peak == 4


def test_an_error_in_a_read_reaches_the_consumer():
    def read(i):
        if i == 3:
            raise OSError("chunk 3 unreadable")
        return i

    seen = []
    with pytest.raises(OSError, match="chunk 3"):
        for value in Prefetcher(read, range(10), depth=4, workers=2):
            seen.append(value)
    assert seen == [0, 1, 2]


def test_wait_time_is_what_the_consumer_spent_blocked():
    prefetcher = Prefetcher(lambda i: time.sleep(0.05) or i, range(4), depth=1, workers=1)
    assert list(prefetcher) == [0, 1, 2, 3]
    assert 0.15 <= prefetcher.wait_seconds < 1.0  # nothing overlaps a consumer that does no work


def test_default_width_is_half_the_cores_within_2_to_8():
    assert default_loader_workers() == max(2, min(8, usable_cores() // 2))
    with pytest.raises(UsageError):
        Prefetcher(lambda i: i, range(2), depth=0, workers=1)
