"""Stage three: descriptors from cached maps, METHOD.md's matching and PCK scoring."""
