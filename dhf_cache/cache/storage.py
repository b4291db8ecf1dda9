"""Turning a cache URL (local path, file://, s3://, any fsspec URL) into a Zarr store."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dhf_cache.errors import StorageError, UsageError


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser()


IO_TIMEOUT_ENV = "DHF_CACHE_IO_TIMEOUT"


def io_timeout() -> float:
    """Seconds any one object-store operation may take (env DHF_CACHE_IO_TIMEOUT, default 300)."""
    try:
        return float(os.environ.get(IO_TIMEOUT_ENV, "300"))
    except ValueError:
        raise UsageError(f"{IO_TIMEOUT_ENV}={os.environ[IO_TIMEOUT_ENV]!r}: expected seconds, e.g. 300") from None


def storage_exceptions() -> tuple[type[BaseException], ...]:
    """Errors that mean the storage failed (not a bug): I/O, timeouts, object-store clients."""
    kinds: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        kinds += [BotoCoreError, ClientError]
    except ImportError:
        pass
    return tuple(kinds)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options` JSON (an object), e.g. '{"endpoint_url": "http://127.0.0.1:9000"}'."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--storage-options is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--storage-options must be a JSON object, got {text!r}")
    return value


def run_bounded(coroutine, timeout: float | None, what: str = "an object-store operation"):
    """Run a coroutine in zarr's event loop and wait for it; with a timeout (remote stores),
    cancel it after `timeout` seconds and raise StorageError. zarr's own calls are bounded by
    its `async.timeout` (set in open_store), but only by abandoning the coroutine; ours are
    cancelled, so a frozen server leaves no request behind."""
    import asyncio

    from zarr.core.sync import sync

    if timeout is None:
        return sync(coroutine)

    async def bounded():
        return await asyncio.wait_for(coroutine, timeout)

    try:
        return sync(bounded())
    except (asyncio.TimeoutError, TimeoutError):
        raise StorageError(f"{what} got no answer within {timeout:g} s ({IO_TIMEOUT_ENV}): the storage server is "
                           "unreachable or frozen. Finished work is kept; rerun the same command when it answers.") from None


def bounded_client_options(url: str, storage_options: dict[str, Any], timeout: float) -> dict[str, Any]:
    """storage_options with the S3 client's connect/read timeouts and retries bounded, unless the
    user set them: botocore's defaults retry a refused connection with back-off and wait 60 s per
    read, and a frozen server then holds a build far longer than the configured timeout."""
    if not url.startswith(("s3://", "s3a://")):
        return storage_options
    options = dict(storage_options)
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", min(timeout, 10.0))
    config.setdefault("read_timeout", timeout)
    config.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
    options["config_kwargs"] = config
    return options


def open_store(url: str, storage_options: dict[str, Any] | None = None, read_only: bool = False,
               create: bool = True):
    """A zarr store for `url`; local paths use zarr's LocalStore (atomic temp + rename writes).
    `create=False` refuses a local path that does not exist instead of creating its folder.
    Every operation on a remote store is bounded by io_timeout() (run_bounded, zarr's
    async.timeout, the client's own timeouts)."""
    from zarr.storage import FsspecStore, LocalStore

    if is_local(url):
        if storage_options:
            raise UsageError("--storage-options only applies to remote URLs such as s3://bucket/cache")
        path = local_path(url)
        if (read_only or not create) and not path.exists():  # LocalStore would create the folder
            raise StorageError(f"{url}: no such cache (the folder does not exist)")
        return LocalStore(path, read_only=read_only)
    import zarr

    # Bound every object-store operation: a frozen server would otherwise hang a PUT forever.
    timeout = io_timeout()
    zarr.config.set({"async.timeout": timeout})
    try:
        return FsspecStore.from_url(url, storage_options=bounded_client_options(url, storage_options or {}, timeout),
                                    read_only=read_only)
    except ImportError as exc:
        raise UsageError(f"{url}: the filesystem for this URL is not installed ({exc})") from None
    except ValueError as exc:
        raise UsageError(f"{url}: not a usable storage URL ({exc})") from None


def store_timeout(url: str) -> float | None:
    """How long one operation on this cache's store may take: None for local disks."""
    return None if is_local(url) else io_timeout()


def stored_bytes(store, prefix: str = "", timeout: float | None = None) -> int:
    """Bytes stored under `prefix` (all chunk and metadata objects)."""
    if hasattr(store, "root") and isinstance(getattr(store, "root", None), Path):
        root = store.root / prefix if prefix else store.root
        total = 0
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if not name.endswith(".partial"):
                    total += os.path.getsize(os.path.join(dirpath, name))
        return total
    return int(run_bounded(store.getsize_prefix(prefix), timeout, f"listing {prefix or 'the cache'}"))


@contextlib.contextmanager
def coordinator_lock(url: str) -> Iterator[None]:
    """Serialise cache creation between processes on one filesystem (e.g. `--shard` jobs that
    start together): an exclusive flock on `<cache>.lock` beside the cache. Object stores have
    no such lock; there, run one build (or `build --prepare-only`) before starting shards."""
    if not is_local(url):
        yield
        return
    import fcntl

    path = local_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
