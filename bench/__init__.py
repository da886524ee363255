"""keyplane benchmarks: run each with ``python -m bench.<name>`` (see docs/benchmarks.md)."""
