"""Benchmarks for undying. Run ``python -m bench.checkpoint``; see bench/README.md."""
