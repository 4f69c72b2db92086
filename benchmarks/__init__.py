"""Benchmark suites of cos_kernels (pytest-benchmark) and the report generator (python -m benchmarks.report)."""
