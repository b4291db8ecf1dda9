"""Fingerprints of specs and a readable list of how two specs differ.

A fingerprint is the sha256 of the canonical JSON (sorted keys, no spaces) of a spec, so it is
stable across Python versions, key order and processes. Fields whose value is None (unset
options) are left out, so adding an optional field in a later version keeps every existing
cache's and checkpoint's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def without_unset(value: Any) -> Any:
    """`value` with every None-valued dict entry removed, recursively."""
    if isinstance(value, dict):
        return {k: without_unset(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_unset(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(without_unset(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_of(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("ascii")).hexdigest()


def spec_fingerprints(spec: BaseModel) -> dict[str, str]:
    """The two-part fingerprint of DESIGN.md plus one over the whole spec.

    `feature_space` is what a checkpoint binds to; `preprocessing` differs between caches of
    the same space built at another load size; `spec` identifies the cache's full recipe.
    """
    data = spec.model_dump(mode="json")
    return {
        "feature_space": sha256_of(data["feature_space"]),
        "preprocessing": sha256_of(data["preprocessing"]),
        "spec": sha256_of(data),
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            if sub is not None:  # unset, as in a spec written before the field existed
                out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def spec_differences(have: Any, want: Any) -> list[str]:
    """Lines like `feature_space.steps: cache has 50, requested 10`, one per differing field."""
    if isinstance(have, BaseModel):
        have = have.model_dump(mode="json")
    if isinstance(want, BaseModel):
        want = want.model_dump(mode="json")
    a, b = _flatten(have), _flatten(want)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: cache has {a.get(key, '<absent>')!r}, requested {b.get(key, '<absent>')!r}")
    return lines
