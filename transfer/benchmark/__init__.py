"""The benchmark pipeline: one command from a teacher to the paper's tables (tools/benchmark.py)."""
