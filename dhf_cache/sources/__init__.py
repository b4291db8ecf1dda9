"""Feature sources: the models whose maps a cache stores (one module per family)."""
