"""Benchmarks, each against a baseline measured in the same run: ``python -m bench.NAME`` from the repo root."""
