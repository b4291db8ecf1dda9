"""Stage two: the aggregation network of METHOD.md (one or several sources), its loss, its
checkpoints and the import of the authors' released weights."""
