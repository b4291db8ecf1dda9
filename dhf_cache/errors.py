"""One error root for everything the user can fix; the CLI prints these without a traceback.

Each message names the bad value and says what to do about it.
"""

from __future__ import annotations


def invalid_values(exc: Exception) -> str:
    """A pydantic ValidationError as `--option VALUE: reason` per bad field, on one line.

    pydantic's own text spans lines and ends in a documentation URL: not a message for a user
    who typed `--lr -1`. Field names map to the CLI's option names (`val_every` -> `--val-every`);
    model-level checks have no field and keep only their reason.
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors():
        reason = str(error.get("msg", "")).removeprefix("Value error, ")
        loc = [str(part) for part in error.get("loc", ())]
        if loc:
            parts.append(f"--{loc[-1].replace('_', '-')} {error.get('input')!r}: {reason}")
        else:
            parts.append(reason)
    return "; ".join(parts) or str(exc)


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's
    name when it has none: what one-line errors quote of a library's multi-line message."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


class DhfCacheError(Exception):
    """Root of every error dhf-cache reports to a user."""

    exit_code = 1


class UsageError(DhfCacheError):
    """An option or argument has a value that cannot work."""

    exit_code = 2


class ModelNotFoundError(DhfCacheError):
    """`--model` names neither a local directory nor a model in the Hugging Face cache."""


class DatasetError(DhfCacheError):
    """A dataset folder or annotation file is missing or malformed."""


class ImageError(DhfCacheError):
    """One image cannot be used; recorded as a failure and the build goes on."""


class FeatureError(DhfCacheError):
    """Features of one image cannot be stored faithfully (e.g. fp16 overflow)."""


class CacheError(DhfCacheError):
    """A cache is missing, unreadable, or not a dhf-cache store."""


class SpecMismatchError(CacheError):
    """A cache was built with a different spec than the one asked for."""

    def __init__(self, message: str, differences: list[str]):
        super().__init__(message)
        self.differences = differences


class StorageError(CacheError):
    """The storage behind a cache failed (I/O error, unreachable or timed-out object store)."""


class CheckpointError(DhfCacheError):
    """A checkpoint is missing, unreadable, or does not fit the cache or run it is used with."""


class ReferenceCheckpointError(CheckpointError):
    """A released reference checkpoint cannot be read or does not fit the layer table."""


class TrainingError(DhfCacheError):
    """Training cannot start or go on (missing images, non-finite loss, ...)."""


class EvaluationError(DhfCacheError):
    """Evaluation cannot run as asked (missing images, unknown raw layer, ...)."""
