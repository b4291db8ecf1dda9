"""The feature cache (docs/cache-format.md): its format and sources, chunk reads and writes, the
layer table kept with the features, fingerprints, verify and migrate, and the descriptor sets
stored beside the features.

Stage two and three read only this package (and the aggregator's): nothing here imports a model
library or a source's stage-one code.
"""
