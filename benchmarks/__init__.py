"""Benchmarks: `python -m benchmarks.intake` and `python -m benchmarks.worker` (figures in docs/benchmarks.md)."""
