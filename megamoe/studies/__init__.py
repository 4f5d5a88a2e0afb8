"""Measurements of megamoe, not part of a training run (L5): benchmarks of the MoE layers against their GEMM floor
and peer libraries (bench*.py, tools/bench_*.py) and the variant comparison (compare*.py, tools/compare_variants.py)."""
