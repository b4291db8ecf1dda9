"""Fingerprints: stable, sensitive to every set field, blind to unset optional ones."""

from __future__ import annotations

from dhf_cache.config import BuildSpec, CodecSpec, FeatureSpace, ModelIdentity, StorageSpec
from dhf_cache.cache.fingerprint import canonical_json, spec_differences, spec_fingerprints


def _spec(**space) -> BuildSpec:
    model = ModelIdentity(unet_class="UNet2DConditionModel", unet_sha256="a" * 64, vae_sha256="b" * 64,
                          text_encoder_sha256="c" * 64)
    return BuildSpec(feature_space=FeatureSpace(model=model, layers=["up_blocks.1.resnets.0"], **space))


def test_unset_optional_fields_do_not_change_the_fingerprint():
    """A spec written before an optional field existed hashes like today's spec with it unset."""
    spec = _spec()
    dumped = spec.model_dump(mode="json")
    assert dumped["feature_space"]["generation"] is None and dumped["storage"]["codec"]["keepbits"] is None
    older = {**dumped, "feature_space": {k: v for k, v in dumped["feature_space"].items() if k != "generation"}}
    assert canonical_json(older) == canonical_json(spec)
    assert spec_differences(older, spec) == []


def test_every_set_field_changes_its_part_of_the_fingerprint():
    base = spec_fingerprints(_spec())
    steps = spec_fingerprints(_spec(steps=10, save_steps=[9, 5, 0]))
    assert steps["feature_space"] != base["feature_space"] and steps["preprocessing"] == base["preprocessing"]
    lossy = spec_fingerprints(_spec().model_copy(update={"storage": StorageSpec(codec=CodecSpec(name="bitround",
                                                                                                keepbits=5))}))
    assert lossy["feature_space"] == base["feature_space"] and lossy["spec"] != base["spec"]
    assert spec_fingerprints(_spec()) == base  # deterministic
