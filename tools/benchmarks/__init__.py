"""Benchmark subcommands of tools/bench.py, one module each."""
