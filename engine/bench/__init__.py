"""Benchmarks (`python -m engine.bench`, `-m engine.bench.search`, `-m engine.bench.asymmetric`,
`-m engine.bench.k_reciprocal`)."""
