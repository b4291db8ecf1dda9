"""The `dhf-cache` command line: parses options into typed configs and calls pipelines."""
