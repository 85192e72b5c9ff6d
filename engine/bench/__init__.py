"""Benchmarks (`python -m engine.bench`, `-m engine.bench.search`, `-m engine.bench.asymmetric`)."""
