"""The stages as orchestration over the dhf_cache library: build, train, evaluate."""
