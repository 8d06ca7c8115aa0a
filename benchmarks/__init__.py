"""lungzarr benchmarks: ``python -m benchmarks --help`` (not part of the installed package)."""
